"""A concept attached to a pipeline: its mapper on the device, its placeholder tokens, and the stage
table it follows at every denoising step (`StageWindow`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..concept import Concept
from ..method.stages import Stage, StageWindow
from ..method.tokens import PlaceholderTokens


@dataclass
class LoadedConcept:
    """A concept attached to a pipeline: its mapper on the device and its placeholder tokens."""

    concept: Concept
    mapper: torch.nn.Module
    tokens: PlaceholderTokens
    image_embed: torch.Tensor  # (1, E)

    @property
    def window(self) -> StageWindow:
        """The concept's `StageWindow` (t_lo, t_hi)."""
        return self.concept.window

    def stage(self, t: int) -> Stage:
        return self.window.stage(t)

    def vectors(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, D) token embeddings and (V, C) value residuals of S* at timestep t."""
        embeddings, residuals = self.vectors_at([t])
        return embeddings[0], residuals[0]

    def vectors_at(self, timesteps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V, D) token embeddings and (K, V, C) value residuals at K timesteps, in one mapper call:
        the supercategory word and no residual in static 1, mapper(t) in the dynamic stage, mapper(t_lo)
        in static 2."""
        window = self.window
        sources = [window.mapper_timestep(t) for t in timesteps]
        # one batched mapper call; where S* is the word, its output (read at t_lo) is replaced
        t_eff = torch.tensor([window.lo if s is None else s for s in sources], device=self.image_embed.device)
        embeddings, residuals = self.mapper(t_eff, self.image_embed.expand(len(timesteps), -1))
        is_word = torch.tensor([s is None for s in sources], device=embeddings.device)[:, None, None]
        word = self.mapper.super_embedding.expand_as(embeddings)
        return torch.where(is_word, word, embeddings), residuals.masked_fill(is_word, 0.0)
