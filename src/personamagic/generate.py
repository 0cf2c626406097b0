"""The `generate` job: concepts + prompts -> PNG files with their generation parameters inside.

Each image is named from its prompt and seed with only `[a-z0-9-]` characters, so no prompt can
write outside the output folder, and carries its parameters twice: an A1111-style `parameters` text
chunk (read by A1111, ComfyUI and most image viewers) and a `personamagic` JSON chunk (read back by
`personamagic generate --from-image`). A grid of all images is written beside them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .concept import Concept, write_atomic
from .errors import UserError
from .models import TINY, load_base_model, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

METADATA_KEY = "personamagic"


@dataclass
class GenerateConfig:
    """Sampling settings. Defaults follow the paper: DDIM, 50 steps, guidance 8.0."""

    prompts: list[str]  # prompts with the concepts' placeholders (e.g. "a photo of S* as an astronaut")
    negative_prompt: str = ""  # one negative prompt for all images (no hidden default, unlike the authors' code)
    num_images: int = 4  # images per prompt
    seed: int = 0  # image i of a prompt uses seed + i, so any image can be regenerated alone
    num_inference_steps: int = 50  # denoising steps (paper: 50)
    guidance_scale: float = 8.0  # classifier-free guidance (paper: 8.0)
    scheduler: str = "ddim"  # ddim (paper), dpm++, euler, euler-a, pndm, unipc
    batch_size: int = 4  # images per UNet batch (x2 with guidance); bounds memory
    grid: bool = True  # also write grid.png with all images

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("give at least one prompt")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("prompts must not be empty")
        for name in ("num_images", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.guidance_scale < 0 or not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass
class GeneratedImage:
    path: Path
    prompt: str
    seed: int


@dataclass
class GenerateResult:
    images: list[GeneratedImage] = field(default_factory=list)
    grid: Path | None = None
    notes: list[str] = field(default_factory=list)


def safe_filename(index: int, prompt: str, seed: int) -> str:
    """`003-a-photo-of-s-as-an-astronaut-seed7.png`: only [a-z0-9-], never a path."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60].strip("-") or "image"
    return f"{index:03d}-{slug}-seed{seed}.png"


def image_metadata(prompt: str, seed: int, config: GenerateConfig, concepts: list[Concept], base_model: str,
                   size: tuple[int, int]) -> dict:
    return {
        "prompt": prompt,
        "negative_prompt": config.negative_prompt,
        "seed": seed,
        "scheduler": config.scheduler,
        "steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "width": size[0],
        "height": size[1],
        "base_model": base_model,
        "concepts": [
            {"placeholder": c.placeholder, "fingerprint": c.fingerprint(), "stage_window": list(c.stage_window)}
            for c in concepts
        ],
        "personamagic_version": __version__,
    }


def png_info(meta: dict) -> PngInfo:
    info = PngInfo()
    a1111 = (
        f"{meta['prompt']}\nNegative prompt: {meta['negative_prompt']}\n"
        f"Steps: {meta['steps']}, Sampler: {meta['scheduler']}, CFG scale: {meta['guidance_scale']}, "
        f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {meta['base_model']}"
    )
    info.add_text("parameters", a1111)
    info.add_text(METADATA_KEY, json.dumps(meta))
    return info


def read_image_metadata(path: str | Path) -> dict:
    """The `personamagic` metadata of a generated PNG (UserError if it has none)."""
    try:
        with Image.open(path) as image:
            text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} as an image ({err})") from None
    if not text:
        raise UserError(f"{path} has no personamagic metadata (was it made by personamagic generate?)")
    return json.loads(text)


def make_grid(images: list[Image.Image]) -> Image.Image:
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def generate(
    concept_paths: list[str],
    output: str | Path,
    config: GenerateConfig,
    *,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    local_files_only: bool = False,
    progress=None,
) -> GenerateResult:
    """Load the concepts and their base model, sample every prompt x seed, write PNGs + grid."""
    from .pipeline import PersonaMagicPipeline

    concepts = [Concept.load(path) for path in concept_paths]
    if not concepts:
        raise UserError("give at least one concept folder")
    model = model or concepts[0].base_model
    result = GenerateResult()
    if model == TINY:
        result.notes.append("tiny model: its images are noise-like by nature; use a real SD-1.x model for faces")
    device_ = resolve_device(device)
    base = load_base_model(model, device=device_, dtype=resolve_dtype(dtype, device_), local_files_only=local_files_only)
    pipe = PersonaMagicPipeline.from_base(base, scheduler=config.scheduler)
    pipe.set_progress_bar_config(disable=True)
    for concept in concepts:
        pipe.load_concept(concept)
    result.notes += pipe.check_prompts(config.prompts)

    jobs = [(p, config.seed + i) for p in config.prompts for i in range(config.num_images)]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    pil_images = []
    for start in range(0, len(jobs), config.batch_size):
        chunk = jobs[start : start + config.batch_size]
        generators = [torch.Generator(device_).manual_seed(seed) for _, seed in chunk]
        images = pipe(
            [p for p, _ in chunk],
            negative_prompt=config.negative_prompt,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            generator=generators,
        ).images
        for offset, ((prompt, seed), image) in enumerate(zip(chunk, images)):
            index = start + offset
            path = output / safe_filename(index, prompt, seed)
            meta = image_metadata(prompt, seed, config, concepts, model, image.size)
            write_atomic(path, lambda tmp, image=image, meta=meta: image.save(tmp, format="PNG", pnginfo=png_info(meta)))
            result.images.append(GeneratedImage(path, prompt, seed))
            pil_images.append(image)
            if progress is not None:
                progress(index + 1, len(jobs))
    if config.grid and len(pil_images) > 1:
        result.grid = output / "grid.png"
        grid = make_grid(pil_images)
        write_atomic(result.grid, lambda tmp: grid.save(tmp, format="PNG"))
    return result
