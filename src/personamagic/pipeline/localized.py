"""Localized customization: Blended Latent Diffusion (Avrahami, Fried and Lischinski 2023; docs/method.md).

The user gives a background image and a region mask (white = where the concept is painted). At every
denoising step the latent outside the region is replaced by the background's latent noised to the
same step, so the sampler only ever invents the inside; after the last step the outside *is* the
background's latent, and the decoded image equals the background there up to the VAE round trip.

The background is noised with the same noise that starts the sampler (as diffusers' inpainting does),
so the inside and the outside start from one draw and no extra random numbers are consumed.

The background and the mask files are read at the output size (`load_localized_inputs`), cropped
around their centre to its shape, never squashed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import PhotoError
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
        raise PhotoError("the region mask is empty at latent resolution; paint a larger white area")
    return latents.expand(batch_size, -1, -1, -1), region


# -- the input files -------------------------------------------------------------------------------


def localized_size(background_size: tuple[int, int], resolution: int, multiple: int) -> tuple[int, int]:
    """(width, height) that keeps the background's shape: shorter side = the model's resolution, both
    sides rounded to a multiple of `multiple`."""
    w, h = background_size
    scale = resolution / min(w, h)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (w, h))


def load_localized_inputs(background: str, region: str, size: tuple[int, int] | None, resolution: int,
                          multiple: int) -> tuple[Image.Image, Image.Image]:
    """Background (RGB) and region (L, 255 inside) at the output size, both cropped around their centre
    to its shape (never squashed). The region is the white part of the mask, or its opaque part when it
    has transparency."""
    from ..faces.photos import open_image, to_rgb

    image, mask = open_image(background), open_image(region)
    if image.size != mask.size:
        raise PhotoError(
            f"region {region} is {mask.width}x{mask.height} but background {background} is "
            f"{image.width}x{image.height}; draw the region on the background itself"
        )
    alpha = np.asarray(mask.convert("RGBA"))[:, :, 3] if mask.mode in ("RGBA", "LA", "PA") else None
    values = alpha if alpha is not None and alpha.min() < 255 else np.asarray(to_rgb(mask).convert("L"))
    mask = Image.fromarray(np.where(values > 127, 255, 0).astype(np.uint8))
    if not np.asarray(mask).any():
        raise PhotoError(f"region {region} marks nothing; paint the region white on black")
    width, height = size or localized_size(image.size, resolution, multiple)
    box = _centre_box(image.size, width / height)
    image = to_rgb(image).crop(box).resize((width, height), Image.Resampling.LANCZOS)
    mask = mask.crop(box).resize((width, height), Image.Resampling.NEAREST)
    return image, mask


def _centre_box(size: tuple[int, int], aspect: float) -> tuple[int, int, int, int]:
    """The largest box of shape `aspect` (width/height) centred in an image of `size`."""
    w, h = size
    if w / h > aspect:
        crop_w = round(h * aspect)
        left = (w - crop_w) // 2
        return (left, 0, left + crop_w, h)
    crop_h = round(w / aspect)
    top = (h - crop_h) // 2
    return (0, top, w, top + crop_h)
