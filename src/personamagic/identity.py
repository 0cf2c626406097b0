"""Face identity encoders for the identity loss L_id = 1 − cos(f(x̂0), f(x0)) of PersonaMagic (AAAI 2025).

f is a frozen ArcFace-family face recognition network. It reads an *aligned* face crop, so this
module also holds the differentiable 5-point alignment that turns a decoded clean-image estimate x̂0
into such a crop, re-using the landmarks that were found once on the training photo.

Conventions (insightface ``arcface_torch``): images are RGB, float, in [−1, 1] (= (pixel/255 − 0.5)/0.5),
aligned to the 112×112 template ``ARCFACE_TEMPLATE_112``; embeddings are L2-normalised, shape (B, D).

Where the weights come from (``load_identity_model``):

- ``"tiny"``: a seeded, randomly initialised small IResNet for tests and offline runs (not a face model).
- a local ``.pth``/``.pt``/``.safetensors`` state dict of an insightface ``arcface_torch`` IResNet
  (iresnet18/34/50/100/200, e.g. the ``backbone.pth`` of ``ms1mv3_arcface_r100_fp16``); depth, widths
  and embedding size are read from the tensor names and shapes.
- a local ``.onnx`` file (e.g. ``w600k_r50.onnx`` of insightface's ``buffalo_l`` pack), converted to a
  differentiable torch module by ``onnx2torch`` (``pip install 'personamagic[onnx]'``).
- a Hugging Face hub reference ``owner/name/path/in/repo.ext`` (or ``owner/name`` when the repo holds
  exactly one weights file), downloaded with ``huggingface_hub.hf_hub_download``.

Licence: insightface's pretrained recognition models (arcface_torch model zoo, buffalo_l, antelopev2)
are released for non-commercial research purposes only. The code here is MIT; the weights are not.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from personamagic.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_IDENTITY_MODEL = "lithiumice/ArcFace_PyTorch/ms1mv3_arcface_r100_fp16.pth"
"""Default identity network: insightface arcface_torch IResNet-100 trained on MS1MV3 (ArcFace loss).

Found on the stored Hugging Face page https://huggingface.co/lithiumice/ArcFace_PyTorch/tree/main
(files ``ms1mv3_arcface_r100_fp16.pth`` 261 MB, ``ms1mv3_arcface_r50_fp16.pth`` 175 MB,
``glink360k_cosface_r100_fp16_0.1.pth`` 261 MB). The hub's pickle scan lists only
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage`` and
``torch.LongStorage``: a plain float32 state dict (LongStorage = BatchNorm ``num_batches_tracked``), so it
loads with ``weights_only=True``, and the sizes match IResNet-100/50 in float32 (65 M / 44 M parameters).
It is a re-upload by an individual with no model card, not an insightface release; the strict key match of
``load_identity_model`` refuses it if it is not an arcface_torch IResNet. Not downloaded or run here (no
hub access): unverified beyond that page.

Alternative with better provenance (Hugging Face staff mirror, needs ``personamagic[onnx]``):
``public-data/insightface/models/buffalo_l/w600k_r50.onnx`` (IResNet-50 trained on WebFace600K; sha256
4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43, as in other copies of buffalo_l).

Licence of both: insightface's pretrained models are for non-commercial research purposes only.
"""

RANDOM_IRESNET100 = "random-iresnet100"  # full-size IResNet-100, random weights: for benchmarks only
ARCFACE_INPUT_SIZE = 112
"""Side in pixels of the aligned face crop that arcface_torch IResNets read."""

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # eye on the image's left (the subject's right eye)
        [73.5318, 51.5014],  # eye on the image's right (the subject's left eye)
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # mouth corner on the image's left
        [70.7299, 92.2041],  # mouth corner on the image's right
    ],
    dtype=np.float64,
)
"""The standard 5-point ArcFace template, (x, y) in pixels of a 112×112 crop (pixel centres at integers,
as in ``cv2.warpAffine``). Same points as insightface ``face_align.arcface_dst`` and OpenCV
``FaceRecognizerSF::alignCrop``."""

LANDMARK_ORDERS: dict[str, tuple[int, int, int, int, int]] = {
    "arcface": (0, 1, 2, 3, 4),
    # OpenCV documents YuNet's 5 points as "right eye, left eye, nose tip, right corner of mouth, left
    # corner of mouth": right/left of the *subject*, so its first eye is the one on the image's left.
    # OpenCV's own FaceRecognizerSF::alignCrop maps YuNet rows 0..4 onto this very template in order, and
    # YuNet on tests/data/astronaut.png gives x = 200 for point 0 and 247 for point 1. Same order.
    "yunet": (0, 1, 2, 3, 4),
}
"""For each detector, the index of its landmark that goes to each row of ``ARCFACE_TEMPLATE_112``."""

IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
"""IBasicBlocks per stage of the insightface arcface_torch IResNets, by depth."""

_MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".onnx")
_HUB_REFERENCE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^\s]+)?$")
# Keys under which training scripts nest the network's weights (arcface_torch checkpoints use the last).
_NESTED_STATE_DICT_KEYS = ("state_dict", "model", "state_dict_backbone")


@runtime_checkable
class IdentityEncoder(Protocol):
    """Aligned face crops (B, 3, H, W), RGB in [−1, 1] → L2-normalised embeddings (B, D).

    Differentiable with respect to the images; the network itself is frozen.
    """

    input_size: int  # side of the square crop the network reads (112 for ArcFace)
    embedding_dim: int  # D

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------
# IResNet (insightface arcface_torch), with its parameter names so that backbone.pth loads strictly.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IResNetConfig:
    """Shape of an arcface_torch IResNet."""

    layers: tuple[int, int, int, int]  # IBasicBlocks in each of the 4 stages (see IRESNET_LAYERS)
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)  # channels of the 4 stages; stem = widths[0]
    embedding_dim: int = 512  # output features of `fc` / `features`
    input_size: int = ARCFACE_INPUT_SIZE  # square input side; 4 stride-2 stages → input_size/16 before fc
    dropout: float = 0.0  # dropout before fc (arcface_torch trains with 0; inactive in eval anyway)

    def __post_init__(self):
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {self.layers}")
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"widths must be 4 positive channel counts, got {self.widths}")
        if self.input_size % 16 != 0:
            raise ValueError(f"input_size must be a multiple of 16 (4 stride-2 stages), got {self.input_size}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")

    @classmethod
    def from_depth(cls, depth: int) -> IResNetConfig:
        """The full-size arcface_torch iresnet{depth}."""
        if depth not in IRESNET_LAYERS:
            raise ValueError(f"unknown IResNet depth {depth}; known: {sorted(IRESNET_LAYERS)}")
        return cls(layers=IRESNET_LAYERS[depth])

    @property
    def depth(self) -> int | None:
        """18/34/50/100/200 for the standard block counts, else None."""
        for depth, layers in IRESNET_LAYERS.items():
            if layers == tuple(self.layers):
                return depth
        return None

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> IResNetConfig:
        """Read the configuration from tensor names (blocks per stage) and shapes (widths, sizes).

        Raises ValueError when the names are not those of an arcface_torch IResNet.
        """
        for key in ("conv1.weight", "prelu.weight", "fc.weight", "features.weight"):
            if key not in state_dict:
                raise ValueError(f"no '{key}'")
        layers, widths = [], []
        for stage in range(1, 5):
            blocks = {int(key.split(".")[1]) for key in state_dict if key.startswith(f"layer{stage}.")}
            if not blocks or blocks != set(range(len(blocks))):
                raise ValueError(f"no blocks layer{stage}.0, layer{stage}.1, ...")
            if f"layer{stage}.0.conv1.weight" not in state_dict:
                raise ValueError(f"no 'layer{stage}.0.conv1.weight'")
            layers.append(len(blocks))
            widths.append(state_dict[f"layer{stage}.0.conv1.weight"].shape[0])
        embedding_dim, fc_in = state_dict["fc.weight"].shape
        side = math.isqrt(fc_in // widths[-1])
        if side * side * widths[-1] != fc_in:
            raise ValueError(f"fc takes {fc_in} features, not {widths[-1]}·side² for a square input")
        return cls(layers=tuple(layers), widths=tuple(widths), embedding_dim=embedding_dim, input_size=16 * side)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """IResNet residual block: BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN, plus the shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + shortcut


class IResNet(nn.Module):
    """insightface arcface_torch IResNet; parameter names match its ``backbone.pth`` state dicts exactly.

    Input (B, 3, input_size, input_size), RGB in [−1, 1]; output (B, embedding_dim), not normalised.
    """

    def __init__(self, config: IResNetConfig):
        super().__init__()
        self.config = config
        widths = config.widths
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        in_channels = widths[0]
        for stage, (blocks, channels) in enumerate(zip(config.layers, widths), start=1):
            stage_blocks = [IBasicBlock(in_channels, channels, stride=2)]
            stage_blocks += [IBasicBlock(channels, channels) for _ in range(blocks - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*stage_blocks))
            in_channels = channels
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-5)
        self.dropout = nn.Dropout(p=config.dropout)
        final_side = config.input_size // 16
        self.fc = nn.Linear(widths[-1] * final_side * final_side, config.embedding_dim)
        self.features = nn.BatchNorm1d(config.embedding_dim, eps=1e-5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"IResNet expects {size}×{size} inputs, got {tuple(images.shape)}")
        x = self.prelu(self.bn1(self.conv1(images)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)  # (B, C, s, s) -> (B, C·s·s)
        return self.features(self.fc(self.dropout(x)))


def build_iresnet(depth: int) -> IResNet:
    """A randomly initialised full-size arcface_torch iresnet{depth} (18, 34, 50, 100 or 200)."""
    return IResNet(IResNetConfig.from_depth(depth))


# ---------------------------------------------------------------------------------------------------
# The encoder wrapper
# ---------------------------------------------------------------------------------------------------


class ArcFaceEncoder(nn.Module):
    """Frozen face recognition network → L2-normalised embeddings; an ``IdentityEncoder``.

    ``backbone`` takes (B, 3, input_size, input_size) RGB and returns (B, embedding_dim) features.
    Its input is ``(pixel − input_mean) / input_std`` with pixel = (image + 1)·127.5 in [0, 255]: the
    defaults 127.5/127.5 hand the [−1, 1] images over unchanged (arcface_torch, insightface ONNX models
    such as w600k_r50); MXNet-era ONNX models with their own Sub/Mul input nodes use 0/1.

    Images of another size are resized (bilinear, no antialiasing, so cheap and differentiable).
    Embeddings are float32 whatever the network's dtype, so the cosine of the loss stays precise.
    The backbone's parameters never require grad and it stays in eval mode, even under ``.train()``
    (BatchNorm statistics of a recognition network must not follow a training batch).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        embedding_dim: int,
        input_size: int = ARCFACE_INPUT_SIZE,
        input_mean: float = 127.5,
        input_std: float = 127.5,
    ):
        super().__init__()
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        self.input_size = input_size
        self.input_mean = input_mean
        self.input_std = input_std
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ArcFaceEncoder:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [−1, 1] → (B, embedding_dim) float32, unit L2 norm."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        size = self.input_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        if (self.input_mean, self.input_std) != (127.5, 127.5):
            images = ((images + 1.0) * 127.5 - self.input_mean) / self.input_std
        weight = next(self.backbone.parameters(), None)
        if weight is not None:
            images = images.to(dtype=weight.dtype)
        features = self.backbone(images).reshape(images.shape[0], -1)  # ONNX graphs may keep (B, D, 1, 1)
        return F.normalize(features.float(), dim=-1)


TINY_IRESNET_CONFIG = IResNetConfig(layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), embedding_dim=32)
"""Shape of the ``"tiny"`` identity model: 112×112 input like ArcFace, ~30 k parameters, D = 32."""


def build_tiny_identity_model(seed: int = 0) -> ArcFaceEncoder:
    """A small randomly initialised IResNet encoder, the same for the same seed in any process.

    For tests and offline runs: it has the real model's interface but knows nothing about faces.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = IResNet(TINY_IRESNET_CONFIG)
    return ArcFaceEncoder(
        backbone, embedding_dim=TINY_IRESNET_CONFIG.embedding_dim, input_size=TINY_IRESNET_CONFIG.input_size
    )


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def load_identity_model(
    spec: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ArcFaceEncoder:
    """Load a frozen (eval, requires_grad False) identity encoder.

    ``spec``: ``"tiny"``, a local ``.pth``/``.pt``/``.safetensors``/``.onnx`` file, or a Hugging Face
    reference ``owner/name/path/in/repo.ext`` (``owner/name`` if the repo holds one weights file).
    Raises ``UserError`` for anything that cannot be loaded.
    """
    spec = os.fspath(spec)
    if spec == "tiny":
        encoder = build_tiny_identity_model()
    elif spec == RANDOM_IRESNET100:
        encoder = ArcFaceEncoder(build_iresnet(100), embedding_dim=512)
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            encoder = _load_file(path)
        elif path.exists():
            raise UserError(f"identity model {spec} is a directory; pass the weights file inside it")
        elif _looks_like_local_path(spec):
            raise UserError(f"identity model file {spec} does not exist; check the path")
        elif _HUB_REFERENCE.match(spec):
            encoder = _load_file(_download_from_hub(spec))
        else:
            raise UserError(
                f"unknown identity model {spec!r}: pass 'tiny', a local .pth/.safetensors/.onnx file, "
                f"or a Hugging Face reference owner/name/path/in/repo (e.g. {DEFAULT_IDENTITY_MODEL})"
            )
    encoder.to(device=device, dtype=dtype)
    encoder.requires_grad_(False)
    return encoder.eval()


def _looks_like_local_path(spec: str) -> bool:
    """True for specs that name a file rather than a hub repo (absolute, ./, ~, or name.ext)."""
    if spec.startswith((os.sep, ".", "~")) or (os.altsep and os.altsep in spec):
        return True
    return "/" not in spec or (spec.count("/") == 1 and spec.lower().endswith(_MODEL_SUFFIXES))


def _download_from_hub(spec: str) -> Path:
    """``owner/name[/path/in/repo]`` → local path of the downloaded file (cached by huggingface_hub)."""
    import huggingface_hub

    owner, name, *rest = spec.split("/")
    repo_id = f"{owner}/{name}"
    advice = "pass a local file with --identity-model PATH, or train without the identity loss with --no-id-loss"
    try:
        if rest:
            filename = "/".join(rest)
        else:
            candidates = [f for f in huggingface_hub.list_repo_files(repo_id) if f.lower().endswith(_MODEL_SUFFIXES)]
            if len(candidates) != 1:
                raise UserError(
                    f"hub repo {repo_id} holds {len(candidates)} weights files ({', '.join(candidates[:5])}); "
                    f"name one as {repo_id}/FILE"
                )
            filename = candidates[0]
        local = huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename)
    except UserError:
        raise
    except Exception as err:  # network, auth, missing repo/file, offline mode: all end the same way
        raise UserError(f"could not download identity model {spec!r} ({type(err).__name__}); {advice}") from err
    logger.info("identity model %s downloaded to %s", spec, local)
    return Path(local)


def _load_file(path: Path) -> ArcFaceEncoder:
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        return _encoder_from_state_dict(_read_torch_state_dict(path), path)
    if suffix == ".safetensors":
        return _encoder_from_state_dict(_read_safetensors(path), path)
    if suffix == ".onnx":
        return _load_onnx(path)
    raise UserError(f"identity model {path} has an unknown extension; use a .pth, .pt, .safetensors or .onnx file")


def _read_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise UserError(
                f"{path} holds pickled Python objects (e.g. a whole nn.Module), which are not loaded for safety; "
                f"save the network's state_dict() instead, or pass an ONNX file"
            ) from err
        raise UserError(f"{path} is not a PyTorch weights file; pass a state dict .pth, .safetensors or .onnx") from err
    except Exception as err:  # zip/EOF/storage errors: whatever torch.load says, the file is unusable
        raise UserError(f"{path} is not a PyTorch weights file; pass a state dict .pth, .safetensors or .onnx") from err
    return _unwrap_state_dict(checkpoint, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return _unwrap_state_dict(load_file(path, device="cpu"), path)
    except Exception as err:
        raise UserError(f"{path} is not a readable .safetensors file; check the download or pass a .pth") from err


def _unwrap_state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict, one nested under a known key, and DataParallel's "module." prefix."""
    if isinstance(checkpoint, dict):
        for key in _NESTED_STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UserError(f"{path} is not a state dict of tensors; save the network's state_dict(), or pass an ONNX file")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _encoder_from_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> ArcFaceEncoder:
    not_iresnet = f"{path} is not an insightface arcface_torch IResNet state dict; pass an ONNX file instead"
    try:
        config = IResNetConfig.from_state_dict(state_dict)
    except ValueError as err:
        raise UserError(f"{not_iresnet} ({_first_line(err)})") from err
    backbone = IResNet(config)
    missing, unexpected = _key_mismatch(backbone.state_dict(), state_dict)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(f"{not_iresnet} ({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. '{example}')")
    try:
        backbone.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # same names, other shapes
        raise UserError(f"{not_iresnet} (tensor shapes differ)") from err
    logger.info(
        "identity model %s: IResNet-%s, %d parameters, %d-d embeddings",
        path, config.depth or "custom", sum(p.numel() for p in backbone.parameters()), config.embedding_dim,
    )
    return ArcFaceEncoder(backbone, embedding_dim=config.embedding_dim, input_size=config.input_size)


def _first_line(err: Exception) -> str:
    """UserError messages are one line; library exceptions may not be."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _key_mismatch(expected: dict, given: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def _load_onnx(path: Path) -> ArcFaceEncoder:
    """Convert an ONNX recognition model to a differentiable torch module (onnx2torch).

    Input convention as insightface's ``ArcFaceONNX``: models whose first nodes subtract and multiply
    (MXNet exports that normalise inside the graph) read pixels in [0, 255]; all others read
    (pixel − 127.5)/127.5, i.e. our [−1, 1]. insightface feeds them ``blobFromImages(..., swapRB=True)``
    of BGR cv2 crops, so the networks see RGB, which is what this library passes.
    """
    try:
        import onnx
        from onnx2torch import convert
    except (ImportError, RuntimeError) as err:  # onnx2torch imports torchvision, which must match torch
        raise UserError(
            f"loading the ONNX identity model {path} needs onnx and onnx2torch with a torchvision that matches "
            f"your torch ({type(err).__name__}: {_first_line(err)}); run pip install 'personamagic[onnx]'"
        ) from err
    try:
        model_proto = onnx.load(str(path))
    except Exception as err:
        raise UserError(f"{path} is not a readable ONNX model; check the download") from err
    input_size = _onnx_input_size(model_proto, path)
    input_mean, input_std = (0.0, 1.0) if _normalizes_pixels_inside(model_proto) else (127.5, 127.5)
    try:
        backbone = convert(model_proto)
    except Exception as err:
        raise UserError(
            f"onnx2torch cannot convert {path} ({type(err).__name__}: {_first_line(err)}); pass an arcface_torch .pth"
        ) from err
    backbone.eval()
    with torch.no_grad():
        probe = backbone(torch.zeros(1, 3, input_size, input_size))
    if not isinstance(probe, torch.Tensor):
        raise UserError(f"{path} has several outputs; pass a recognition model with one embedding output")
    embedding_dim = probe.reshape(1, -1).shape[1]
    logger.info(
        "identity model %s: ONNX, %d×%d input, mean/std %s/%s, %d-d embeddings",
        path, input_size, input_size, input_mean, input_std, embedding_dim,
    )
    return ArcFaceEncoder(
        backbone, embedding_dim=embedding_dim, input_size=input_size, input_mean=input_mean, input_std=input_std
    )


def _normalizes_pixels_inside(model_proto) -> bool:
    """Whether the graph reads pixels in [0, 255] and subtracts and multiplies them itself.

    insightface's rule (node names starting Sub/_minus and Mul/_mul among the first 8 nodes, as MXNet
    names them), or else the graph input's first two consumers being Sub and Mul (torch exports, whose
    node list may start with unrelated Identity nodes).
    """
    names = [node.name for node in model_proto.graph.node[:8]]
    if any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names):
        return True
    initializers = {init.name for init in model_proto.graph.initializer}
    current = next(i.name for i in model_proto.graph.input if i.name not in initializers)
    ops = []
    for _ in range(2):
        consumer = next((node for node in model_proto.graph.node if current in node.input), None)
        if consumer is None or len(consumer.output) != 1:
            break
        ops.append(consumer.op_type)
        current = consumer.output[0]
    return sorted(ops) == ["Mul", "Sub"]


def _onnx_input_size(model_proto, path: Path) -> int:
    """Side of the square input from the graph's (B, 3, H, W) input; ARCFACE_INPUT_SIZE when symbolic."""
    initializers = {init.name for init in model_proto.graph.initializer}
    graph_inputs = [i for i in model_proto.graph.input if i.name not in initializers]
    if len(graph_inputs) != 1:
        raise UserError(f"{path} has {len(graph_inputs)} inputs; pass a recognition model with one image input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (3, None):
        raise UserError(f"{path} does not take (B, 3, H, W) images; pass a face recognition model")
    height, width = dims[2], dims[3]
    if height is None or width is None:
        return ARCFACE_INPUT_SIZE
    if height != width:
        raise UserError(f"{path} takes {height}×{width} inputs; only square face crops are supported")
    return height


# ---------------------------------------------------------------------------------------------------
# Alignment and similarity
# ---------------------------------------------------------------------------------------------------


def similarity_transform(src_points: np.ndarray, dst_points: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) src → dst.

    Umeyama (1991), Eq. 40–42. Points (N, 2), N ≥ 2; returns M (2, 3) with dst ≈ M @ [x, y, 1].
    """
    src = np.asarray(src_points, dtype=np.float64)
    dst = np.asarray(dst_points, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"expected two (N, 2) point sets with N ≥ 2, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_centered, dst_centered = src - src_mean, dst - dst_mean
    src_variance = (src_centered**2).sum() / len(src)
    if src_variance <= 0:
        raise ValueError("the source points all coincide; a similarity transform is undefined")
    covariance = dst_centered.T @ src_centered / len(src)  # (2, 2)
    u, singular_values, vt = np.linalg.svd(covariance)
    signs = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = (singular_values * signs).sum() / src_variance
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def alignment_theta(
    landmarks: np.ndarray | torch.Tensor,
    image_size: tuple[int, int],
    output_size: int = ARCFACE_INPUT_SIZE,
    *,
    landmarks_order: str = "arcface",
) -> torch.Tensor:
    """The `affine_grid` matrix (2, 3) that warps an image of `image_size` (H, W) so that its 5
    landmarks (x, y pixels, pixel centres at integers) land on the ArcFace template.

    Computed once per photo on the host; `warp_faces` applies it on the device at every step.
    """
    if landmarks_order not in LANDMARK_ORDERS:
        raise ValueError(f"unknown landmarks_order {landmarks_order!r}; known: {sorted(LANDMARK_ORDERS)}")
    if isinstance(landmarks, torch.Tensor):
        landmarks = landmarks.detach().cpu().numpy()
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks of shape (5, 2), got {points.shape}")
    points = points[list(LANDMARK_ORDERS[landmarks_order])]
    template = ARCFACE_TEMPLATE_112 * (output_size / ARCFACE_INPUT_SIZE)

    # grid_sample needs, for each output location, where to read in the input, both in [-1, 1] units:
    # normalised output → output pixel → (inverse similarity) → input pixel → normalised input.
    height, width = image_size
    to_template = np.vstack([similarity_transform(points, template), [0.0, 0.0, 1.0]])
    half = output_size / 2
    output_from_normalized = np.array([[half, 0, half - 0.5], [0, half, half - 0.5], [0, 0, 1]])
    normalized_from_input = np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])
    theta = normalized_from_input @ np.linalg.inv(to_template) @ output_from_normalized
    return torch.as_tensor(theta[:2], dtype=torch.float32)


def warp_faces(images: torch.Tensor, theta: torch.Tensor, output_size: int = ARCFACE_INPUT_SIZE) -> torch.Tensor:
    """(B, 3, H, W) images, theta (B, 2, 3) or (2, 3) from `alignment_theta` -> (B, 3, S, S) aligned
    crops; differentiable. Bilinear sampling; outside the image is black (−1), like cv2.warpAffine."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    theta = theta.to(images.device, images.dtype).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], output_size, output_size], align_corners=False)
    # grid_sample pads with 0 (mid grey in [-1, 1]); shifting by 1 makes the padding black instead.
    return F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def align_faces(
    images: torch.Tensor,
    landmarks: np.ndarray | torch.Tensor,
    output_size: int = ARCFACE_INPUT_SIZE,
    *,
    landmarks_order: str = "arcface",
) -> torch.Tensor:
    """Warp (B, 3, H, W) images so that 5 landmarks (5, 2), the same for the whole batch, land on the
    ArcFace template; ``landmarks_order`` names the detector that found them (``LANDMARK_ORDERS``)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    theta = alignment_theta(landmarks, tuple(images.shape[-2:]), output_size, landmarks_order=landmarks_order)
    return warp_faces(images, theta, output_size)


def identity_similarity(encoder: IdentityEncoder, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the identity embeddings, (B,); a batch of 1 broadcasts against B.

    Images are aligned crops as the encoder expects. L_id = 1 − identity_similarity(f, x̂0, x0).
    """
    return (encoder(images_a) * encoder(images_b)).sum(dim=-1)
