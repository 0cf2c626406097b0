"""The VAE's latent space as the UNet sees it: the VAE's raw latents scaled by `scaling_factor`, and,
where the VAE's config has them (`latents_mean`, `latents_std`, per channel), shifted and scaled per
channel first — as diffusers' pipelines decode and its training scripts encode."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentScale:
    scaling_factor: float
    mean: tuple[float, ...] | None = None  # latents_mean, per channel
    std: tuple[float, ...] | None = None  # latents_std, per channel

    @classmethod
    def of(cls, vae) -> "LatentScale":
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return cls(float(config.scaling_factor))
        return cls(float(config.scaling_factor), tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def _per_channel(self, values, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)

    def encode(self, raw: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latents (B, C, h, w) -> the UNet's."""
        if self.mean is None:
            return raw * self.scaling_factor
        return (raw - self._per_channel(self.mean, raw)) * self.scaling_factor / self._per_channel(self.std, raw)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The UNet's latents -> the VAE decoder's input."""
        if self.mean is None:
            return latents / self.scaling_factor
        return latents * self._per_channel(self.std, latents) / self.scaling_factor + self._per_channel(self.mean, latents)
