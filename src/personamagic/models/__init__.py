"""Base models: loading real ones from their files (`loading`), building tiny ones in code (`tiny`),
the tokenizer shipped with the package (`tokenizer`), devices and dtypes (`devices`), and the web UI's
resident model (`resident`). What differs between model families lives in `personamagic.families`."""

from .components import BaseComponents
from .devices import DTYPE_NAMES, check_compile_backend, resolve_device, resolve_dtype
from .loading import DEFAULT_BASE_MODEL, DEFAULT_IMAGE_ENCODER, load_base_model, load_image_encoder
from .resident import ResidentModels
from .tiny import (
    BUILT_MODELS,
    RANDOM_IMAGE_ENCODER,
    RANDOM_SD1,
    SD1_SCHEDULER_CONFIG,
    TINY,
    TINY_MODELS,
    TINY_SDXL,
    TinyConfig,
    TinySDXLConfig,
    build_random_sd1_components,
    build_tiny_clipseg,
    build_tiny_components,
    build_tiny_image_encoder,
    build_tiny_sdxl_components,
)
from .tokenizer import clip_tokenizer

__all__ = [
    "BUILT_MODELS", "BaseComponents", "DEFAULT_BASE_MODEL", "DEFAULT_IMAGE_ENCODER", "DTYPE_NAMES",
    "RANDOM_IMAGE_ENCODER", "RANDOM_SD1", "ResidentModels", "SD1_SCHEDULER_CONFIG", "TINY", "TINY_MODELS", "TINY_SDXL", "TinyConfig", "TinySDXLConfig",
    "build_random_sd1_components", "build_tiny_clipseg", "build_tiny_components", "build_tiny_image_encoder", "build_tiny_sdxl_components",
    "check_compile_backend", "clip_tokenizer", "load_base_model", "load_image_encoder", "resolve_device",
    "resolve_dtype",
]
