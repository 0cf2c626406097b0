"""Models built in code, two per family under the names the family gives them: `tiny` / `tiny-sdxl`
(real diffusers / transformers classes at a toy size, seeded) for tests, CI and trying the tool offline,
`random-sd1` / `random-sdxl` (the real sizes, random weights) for benchmarks; and tiny random plug-ins for
tests (a CLIPSeg, a PhotoMaker ID encoder and its weights file).

The tiny models' images are noise-like by nature: they exist so the whole method runs offline on a CPU
in seconds. They use the real tokenizers (built from the shipped BPE vocabulary) and their family's real
noise schedule, so their token ids and timesteps mean what they mean on a real model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..families import SD1, SDXL
from ..families.sd1 import SCHEDULER_CONFIG as SD1_SCHEDULER_CONFIG
from ..families.sdxl import SCHEDULER_CONFIG as SDXL_SCHEDULER_CONFIG
from .components import BaseComponents
from .tokenizer import clip_tokenizer

# the short names of the models built here, as each family names its own
TINY = SD1.tiny_model
TINY_SDXL = SDXL.tiny_model
RANDOM_SD1 = SD1.random_model  # SD-1.x sizes, random weights: for benchmarks (timing does not depend on weights)
RANDOM_SDXL = SDXL.random_model  # SDXL base sizes, random weights: for benchmarks
RANDOM_IMAGE_ENCODER = "random-clip-vit-b32"  # CLIP ViT-B/32 vision tower sizes, random weights
# names of models built in code rather than loaded
BUILT_MODELS = (TINY, TINY_SDXL, RANDOM_SD1, RANDOM_SDXL)
TINY_MODELS = (TINY, TINY_SDXL)  # the offline toys: tiny stand-ins for every other model they use


def build_model(name: str, device=None) -> BaseComponents:
    """The model built in code under `name` (one of BUILT_MODELS): a toy on the CPU (moved later), or a
    real-size one directly on `device`."""
    toys = {TINY: build_tiny_components, TINY_SDXL: build_tiny_sdxl_components}
    real_size = {RANDOM_SD1: build_random_sd1_components, RANDOM_SDXL: build_random_sdxl_components}
    if name in toys:
        return toys[name]()
    if name in real_size:
        return real_size[name](device)
    raise ValueError(f"no built model named {name!r}; known: {', '.join(BUILT_MODELS)}")


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the offline `tiny` model: SD-1.x's layout (4-level VAE, cross-attention UNet, CLIP
    text encoder with the real vocabulary) at a size that trains in seconds on a CPU."""

    seed: int = 0  # weights are torch.manual_seed(seed) draws, so every process builds the same model
    hidden_size: int = 32  # text encoder width = UNet cross_attention_dim
    text_layers: int = 2  # CLIP text encoder layers
    text_heads: int = 4  # CLIP text encoder heads
    unet_channels: tuple = (32, 64)  # UNet block_out_channels (one cross-attention block per level)
    vae_channels: tuple = (16, 16, 32, 32)  # 4 levels -> scale factor 8, as SD-1.x
    latent_size: int = 16  # UNet sample_size: 16x16 latents -> 128x128 images
    image_embed_dim: int = 16  # projection_dim of the tiny CLIP vision model


def build_tiny_components(config: TinyConfig = TinyConfig()) -> BaseComponents:
    """Build the tiny SD-1.x-shaped model, deterministically, without touching the global RNG."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(
            sample_size=config.latent_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=config.unet_channels,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * len(config.unet_channels),
            up_block_types=("CrossAttnUpBlock2D",) * len(config.unet_channels),
            cross_attention_dim=config.hidden_size,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = _tiny_vae(config.vae_channels, config.latent_size)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.hidden_size,
                intermediate_size=config.hidden_size * 2,
                num_hidden_layers=config.text_layers,
                num_attention_heads=config.text_heads,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                attn_implementation="sdpa",
            )
        )
    return BaseComponents(TINY, SD1, [tokenizer], [text_encoder], vae, unet, dict(SD1_SCHEDULER_CONFIG)).freeze()


def _tiny_vae(channels: tuple, latent_size: int, **family):
    """A tiny `AutoencoderKL`: one level per channel count (4 levels: scale factor 8), 4 latent channels;
    `family`: the family's own settings (SDXL's scaling factor)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                         latent_channels=4, norm_num_groups=8, sample_size=latent_size * 8, **family)


@dataclass(frozen=True)
class TinySDXLConfig:
    """Sizes of `tiny-sdxl`: SDXL's layout (two CLIP text encoders of different widths, the second with
    a projection; a UNet with SDXL's size conditioning, no attention at the top level; SDXL's VAE
    scaling) at a size that trains in seconds on a CPU."""

    seed: int = 0  # weights are torch.manual_seed(seed) draws
    widths: tuple = (32, 48)  # text encoder 1 and 2 widths (real: 768, 1280); cross-attention = their sum
    text_layers: int = 2  # layers of each text encoder
    unet_channels: tuple = (32, 64)  # block_out_channels; level 1 plain, level 2 cross-attention (as SDXL's top)
    time_embed_dim: int = 8  # addition_time_embed_dim (real 256)
    vae_channels: tuple = (16, 16, 32, 32)  # 4 levels -> scale factor 8
    latent_size: int = 16  # 16x16 latents -> 128x128 images


def build_tiny_sdxl_components(config: TinySDXLConfig = TinySDXLConfig()) -> BaseComponents:
    """Build `tiny-sdxl` deterministically, without touching the global RNG; the real SDXL tokenizers
    (the second pads with "!", as OpenCLIP does) and the real SDXL noise schedule."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    w1, w2 = config.widths

    def text_config(width: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
            num_hidden_layers=config.text_layers, num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            attn_implementation="sdpa",
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(
            sample_size=config.latent_size,
            block_out_channels=config.unet_channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=w1 + w2,
            addition_embed_type="text_time",
            addition_time_embed_dim=config.time_embed_dim,
            # six size numbers (original size, crop, target size) + encoder 2's pooled projection
            projection_class_embeddings_input_dim=6 * config.time_embed_dim + w2,
            norm_num_groups=8,
        )
        vae = _tiny_vae(config.vae_channels, config.latent_size, scaling_factor=0.13025, force_upcast=True)
        text_encoder = CLIPTextModel(text_config(w1, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(w2, "gelu"))
    return BaseComponents(TINY_SDXL, SDXL, [tokenizer, tokenizer_2], [text_encoder, text_encoder_2], vae, unet,
                          dict(SDXL_SCHEDULER_CONFIG)).freeze()


# The vision tower of every tiny CLIP (the mapper's image encoder, the T-Sim metric's toy).
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)


def build_tiny_image_encoder(config: TinyConfig = TinyConfig()):
    """A tiny CLIPVisionModelWithProjection + matching CLIPImageProcessor (32x32 input)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION, projection_dim=config.image_embed_dim))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model.eval().requires_grad_(False), processor


def build_tiny_clip(seed: int = 0):
    """A tiny, seeded, randomly initialised `CLIPModel` + `CLIPProcessor` (real classes, SD-1.x
    tokenizer) for the T-Sim metric's tests and offline demos: it runs the metric but knows nothing
    about images."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=TINY_CLIP_VISION, projection_dim=16))
    processor = CLIPProcessor(image_processor=_tiny_clip_image_processor(), tokenizer=tokenizer)
    return model.eval().requires_grad_(False), processor


def _tiny_clip_image_processor():
    # transformers >= 5 names the torchvision-free processor explicitly and warns when it falls back.
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def build_random_sd1_components(device=None) -> BaseComponents:
    """Stable Diffusion 1.x at its real sizes (UNet 320/640/1280/1280, SD VAE, CLIP ViT-L/14 text
    encoder, real tokenizer) with random weights, initialised directly on `device`. For benchmarks:
    timing and memory do not depend on the weights' values. Images are noise."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
            )
        )
    components = BaseComponents(RANDOM_SD1, SD1, [tokenizer], [text_encoder], vae, unet, dict(SD1_SCHEDULER_CONFIG))
    return components.freeze()


def build_tiny_clipseg(seed: int = 0):
    """A tiny, randomly initialised CLIPSeg (real classes, 32x32 input) and its processor, for tests.

    Its masks are noise, but every step of `clipseg_probabilities` runs as with the real model. The
    weights are `torch.manual_seed(seed)` draws taken without touching the global RNG.
    """
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    tokenizer = clip_tokenizer()
    config = CLIPSegConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
        extract_layers=(0, 1),  # one decoder layer per vision layer
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPSegForImageSegmentation(config)
    image_processor = ViTImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=[0.48145466, 0.4578275, 0.40821073],  # CLIP's normalisation, as CLIPSeg's processor
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model.eval().requires_grad_(False), processor


def build_random_sdxl_components(device=None) -> BaseComponents:
    """SDXL base at its real sizes (UNet 320/640/1280 with 1/2/10 transformer layers, CLIP-L + OpenCLIP-G
    text encoders, the SDXL VAE), random weights, initialised directly on `device`: for benchmarks at
    1024². Images are noise."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
            scaling_factor=0.13025, force_upcast=True,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, hidden_act="quick_gelu", **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
            hidden_act="gelu", **common))
    return BaseComponents(RANDOM_SDXL, SDXL, [tokenizer, tokenizer_2], [text_encoder, text_encoder_2], vae, unet,
                          dict(SDXL_SCHEDULER_CONFIG)).freeze()


def build_random_image_encoder(device=None):
    """CLIP ViT-B/32's vision tower at its real sizes (512-d projection), random weights, on `device`:
    for benchmarks."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512)
    with torch.device(device or "cpu"):
        model = CLIPVisionModelWithProjection(config).eval().requires_grad_(False)
    return model, CLIPImageProcessor()


def build_tiny_photomaker(
    seed: int = 0,
    *,
    text_width: int = 80,
    projection_dim: int = 32,
    projection_dim_2: int = 48,
    fuse_hidden_dim: int | None = None,
):
    """A tiny random PhotoMaker ID encoder (same classes, 32x32 images) and its image processor, for tests.

    `text_width` is the prompt embedding width of the SDXL it fuses into (a tiny SDXL: 32 + 48). The
    weights follow `seed` alone; the global RNG is left as it was.
    """
    from transformers import CLIPVisionConfig

    from ..adapters.photomaker.encoder import (
        PhotoMakerConfig,
        PhotoMakerIDEncoder,
        clip_attention_heads,
        id_image_processor,
    )

    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=clip_attention_heads(32),
        image_size=32,
        patch_size=8,
        projection_dim=projection_dim,
    )
    config = PhotoMakerConfig.from_vision_config(
        vision_config,
        projection_dim_2=projection_dim_2,
        prompt_embed_dim=text_width,
        fuse_hidden_dim=fuse_hidden_dim or text_width,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = PhotoMakerIDEncoder(config)
    return encoder.eval().requires_grad_(False), id_image_processor(config)


def tiny_photomaker_lora(unet, *, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA for `unet` in PhotoMaker's `lora_weights` format: q/k/v/out of every attention layer."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for processor_name in unet.attn_processors:  # "<attention>.processor"
        attention = unet.get_submodule(processor_name.removesuffix(".processor"))
        for proj, linear in (
            ("to_q", attention.to_q),
            ("to_k", attention.to_k),
            ("to_v", attention.to_v),
            ("to_out", attention.to_out[0]),
        ):
            prefix = f"unet.{processor_name}.{proj}_lora"
            lora[f"{prefix}.down.weight"] = (
                torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5
            )
            lora[f"{prefix}.up.weight"] = torch.randn(linear.out_features, rank, generator=generator) * 0.1
    return lora


def save_tiny_photomaker_weights(path, id_encoder, unet, *, rank: int = 4, seed: int = 0) -> Path:
    """Write `id_encoder` (a PhotoMakerIDEncoder) and a tiny LoRA for `unet` as a file laid out like
    `photomaker-v1.bin`."""
    path = Path(path)
    state = {"id_encoder": id_encoder.state_dict(), "lora_weights": tiny_photomaker_lora(unet, rank=rank, seed=seed)}
    torch.save(state, path)
    return path
