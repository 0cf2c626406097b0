"""Stable Diffusion 1.x (SD 1.4, 1.5 and their fine-tunes such as dreamlike-photoreal-2.0).

One CLIP ViT-L/14 text encoder; the UNet reads its last hidden state (768 wide) through cross-attention
and nothing else. 512x512 images, 64x64 latents; cross-attention at the 64², 32², 16² and 8² latent
levels. The partition averages every cross-attention layer's map on a 16x16 grid (docs/method.md: the level
whose maps carry the layout without the 64² level's texture noise). The tandem-equilibrium loss reads the
text encoder's last layer, whose output is what the UNet sees. Textual-inversion files are
`{token: Tensor[n, 768]}`, diffusers' format, which A1111 and ComfyUI read too.
"""

from __future__ import annotations

from personamagic import DEFAULT_BASE_MODEL

from .base import ModelFamily, TextEncoderSpec

# CompVis/stable-diffusion-v1-4's scheduler/scheduler_config.json (SD 1.5 ships the same schedule): the
# noise schedule of the `tiny` models, so that their timesteps mean what they mean on a real model.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


class StableDiffusion1(ModelFamily):
    name = "sd1"
    title = "Stable Diffusion 1.x"
    default_model = DEFAULT_BASE_MODEL
    suggested_models = (
        DEFAULT_BASE_MODEL,
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "dreamlike-art/dreamlike-photoreal-2.0",
    )
    tiny_model = "tiny"
    random_model = "random-sd1"
    image_size = 512
    pipeline_class = "StableDiffusionPipeline"
    encoders = (TextEncoderSpec("text_encoder", "tokenizer", hidden_layer=None, pooled=False, export_key=None),)
    te_layer = -1
    partition_resolution = 16
    checkpoint_prefixes = ("model.diffusion_model.input_blocks.0.0.", "cond_stage_model.transformer.")
    checkpoint_config_repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"

    def recognizes_index(self, index: dict) -> bool:
        components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        return {"unet", "vae", "text_encoder", "tokenizer"} <= components and "text_encoder_2" not in components

    def pipeline_kwargs(self) -> dict:
        # diffusers' SD-1.x pipeline would load its NSFW safety checker (and warn without one); PersonaMagic
        # runs none, as its own pipeline does
        return {"safety_checker": None, "requires_safety_checker": False}

    def problems(self, components) -> list[str]:
        unet, vae = components.unet, components.vae
        found = []
        if type(unet).__name__ != "UNet2DConditionModel":
            found.append(f"UNet is {type(unet).__name__}")
        if unet.config.in_channels != 4:
            found.append(f"UNet takes {unet.config.in_channels} input channels (an inpainting or depth model)")
        if unet.config.addition_embed_type is not None or unet.config.encoder_hid_dim is not None:
            found.append("UNet has extra conditioning inputs (SDXL-style)")
        if vae.config.latent_channels != 4:
            found.append(f"VAE has {vae.config.latent_channels} latent channels")
        if len(components.text_encoders) != 1:
            found.append(f"{len(components.text_encoders)} text encoders (SD-1.x has one)")
            return found
        text_encoder = components.text_encoders[0]
        if type(text_encoder).__name__ != "CLIPTextModel":
            found.append(f"text encoder is {type(text_encoder).__name__}")
        elif getattr(text_encoder.config, "hidden_act", "quick_gelu") != "quick_gelu":
            # SD 2.x's OpenCLIP-H text encoder is also a CLIPTextModel, with GELU activations
            found.append("text encoder is OpenCLIP (Stable Diffusion 2.x)")
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            found.append("UNet cross-attention width does not match the text encoder")
        return found


SD1 = StableDiffusion1()
