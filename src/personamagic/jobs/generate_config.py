"""The settings of a `generate` run (`GenerateConfig`) and their bounds, checked before anything loads:
what the job runs (`generate`) and what an image's record converts to and from (`image_record`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import SettingsError
from ..models.devices import check_compile_backend
from ..training.config import SEED_LIMIT  # the last image's seed + i included

# Bounds of the sampling settings, checked before anything loads.
MAX_INFERENCE_STEPS = 1000  # Stable Diffusion's T: a schedule has no more steps (checked again against the model's T)
MAX_SIDE = 4096  # largest width or height in pixels (8x SD-1.x's 512; beyond it no GPU holds the UNet's activations)
MAX_GUIDANCE_SCALE = 100.0  # CFG far above the usual 5-15 saturates every pixel (1e30 makes black images)
MAX_IP_ADAPTER_SCALE = 10.0  # IP-Adapter weight; 1.0 is as trained, far above it saturates like CFG
MAX_IMAGES = 100_000  # images per run (prompts x num_images)
MAX_BATCH_SIZE = 256  # images per UNet batch (x2 with guidance); the fastest batch on an H200 was 16


@dataclass
class GenerateConfig:
    """Sampling settings. Defaults follow the paper: DDIM, 50 steps, guidance 8.0."""

    prompts: list[str]  # prompts with the concepts' placeholders (e.g. "a photo of S* as an astronaut")
    negative_prompt: str = ""  # one negative prompt for all images (no hidden default, unlike the authors' code)
    num_images: int = 4  # images per prompt
    seed: int = 0  # image i of a prompt uses seed + i, so any image can be regenerated alone
    num_inference_steps: int = 50  # denoising steps (paper: 50)
    guidance_scale: float = 8.0  # classifier-free guidance (paper: 8.0)
    scheduler: str = "ddim"  # ddim (paper), dpm++, euler, euler-a, heun, pndm, unipc, ... or a diffusers class name
    batch_size: int = 4  # images per UNet batch (x2 with guidance); bounds memory
    grid: bool = True  # also write grid.png with all images
    width: int | None = None  # image width in pixels (multiple of 8); None: the model's, or the background's shape
    height: int | None = None  # image height in pixels (multiple of 8); None: as width
    placeholders: list[str] = field(default_factory=list)  # text for each concept, in order; empty: as trained
    background: str | None = None  # localized customization: background image file (Blended Latent Diffusion)
    region: str | None = None  # mask image file of the background's size: white (or opaque) = paint the concept here
    ip_adapter: str | None = None  # IP-Adapter weights: "owner/repo/subfolder/file" on the hub or a local file
    ip_adapter_images: list[str] = field(default_factory=list)  # image file(s) for the IP-Adapter (e.g. the photo)
    ip_adapter_scale: float = 1.0  # weight of the IP-Adapter's image tokens
    photomaker: str | None = None  # PhotoMaker v1 weights (SDXL): hub id TencentARC/PhotoMaker or a local file
    photomaker_images: list[str] = field(default_factory=list)  # the person's photo(s) PhotoMaker embeds
    photomaker_merge_step: int | None = None  # steps i <= this use the text-only prompt; None: 20% of the steps
    photomaker_lora_scale: float = 1.0  # strength of PhotoMaker's UNet LoRA
    vae: str | None = None  # another VAE (hub id or folder of an AutoencoderKL), e.g. an fp16-fixed SDXL VAE
    model_config: str | None = None  # for a single-file base model: a diffusers folder of its family's configs
    cuda_graph: bool = True  # on CUDA, replay the UNet from a CUDA graph (same kernels, fewer launches)
    compile: bool = False  # torch.compile the UNet: faster large batches after a one-off compile per batch shape
    compile_backend: str = "inductor"  # torch.compile backend

    def __post_init__(self):
        if self.compile:
            check_compile_backend(self.compile_backend)
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise SettingsError("give at least one prompt")
        if any(not p.strip() for p in self.prompts):
            raise SettingsError("prompts must not be empty")
        if not isinstance(self.negative_prompt, str):
            raise SettingsError(f"negative_prompt must be text, got {self.negative_prompt!r}")
        for name, low, high in (("num_images", 1, MAX_IMAGES), ("num_inference_steps", 1, MAX_INFERENCE_STEPS),
                                ("batch_size", 1, MAX_BATCH_SIZE), ("seed", 0, SEED_LIMIT - 1)):
            value = getattr(self, name)
            if not is_int(value) or value < low or (high is not None and value > high):
                bound = f"from {low} to {high}" if high is not None else f">= {low}"
                raise SettingsError(f"{name} must be a whole number {bound}, got {value!r}")
        if self.seed + self.num_images - 1 >= SEED_LIMIT:
            raise SettingsError(f"seed {self.seed} + {self.num_images} images passes the largest seed {SEED_LIMIT - 1}; "
                                "use a smaller seed")
        if len(self.prompts) * self.num_images > MAX_IMAGES:
            raise SettingsError(f"{len(self.prompts)} prompts x {self.num_images} images is more than {MAX_IMAGES} "
                                "images in one run; split the run")
        for name, high in (("guidance_scale", MAX_GUIDANCE_SCALE), ("ip_adapter_scale", MAX_IP_ADAPTER_SCALE)):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value <= high:
                raise SettingsError(f"{name} must be a number from 0 to {high:g}, got {value!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 8 or value % 8 or value > MAX_SIDE):
                raise SettingsError(f"{name} must be a multiple of 8 from 8 to {MAX_SIDE}, got {value!r}")
        for placeholder in self.placeholders:
            if not isinstance(placeholder, str) or not placeholder.strip() or placeholder != placeholder.strip():
                raise SettingsError(f"a placeholder must be non-empty text without surrounding spaces, "
                                    f"got {placeholder!r}")
        if (self.background is None) != (self.region is None):
            raise SettingsError("localized generation needs both a background and a region mask")
        if self.ip_adapter is not None and not self.ip_adapter_images:
            raise SettingsError("an IP-Adapter needs an image (the person's photo)")
        if self.ip_adapter is None and self.ip_adapter_images:
            raise SettingsError("IP-Adapter images given without an IP-Adapter")
        if (self.photomaker is None) != (not self.photomaker_images):
            raise SettingsError("PhotoMaker needs both its weights (--photomaker) and the person's photo(s) "
                                "(--photomaker-image)")
        if self.photomaker_merge_step is not None and not (is_int(self.photomaker_merge_step)
                                                           and 0 <= self.photomaker_merge_step <= MAX_INFERENCE_STEPS):
            raise SettingsError(f"photomaker_merge_step must be a whole number from 0 to {MAX_INFERENCE_STEPS}, "
                                f"got {self.photomaker_merge_step!r}")
        steps = self.num_inference_steps
        if self.photomaker is not None and self.photomaker_merge_step is not None and self.photomaker_merge_step >= steps - 1:
            raise SettingsError(f"photomaker_merge_step {self.photomaker_merge_step} leaves none of the {steps} steps to "
                                "PhotoMaker (steps i <= it use the text-only prompt); give a smaller one or more steps")
        if not is_number(self.photomaker_lora_scale) or not 0 <= self.photomaker_lora_scale <= MAX_IP_ADAPTER_SCALE:
            raise SettingsError(f"photomaker_lora_scale must be a number from 0 to {MAX_IP_ADAPTER_SCALE:g}, "
                                f"got {self.photomaker_lora_scale!r}")

    @property
    def num_jobs(self) -> int:
        return len(self.prompts) * self.num_images

    def jobs(self, start: int = 0):
        """(prompt, seed) of image `start`, `start` + 1, ...: image i of a prompt has seed + i."""
        for index in range(start, self.num_jobs):
            prompt_index, i = divmod(index, self.num_images)
            yield self.prompts[prompt_index], self.seed + i


def is_int(value) -> bool:
    """An int that is not a bool (Python counts True as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
