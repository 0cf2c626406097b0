"""Stable Diffusion XL (SDXL base 1.0 and its fine-tunes: RealVisXL, Juggernaut XL, ...).

Two text encoders: CLIP ViT-L (768 wide) and OpenCLIP ViT-bigG (1280 wide, with a text projection).
The UNet's cross-attention reads the *penultimate* hidden states of both, side by side (2048 wide), as
diffusers' `StableDiffusionXLPipeline.encode_prompt` builds them; its added conditioning is the pooled,
projected end-of-text embedding of encoder 2 (`text_embeds`) and six size numbers (`time_ids`: original
size, crop top-left, target size). Both depend on the prompt, so S* reaches them too and they follow
the stages. A missing negative prompt is all zeros (`force_zeros_for_empty_prompt` of the base model; an explicit "" is encoded, as in diffusers).

Choices of PersonaMagic on this family (see docs/method.md):
* the tandem-equilibrium loss reads layer -2 of each encoder, the last layer whose output reaches the
  UNet's cross-attention; the two encoders' terms are averaged (`TrainConfig.te_encoder_weights`);
* the stage partition averages the cross-attention maps on a 32x32 grid: at 1024² (128² latents) SDXL
  has cross-attention only at the 64² and 32² levels, and 32² is the coarser of the two — the same
  quarter of the latent side that SD-1.x's 16² is of its 64² latents, where the layout is read;
* the VAE overflows in fp16 (its config says `force_upcast`): it decodes in fp32 unless a fixed VAE is
  given (`--vae`, e.g. madebyollin/sdxl-vae-fp16-fix);
* textual-inversion files are `{"clip_l": [n, 768], "clip_g": [n, 1280]}` (kohya's format, read by
  A1111 and ComfyUI; diffusers loads each part with its own `load_textual_inversion` call).
"""

from __future__ import annotations

import torch

from .base import ModelFamily, TextEncoderSpec

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json: the schedule of `tiny-sdxl`.
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"
    default_model = "stabilityai/stable-diffusion-xl-base-1.0"
    suggested_models = ("stabilityai/stable-diffusion-xl-base-1.0",)
    repo_name_hints = ("xl",)  # RealVisXL_V4.0, Juggernaut-XL-v9, ...
    tiny_model = "tiny-sdxl"
    random_model = "random-sdxl"
    image_size = 1024
    pipeline_class = "StableDiffusionXLPipeline"
    encoders = (
        TextEncoderSpec("text_encoder", "tokenizer", hidden_layer=-2, pooled=False, export_key="clip_l"),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", hidden_layer=-2, pooled=True, export_key="clip_g"),
    )
    te_layer = -2
    partition_resolution = 32
    addition_embed_type = "text_time"
    zero_empty_negative = True
    supports_photomaker = True  # PhotoMaker v1 is made for SDXL: its fuse MLP is 2048 wide, CLIP-L + OpenCLIP-G
    checkpoint_prefixes = ("model.diffusion_model.", "conditioner.embedders.0.transformer.",
                           "conditioner.embedders.1.model.")
    checkpoint_config_repo = "stabilityai/stable-diffusion-xl-base-1.0"

    def encoder_width_problems(self, widths: list[int]) -> list[str]:
        found = super().encoder_width_problems(widths)
        if not found and widths[0] >= widths[1]:  # CLIP ViT-L (768) comes first, OpenCLIP bigG (1280) second
            found.append(f"encoder widths {widths}: clip_l (encoder 1) is narrower than clip_g (encoder 2) in every "
                         "SDXL model, so these are swapped")
        return found

    def recognizes_index(self, index: dict) -> bool:
        components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        needed = {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
        return index.get("_class_name") == "StableDiffusionXLPipeline" and needed <= components

    def problems(self, components) -> list[str]:
        unet, vae = components.unet, components.vae
        found = []
        if unet.config.in_channels != 4:
            found.append(f"UNet takes {unet.config.in_channels} input channels (an inpainting model)")
        if unet.config.addition_embed_type != "text_time":
            found.append("UNet has no SDXL size conditioning")
        if len(components.text_encoders) != 2:
            found.append(f"{len(components.text_encoders)} text encoder(s) (SDXL has two)")
            return found
        widths = sum(e.config.hidden_size for e in components.text_encoders)
        if unet.config.cross_attention_dim != widths:
            found.append(f"UNet cross-attention width {unet.config.cross_attention_dim} is not the encoders' {widths}")
        if not hasattr(components.text_encoders[1], "text_projection"):
            found.append("text encoder 2 has no text projection (the pooled embedding)")
        if vae.config.latent_channels != 4:
            found.append(f"VAE has {vae.config.latent_channels} latent channels")
        return found

    def added_conditioning(self, pooled, time_ids) -> dict:
        return {"text_embeds": pooled, "time_ids": time_ids}

    def time_ids(self, original_size, crop_top_left, target_size):
        return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


SDXL = StableDiffusionXL()
