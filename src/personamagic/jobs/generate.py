"""The `generate` job: concepts + prompts -> PNG files with their generation parameters inside.

Each image is named from its prompt and seed with only `[a-z0-9-]` characters, so no prompt can
write outside the output folder, and carries its record (`image_record`): everything needed to make
it again (`regenerate`, `personamagic generate --from-image`), pixel for pixel on the same device type
and dtype. A grid of the first `GRID_IMAGES` images is written beside them.

Images are written as they are sampled (each atomically), so memory stays bounded whatever the number
of images; a run that fails on the way keeps the images written before and names them
(`GenerateStopped`), and leaves no folder it created empty.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..concept import Concept, resolve_concept_path
from ..errors import ConceptError, Interrupted, PersonaMagicError, PhotoError, SettingsError
from ..files import disk_error, make_folders, remove_empty_folders, write_atomic
from ..models import TINY_MODELS, load_base_model, resolve_device, resolve_dtype
from .assets import check_assets, model_assets
from ..models.devices import DTYPE_NAMES
from .generate_config import MAX_SIDE, GenerateConfig
from .image_record import image_metadata, input_records, png_info, read_image_metadata

logger = logging.getLogger(__name__)

GRID_IMAGES = 64  # grid.png shows the first this many images, whatever num_images is
GRID_MAX_SIDE = 4096  # grid.png's longer side at most: its tiles are scaled down to fit


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


def safe_filename(index: int, prompt: str, seed: int, digits: int = 3) -> str:
    """`003-a-photo-of-s-as-an-astronaut-seed7.png`: only [a-z0-9-], never a path. `digits`: the width
    of the index, so that names sort in order (more than 3 for runs of over 1000 images)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60].strip("-") or "image"
    return f"{index:0{digits}d}-{slug}-seed{seed}.png"


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(
            f"cannot read the prompts file {path} ({err.__class__.__name__}); give a UTF-8 text file"
        ) from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SettingsError(f"the prompts file {path} holds no prompt (one per line; # starts a comment)")
    return prompts


def make_grid(images: list[Image.Image]) -> Image.Image:
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


class GridTiles:
    """The first `count` images of a run as the tiles of grid.png, each scaled down (when needed) so
    that the grid's longer side is at most `GRID_MAX_SIDE`: memory stays that of one grid."""

    def __init__(self, count: int):
        self.count = count
        self.columns = math.ceil(math.sqrt(count))
        self.rows = math.ceil(count / self.columns)
        self.tiles: list[Image.Image] = []

    def add(self, image: Image.Image) -> None:
        if len(self.tiles) >= self.count:
            return
        scale = min(1.0, GRID_MAX_SIDE / max(self.columns * image.width, self.rows * image.height))
        if scale < 1.0:
            size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        self.tiles.append(image)

    def grid(self) -> Image.Image:
        return make_grid(self.tiles)


# --------------------------------------------------------------------------------------------------
# the job


class GenerateStopped(PersonaMagicError):
    """A run that stopped on the way (a full disk, a fault in a later batch): the images it wrote
    before stay, and `kept` lists them."""

    def __init__(self, message: str, kept: list[Path]):
        super().__init__(message)
        self.kept = kept


class GenerateInterrupted(GenerateStopped, Interrupted):
    """A run stopped by Ctrl-C: the images it wrote before stay, and `kept` lists them."""


def prepare_output_folder(output: Path) -> list[Path]:
    """Check `output` can hold images and create it (before the model loads, so a bad path fails at
    once); returns the folders created, for `remove_empty_folders` when the run fails."""
    try:
        if output.exists() and not output.is_dir():
            raise SettingsError(f"--output {output} is a file; give a folder")
        if any(parent.exists() and not parent.is_dir() for parent in output.parents):
            raise SettingsError(f"--output {output} lies under a file; give a folder path")
        created = make_folders(output)
    except OSError as err:
        raise disk_error(output, err) from None
    try:
        tempfile.TemporaryFile(dir=output).close()  # a read-only folder fails here, not after sampling
    except OSError as err:
        remove_empty_folders(created)
        raise disk_error(output, err) from None
    return created


class _Session:
    """A loaded pipeline with its concepts and inputs, able to sample and save batches of (prompt, seed)."""

    def __init__(self, concept_paths: list[str], config: GenerateConfig, model: str | None, device: str,
                 dtype: str | None, local_files_only: bool, result: GenerateResult, resident=None):
        self.config, self.result = config, result
        self.concept_paths = [str(p) for p in concept_paths]
        self.concepts = [Concept.load(path) for path in self.concept_paths]
        self.ip_adapter = None  # its IPAdapterSpec, parsed by _check_inputs
        self._check_placeholders()
        # Check the settings and input files before the (possibly multi-GB) model load.
        self.inputs = self._check_inputs()
        self.model = model or self.concepts[0].base_model
        if self.model in TINY_MODELS:
            result.notes.append("tiny model: its images are noise-like by nature; use a real model for faces")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        assets = self._assets()
        if resident is not None:  # the base model may be loaded already; the rest is checked all the same
            assets = [a for a in assets if a.what != "the base model"]
        check_assets(assets, local_files_only=local_files_only)
        base = self._load_base(resident, local_files_only)
        self._load_pipeline(base)
        self._attach_concepts()
        self.call_kwargs = self._call_kwargs(base, local_files_only)

    def _check_placeholders(self) -> None:
        config = self.config
        if not self.concepts:
            raise SettingsError("give at least one concept folder")
        if config.placeholders and len(config.placeholders) != len(self.concepts):
            raise SettingsError(
                f"{len(config.placeholders)} --placeholder for {len(self.concepts)} concepts; give one per concept"
            )
        placeholders = config.placeholders or [c.placeholder for c in self.concepts]
        if len(set(placeholders)) != len(placeholders):
            raise SettingsError(
                f"two concepts use the placeholder {next(p for p in placeholders if placeholders.count(p) > 1)!r}; "
                "give each its own (--placeholder once per concept, e.g. --placeholder '<me>' --placeholder '<style>')"
            )

    def _check_inputs(self) -> dict:
        """The scheduler name, the plug-ins and every input file, checked; the input files' records for
        the images' records."""
        from ..adapters.ip_adapter import IPAdapterSpec
        from ..pipeline import scheduler_choice

        config = self.config
        scheduler_choice(config.scheduler)
        if config.ip_adapter is not None:
            self.ip_adapter = IPAdapterSpec.parse(config.ip_adapter, scale=config.ip_adapter_scale)
        if config.photomaker is not None:
            from ..adapters.photomaker_plugin import trigger_pattern
            from ..pipeline.pipeline import check_photomaker_vectors

            # the concepts PhotoMaker fuses: those before its trigger
            for concept, placeholder in zip(self.concepts, config.placeholders or [c.placeholder for c in self.concepts]):
                if any(re.search(trigger_pattern(placeholder), p) for p in config.prompts):
                    check_photomaker_vectors(placeholder, concept.mapper_config["num_vectors"])
        return input_records(config)

    def _assets(self) -> list:
        """What the run downloads (`jobs.assets`), for the offline check."""
        from ..families import family_named

        config = self.config
        # the concepts say the family (the offline toy to suggest); a model's name only hints at it
        family = family_named(self.concepts[0].family) if self.concepts else None
        return model_assets(self.model, family=family, model_config=config.model_config, vae=config.vae,
                            photomaker=config.photomaker, ip_adapter=self.ip_adapter)

    def _load_base(self, resident, local_files_only: bool):
        config = self.config
        plugged = config.ip_adapter is not None or config.photomaker is not None
        shareable = resident is not None and not plugged and not config.compile  # these change the model for good
        load = resident.load if shareable else load_base_model
        return load(self.model, device=self.device, dtype=self.dtype, local_files_only=local_files_only,
                    vae=config.vae, model_config=config.model_config)

    def _load_pipeline(self, base) -> None:
        from ..pipeline import PersonaMagicPipeline

        config = self.config
        self.pipe = PersonaMagicPipeline.from_base(base, scheduler=config.scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        num_train_timesteps = self.pipe.scheduler.config.num_train_timesteps
        if config.num_inference_steps > num_train_timesteps:
            raise SettingsError(f"{config.num_inference_steps} denoising steps, but {self.model}'s schedule has "
                                f"{num_train_timesteps} timesteps; use --steps {num_train_timesteps} or fewer")
        if config.compile:
            logger.info("--compile: the first batch of each size compiles the UNet first (tens of seconds or "
                        "more; PyTorch caches the result on disk for later runs)")
            self.pipe.enable_compile(backend=config.compile_backend)
        plugged = config.ip_adapter is not None or config.photomaker is not None
        if config.cuda_graph and self.device.type == "cuda" and not plugged:
            self.pipe.enable_cuda_graph()

    def _attach_concepts(self) -> None:
        """Each concept on the pipeline, with a reminder of the plug-ins and VAE it was trained with."""
        config, notes = self.config, self.result.notes
        placeholders = config.placeholders or [None] * len(self.concepts)
        for concept, placeholder in zip(self.concepts, placeholders):
            self.pipe.load_concept(concept, placeholder)
            for key, flags, given in (("ip_adapter", "--ip-adapter and --ip-adapter-image", config.ip_adapter),
                                      ("photomaker", "--photomaker and --photomaker-image", config.photomaker),
                                      ("vae", "--vae", config.vae)):
                trained_with = concept.extra.get(key)
                if trained_with and given is None:
                    weights = trained_with.get("weights") if isinstance(trained_with, dict) else trained_with
                    notes.append(f"concept {concept.placeholder!r} was trained with the {key.replace('_', '-')} "
                                 f"{weights}; pass {flags} to generate as it was trained")
        notes += self.pipe.check_prompts(config.prompts)
        for warning in long_prompt_warnings(self.pipe, config.prompts, config.negative_prompt):
            logger.warning(warning)

    def _call_kwargs(self, base, local_files_only: bool) -> dict:
        """The pipeline's arguments that are the same for every batch: size, localized inputs, plug-ins."""
        from ..adapters.ip_adapter import load_ip_adapter
        from ..faces.photos import load_photo
        from ..pipeline.localized import load_localized_inputs

        config, kwargs, size = self.config, {}, None
        if config.width or config.height:
            size = (config.width or config.height, config.height or config.width)
        if config.background is not None:
            background, region = load_localized_inputs(
                config.background, config.region, size, base.resolution, self.pipe.vae_scale_factor
            )
            size = background.size
            if max(size) > MAX_SIDE:
                raise PhotoError(f"the background's shape gives {size[0]}x{size[1]} images, over {MAX_SIDE} pixels a "
                                 "side; pass --width and --height, or crop the background")
            kwargs.update(background=background, region=region)
        if size is not None:
            kwargs.update(width=size[0], height=size[1])
        if config.ip_adapter is not None:
            images = [load_photo(p) for p in config.ip_adapter_images]
            load_ip_adapter(self.pipe, self.ip_adapter, local_files_only=local_files_only)
            kwargs["ip_adapter_image"] = images
        if config.photomaker is not None:
            from ..adapters.photomaker_plugin import PhotoMakerSpec

            images = [load_photo(p) for p in config.photomaker_images]
            spec = PhotoMakerSpec(weights=config.photomaker, lora_scale=config.photomaker_lora_scale,
                                  merge_step=config.photomaker_merge_step)
            self.pipe.load_photomaker(spec, local_files_only=local_files_only)
            self.result.notes += self.pipe.check_photomaker_prompts(config.prompts)
            kwargs["photomaker_images"] = images
        return kwargs

    def sample(self, jobs: list[tuple[str, int]]) -> list[Image.Image]:
        """One UNet batch: image k is prompt jobs[k][0] from seed jobs[k][1]."""
        generators = [torch.Generator(self.device).manual_seed(seed) for _, seed in jobs]
        try:
            images = self.pipe(
                [p for p, _ in jobs],
                negative_prompt=self.config.negative_prompt or None,  # none given: the family's default
                num_inference_steps=self.config.num_inference_steps,
                guidance_scale=self.config.guidance_scale,
                generator=generators,
                output_type="np",
                **self.call_kwargs,
            ).images  # (B, H, W, 3) in [0, 1]
        except (torch.OutOfMemoryError, MemoryError):
            raise SettingsError(f"out of memory sampling {len(jobs)} image(s) at once on {self.device.type}; lower "
                                "--batch-size, --width/--height, or use a larger device") from None
        if not np.isfinite(images).all():
            # Cast to 8 bits, NaN would be a black image written with success; say so instead.
            dtype = DTYPE_NAMES.get(self.dtype, str(self.dtype))
            raise SettingsError(f"sampling gave NaN or infinite pixels (the model overflowed in {dtype}); "
                                "use --dtype fp32 or a lower --guidance-scale")
        return self.pipe.image_processor.numpy_to_pil(images)

    def save(self, image: Image.Image, path: Path, jobs: list[tuple[str, int]], index: int) -> None:
        """Image `index` of the batch `jobs`, written with its record."""

        prompt, seed = jobs[index]
        record = image_metadata(prompt, seed, self.config, self.concepts, self.model, image.size,
                                concept_paths=self.concept_paths, inputs=self.inputs, device=self.device.type,
                                dtype=DTYPE_NAMES.get(self.dtype, str(self.dtype)), batch=(jobs, index))
        try:
            write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(record)))
        except OSError as err:
            raise disk_error(path, err) from None


def long_prompt_warnings(pipe, prompts: list[str], negative_prompt: str = "") -> list[str]:
    """One warning per prompt longer than a text encoder reads (77 tokens on SD), saying what is cut.
    The encoder silently drops the end; placeholders count with all their vectors."""
    warnings_ = []
    labelled = [("prompt", p) for p in dict.fromkeys(prompts)]
    if negative_prompt:
        labelled.append(("negative prompt", negative_prompt))
    for label, prompt in labelled:
        text = pipe.rewrite_prompt(prompt)
        for tokenizer in pipe.tokenizers:
            room = tokenizer.model_max_length - 2  # the start and end tokens take two positions
            ids, cut = _tokens_after(tokenizer, text, room)
            if cut is None:
                continue
            lost = []
            for loaded in pipe.concepts:
                cut = cut.replace(" ".join(loaded.tokens.tokens), loaded.tokens.placeholder)
                for token in loaded.tokens.tokens:
                    cut = cut.replace(token, loaded.tokens.placeholder)
                if set(loaded.tokens.ids) & set(ids[room:]):
                    lost.append(loaded.tokens.placeholder)
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            warning = (f"{label} {short!r} is {len(ids) + 2} tokens, the text encoder reads "
                       f"{tokenizer.model_max_length}: {cut.strip()!r} at its end is ignored")
            if lost:
                warning += f" (with {' and '.join(lost)}: shorten the prompt or the concept will not appear)"
            warnings_.append(warning)
            break
    return warnings_


def _tokens_after(tokenizer, text: str, room: int) -> tuple[list[int], str | None]:
    """The ids of `text` (no start/end tokens) and the text past its first `room` tokens (None if it fits):
    the prompt's own characters where the tokenizer gives offsets, else the decoded tokens."""
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = encoding["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        encoding, offsets = tokenizer(text, add_special_tokens=False, verbose=False), None
    ids = encoding.input_ids
    if len(ids) <= room:
        return ids, None
    return ids, text[offsets[room][0]:] if offsets else tokenizer.decode(ids[room:])


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

    Prompts x seeds are sampled `config.batch_size` at a time in one UNet batch (x2 with guidance),
    and each image is written as soon as it is sampled (memory does not grow with `num_images`).
    `progress(done, total)` is called after every batch. `resident`: a `models.ResidentModels` to take
    the base model from (not with an IP-Adapter or `compile`). A run that fails keeps the images it
    wrote (GenerateStopped lists them) and removes the folders it created if they stayed empty.
    """
    output = Path(output)
    result = GenerateResult()
    with _stopping(output, result):
        session = _Session(concept_paths, config, model, device, dtype, local_files_only, result, resident)
        total = config.num_jobs
        digits = max(3, len(str(total - 1)))
        grid = GridTiles(min(total, GRID_IMAGES)) if config.grid and total > 1 else None
        jobs = config.jobs()
        done = 0
        while done < total:
            chunk = list(itertools.islice(jobs, config.batch_size))
            for offset, image in enumerate(session.sample(chunk)):
                prompt, seed = chunk[offset]
                path = output / safe_filename(done + offset, prompt, seed, digits)
                session.save(image, path, chunk, offset)
                result.images.append(GeneratedImage(path, prompt, seed))
                if grid is not None:
                    grid.add(image)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        if grid is not None:
            path = output / "grid.png"
            picture = grid.grid()
            try:
                write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))
            except OSError as err:
                raise disk_error(path, err) from None
            result.grid = path
    return result


@contextlib.contextmanager
def _stopping(output: Path, result: GenerateResult):
    """The output folder made ready; on any failure inside, the folders this run created are removed
    if they stayed empty, and a fault that stops the run becomes a `GenerateStopped` listing what was kept."""
    created = prepare_output_folder(output)
    try:
        yield
    except BaseException as err:
        remove_empty_folders(created)
        stopped = stopped_error(err, result, output)
        if stopped is None:
            raise
        raise stopped from err


def stopped_error(err: BaseException, result: GenerateResult, output: Path) -> GenerateStopped | None:
    """The one-line error of a run stopped by Ctrl-C, or by a user mistake or disk fault after images
    were written, naming what was kept; None where `err` itself should go on (nothing was written, or
    it is not the user's to fix)."""
    kept = [image.path for image in result.images]
    if isinstance(err, KeyboardInterrupt):
        reason, stopped = "interrupted", GenerateInterrupted
    elif isinstance(err, PersonaMagicError) and kept:
        reason, stopped = str(err), GenerateInterrupted if isinstance(err, Interrupted) else GenerateStopped
    else:
        return None
    reason += f"; kept the {len(kept)} image(s) written before in {output}" if kept else "; no image was written"
    return stopped(reason, kept)


# --------------------------------------------------------------------------------------------------
# regeneration from an image's own record


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
    model_config: str | None = None,
) -> GenerateResult:
    """Make a generated image again from its record; write it to the folder `output`.

    The image's whole batch is sampled again (same prompts and seeds, so every number is computed as
    the first time) and only this image is kept: on the same device type and dtype the result is the
    same image, pixel for pixel. Concepts are found at the recorded paths (as given, then absolute)
    unless `concept_paths` says where they are now; each must match its recorded fingerprint.
    `dtype` defaults to the recorded one. `resident`: as in `generate`. `model_config`: the config
    folder of a single-file model, when not where the image's record says.
    """

    image = Path(image)
    record = read_image_metadata(image)
    paths = _find_concepts(record.concepts, concept_paths)
    try:
        config = record.generate_config()
        jobs, index = record.batch_jobs()
    except SettingsError as err:
        raise SettingsError(f"{image}: its personamagic metadata asks for settings out of range ({err})") from None
    if model_config is not None:  # the single file's configs are elsewhere now
        config.model_config = model_config

    output = Path(output)
    path = output / image.name  # the image keeps its own name
    if path.resolve() == image.resolve():
        raise SettingsError(f"--output {output} holds {image.name} itself; make it again into another folder")
    result = GenerateResult()
    with _stopping(output, result):
        dtype = dtype or record.dtype or "auto"
        session = _Session(paths, config, model or record.base_model, device, dtype, local_files_only, result,
                           resident)
        if record.device and record.device != session.device.type:
            result.notes.append(
                f"the image was made on {record.device}, this run is on {session.device.type}: "
                "expect small differences (exact only on the same device type and dtype)"
            )
        if len(jobs) > 1:
            logger.info("sampling the image's batch of %d again to reproduce it exactly", len(jobs))
        new_image = session.sample(jobs)[index]
        session.save(new_image, path, jobs, index)
        result.images.append(GeneratedImage(path, record.prompt, record.seed))
    return result


def _find_concepts(entries, given: list[str] | None) -> list[str]:
    """Concept paths for a record's concept entries, each checked against its fingerprint."""
    if given:
        if len(given) != len(entries):
            raise ConceptError(f"the image was made with {len(entries)} concept(s); {len(given)} given")
        candidates = [[path] for path in given]
    else:
        candidates = [[e[key] for key in ("path", "abs_path") if e.get(key)] for e in entries]
    paths = []
    for entry, options in zip(entries, candidates):
        found = next((p for p in options if _is_concept(p)), None)
        if found is None:
            where = " or ".join(options) or "no recorded path"
            raise ConceptError(
                f"the image was made with concept {entry['placeholder']!r} (fingerprint {entry['fingerprint']}) "
                f"at {where}, which is not there; pass the concept folder(s) after --from-image"
            )
        fingerprint = Concept.load(found).fingerprint()
        if fingerprint != entry["fingerprint"]:
            raise ConceptError(
                f"concept {found} has fingerprint {fingerprint}, but the image was made with "
                f"{entry['fingerprint']} ({entry['placeholder']!r}); pass the concept that made it"
            )
        paths.append(found)
    return paths


def _is_concept(path: str) -> bool:
    try:
        resolve_concept_path(path)
    except ConceptError:
        return False
    return True
