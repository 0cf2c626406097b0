"""A Hugging Face hub cache of tiny models in the real repos' file layouts, for tests without a network.

`build_hub_cache(root)` writes `root/hub`, a folder that huggingface_hub reads as its cache (point
`HF_HUB_CACHE` at it and set `HF_HUB_OFFLINE=1`): every repo a PersonaMagic user may name by id —
`CompVis/stable-diffusion-v1-4`, `openai/clip-vit-base-patch32`, ... — stored the way huggingface_hub 2.x
stores a download: `models--owner--name/refs/main` holds a commit hash, `blobs/` the file contents (named
by their git or LFS hash), `snapshots/<hash>/` relative symlinks to them and, for the diffusers pipelines
(which `DiffusionPipeline.from_pretrained` fetches with `snapshot_download`), the tree listing
`trees/<hash>.json` that diffusers reads offline. Beside the cache it writes what a user may pass instead
of an id: plain diffusers folders and single-file checkpoints in the original LDM / SGM key layouts.

Why: the paths real users take must run in tests through the real libraries' own loaders. So the file
names, JSON keys and values are those of the real repos (copied from the repos' files; the source of
each is cited beside it) and only the sizes are tiny — those of `personamagic.models.TinyConfig` (text
width 32, UNet (32, 64), VAE (16, 16, 32, 32), 16x16 latents = 128x128 images). The weights are random
draws under a fixed seed per repo (each repo has its own), taken without touching the global RNG, so
every build writes the same bytes. They are generated here and never committed.

Sources of the real files (git mirrors of the hub repos on GitHub, whose history carries the hub commits):
- CompVis/stable-diffusion-v1-4 at hub commit 133a221b (2023-08-23, the mirror's latest hub commit):
  wswplay/stable-diffusion-v1-4.
- runwayml/stable-diffusion-v1-5 at 1d0c4eb (2023-08-23): HDRJ-One/runwayml-stable-diffusion-v1-5;
  stable-diffusion-v1-5/stable-diffusion-v1-5 is its re-upload (assumed identical files: not verified).
- dreamlike-art/dreamlike-photoreal-2.0 at db49fbf (2023-01-27): jack-op11/dreamlike-photoreal-2.0.
- stabilityai/stable-diffusion-xl-base-1.0 at bf71498 (2023-08-04):
  andrewcchoi/stabilityai-stable-diffusion-xl-base-1.0.
- stabilityai/stable-diffusion-2-1 (snapshot of 2023-02-13): jack-op11/stable-diffusion-2-1.
- runwayml/stable-diffusion-inpainting at caac104 (2022-12-14): jack-op11/stable-diffusion-inpainting, used
  for its re-upload stable-diffusion-v1-5/stable-diffusion-inpainting (later changes there not verified).
- stabilityai/stable-diffusion-xl-refiner-1.0 model_index.json: the copy in JSchalter/models.
- openai/clip-vit-base-patch32 config.json: the dump in whaler404/Hf-Learn (transformers_learn/.../clip.md).
- lithiumice/ArcFace_PyTorch: file name and format as documented at personamagic.identity.DEFAULT_IDENTITY_MODEL.
Values that no copy confirmed are marked "not verified" where they are written.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

SD14 = "CompVis/stable-diffusion-v1-4"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DREAMLIKE = "dreamlike-art/dreamlike-photoreal-2.0"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
SD21 = "stabilityai/stable-diffusion-2-1"
SD15_INPAINTING = "stable-diffusion-v1-5/stable-diffusion-inpainting"
CLIPSEG = "CIDAS/clipseg-rd64-refined"
CLIP_B32 = "openai/clip-vit-base-patch32"
ARCFACE = "lithiumice/ArcFace_PyTorch"
ARCFACE_FILE = "ms1mv3_arcface_r100_fp16.pth"

# One seed per repo, so that no two repos share weights (a test can tell which one was loaded).
SEEDS = {
    SD14: 14, SD15: 15, DREAMLIKE: 20, SDXL: 10, SD21: 21, SD15_INPAINTING: 9, CLIPSEG: 64, CLIP_B32: 32, ARCFACE: 100,
}

# Files stored with git LFS on the hub: their blobs are named by sha256, the others by their git hash.
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pth", ".pt", ".onnx", ".msgpack")

# --------------------------------------------------------------------------------------------------
# Tiny sizes: each replaces the real value of the same key; every other key keeps the real value.

TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
# SD-1.x/2.x UNet: two levels for four, keeping the real pattern (cross-attention at every level but the
# lowest resolution); layers_per_block 2, attention_head_dim 8 and norm_num_groups 32 stay real.
TINY_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": TINY_TEXT["hidden_size"],
    "sample_size": 16,  # real 64 (512 px); repos made for 768 px (real 96) get 24
}
# The one non-size value changed: diffusers' SD pipelines rewrite a UNet's sample_size below 64 to 64 when
# its config's _diffusers_version is older than 0.9 (a fix-up for early SD configs), which would turn the
# tiny 16x16 latents into 64x64 ones. So the UNet configs of SD-1.4 (real 0.2.2), SD-1.5 (0.6.0) and the
# inpainting model (0.6.0.dev0) say 0.9.0.
TINY_UNET_VERSION = {"_diffusers_version": "0.9.0"}
# norm_num_groups must divide the 16-channel levels; the real default (32) does not.
TINY_VAE = {"block_out_channels": [16, 16, 32, 32], "norm_num_groups": 8, "sample_size": 128}
# StableDiffusionSafetyChecker's CLIP config, in the legacy `*_config_dict` form of the real files.
TINY_SAFETY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
TINY_SAFETY_VISION = {**TINY_SAFETY_TEXT, "patch_size": 14}
TINY_PROJECTION = 16  # projection_dim of the tiny CLIP / CLIPSeg / safety checker

# --------------------------------------------------------------------------------------------------
# Real files, SD-1.4 (CompVis/stable-diffusion-v1-4 @ 133a221b); sizes are replaced where used.

SD14_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.2.2",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD14_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# A stray Jupyter checkpoint that the real repo ships (and `from_pretrained` downloads) beside the config.
SD14_SCHEDULER_IPYNB = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.2.2",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
}
SD14_TEXT_ENCODER = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "torch_dtype": "float32",
    "transformers_version": "4.21.0.dev0",
    "vocab_size": 49408,
}
SD14_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.2.2",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD14_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.2.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD14_SAFETY_CHECKER = {
    "_name_or_path": "./safety_module",
    "architectures": ["StableDiffusionSafetyChecker"],
    "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592,
    "model_type": "clip",
    "projection_dim": 768,
    "text_config_dict": {
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    },
    "torch_dtype": "float32",
    "transformers_version": None,
    "vision_config_dict": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14,
    },
}
# feature_extractor/preprocessor_config.json of SD-1.4, SD-1.5, SD-2.1 and the inpainting model alike.
SD_FEATURE_EXTRACTOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def _added_token(content: str, *, typed: bool) -> dict:
    token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if typed else token


# tokenizer/special_tokens_map.json, tokenizer/tokenizer_config.json of SD-1.4 (SD-1.5's are the same).
SD_SPECIAL_TOKENS = {
    "bos_token": _added_token("<|startoftext|>", typed=False),
    "eos_token": _added_token("<|endoftext|>", typed=False),
    "pad_token": "<|endoftext|>",
    "unk_token": _added_token("<|endoftext|>", typed=False),
}
SD_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": _added_token("<|startoftext|>", typed=True),
    "do_lower_case": True,
    "eos_token": _added_token("<|endoftext|>", typed=True),
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": _added_token("<|endoftext|>", typed=True),
}

# --------------------------------------------------------------------------------------------------
# SD-1.5 (runwayml/stable-diffusion-v1-5 @ 1d0c4eb): SD-1.4's files but for the keys below.

SD15_MODEL_INDEX = {**SD14_MODEL_INDEX, "_diffusers_version": "0.6.0"}
SD15_SCHEDULER = {**SD14_SCHEDULER, "_diffusers_version": "0.6.0"}
SD15_TEXT_ENCODER = {**SD14_TEXT_ENCODER, "projection_dim": 768, "transformers_version": "4.22.0.dev0"}
SD15_UNET = {**SD14_UNET, "_diffusers_version": "0.6.0"}
# SD-1.5's VAE config has norm_num_groups and no scaling_factor (AutoencoderKL's default is 0.18215).
SD15_VAE = {k: v for k, v in SD14_VAE.items() if k != "scaling_factor"} | {
    "_diffusers_version": "0.6.0", "norm_num_groups": 32,
}
# SD-1.5's safety checker config also carries transformers 4.22's full text_config / vision_config dumps,
# left out here: the `*_config_dict` entries below are the ones that set the sizes.
SD15_SAFETY_CHECKER = {
    "_commit_hash": "4bb648a606ef040e7685bde262611766a5fdd67b",
    **SD14_SAFETY_CHECKER,
    "_name_or_path": "CompVis/stable-diffusion-safety-checker",
}

# --------------------------------------------------------------------------------------------------
# dreamlike-art/dreamlike-photoreal-2.0 @ db49fbf: a 768 px SD-1.5 fine-tune without a safety checker,
# with a DDIM scheduler. Its diffusers weights are float16 (the LFS sizes: text encoder 246 MB, UNet
# 1.7 GB, VAE 167 MB), so the tiny ones are too. No fp16 variant files.

DREAMLIKE_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.10.2",
    "feature_extractor": [None, None],
    "requires_safety_checker": None,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
DREAMLIKE_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.10.2",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
DREAMLIKE_TEXT_ENCODER = {
    **SD14_TEXT_ENCODER, "projection_dim": 768, "torch_dtype": "float16", "transformers_version": "4.26.0.dev0",
}
DREAMLIKE_UNET = {
    **SD14_UNET,
    "_diffusers_version": "0.10.2",
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": False,
    "use_linear_projection": False,
}
DREAMLIKE_VAE = {**SD14_VAE, "_diffusers_version": "0.10.2", "norm_num_groups": 32, "sample_size": 256}
DREAMLIKE_TOKENIZER_CONFIG = {**SD_TOKENIZER_CONFIG, "name_or_path": "runwayml/stable-diffusion-v1-5"}

# --------------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-xl-base-1.0 @ bf71498.

SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
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
# The config says float16 but the main weights are float32 (text encoder 492 MB); fp16 is the variant.
SDXL_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0",
    "vocab_size": 49408,
}
# OpenCLIP ViT-bigG/14's text tower.
SDXL_TEXT_ENCODER_2 = {
    **SDXL_TEXT_ENCODER,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.20.0.dev0",
    "_name_or_path": "../sdxl-vae/",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# SDXL's tokenizer files add clean_up_tokenization_spaces and drop name_or_path / special_tokens_map_file;
# tokenizer_2 pads with "!" (OpenCLIP's pad id 0) where tokenizer pads with <|endoftext|>.
SDXL_TOKENIZER_CONFIG = {
    k: v for k, v in SD_TOKENIZER_CONFIG.items() if k not in ("name_or_path", "special_tokens_map_file")
} | {"clean_up_tokenization_spaces": True}
SDXL_TOKENIZER_2_CONFIG = {**SDXL_TOKENIZER_CONFIG, "pad_token": "!"}
SDXL_SPECIAL_TOKENS_2 = {**SD_SPECIAL_TOKENS, "pad_token": "!"}

# Tiny SDXL: encoder widths 32 and 48 (they must differ: diffusers' single-file loader tells the two
# apart by width); encoder 2 keeps 10 layers, the fewest with which diffusers' single-file detection
# (the key `conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias`) recognises SDXL.
TINY_SDXL_TEXT = {**TINY_TEXT, "projection_dim": 32}
TINY_SDXL_TEXT_2 = {
    "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 10, "projection_dim": 48,
}
TINY_SDXL_TIME_EMBED = 8  # addition_time_embed_dim (real 256)
TINY_SDXL_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],  # heads of 16 channels (real: heads of 64)
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": TINY_SDXL_TEXT["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],
    "addition_time_embed_dim": TINY_SDXL_TIME_EMBED,
    # 6 micro-conditioning numbers (original size, crop, target size) + encoder 2's pooled projection.
    "projection_class_embeddings_input_dim": 6 * TINY_SDXL_TIME_EMBED + TINY_SDXL_TEXT_2["projection_dim"],
    "sample_size": 16,
}

# stabilityai/stable-diffusion-xl-refiner-1.0: only what tells a loader what it is. The scheduler file is
# not verified: written as the base model's (same diffusers version, same schedule).
SDXL_REFINER_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLImg2ImgPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": False,
    "add_watermarker": None,
    "requires_aesthetics_score": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": [None, None],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": [None, None],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# --------------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-2-1 (snapshot of 2023-02-13): OpenCLIP-H text encoder (gelu, 23 layers),
# v-prediction. Later hub commits changed model_index's CLIPFeatureExtractor to CLIPImageProcessor.

SD21_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.8.0",
    "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "requires_safety_checker": False,
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD21_TEXT_ENCODER = {
    **SD14_TEXT_ENCODER,
    "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "transformers_version": "4.25.0.dev0",
}
SD21_UNET = {
    **SD14_UNET,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "use_linear_projection": True,
    "upcast_attention": True,
}
SD21_VAE = {
    **SD15_VAE,
    "_diffusers_version": "0.8.0",
    "_name_or_path": "hf-models/stable-diffusion-v2-768x768/vae",
    "sample_size": 768,
}
# SD-2.1's tokenizer files disagree on the pad token ("!" in the map, <|endoftext|> in the config): real.
SD21_SPECIAL_TOKENS = {**SD_SPECIAL_TOKENS, "pad_token": "!"}
SD21_TOKENIZER_CONFIG = {**SD_TOKENIZER_CONFIG, "name_or_path": "hf-models/stable-diffusion-v2-768x768/tokenizer"}

# --------------------------------------------------------------------------------------------------
# runwayml/stable-diffusion-inpainting @ caac104: a UNet with 9 input channels (latents, mask, masked image).

INPAINTING_MODEL_INDEX = {
    **SD15_MODEL_INDEX,
    "_class_name": "StableDiffusionInpaintPipeline",
    "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}
INPAINTING_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.6.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
    "skip_prk_steps": True,
}
INPAINTING_UNET = {**SD14_UNET, "_diffusers_version": "0.6.0.dev0", "in_channels": 9}
INPAINTING_VAE = {**SD15_VAE, "_diffusers_version": "0.6.0.dev0", "sample_size": 256}

# --------------------------------------------------------------------------------------------------
# openai/clip-vit-base-patch32 (config.json as dumped in whaler404/Hf-Learn; the dump's generation-era
# keys — max_length, top_k, ... — are left out). The preprocessor and tokenizer files are not verified
# against a copy: written as the CLIP files of the same era (openai/clip-vit-large-patch14's, which the SD
# repos copied), without do_convert_rgb.

CLIP_B32_TEXT = {
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 512, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 2048,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 8,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 512, "vocab_size": 49408,
}
CLIP_B32_VISION = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 768, "image_size": 224,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 32,
    "projection_dim": 512,
}
CLIP_B32_CONFIG = {
    "_name_or_path": "openai/clip-vit-base-patch32",
    "architectures": ["CLIPModel"],
    "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592,
    "model_type": "clip",
    "projection_dim": 512,
    "text_config": CLIP_B32_TEXT,
    "text_config_dict": None,
    "transformers_version": None,
    "vision_config": CLIP_B32_VISION,
    "vision_config_dict": None,
}
CLIP_B32_PREPROCESSOR = {k: v for k, v in SD_FEATURE_EXTRACTOR.items() if k != "do_convert_rgb"}
CLIP_B32_TOKENIZER_CONFIG = {**SD_TOKENIZER_CONFIG, "name_or_path": "openai/clip-vit-base-patch32"}
# The tiny CLIP: the image size of personamagic's tiny image encoder (32 px, 8 px patches).
TINY_CLIP_VISION = {**TINY_TEXT, "image_size": 32, "patch_size": 8, "projection_dim": TINY_PROJECTION}

# --------------------------------------------------------------------------------------------------
# CIDAS/clipseg-rd64-refined: not verified against a copy of its files. Values: transformers' CLIPSeg
# defaults (which describe this model: CLIP ViT-B/16, extract_layers 3/6/9, reduce_dim 64), the "refined"
# variant's complex transposed convolution (as its author explains in timojl/clipseg on GitHub, thread
# 25) and the special token ids of the CLIP configs of its conversion time (4.24: bos 0, eos 2, pad 1).
# Its image processor resizes to 352 px with ImageNet's mean/std (as a copy of the file in another
# project's test fixture has it) while the vision config says 224: CLIPSeg interpolates its position
# embeddings. The tiny keeps that ratio (64 / 96). The weights file name (model.safetensors) and the
# tokenizer files (SD-1.4's) are not verified either.

CLIPSEG_CONFIG = {
    "architectures": ["CLIPSegForImageSegmentation"],
    "conditional_layer": 0,
    "decoder_attention_dropout": 0.0,
    "decoder_hidden_act": "quick_gelu",
    "decoder_intermediate_size": 2048,
    "decoder_num_attention_heads": 4,
    "extract_layers": [3, 6, 9],
    "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592,
    "model_type": "clipseg",
    "projection_dim": 512,
    "reduce_dim": 64,
    "text_config": {
        **{k: v for k, v in CLIP_B32_TEXT.items() if k != "projection_dim"}, "model_type": "clipseg_text_model",
    },
    "torch_dtype": "float32",
    "transformers_version": "4.24.0.dev0",
    "use_complex_transposed_convolution": True,
    "vision_config": {
        **{k: v for k, v in CLIP_B32_VISION.items() if k != "projection_dim"},
        "model_type": "clipseg_vision_model",
        "patch_size": 16,
    },
}
CLIPSEG_PREPROCESSOR = {
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "ViTImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "processor_class": "CLIPSegProcessor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 352, "width": 352},
}
TINY_CLIPSEG = {
    "extract_layers": [0, 1],  # one decoder layer per tiny vision layer
    "reduce_dim": 16,
    "decoder_num_attention_heads": 2,
    "decoder_intermediate_size": 32,
    "projection_dim": TINY_PROJECTION,
}
TINY_CLIPSEG_VISION = {**TINY_TEXT, "image_size": 64}  # patch_size 16 stays: the decoder upsamples x16
TINY_CLIPSEG_INPUT = 96  # the image processor's size (352 for 224 in the real files)

# The tiny ArcFace: insightface's IResNet layout at a tiny width (the real file is an IResNet-100).
TINY_ARCFACE = {"layers": (1, 1, 1, 1), "widths": (8, 8, 16, 16), "embedding_dim": 16, "input_size": 112}


# --------------------------------------------------------------------------------------------------
# building


def build_hub_cache(root: Path) -> dict:
    """Write the hub cache under `root/hub` and the extra artefacts beside it; return their paths.

    Keys: "root"; "hub_cache" (the `HF_HUB_CACHE` folder); "snapshots" ({repo id: snapshot folder});
    "sd14_folder" (a plain copy of SD-1.4's snapshot), "sd14_linear_schedule_folder" (the same weights
    with a linear beta schedule), "sd15_v_prediction_folder" (SD-1.5 with prediction_type v_prediction),
    "sd14_safetensors" / "sd14_ckpt" (SD-1.4 as one LDM checkpoint), "sdxl_safetensors" (SDXL as one SGM
    checkpoint).
    """
    root = Path(root)
    cache = root / "hub"
    bpe = _clip_bpe_files()
    repos, modules = {}, {}
    repos[SD14], modules[SD14] = _sd_pipeline(
        SEEDS[SD14], bpe,
        model_index=SD14_MODEL_INDEX, scheduler=SD14_SCHEDULER, text_encoder=SD14_TEXT_ENCODER,
        unet=SD14_UNET, vae=SD14_VAE, safety_checker=SD14_SAFETY_CHECKER, fp16_variant=True,
        unet_overrides=TINY_UNET_VERSION,
        extra={"scheduler/.ipynb_checkpoints/scheduler_config-checkpoint.json": _json(SD14_SCHEDULER_IPYNB)},
    )
    repos[SD15], _ = _sd_pipeline(
        SEEDS[SD15], bpe,
        model_index=SD15_MODEL_INDEX, scheduler=SD15_SCHEDULER, text_encoder=SD15_TEXT_ENCODER,
        unet=SD15_UNET, vae=SD15_VAE, safety_checker=SD15_SAFETY_CHECKER, fp16_variant=True,
        unet_overrides=TINY_UNET_VERSION,
    )
    repos[DREAMLIKE], _ = _sd_pipeline(
        SEEDS[DREAMLIKE], bpe,
        model_index=DREAMLIKE_MODEL_INDEX, scheduler=DREAMLIKE_SCHEDULER, text_encoder=DREAMLIKE_TEXT_ENCODER,
        unet=DREAMLIKE_UNET, vae=DREAMLIKE_VAE, tokenizer_config=DREAMLIKE_TOKENIZER_CONFIG,
        feature_extractor=None, dtype=torch.float16,
    )
    repos[SD21], _ = _sd_pipeline(
        SEEDS[SD21], bpe,
        model_index=SD21_MODEL_INDEX, scheduler=SD21_SCHEDULER, text_encoder=SD21_TEXT_ENCODER,
        unet=SD21_UNET, vae=SD21_VAE, tokenizer_config=SD21_TOKENIZER_CONFIG, special_tokens=SD21_SPECIAL_TOKENS,
        unet_overrides={"attention_head_dim": [2, 4]},  # a per-level list, as the real one (heads of 16)
    )
    repos[SD15_INPAINTING], _ = _sd_pipeline(
        SEEDS[SD15_INPAINTING], bpe,
        model_index=INPAINTING_MODEL_INDEX, scheduler=INPAINTING_SCHEDULER, text_encoder=SD15_TEXT_ENCODER,
        unet=INPAINTING_UNET, vae=INPAINTING_VAE, safety_checker=SD15_SAFETY_CHECKER, unet_overrides=TINY_UNET_VERSION,
    )
    repos[SDXL], modules[SDXL] = _sdxl_pipeline(SEEDS[SDXL], bpe)
    repos[SDXL_REFINER] = {
        "model_index.json": _json(SDXL_REFINER_MODEL_INDEX),
        "scheduler/scheduler_config.json": _json(SDXL_SCHEDULER),
    }
    transformers_repos = {
        CLIPSEG: _clipseg(SEEDS[CLIPSEG], bpe),
        CLIP_B32: _clip(SEEDS[CLIP_B32], bpe),
        ARCFACE: _arcface(SEEDS[ARCFACE]),
    }

    # Diffusers pipelines come down with snapshot_download (which records the tree listing); the
    # transformers models and the ArcFace file file by file with hf_hub_download (which does not).
    snapshots = {repo_id: _write_repo(cache, repo_id, files, tree_listing=True) for repo_id, files in repos.items()}
    for repo_id, files in transformers_repos.items():
        snapshots[repo_id] = _write_repo(cache, repo_id, files, tree_listing=False)

    artefacts = {"root": root, "hub_cache": cache, "snapshots": snapshots}
    artefacts["sd14_folder"] = _plain_copy(snapshots[SD14], root / "sd14-diffusers")
    artefacts["sd14_linear_schedule_folder"] = _plain_copy(
        snapshots[SD14], root / "sd14-linear-schedule",
        scheduler={**SD14_SCHEDULER, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    )
    artefacts["sd15_v_prediction_folder"] = _plain_copy(
        snapshots[SD15], root / "sd15-v-prediction", scheduler={**SD15_SCHEDULER, "prediction_type": "v_prediction"}
    )
    ldm = sd1_to_ldm(modules[SD14]["unet"], modules[SD14]["vae"], modules[SD14]["text_encoder"])
    artefacts["sd14_safetensors"] = _write_bytes(root / "single-file" / "sd-v1-4-tiny.safetensors", _safetensors(ldm))
    artefacts["sd14_ckpt"] = _write_bytes(root / "single-file" / "sd-v1-4-tiny.ckpt", _torch_save({"state_dict": ldm}))
    sgm = sdxl_to_sgm(
        modules[SDXL]["unet"], modules[SDXL]["vae"], modules[SDXL]["text_encoder"], modules[SDXL]["text_encoder_2"]
    )
    artefacts["sdxl_safetensors"] = _write_bytes(
        root / "single-file" / "sd_xl_base_1.0-tiny.safetensors", _safetensors(sgm)
    )
    return artefacts


@contextlib.contextmanager
def _seeded(seed: int):
    """Draws under `torch.manual_seed(seed)`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _sized(real: dict, sizes: dict) -> dict:
    return {**copy.deepcopy(real), **sizes}


def _sd_pipeline(
    seed: int,
    bpe: dict[str, bytes],
    *,
    model_index: dict,
    scheduler: dict,
    text_encoder: dict,
    unet: dict,
    vae: dict,
    tokenizer_config: dict = SD_TOKENIZER_CONFIG,
    special_tokens: dict = SD_SPECIAL_TOKENS,
    feature_extractor: dict | None = SD_FEATURE_EXTRACTOR,
    safety_checker: dict | None = None,
    fp16_variant: bool = False,
    dtype: torch.dtype = torch.float32,
    unet_overrides: dict | None = None,
    extra: dict[str, bytes] | None = None,
) -> tuple[dict[str, bytes], dict[str, torch.nn.Module]]:
    """The files of an SD-1.x/2.x diffusers repo, and its (float32) modules."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # A 768 px model (real sample_size 96) keeps its 1.5x resolution: 24x24 latents.
    latent = TINY_UNET["sample_size"] * unet["sample_size"] // SD14_UNET["sample_size"]
    projection = {"projection_dim": TINY_TEXT["hidden_size"]} if "projection_dim" in text_encoder else {}
    text_config = _sized(text_encoder, TINY_TEXT | projection)
    unet_config = _sized(unet, TINY_UNET | {"sample_size": latent} | (unet_overrides or {}))
    vae_config = _sized(vae, TINY_VAE | {"sample_size": latent * 8})
    with _seeded(seed):
        modules = {
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(text_config)),
            "unet": UNet2DConditionModel.from_config(unet_config),
            "vae": AutoencoderKL.from_config(vae_config),
        }
        if safety_checker is not None:
            modules["safety_checker"] = _safety_checker(safety_checker)
    configs = {"text_encoder": text_config, "unet": unet_config, "vae": vae_config}
    files = {"model_index.json": _json(model_index), "scheduler/scheduler_config.json": _json(scheduler)}
    files |= _tokenizer_files("tokenizer", bpe, tokenizer_config, special_tokens)
    if feature_extractor is not None:
        files["feature_extractor/preprocessor_config.json"] = _json(feature_extractor)
    for name in ("text_encoder", "unet", "vae"):
        files[f"{name}/config.json"] = _json(configs[name])
        files |= _weights(name, _hub_state_dict(modules[name]), dtype=dtype, fp16_variant=fp16_variant)
    if safety_checker is not None:
        files["safety_checker/config.json"] = _json(_sized(safety_checker, _tiny_safety_sizes()))
        state = _hub_state_dict(modules["safety_checker"])
        files |= _weights("safety_checker", state, dtype=dtype, fp16_variant=fp16_variant)
    files |= extra or {}
    return files, modules


def _tiny_safety_sizes() -> dict:
    return {
        "projection_dim": TINY_PROJECTION,
        "text_config_dict": TINY_SAFETY_TEXT,
        "vision_config_dict": TINY_SAFETY_VISION,
    }


def _safety_checker(real: dict) -> torch.nn.Module:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    return StableDiffusionSafetyChecker(CLIPConfig.from_dict(_sized(real, _tiny_safety_sizes())))


def _sdxl_pipeline(seed: int, bpe: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, torch.nn.Module]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = {
        "text_encoder": _sized(SDXL_TEXT_ENCODER, TINY_SDXL_TEXT),
        "text_encoder_2": _sized(SDXL_TEXT_ENCODER_2, TINY_SDXL_TEXT_2),
        "unet": _sized(SDXL_UNET, TINY_SDXL_UNET),
        "vae": _sized(SDXL_VAE, TINY_VAE),
    }
    with _seeded(seed):
        modules = {
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"])),
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
        }
    files = {"model_index.json": _json(SDXL_MODEL_INDEX), "scheduler/scheduler_config.json": _json(SDXL_SCHEDULER)}
    files |= _tokenizer_files("tokenizer", bpe, SDXL_TOKENIZER_CONFIG, SD_SPECIAL_TOKENS)
    files |= _tokenizer_files("tokenizer_2", bpe, SDXL_TOKENIZER_2_CONFIG, SDXL_SPECIAL_TOKENS_2)
    for name, config in configs.items():
        files[f"{name}/config.json"] = _json(config)
        files |= _weights(name, _hub_state_dict(modules[name]), fp16_variant=True)
    return files, modules


def _clip(seed: int, bpe: dict[str, bytes]) -> dict[str, bytes]:
    from transformers import CLIPConfig, CLIPModel

    config = _sized(
        CLIP_B32_CONFIG,
        {
            "projection_dim": TINY_PROJECTION,
            "text_config": _sized(CLIP_B32_TEXT, TINY_TEXT | {"projection_dim": TINY_PROJECTION}),
            "vision_config": _sized(CLIP_B32_VISION, TINY_CLIP_VISION),
        },
    )
    with _seeded(seed):
        model = CLIPModel(CLIPConfig.from_dict(config))
    size = TINY_CLIP_VISION["image_size"]
    files = {
        "config.json": _json(config),
        "model.safetensors": _safetensors(model.state_dict()),
        "preprocessor_config.json": _json(CLIP_B32_PREPROCESSOR | {"crop_size": size, "size": size}),
        "tokenizer.json": bpe["tokenizer.json"],
    }
    return files | _tokenizer_files("", bpe, CLIP_B32_TOKENIZER_CONFIG, SD_SPECIAL_TOKENS)


def _clipseg(seed: int, bpe: dict[str, bytes]) -> dict[str, bytes]:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    config = _sized(
        CLIPSEG_CONFIG,
        TINY_CLIPSEG
        | {
            "text_config": _sized(CLIPSEG_CONFIG["text_config"], TINY_TEXT),
            "vision_config": _sized(CLIPSEG_CONFIG["vision_config"], TINY_CLIPSEG_VISION),
        },
    )
    with _seeded(seed):
        model = CLIPSegForImageSegmentation(CLIPSegConfig.from_dict(config))
    size = {"height": TINY_CLIPSEG_INPUT, "width": TINY_CLIPSEG_INPUT}
    files = {
        "config.json": _json(config),
        "model.safetensors": _safetensors(model.state_dict()),
        "preprocessor_config.json": _json(CLIPSEG_PREPROCESSOR | {"size": size}),
    }
    return files | _tokenizer_files("", bpe, SD_TOKENIZER_CONFIG | {"name_or_path": CLIPSEG}, SD_SPECIAL_TOKENS)


def _arcface(seed: int) -> dict[str, bytes]:
    """insightface's `backbone.pth` format: a torch.save'd plain float32 state dict (OrderedDict)."""
    from personamagic.identity import IResNet, IResNetConfig

    with _seeded(seed):
        model = IResNet(IResNetConfig(**TINY_ARCFACE))
    return {ARCFACE_FILE: _torch_save(OrderedDict(model.state_dict()))}


def _clip_bpe_files() -> dict[str, bytes]:
    """vocab.json and merges.txt byte for byte as in the SD repos (the same 49,408-token CLIP BPE), and a
    tokenizer.json, all derived from the BPE vocabulary that personamagic ships."""
    from personamagic.models import clip_tokenizer

    tokenizer = clip_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.backend_tokenizer.model.save(folder)
        vocab = json.loads(Path(folder, "vocab.json").read_text(encoding="utf-8"))
        merges = Path(folder, "merges.txt").read_bytes()
    # The hub's vocab.json is sorted by token, two-space indented, not ASCII-escaped.
    vocab_json = (json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    tokenizer_json = tokenizer.backend_tokenizer.to_str().encode("utf-8")
    return {"vocab.json": vocab_json, "merges.txt": merges, "tokenizer.json": tokenizer_json}


def _tokenizer_files(folder: str, bpe: dict[str, bytes], config: dict, special_tokens: dict) -> dict[str, bytes]:
    prefix = f"{folder}/" if folder else ""
    return {
        f"{prefix}merges.txt": bpe["merges.txt"],
        f"{prefix}special_tokens_map.json": _json(special_tokens),
        f"{prefix}tokenizer_config.json": _json(config),
        f"{prefix}vocab.json": bpe["vocab.json"],
    }


def _hub_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the hub files' parameter names: transformers 5 flattened CLIPTextModel and
    CLIPVisionModel (no `text_model.` / inner `vision_model.` level), the hub files still have them."""
    from transformers import CLIPTextModel

    state = module.state_dict()
    if isinstance(module, CLIPTextModel):
        return {f"text_model.{k}": v for k, v in state.items()}
    if type(module).__name__ == "StableDiffusionSafetyChecker":
        return {k.replace("vision_model.", "vision_model.vision_model.", 1): v for k, v in state.items()}
    return state


def _weights(
    folder: str, state: dict, *, dtype: torch.dtype = torch.float32, fp16_variant: bool = False
) -> dict[str, bytes]:
    name = "model" if folder in ("text_encoder", "text_encoder_2", "safety_checker") else "diffusion_pytorch_model"
    files = {f"{folder}/{name}.safetensors": _safetensors(_cast(state, dtype))}
    if fp16_variant:
        files[f"{folder}/{name}.fp16.safetensors"] = _safetensors(_cast(state, torch.float16))
    return files


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


# --------------------------------------------------------------------------------------------------
# writing the cache


def _write_repo(cache: Path, repo_id: str, files: dict[str, bytes], *, tree_listing: bool) -> Path:
    """Store `files` as huggingface_hub stores a download of `repo_id`; return the snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    entries = {path: _tree_entry(content, lfs=path.endswith(LFS_SUFFIXES)) for path, content in sorted(files.items())}
    # A made-up commit hash, a function of the contents (real hashes would claim real contents).
    commit = hashlib.sha1("".join(f"{p}\0{e['blob_id']}\n" for p, e in entries.items()).encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    for path, content in files.items():
        entry = entries[path]
        blob = storage / "blobs" / entry.get("lfs_sha256", entry["blob_id"])
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)  # huggingface_hub writes the hash without a newline
    if tree_listing:
        listing = {"format_version": 1, "files": entries}
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps(listing, indent=1))
    return snapshot


def _tree_entry(content: bytes, *, lfs: bool) -> dict:
    """A file as the hub's tree API lists it: git blob id, and for LFS files the LFS sha256 and size
    (their git blob is the LFS pointer)."""
    if not lfs:
        return {"size": len(content), "blob_id": _git_blob_id(content)}
    sha256 = hashlib.sha256(content).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(content)}\n".encode()
    return {"size": len(content), "blob_id": _git_blob_id(pointer), "lfs_sha256": sha256, "lfs_size": len(content)}


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _plain_copy(snapshot: Path, destination: Path, *, scheduler: dict | None = None) -> Path:
    """A plain diffusers folder (real files, no symlinks) holding the snapshot, optionally with another
    scheduler config."""
    shutil.copytree(snapshot, destination, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    if scheduler is not None:
        (destination / "scheduler" / "scheduler_config.json").write_bytes(_json(scheduler))
    return destination


def _write_bytes(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _safetensors(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})


def _torch_save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# diffusers -> original key layouts (the inverse of diffusers' loaders/single_file_utils.py)

# Within a UNet ResBlock / a VAE ResnetBlock / the VAE's mid attention: diffusers name -> original name.
_UNET_RESNET = {
    "norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in openaimodel.UNetModel's names (no prefix)."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    table = [
        ("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("add_embedding.linear_1.", "label_emb.0.0.", {}), ("add_embedding.linear_2.", "label_emb.0.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for level in range(levels):
        # input_blocks: conv_in, then per level `layers_per_block` (ResBlock, [SpatialTransformer]) and a Downsample.
        first = 1 + level * (per_level + 1)
        for j in range(per_level):
            table.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{first + j}.0.", _UNET_RESNET))
            table.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{first + j}.1.", {}))
        table.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{first + per_level}.0.op.", {}))
        # output_blocks: per level `layers_per_block + 1` (ResBlock, [SpatialTransformer], [Upsample]).
        first = level * (per_level + 1)
        for j in range(per_level + 1):
            table.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{first + j}.0.", _UNET_RESNET))
            table.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{first + j}.1.", {}))
        upsample = 2 if config["up_block_types"][level].startswith("CrossAttn") else 1
        upsampler = f"output_blocks.{first + per_level}.{upsample}.conv."
        table.append((f"up_blocks.{level}.upsamplers.0.conv.", upsampler, {}))
    return _rename(state, table)


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in ldm's AutoencoderKL names (no prefix)."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    parts = ("encoder", "decoder")
    table = [(f"{part}.{name}.", f"{part}.{name}.", {}) for part in parts for name in ("conv_in", "conv_out")]
    table += [(f"{part}.conv_norm_out.", f"{part}.norm_out.", {}) for part in parts]
    table += [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for part in parts:
        table.append((f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET))
        table.append((f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET))
        table.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION))
    for level in range(levels):
        for j in range(per_level):
            table.append((f"encoder.down_blocks.{level}.resnets.{j}.", f"encoder.down.{level}.block.{j}.", _VAE_RESNET))
        downsampler = f"encoder.down.{level}.downsample.conv."
        table.append((f"encoder.down_blocks.{level}.downsamplers.0.conv.", downsampler, {}))
        # The decoder's up levels are numbered from the lowest resolution in ldm, from the highest in diffusers.
        up = f"decoder.up.{levels - 1 - level}."
        for j in range(per_level + 1):
            table.append((f"decoder.up_blocks.{level}.resnets.{j}.", f"{up}block.{j}.", _VAE_RESNET))
        table.append((f"decoder.up_blocks.{level}.upsamplers.0.conv.", f"{up}upsample.conv.", {}))
    ldm = _rename(state, table)
    for key, value in ldm.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            ldm[key] = value[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) 1x1 convolution
    return ldm


def clip_text_to_ldm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel under `prefix` in transformers 4's names (`text_model.*`), with the
    `position_ids` buffer that the original checkpoints carry."""
    ldm = {prefix + k: v for k, v in _hub_state_dict(text_encoder).items()}
    positions = text_encoder.config.max_position_embeddings
    ldm[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return ldm


def open_clip_to_sgm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in open_clip's text-tower names, under `prefix`."""
    state = text_encoder.state_dict()
    sgm = {
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
        # open_clip applies it as x @ text_projection: (width, projection_dim), a Linear's weight transposed.
        prefix + "text_projection": state["text_projection.weight"].T,
    }
    for layer in range(text_encoder.config.num_hidden_layers):
        source, target = f"text_model.encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{source}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            sgm[f"{target}attn.in_proj_{kind}"] = torch.cat(qkv)  # (3 * width, width) / (3 * width,)
            sgm[f"{target}attn.out_proj.{kind}"] = state[f"{source}self_attn.out_proj.{kind}"]
            sgm[f"{target}ln_1.{kind}"] = state[f"{source}layer_norm1.{kind}"]
            sgm[f"{target}ln_2.{kind}"] = state[f"{source}layer_norm2.{kind}"]
            sgm[f"{target}mlp.c_fc.{kind}"] = state[f"{source}mlp.fc1.{kind}"]
            sgm[f"{target}mlp.c_proj.{kind}"] = state[f"{source}mlp.fc2.{kind}"]
    converted = 5 + 16 * text_encoder.config.num_hidden_layers
    if len(state) != converted:
        raise ValueError(f"the text encoder has {len(state)} tensors, {converted} converted: unknown layout")
    return sgm


def sd1_to_ldm(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """An SD-1.x model as one checkpoint in the original CompVis LDM layout (`sd-v1-4.ckpt`)."""
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    ldm |= {"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    ldm |= clip_text_to_ldm(text_encoder, "cond_stage_model.transformer.")
    return ldm | ldm_schedule_buffers()


def sdxl_to_sgm(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """An SDXL model as one checkpoint in Stability's SGM layout (`sd_xl_base_1.0.safetensors`)."""
    sgm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    sgm |= {"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    sgm |= clip_text_to_ldm(text_encoder, "conditioner.embedders.0.transformer.")
    return sgm | open_clip_to_sgm(text_encoder_2, "conditioner.embedders.1.model.")


def ldm_schedule_buffers(num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> dict:
    """The noise-schedule buffers that ldm's DDPM registers (and SD-1.x checkpoints carry), for SD's
    schedule: ldm's "linear" betas, sqrt-spaced — diffusers' "scaled_linear"."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
    }
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in buffers.items()}


def _rename(state: dict[str, torch.Tensor], table: list[tuple[str, str, dict]]) -> dict[str, torch.Tensor]:
    """Rename every key by the first (prefix, new prefix, inner renames) entry whose prefix it starts with."""
    renamed = {}
    for key, value in state.items():
        for old, new, inner in table:
            if key.startswith(old):
                rest = key[len(old):]
                for inner_old, inner_new in inner.items():
                    if rest.startswith(inner_old):
                        rest = inner_new + rest[len(inner_old):]
                        break
                renamed[new + rest] = value
                break
        else:
            raise KeyError(f"no original name for {key!r}")
    return renamed
