"""Concepts for tests: random (non-zero) mappers on the tiny model, so every stage is distinguishable;
and a diffusers `StableDiffusionPipeline` on the tiny model's modules."""

import torch

from personamagic.concept import Concept
from personamagic.method.mapper import MapperConfig, StageMapper
from personamagic.training.trainer import supercategory_embedding


def random_concept(base, window=(400, 800), seed=0, placeholder="S*", supercategory="face", num_vectors=1) -> Concept:
    super_embedding = supercategory_embedding(base, supercategory)
    torch.manual_seed(seed)
    config = MapperConfig(text_embed_dim=base.hidden_size, image_embed_dim=16, num_vectors=num_vectors,
                          encoder_widths=base.encoder_widths, residual_dim=base.cross_attention_dim)
    mapper = StageMapper(config, super_embedding)
    with torch.no_grad():
        for p in mapper.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return Concept(
        mapper_state=mapper.state_dict(),
        image_embeds=torch.randn(1, 16),
        placeholder=placeholder,
        supercategory=supercategory,
        stage_window=window,
        num_train_timesteps=1000,
        base_model="tiny",
        text_encoder_hidden_size=base.hidden_size,
        mapper_config=mapper.config.to_dict(),
        family=base.family.name,
    )


def stable_diffusion_pipeline(base):
    """diffusers' own `StableDiffusionPipeline` (DDIM, no safety checker) over `base`'s modules."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sd = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=DDIMScheduler.from_config(base.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd
