"""The world's metrics: one small CNN (the *judge*), trained on renders only, that reads every
attribute of a world image. Two instruments are made of it:

- the **identity encoder**: the identity heads' class probabilities, each centred on chance and
  scaled to unit length per attribute, concatenated and L2-normalised. Two images of one person score
  ~1, two random people ~0 (the expected cosine of independent attributes is exactly 0). It is
  differentiable, so it also serves as the identity loss's network (`--identity-model world`);
- the **context classifier**: the context heads' argmax, which says which of a prompt's context
  attributes an image shows (world T-Sim = the fraction shown).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from .attributes import CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES

ALL_ATTRIBUTES = IDENTITY_ATTRIBUTES + CONTEXT_ATTRIBUTES


class WorldJudge(nn.Module):
    """(B, 3, 64, 64) RGB in [−1, 1] → one logit vector per world attribute."""

    def __init__(self, width: int = 32, resolution: int = 64):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]  # each a stride-2 3x3 convolution: 64² -> 4²
        layers = []
        for i in range(len(chans) - 1):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, 2, 1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        side = resolution // 16
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * side * side, 256), nn.ReLU())
        self.heads = nn.ModuleDict({a.name: nn.Linear(256, a.size) for a in ALL_ATTRIBUTES})
        self.resolution = resolution

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution,) * 2, mode="bilinear", align_corners=False,
                                   antialias=True)
        features = self.neck(self.trunk(images))
        return {name: head(features) for name, head in self.heads.items()}


class WorldIdentityEncoder(nn.Module):
    """An `IdentityEncoder` of the world: (B, 3, H, W) RGB in [−1, 1] → (B, D) unit vectors."""

    def __init__(self, judge: WorldJudge):
        super().__init__()
        self.judge = judge.eval().requires_grad_(False)
        self.input_size = judge.resolution
        self.embedding_dim = sum(a.size for a in IDENTITY_ATTRIBUTES)

    def train(self, mode: bool = True) -> "WorldIdentityEncoder":
        return super().train(False)  # BatchNorm statistics stay the judge's

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.judge(images.to(next(self.judge.parameters()).dtype))
        return identity_embedding({a.name: logits[a.name].float() for a in IDENTITY_ATTRIBUTES})


def identity_embedding(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per identity attribute: softmax − 1/k, scaled so a one-hot has unit length; concatenated, L2-normalised."""
    blocks = []
    for attribute in IDENTITY_ATTRIBUTES:
        k = attribute.size
        blocks.append((logits[attribute.name].softmax(-1) - 1 / k) / math.sqrt(1 - 1 / k))
    return F.normalize(torch.cat(blocks, dim=-1), dim=-1)


def context_predictions(judge: WorldJudge, images: torch.Tensor) -> dict[str, list[str]]:
    """The context value the judge reads in each image, per context attribute."""
    with torch.no_grad():
        logits = judge(images)
    return {a.name: [a.values[i] for i in logits[a.name].argmax(-1).tolist()] for a in CONTEXT_ATTRIBUTES}


# --------------------------------------------------------------------------------------------------
# training (on renders only)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What separates a generated image from a render: blur, noise, small colour shifts."""
    B = images.shape[0]
    sigma = torch.rand(B, generator=generator) * 1.5
    blurred = torch.stack([_blur(img, float(s)) for img, s in zip(images, sigma)])
    gain = 1 + 0.1 * (torch.rand(B, 3, 1, 1, generator=generator) * 2 - 1)
    bias = 0.08 * (torch.rand(B, 3, 1, 1, generator=generator) * 2 - 1)
    noise = torch.randn(images.shape, generator=generator) * torch.rand(B, 1, 1, 1, generator=generator) * 0.08
    return (blurred * gain + bias + noise).clamp(-1, 1)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.2:
        return image
    radius = max(1, int(math.ceil(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = F.conv2d(F.pad(image[None], (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return out[0]


def train_judge(images: np.ndarray, labels: np.ndarray, steps: int = 3000, batch: int = 64, lr: float = 2e-3,
                seed: int = 0, progress=None, start: WorldJudge | None = None) -> WorldJudge:
    """Train on renders: images (N, 64, 64, 3) uint8, labels (N, A) in ALL_ATTRIBUTES' order. `start`:
    a judge to continue from (a second cosine cycle, at `lr`)."""
    torch.manual_seed(seed)
    judge = (start or WorldJudge()).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    lr_at = lambda s: lr * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    generator = torch.Generator().manual_seed(seed)
    labels = torch.from_numpy(labels.astype(np.int64))
    for step in range(steps):
        index = torch.randint(len(images), (batch,), generator=generator)
        x = torch.from_numpy(images[index.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1
        logits = judge(augment(x, generator))
        loss = sum(F.cross_entropy(logits[a.name], labels[index, i]) for i, a in enumerate(ALL_ATTRIBUTES))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, loss.item())
    return judge.eval().requires_grad_(False)


# the shipped judge's training: two cosine cycles of (steps, learning rate, seed), batches of 64
JUDGE_SCHEDULE = ((2000, 2e-3, 0), (2500, 7e-4, 1))


def train_judge_schedule(images: np.ndarray, labels: np.ndarray, schedule=JUDGE_SCHEDULE, progress=None) -> WorldJudge:
    """The judge as shipped: `train_judge` once per cycle of `schedule`, each continuing the last."""
    judge = None
    for steps, lr, seed in schedule:
        judge = train_judge(images, labels, steps=steps, lr=lr, seed=seed, progress=progress, start=judge)
    return judge


# --------------------------------------------------------------------------------------------------
# files


def save_judge(judge: WorldJudge, path: Path) -> None:
    from ..files import save_safetensors_atomic

    header = {"world_judge": json.dumps({"attributes": {a.name: list(a.values) for a in ALL_ATTRIBUTES},
                                         "resolution": judge.resolution})}
    save_safetensors_atomic({k: v.contiguous() for k, v in judge.state_dict().items()}, header, path)


def load_judge(path: Path) -> WorldJudge:
    """The judge saved at `path`; refuses a file made for other attributes (another world)."""
    from ..files import load_safetensors

    tensors, header = load_safetensors(Path(path))
    meta = json.loads(header.get("world_judge", "{}"))
    expected = {a.name: list(a.values) for a in ALL_ATTRIBUTES}
    if meta.get("attributes") != expected:
        raise ModelLoadError(f"{path} is not a judge of this world's attributes; retrain it (personamagic world "
                             "train-judge)")
    judge = WorldJudge(resolution=meta["resolution"])
    judge.load_state_dict(tensors)
    return judge.eval().requires_grad_(False)
