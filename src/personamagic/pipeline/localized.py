"""Localized customization: Blended Latent Diffusion (Avrahami, Fried and Lischinski 2023; docs/method.md).

The user gives a background image and a region mask (white = where the concept is painted). At every
denoising step the latent outside the region is replaced by the background's latent noised to the
same step, so the sampler only ever invents the inside; after the last step the outside *is* the
background's latent, and the decoded image equals the background there up to the VAE round trip.

The background is noised with the same noise that starts the sampler (as diffusers' inpainting does),
so the inside and the outside start from one draw and no extra random numbers are consumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.latents import LatentScale


def latent_region(region: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) in [0, 1] -> latent mask (B, 1, h, w) in {0, 1}.

    A latent pixel belongs to the region when at least half of the image pixels it covers do (area
    average, then >= 0.5): a hard mask, so the outside is replaced exactly, never partly.
    """
    if region.ndim != 4 or region.shape[1] != 1:
        raise ValueError(f"region must have shape (B, 1, H, W), got {tuple(region.shape)}")
    area = F.interpolate(region.float(), size=latent_size, mode="area")
    return (area >= 0.5).float()


def blend_latents(latents: torch.Tensor, known: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Blended Latent Diffusion's step: region·latents + (1 − region)·known (Avrahami et al. 2023, Alg. 1).

    latents, known: (B, C, h, w); region: (B or 1, 1, h, w) in {0, 1}.
    """
    return region * latents + (1 - region) * known


def noised_background(scheduler, background: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """The background latent (B, C, h, w) noised to `timestep` with `noise`, in the scheduler's own
    parametrisation (√ᾱ·z + √(1−ᾱ)·ε for DDIM-like schedulers, z + σ·ε for Euler-like ones); `None`
    means the end of sampling, where the clean latent is returned."""
    if timestep is None:
        return background
    timesteps = torch.as_tensor(timestep, device=background.device).reshape(1)
    return scheduler.add_noise(background, noise, timesteps)


def prepare_localized(pipe, background, region, batch_size: int, height: int, width: int):
    """Background image(s) and region mask(s) -> scaled background latents (B, C, h, w) and the latent
    region (B or 1, 1, h, w) in {0, 1}. Images are resized to (height, width)."""
    from ..errors import UserError

    if (background is None) != (region is None):
        raise ValueError("localized generation needs both `background` and `region`")
    pixels = pipe.image_processor.preprocess(background, height=height, width=width)
    mask = pipe.mask_processor.preprocess(region, height=height, width=width)
    pixels = pixels.to(pipe.device, pipe.vae.dtype)
    latents = LatentScale.of(pipe.vae).encode(pipe.vae.encode(pixels).latent_dist.mean.float())
    if latents.shape[0] not in (1, batch_size):
        raise ValueError(f"{latents.shape[0]} backgrounds for {batch_size} images")
    region = latent_region(mask.to(pipe.device), latents.shape[-2:])
    if not region.any():
        raise UserError("the region mask is empty at latent resolution; paint a larger white area")
    return latents.expand(batch_size, -1, -1, -1), region
