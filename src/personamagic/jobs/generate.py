"""The `generate` job: concepts + prompts -> PNG files with their generation parameters inside.

Each image is named from its prompt and seed with only `[a-z0-9-]` characters, so no prompt can
write outside the output folder, and carries its parameters twice: an A1111-style `parameters` text
chunk (read by A1111, ComfyUI and most image viewers) and a `personamagic` JSON chunk. The JSON holds
everything needed to make the image again (`regenerate`, `personamagic generate --from-image`):
prompt, seed, sampler settings, size, device and dtype, every concept's path as given and its
fingerprint, the background/region/IP-Adapter files with their SHA-256, and the batch the image was
sampled in (prompts and seeds), so that the regenerated image is computed exactly as the first one.
A grid of all images is written beside them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import __version__
from ..concept import Concept, resolve_concept_path
from ..files import write_atomic
from ..errors import UserError
from ..models.devices import check_compile_backend
from ..models import TINY, load_base_model, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

METADATA_KEY = "personamagic"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


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
    cuda_graph: bool = True  # on CUDA, replay the UNet from a CUDA graph (same kernels, fewer launches)
    compile: bool = False  # torch.compile the UNet: faster large batches after a one-off compile per batch shape
    compile_backend: str = "inductor"  # torch.compile backend

    def __post_init__(self):
        if self.compile:
            check_compile_backend(self.compile_backend)
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
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a multiple of 8, got {value}")
        if (self.background is None) != (self.region is None):
            raise ValueError("localized generation needs both a background and a region mask")
        if self.ip_adapter is not None and not self.ip_adapter_images:
            raise ValueError("an IP-Adapter needs an image (the person's photo)")
        if self.ip_adapter is None and self.ip_adapter_images:
            raise ValueError("IP-Adapter images given without an IP-Adapter")
        if not self.ip_adapter_scale >= 0:
            raise ValueError(f"ip_adapter_scale must be >= 0, got {self.ip_adapter_scale}")


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


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"cannot read the prompts file {path} ({err.__class__.__name__}); give a UTF-8 text file"
        ) from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"the prompts file {path} holds no prompt (one per line; # starts a comment)")
    return prompts


# --------------------------------------------------------------------------------------------------
# metadata


def file_record(path: str | Path) -> dict:
    """How metadata refers to an input file: the path as given, absolute, and a short SHA-256."""
    path = Path(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.__class__.__name__})") from None
    return {"path": str(path), "abs_path": str(path.expanduser().resolve()), "sha256": digest}


def image_metadata(prompt: str, seed: int, config: GenerateConfig, concepts: list[Concept], base_model: str,
                   size: tuple[int, int], *, concept_paths: list[str] | None = None, extra: dict | None = None) -> dict:
    """The `personamagic` metadata of one image. `concept_paths` (as given) let `regenerate` find the
    concepts again; `extra` (inputs, batch, device, dtype) is merged in."""
    placeholders = config.placeholders or [c.placeholder for c in concepts]
    entries = []
    for i, concept in enumerate(concepts):
        entry = {"placeholder": placeholders[i], "supercategory": concept.supercategory,
                 "fingerprint": concept.fingerprint(), "stage_window": list(concept.stage_window)}
        if concept_paths is not None:
            entry["path"] = str(concept_paths[i])
            entry["abs_path"] = str(Path(concept_paths[i]).expanduser().resolve())
        entries.append(entry)
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
        "concepts": entries,
        "personamagic_version": __version__,
        **(extra or {}),
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


# --------------------------------------------------------------------------------------------------
# inputs of localized generation


def localized_size(background_size: tuple[int, int], resolution: int, multiple: int) -> tuple[int, int]:
    """(width, height) that keeps the background's shape: shorter side = the model's resolution, both
    sides rounded to a multiple of `multiple`."""
    w, h = background_size
    scale = resolution / min(w, h)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (w, h))


def load_localized_inputs(background: str, region: str, size: tuple[int, int] | None, resolution: int,
                          multiple: int) -> tuple[Image.Image, Image.Image]:
    """Background (RGB) and region (L, 255 inside) at the output size, both cropped around their centre
    to its shape (never squashed). The region is the white part of the mask, or its opaque part when it
    has transparency."""
    from ..faces.photos import open_image, to_rgb

    image, mask = open_image(background), open_image(region)
    if image.size != mask.size:
        raise UserError(
            f"region {region} is {mask.width}x{mask.height} but background {background} is "
            f"{image.width}x{image.height}; draw the region on the background itself"
        )
    alpha = np.asarray(mask.convert("RGBA"))[:, :, 3] if mask.mode in ("RGBA", "LA", "PA") else None
    values = alpha if alpha is not None and alpha.min() < 255 else np.asarray(to_rgb(mask).convert("L"))
    mask = Image.fromarray(np.where(values > 127, 255, 0).astype(np.uint8))
    if not np.asarray(mask).any():
        raise UserError(f"region {region} marks nothing; paint the region white on black")
    width, height = size or localized_size(image.size, resolution, multiple)
    box = _centre_box(image.size, width / height)
    image = to_rgb(image).crop(box).resize((width, height), Image.Resampling.LANCZOS)
    mask = mask.crop(box).resize((width, height), Image.Resampling.NEAREST)
    return image, mask


def _centre_box(size: tuple[int, int], aspect: float) -> tuple[int, int, int, int]:
    """The largest box of shape `aspect` (width/height) centred in an image of `size`."""
    w, h = size
    if w / h > aspect:
        crop_w = round(h * aspect)
        left = (w - crop_w) // 2
        return (left, 0, left + crop_w, h)
    crop_h = round(w / aspect)
    top = (h - crop_h) // 2
    return (0, top, w, top + crop_h)


# --------------------------------------------------------------------------------------------------
# the job


class _Session:
    """A loaded pipeline with its concepts and inputs, able to sample and save batches of (prompt, seed)."""

    def __init__(self, concept_paths: list[str], config: GenerateConfig, model: str | None, device: str,
                 dtype: str | None, local_files_only: bool, result: GenerateResult, resident=None):
        from ..adapters.ip_adapter import IPAdapterSpec, load_ip_adapter
        from ..pipeline import PersonaMagicPipeline, scheduler_choice

        self.config, self.result = config, result
        self.concept_paths = [str(p) for p in concept_paths]
        self.concepts = [Concept.load(path) for path in self.concept_paths]
        if not self.concepts:
            raise UserError("give at least one concept folder")
        if config.placeholders and len(config.placeholders) != len(self.concepts):
            raise UserError(
                f"{len(config.placeholders)} --placeholder for {len(self.concepts)} concepts; give one per concept"
            )
        # Check the settings and input files before the (possibly multi-GB) model load.
        scheduler_choice(config.scheduler)
        inputs = {}
        if config.background is not None:
            inputs["background"], inputs["region"] = file_record(config.background), file_record(config.region)
        if config.ip_adapter is not None:
            spec = IPAdapterSpec.parse(config.ip_adapter, scale=config.ip_adapter_scale)
            inputs["ip_adapter"] = {"weights": config.ip_adapter, "scale": config.ip_adapter_scale,
                                    "images": [file_record(p) for p in config.ip_adapter_images]}
        self.model = model or self.concepts[0].base_model
        if self.model == TINY:
            result.notes.append("tiny model: its images are noise-like by nature; use a real SD-1.x model for faces")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        shareable = resident is not None and config.ip_adapter is None and not config.compile
        load = resident.load if shareable else load_base_model
        base = load(self.model, device=self.device, dtype=self.dtype, local_files_only=local_files_only)
        self.pipe = PersonaMagicPipeline.from_base(base, scheduler=config.scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        if config.compile:
            logger.info("--compile: the first batch of each size compiles the UNet first (tens of seconds or "
                        "more; PyTorch caches the result on disk for later runs)")
            self.pipe.enable_compile(backend=config.compile_backend)
        if config.cuda_graph and self.device.type == "cuda" and config.ip_adapter is None:
            self.pipe.enable_cuda_graph()
        placeholders = config.placeholders or [None] * len(self.concepts)
        for concept, placeholder in zip(self.concepts, placeholders):
            self.pipe.load_concept(concept, placeholder)
            trained_with = concept.extra.get("ip_adapter")
            if trained_with and config.ip_adapter is None:
                result.notes.append(
                    f"concept {concept.placeholder!r} was trained with the IP-Adapter {trained_with.get('weights')}; "
                    "pass --ip-adapter and --ip-adapter-image to generate as it was trained"
                )
        result.notes += self.pipe.check_prompts(config.prompts)

        self.call_kwargs = {}
        resolution = base.resolution
        size = None
        if config.width or config.height:
            size = (config.width or config.height, config.height or config.width)
        if config.background is not None:
            background, region = load_localized_inputs(
                config.background, config.region, size, resolution, self.pipe.vae_scale_factor
            )
            size = background.size
            self.call_kwargs.update(background=background, region=region)
        if size is not None:
            self.call_kwargs.update(width=size[0], height=size[1])
        if config.ip_adapter is not None:
            from ..faces.photos import load_photo

            images = [load_photo(p) for p in config.ip_adapter_images]
            load_ip_adapter(self.pipe, spec, local_files_only=local_files_only)
            self.call_kwargs["ip_adapter_image"] = images
        self.extra_meta = {**inputs, "device": self.device.type, "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype))}

    def sample(self, jobs: list[tuple[str, int]]) -> list[Image.Image]:
        """One UNet batch: image k is prompt jobs[k][0] from seed jobs[k][1]."""
        generators = [torch.Generator(self.device).manual_seed(seed) for _, seed in jobs]
        return self.pipe(
            [p for p, _ in jobs],
            negative_prompt=self.config.negative_prompt,
            num_inference_steps=self.config.num_inference_steps,
            guidance_scale=self.config.guidance_scale,
            generator=generators,
            **self.call_kwargs,
        ).images

    def save(self, image: Image.Image, path: Path, jobs: list[tuple[str, int]], index: int) -> None:
        prompt, seed = jobs[index]
        extra = {**self.extra_meta, "batch": {"jobs": [list(job) for job in jobs], "index": index}}
        meta = image_metadata(prompt, seed, self.config, self.concepts, self.model, image.size,
                              concept_paths=self.concept_paths, extra=extra)
        write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(meta)))


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
    resident=None,
) -> GenerateResult:
    """Load the concepts and their base model, sample every prompt x seed, write PNGs + grid.

    Prompts x seeds are sampled `config.batch_size` at a time in one UNet batch (x2 with guidance).
    `progress(done, total)` is called after every batch. `resident`: a `models.ResidentModels` to take
    the base model from (not with an IP-Adapter or `compile`).
    """
    result = GenerateResult()
    session = _Session(concept_paths, config, model, device, dtype, local_files_only, result, resident)
    jobs = [(p, config.seed + i) for p in config.prompts for i in range(config.num_images)]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    pil_images = []
    for start in range(0, len(jobs), config.batch_size):
        chunk = jobs[start : start + config.batch_size]
        for offset, image in enumerate(session.sample(chunk)):
            prompt, seed = chunk[offset]
            path = output / safe_filename(start + offset, prompt, seed)
            session.save(image, path, chunk, offset)
            result.images.append(GeneratedImage(path, prompt, seed))
            pil_images.append(image)
        if progress is not None:
            progress(start + len(chunk), len(jobs))
    if config.grid and len(pil_images) > 1:
        result.grid = output / "grid.png"
        grid = make_grid(pil_images)
        write_atomic(result.grid, lambda tmp: grid.save(tmp, format="PNG"))
    return result


# --------------------------------------------------------------------------------------------------
# regeneration from an image's own metadata


def regenerate(
    image: str | Path,
    output: str | Path,
    *,
    concept_paths: list[str] | None = None,
    model: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    local_files_only: bool = False,
    resident=None,
) -> GenerateResult:
    """Make a generated image again from its metadata; write it to the folder `output`.

    The image's whole batch is sampled again (same prompts and seeds, so every number is computed as
    the first time) and only this image is kept: on the same device type and dtype the result is the
    same image, pixel for pixel. Concepts are found at the recorded paths (as given, then absolute)
    unless `concept_paths` says where they are now; each must match its recorded fingerprint.
    `dtype` defaults to the recorded one. `resident`: as in `generate`.
    """
    image = Path(image)
    meta = read_image_metadata(image)
    paths = _find_concepts(meta.get("concepts", []), concept_paths)
    inputs = {name: _find_file(meta[name], name) for name in ("background", "region") if name in meta}
    ip = meta.get("ip_adapter")
    config = GenerateConfig(
        prompts=[meta["prompt"]],
        negative_prompt=meta.get("negative_prompt", ""),
        num_images=1,
        seed=meta["seed"],
        num_inference_steps=meta["steps"],
        guidance_scale=meta["guidance_scale"],
        scheduler=meta["scheduler"],
        grid=False,
        width=meta.get("width"),
        height=meta.get("height"),
        placeholders=[c["placeholder"] for c in meta.get("concepts", [])],
        background=inputs.get("background"),
        region=inputs.get("region"),
        ip_adapter=ip["weights"] if ip else None,
        ip_adapter_images=[_find_file(r, "IP-Adapter image") for r in ip["images"]] if ip else [],
        ip_adapter_scale=ip["scale"] if ip else 1.0,
    )
    batch = meta.get("batch") or {"jobs": [[meta["prompt"], meta["seed"]]], "index": 0}
    jobs = [(prompt, int(seed)) for prompt, seed in batch["jobs"]]
    index = batch["index"]
    if jobs[index] != (meta["prompt"], meta["seed"]):
        raise UserError(f"{image} has inconsistent metadata (its batch does not hold its own prompt and seed)")

    result = GenerateResult()
    dtype = dtype or meta.get("dtype", "auto")
    session = _Session(paths, config, model or meta.get("base_model"), device, dtype, local_files_only, result,
                       resident)
    if meta.get("device") and meta["device"] != session.device.type:
        result.notes.append(
            f"the image was made on {meta['device']}, this run is on {session.device.type}: "
            "expect small differences (exact only on the same device type and dtype)"
        )
    if meta.get("batch") and len(jobs) > 1:
        logger.info("sampling the image's batch of %d again to reproduce it exactly", len(jobs))
    new_image = session.sample(jobs)[index]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / safe_filename(0, meta["prompt"], meta["seed"])
    session.save(new_image, path, jobs, index)
    result.images.append(GeneratedImage(path, meta["prompt"], meta["seed"]))
    return result


def _find_concepts(entries: list[dict], given: list[str] | None) -> list[str]:
    """Concept paths for the recorded entries, each checked against its fingerprint."""
    if given:
        if len(given) != len(entries):
            raise UserError(f"the image was made with {len(entries)} concept(s); {len(given)} given")
        candidates = [[path] for path in given]
    else:
        candidates = [[e[key] for key in ("path", "abs_path") if e.get(key)] for e in entries]
    paths = []
    for entry, options in zip(entries, candidates):
        found = next((p for p in options if _is_concept(p)), None)
        if found is None:
            where = " or ".join(options) or "no recorded path"
            raise UserError(
                f"the image was made with concept {entry['placeholder']!r} (fingerprint {entry['fingerprint']}) "
                f"at {where}, which is not there; pass the concept folder(s) after --from-image"
            )
        fingerprint = Concept.load(found).fingerprint()
        if fingerprint != entry["fingerprint"]:
            raise UserError(
                f"concept {found} has fingerprint {fingerprint}, but the image was made with "
                f"{entry['fingerprint']} ({entry['placeholder']!r}); pass the concept that made it"
            )
        paths.append(found)
    return paths


def _is_concept(path: str) -> bool:
    try:
        resolve_concept_path(path)
    except UserError:
        return False
    return True


def _find_file(record: dict, what: str) -> str:
    """A recorded input file (as given, then absolute) whose SHA-256 still matches."""
    for option in (record["path"], record["abs_path"]):
        if Path(option).is_file():
            digest = file_record(option)["sha256"]
            if digest != record["sha256"]:
                raise UserError(f"the {what} {option} changed since the image was made (sha256 {digest}, "
                                f"image says {record['sha256']})")
            return option
    raise UserError(f"the {what} {record['path']} that made the image is gone; put it back to regenerate")
