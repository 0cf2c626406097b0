"""insightface's arcface_torch IResNet, with its parameter names, so that its `backbone.pth` state dicts
load strictly (the network code is MIT; the published weights are non-commercial research only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..faces.alignment import ARCFACE_INPUT_SIZE

IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
"""IBasicBlocks per stage of the insightface arcface_torch IResNets, by depth."""


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
