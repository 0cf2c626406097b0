"""The stage mapper: timestep (+ photo) -> dynamic embedding of S* and its value residual (SPEC §1).

The only trained network of PersonaMagic. Two small MLP branches share a fixed sinusoidal encoding of
the timestep:

* the **embedding branch** maps [time features ; supercategory embedding] to `num_vectors` token
  embeddings, re-normalised to the norm of the supercategory word: `normalize(head + e_super)·‖e_super‖`;
* the **residual branch** (NeTI's "output bypass") maps [time features ; CLIP image embedding] to
  `num_vectors` vectors that are added to the text encoder *output* at the S* positions and used only
  as the V input of the UNet's cross-attention.

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

    text_embed_dim: int  # D: the text encoder's hidden size (768 on SD-1.x)
    image_embed_dim: int  # E: projection_dim of the CLIP image encoder (512 for ViT-B/32)
    num_vectors: int = 1  # token positions S* expands to (paper: one S*; authors' code: 4)
    time_frequencies: int = 64  # sinusoid frequencies of the timestep encoding (2x this many features)
    hidden_dim: int = 128  # width of both MLP branches (authors' code: 128)
    max_period: float = 10000.0  # longest period of the timestep sinusoids, in timesteps
    time_dependent: bool = True  # False: one embedding for every t (textual inversion, an ablation)
    use_residual: bool = True  # False: no value residual (text conditioning only, an ablation)

    def __post_init__(self):
        for name in ("text_embed_dim", "image_embed_dim", "num_vectors", "time_frequencies", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MapperConfig.{name} must be >= 1, got {getattr(self, name)}")

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
    """timesteps (B,) + image embeddings (B, E) -> embeddings (B, V, D), residuals (B, V, D)."""

    def __init__(self, config: MapperConfig, super_embedding: torch.Tensor):
        super().__init__()
        self.config = config
        D, V, H = config.text_embed_dim, config.num_vectors, config.hidden_dim
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
            self.residual_head = nn.Linear(H, V * D)
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
        D, V = self.config.text_embed_dim, self.config.num_vectors
        time = self.time_encoding(timesteps)  # (B, 2F)
        if not self.config.time_dependent:
            time = torch.zeros_like(time)
        e_super = self.super_embedding.expand(B, D)  # (B, D)

        hidden = self.embedding_mlp(torch.cat([time, e_super], dim=-1))
        offsets = self.embedding_head(hidden).view(B, V, D)
        # Keep every vector at the norm of a real word so the text encoder sees in-distribution input.
        norm = self.super_embedding.norm()
        embeddings = F.normalize(offsets + e_super[:, None, :], dim=-1) * norm  # (B, V, D)

        if not self.config.use_residual:
            return embeddings, torch.zeros_like(embeddings)
        hidden = self.residual_mlp(torch.cat([time, image_embeds.float()], dim=-1))
        residuals = self.residual_head(hidden).view(B, V, D)  # (B, V, D)
        return embeddings, residuals
