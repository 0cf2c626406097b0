"""The identity-encoder interface of the identity loss, and the wrapper that turns a recognition network
into one: aligned face crops (B, 3, H, W), RGB in [−1, 1] → L2-normalised embeddings (B, D).

L_id = 1 − cos(f(x̂0), f(x0)) (paper Eq. 3), f frozen. Conventions follow insightface's arcface_torch:
images RGB, float, in [−1, 1] (= (pixel/255 − 0.5)/0.5), aligned to the recogniser's 5-point template.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..faces.alignment import ARCFACE_INPUT_SIZE


@runtime_checkable
class IdentityEncoder(Protocol):
    """Aligned face crops (B, 3, H, W), RGB in [−1, 1] → L2-normalised embeddings (B, D).

    Differentiable with respect to the images; the network itself is frozen.
    """

    input_size: int  # side of the square crop the network reads (112 for ArcFace)
    embedding_dim: int  # D

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


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


def identity_similarity(encoder: IdentityEncoder, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the identity embeddings, (B,); a batch of 1 broadcasts against B.

    Images are aligned crops as the encoder expects. L_id = 1 − identity_similarity(f, x̂0, x0).
    """
    return (encoder(images_a) * encoder(images_b)).sum(dim=-1)
