"""The automatic stage partition's driver (docs/method.md): warm up, capture S*'s attention, cut the IoU curve.

1. Warm-up: the mapper trains over the whole schedule [0, T) for `warmup_steps`, in the training loop
   (`training.group`) like any other step.
2. Capture: photo 0's latent is noised to each timestep of a DDIM grid with one fixed-seed noise draw,
   the UNet runs on "a photo of S*" with the current mapper, and S*'s cross-attention maps are averaged
   over heads, layers and vectors on the family's grid (16x16 on SD-1.x).
3. IoU of each map with the face mask; the relative, smoothed curve is cut by λ1, λ2
   (`personamagic.method.stages.partition_stages`) and mapped onto the whole schedule (`StageWindow`).
"""

from __future__ import annotations

import torch

from ..method.stages import (
    StagePartition,
    StageWindow,
    attention_iou,
    average_maps,
    capturing_attention,
    partition_stages,
)
from .config import derived_seed

CAPTURE_PROMPT = "a photo of {}"  # the prompt of the attention capture (paper, Fig. 2)


def partition_after_warmup(trainer) -> tuple[StagePartition, StageWindow, torch.Tensor]:
    """Steps 2-3 with the mapper as it is (warmed up): capture, IoU with photo 0's mask, cut; returns the
    partition (on the grid), the window it gives on the whole schedule, and the maps (K, r, r)."""
    c, T = trainer.config, trainer.num_train_timesteps
    timesteps, maps = capture_attention(trainer, c.partition_timesteps, trainer.partition_resolution)
    mask = trainer.data.masks[0, 0].cpu()
    iou = [attention_iou(m, mask) for m in maps.cpu()]
    partition = partition_stages(timesteps.tolist(), iou, c.lambda1, c.lambda2,
                                 min_dynamic_fraction=c.min_dynamic_fraction, num_train_timesteps=T)
    return partition, StageWindow.from_partition(partition, T, c.min_dynamic_fraction), maps.cpu()


@torch.no_grad()
def capture_attention(trainer, num_timesteps: int, resolution: int, chunk: int = 10):
    """S*'s cross-attention map at each timestep of a `num_timesteps`-step DDIM grid.

    Photo 0's latent is noised with one fixed-seed noise draw (the seed's stream 1, independent of the
    training generator), the prompt is "a photo of S*" with the current mapper. Returns timesteps (K,)
    descending and maps (K, resolution, resolution) in [0, 1].
    """
    from diffusers import DDIMScheduler

    objective, device = trainer.objective, trainer.device
    grid = DDIMScheduler.from_config(trainer.base.scheduler_config)
    grid.set_timesteps(num_timesteps)
    timesteps = grid.timesteps.to(device)
    generator = torch.Generator(device).manual_seed(derived_seed(trainer.config.seed, 1))
    latents = objective.latent_scale.encode(trainer.data.latent_mean[:1])
    noise = torch.randn(latents.shape, generator=generator, device=device)
    prompt = objective._rewrite(CAPTURE_PROMPT.format(trainer.config.placeholder))
    ids = objective.conditioner.tokenize([prompt], device)
    columns = torch.nonzero(torch.isin(ids[0][0], torch.tensor(trainer.tokens.ids, device=device)))[:, 0]
    maps = []
    for t in timesteps.split(chunk):
        b = t.shape[0]
        noisy = objective.add_noise(latents.expand(b, -1, -1, -1), noise.expand(b, -1, -1, -1), t)
        embeddings, residuals = trainer.mapper(t, trainer.data.image_embeds[:1].expand(b, -1))
        conditioning = objective.conditioning([x.expand(b, -1) for x in ids], embeddings, residuals,
                                              torch.zeros_like(t))
        with capturing_attention(trainer.base.unet, columns) as store:
            objective.denoise(noisy, t, conditioning, unet=trainer.base.unet)
        maps.append(average_maps(store, resolution))
    return timesteps.cpu(), torch.cat(maps)
