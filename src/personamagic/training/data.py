"""What training reads: the photos encoded once (`TrainingData`) and one step's random draws (`Batch`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..errors import PhotoError
from ..faces.alignment import warp_faces


@dataclass
class TrainingData:
    """What the loop needs from the N training photos, computed once before training."""

    latent_mean: torch.Tensor  # (N, 4, h, w) mean of the VAE posterior (unscaled)
    latent_std: torch.Tensor  # (N, 4, h, w) its standard deviation
    masks: torch.Tensor  # (N, 1, h, w) face masks at latent resolution, in [0, 1], never all zero
    image_embeds: torch.Tensor  # (N, E) CLIP image embeddings (projection space)
    face_theta: torch.Tensor | None = None  # (N, 2, 3) affine_grid matrices aligning each face for ArcFace
    identity_reference: torch.Tensor | None = None  # (N, D_id) identity embeddings of the photos
    ip_adapter_embeds: torch.Tensor | None = None  # (N, 1, ...) IP-Adapter image embeds, when plugged in
    # (N, 6) SDXL's size conditioning of each photo: original size, crop top-left, target size
    time_ids: torch.Tensor | None = None
    photomaker_embeds: torch.Tensor | None = None  # (N, 1, D) PhotoMaker ID embedding of each photo, when plugged in

    @property
    def num_images(self) -> int:
        return self.latent_mean.shape[0]


@torch.no_grad()
def prepare_training_data(
    vae,
    pixels: torch.Tensor,
    masks: torch.Tensor,
    image_embeds: torch.Tensor,
    face_theta: torch.Tensor | None = None,
    identity_encoder=None,
) -> TrainingData:
    """Encode the photos once: VAE posterior (mean, std), latent masks, identity references.

    pixels: (N, 3, H, W) in [-1, 1]; masks: (N, 1, H, W) in [0, 1] at pixel resolution;
    face_theta: (N, 2, 3) from `identity.alignment_theta`, needed with an identity encoder.
    """
    if masks.flatten(1).sum(1).min() <= 0:
        raise PhotoError("a face mask is empty; use another --mask method or a mask file that marks the face")
    device, dtype = vae.device, vae.dtype
    posterior = vae.encode(pixels.to(device, dtype)).latent_dist
    latent_size = posterior.mean.shape[-2:]
    latent_masks = torch.nn.functional.interpolate(masks.float().to(device), size=latent_size, mode="area")
    reference = None
    if identity_encoder is not None:
        if face_theta is None:
            raise ValueError("the identity loss needs the faces' alignment (face_theta)")
        faces = warp_faces(pixels.to(device, torch.float32), face_theta.to(device), identity_encoder.input_size)
        reference = identity_encoder(faces).float()
    return TrainingData(
        latent_mean=posterior.mean.float(),
        latent_std=posterior.std.float(),
        masks=latent_masks,
        image_embeds=image_embeds.float().to(device),
        face_theta=None if face_theta is None else face_theta.float().to(device),
        identity_reference=reference,
    )


@dataclass
class Batch:
    """The random draws of one step (all from the trainer's generator)."""

    image_index: torch.Tensor  # (B,) which photo each sample uses
    latents: torch.Tensor  # (B, 4, h, w) scaled latents drawn from the posterior
    noise: torch.Tensor  # (B, 4, h, w) ε
    timesteps: torch.Tensor  # (B,) long
    keep_residual: torch.Tensor  # (B,) 1.0 keeps the value residual, 0.0 drops it
    te_prompt_index: torch.Tensor  # (B,) which TE prompt each sample uses

    @property
    def size(self) -> int:
        return self.timesteps.shape[0]

    def select(self, index) -> "Batch":
        """The samples at `index` (a slice or index tensor) of every field."""
        return Batch(*(getattr(self, f.name)[index] for f in fields(self)))


def sample_batch(data: TrainingData, batch_size: int, window: tuple[int, int], generator: torch.Generator,
                 *, latent_scale, bypass_drop: float, num_te_prompts: int) -> Batch:
    """Draw one batch with t ~ U[window) from `generator` (in this fixed order, so that a resumed or
    regrouped run repeats the same draws)."""
    lo, hi = window
    g, B, d = generator, batch_size, data.latent_mean.device
    image_index = torch.randint(0, data.num_images, (B,), generator=g, device=d)
    latent_noise = torch.randn(data.latent_mean[image_index].shape, generator=g, device=d)
    latents = latent_scale.encode(data.latent_mean[image_index] + data.latent_std[image_index] * latent_noise)
    noise = torch.randn(latents.shape, generator=g, device=d)
    timesteps = torch.randint(lo, hi, (B,), generator=g, device=d)
    keep = (torch.rand((B,), generator=g, device=d) >= bypass_drop).float()
    te_index = torch.randint(0, num_te_prompts, (B,), generator=g, device=d)
    return Batch(image_index, latents, noise, timesteps, keep, te_index)


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """A batch as `parts` equal micro-batches (gradient accumulation)."""
    if parts == 1:
        return [batch]
    size = batch.size // parts
    return [batch.select(slice(i * size, (i + 1) * size)) for i in range(parts)]


def concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along the batch, without copying a single part (a group of one identity)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)
