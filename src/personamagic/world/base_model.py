"""The world's base model: Stable Diffusion 1.x's layout at the world's size — a diffusers
`AutoencoderKL` (64² → 16²×4, a scale factor of 4), a `UNet2DConditionModel` with cross-attention at
every level, and a transformers `CLIPTextModel` with the real SD tokenizer — built untrained here and
trained from scratch by `personamagic world train-base`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..families.sd1 import SCHEDULER_CONFIG
from ..models.tokenizer import clip_tokenizer


@dataclass(frozen=True)
class WorldModelConfig:
    """Sizes of the world's base model (6.6M UNet, 0.65M VAE, a 64-wide 3-layer text encoder)."""

    seed: int = 0  # initial weights are torch.manual_seed(seed) draws
    vae_channels: tuple = (16, 32, 64)  # 3 levels: scale factor 4, 64² images -> 16² latents
    unet_channels: tuple = (64, 128, 128)  # UNet block_out_channels; cross-attention at 8² and 4²
    unet_layers: int = 1  # resnets per UNet block
    head_dim: int = 32  # UNet attention head width (heads = channels / head_dim)
    text_width: int = 64  # text encoder width = UNet cross_attention_dim
    text_layers: int = 3  # CLIP text encoder layers
    text_heads: int = 4  # CLIP text encoder heads
    resolution: int = 64  # image side

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def build_vae(config: WorldModelConfig = WorldModelConfig()):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
            block_out_channels=config.vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=config.resolution,
            mid_block_add_attention=False,  # a 16² self-attention costs a third of a CPU step here
        )


def build_unet(config: WorldModelConfig = WorldModelConfig()):
    from diffusers import UNet2DConditionModel

    levels = len(config.unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        return UNet2DConditionModel(
            sample_size=config.resolution // 2 ** (len(config.vae_channels) - 1),
            in_channels=4,
            out_channels=4,
            block_out_channels=config.unet_channels,
            layers_per_block=config.unet_layers,
            # SD-1.x's pattern shifted by one level: its lowest level has no attention, ours has none at
            # the top (16²), where attention would cost most of a CPU step
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            cross_attention_dim=config.text_width,
            # diffusers' `attention_head_dim` is the number of heads (a known misnomer)
            attention_head_dim=tuple(max(1, c // config.head_dim) for c in config.unet_channels),
            norm_num_groups=32,
        )


def build_text_encoder(config: WorldModelConfig = WorldModelConfig()):
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 2)
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=config.text_width * 4,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            attn_implementation="sdpa",
        ))


def scheduler_config() -> dict:
    """The world model's noise schedule: SD-1.4's, so its timesteps mean what they mean on SD."""
    return dict(SCHEDULER_CONFIG)
