"""The stage mapper: timestep (+ photo) -> dynamic embedding of S* and its value residual (docs/method.md).

The only trained network of PersonaMagic. Two small MLP branches share a fixed sinusoidal encoding of
the timestep:

* the **embedding branch** maps [time features ; supercategory embedding] to `num_vectors` token
  embeddings, re-normalised to the norm of the supercategory word: `normalize(head + e_super)·‖e_super‖`;
* the **residual branch** (NeTI's "output bypass") maps [time features ; CLIP image embedding] to
  `num_vectors` vectors that are added to the text encoder *output* at the S* positions and used only
  as the V input of the UNet's cross-attention.

A base model with several text encoders (SDXL: CLIP-L 768 and OpenCLIP-G 1280) gets one embedding per
encoder for every vector: the embedding head's output is the encoders' widths side by side, and each
encoder's part is re-normalised to the norm of the supercategory word *in that encoder*. The residual
has the width of the UNet's cross-attention input (the encoders' outputs concatenated).

Both heads start at zero, so an untrained mapper reproduces the plain supercategory word exactly (and
a zero residual): training starts from "a photo of a face" and moves away only as far as the loss asks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MapperConfig:
    """Shape of the stage mapper. Sizes of the base model are read from it, never assumed."""

    text_embed_dim: int  # D: token-embedding width, summed over the text encoders (768 on SD-1.x)
    image_embed_dim: int  # E: projection_dim of the CLIP image encoder (512 for ViT-B/32)
    num_vectors: int = 1  # token positions S* expands to (paper: one S*; authors' code: 4)
    time_frequencies: int = 64  # sinusoid frequencies of the timestep encoding (2x this many features)
    hidden_dim: int = 128  # width of both MLP branches (authors' code: 128)
    max_period: float = 10000.0  # longest period of the timestep sinusoids, in timesteps
    time_dependent: bool = True  # False: one embedding for every t (textual inversion, an ablation)
    use_residual: bool = True  # False: no value residual (text conditioning only, an ablation)
    # token-embedding width of each text encoder, in the order of the base model's encoders; they sum
    # to text_embed_dim (None: one encoder, [text_embed_dim])
    encoder_widths: list[int] | None = None
    residual_dim: int | None = None  # width of the value residual = UNet cross-attention input (None: D)

    def __post_init__(self):
        if self.encoder_widths is None:
            self.encoder_widths = [self.text_embed_dim]
        self.encoder_widths = [int(w) for w in self.encoder_widths]
        if self.residual_dim is None:
            self.residual_dim = self.text_embed_dim
        for name in ("text_embed_dim", "image_embed_dim", "num_vectors", "time_frequencies", "hidden_dim",
                     "residual_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MapperConfig.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.encoder_widths) < 1 or sum(self.encoder_widths) != self.text_embed_dim:
            raise ValueError(f"MapperConfig.encoder_widths {self.encoder_widths} must be >= 1 and sum to "
                             f"text_embed_dim {self.text_embed_dim}")

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp_block(in_dim: int, hidden_dim: int) -> nn.Sequential:
    """Two fully connected layers, each followed by LayerNorm and LeakyReLU (paper, appendix)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(),
    )


class StageMapper(nn.Module):
    """timesteps (B,) + image embeddings (B, E) -> embeddings (B, V, D), residuals (B, V, R).

    D = the summed token-embedding width of the text encoders, R = the UNet's cross-attention width
    (both 768 on SD-1.x); `super_embedding` (D,) is the supercategory word's embedding in each encoder,
    side by side.
    """

    def __init__(self, config: MapperConfig, super_embedding: torch.Tensor):
        super().__init__()
        self.config = config
        D, V, H, R = config.text_embed_dim, config.num_vectors, config.hidden_dim, config.residual_dim
        if super_embedding.shape != (D,):
            raise ValueError(f"super_embedding must have shape ({D},), got {tuple(super_embedding.shape)}")
        exponents = torch.arange(config.time_frequencies, dtype=torch.float32) / config.time_frequencies
        # Buffers, so state_dict() holds everything needed to rebuild the mapper.
        self.register_buffer("frequencies", torch.exp(-math.log(config.max_period) * exponents))
        self.register_buffer("super_embedding", super_embedding.detach().float().clone())
        time_dim = 2 * config.time_frequencies
        self.embedding_mlp = _mlp_block(time_dim + D, H)
        self.embedding_head = nn.Linear(H, V * D)
        heads = [self.embedding_head]
        if config.use_residual:
            self.residual_mlp = _mlp_block(time_dim + config.image_embed_dim, H)
            self.residual_head = nn.Linear(H, V * R)
            heads.append(self.residual_head)
        for head in heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def time_encoding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, 2F) fixed sinusoidal features [sin(t·f), cos(t·f)]."""
        angles = timesteps.float()[:, None] * self.frequencies[None, :]  # (B, 1) x (1, F) -> (B, F)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, timesteps: torch.Tensor, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = timesteps.shape[0]
        D, V, R = self.config.text_embed_dim, self.config.num_vectors, self.config.residual_dim
        time = self.time_encoding(timesteps)  # (B, 2F)
        if not self.config.time_dependent:
            time = torch.zeros_like(time)
        e_super = self.super_embedding.expand(B, D)  # (B, D)

        hidden = self.embedding_mlp(torch.cat([time, e_super], dim=-1))
        offsets = self.embedding_head(hidden).view(B, V, D)
        embeddings = self.renormalize(offsets + e_super[:, None, :])  # (B, V, D)

        if not self.config.use_residual:
            return embeddings, embeddings.new_zeros(B, V, R)
        hidden = self.residual_mlp(torch.cat([time, image_embeds.float()], dim=-1))
        residuals = self.residual_head(hidden).view(B, V, R)  # (B, V, R)
        return embeddings, residuals

    def renormalize(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D): each text encoder's part rescaled to the norm of the supercategory word
        in that encoder, so every encoder sees a vector of a real word's length (in-distribution)."""
        widths = self.config.encoder_widths
        words = self.super_embedding.split(widths)
        parts = [F.normalize(part, dim=-1) * word.norm() for part, word in zip(vectors.split(widths, dim=-1), words)]
        return torch.cat(parts, dim=-1)
