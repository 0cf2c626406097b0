"""The record each generated image carries in its PNG: what `generate` writes and `--from-image` reads.

A PNG holds two text chunks: `parameters`, an A1111-style line (read by A1111, ComfyUI and most image
viewers), and `personamagic`, a JSON object with everything needed to make the image again: prompt,
seed, sampler settings, size, device and dtype, every concept's path as given and its fingerprint, the
background/region/IP-Adapter/PhotoMaker files with their SHA-256, and the batch the image was sampled
in (prompts and seeds), so that the regenerated image is computed exactly as the first one.
`ImageRecord` is that object: made from a `GenerateConfig` (`image_metadata`), written (`png_info`),
read and checked (`read_image_metadata`), and turned back into a `GenerateConfig` (`generate_config`).
Images of earlier versions, without a batch, device or input files, read the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import __version__
from ..concept import Concept
from ..errors import BAD_JSON, PhotoError, SettingsError
from ..training.config import SEED_LIMIT
from .generate_config import MAX_BATCH_SIZE, GenerateConfig, is_int, is_number

# what PIL raises for a file it cannot read as an image (a truncated or forged PNG, a decompression bomb)
UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombWarning,
                    Image.DecompressionBombError)
METADATA_KEY = "personamagic"  # PNG text chunk of the record's JSON
PARAMETERS_KEY = "parameters"  # PNG text chunk of the A1111-style line


@dataclass(frozen=True, kw_only=True)
class ImageRecord(Mapping):
    """The `personamagic` record of one image, its fields in the order its JSON is written. A field is
    None where the JSON has no such key; nested values are read-only JSON (tuples, mappings). As a
    mapping, `record[key]` is the plain JSON value written under `key`."""

    prompt: str  # the image's prompt, placeholders as given
    negative_prompt: str | None = None  # the run's negative prompt ("" when none was given)
    seed: int  # the image's own seed
    scheduler: str  # `GenerateConfig.scheduler`
    steps: int  # `GenerateConfig.num_inference_steps`
    guidance_scale: float  # `GenerateConfig.guidance_scale`
    width: int | None = None  # the image's size in pixels
    height: int | None = None
    base_model: str | None = None  # the base model as given: hub id, path or built-in name
    concepts: tuple[Mapping, ...]  # placeholder, supercategory, fingerprint, stage_window, path, abs_path
    personamagic_version: str | None = None  # the version that wrote the image
    background: Mapping | None = None  # localized generation: the background's file record (below)
    region: Mapping | None = None  # the region mask's file record
    ip_adapter: Mapping | None = None  # weights, scale, images (file records)
    photomaker: Mapping | None = None  # weights, merge_step, lora_scale, images (file records)
    vae: str | None = None  # another VAE, as given
    model_config: str | None = None  # the config folder of a single-file base model
    device: str | None = None  # the device type the image was sampled on
    dtype: str | None = None  # the weights' precision: fp32, fp16, bf16
    batch: Mapping | None = None  # jobs: the [prompt, seed] pairs sampled in its UNet batch; index: its own
    extra: Mapping = field(default_factory=lambda: MappingProxyType({}))  # keys no field reads, kept as written

    @classmethod
    def from_json(cls, data) -> ImageRecord:
        """The record of a JSON value, checked: ValueError saying what is wrong where it is not what
        `image_metadata` writes (no object, a missing key, a wrong type, a batch without the image)."""
        fault = _fault(data)
        if fault is not None:
            raise ValueError(fault)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{key: _frozen(value) for key, value in data.items() if key in names},
                   extra=_frozen({key: value for key, value in data.items() if key not in names}))

    def to_json(self) -> dict:
        """The JSON object the record is written as (a new one: plain dicts and lists)."""
        data = {f.name: _thawed(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{key: value for key, value in data.items() if value is not None}, **_thawed(self.extra)}

    def __getitem__(self, key: str):
        return self.to_json()[key]

    def __iter__(self):
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())

    def generate_config(self) -> GenerateConfig:
        """The settings that make this image again, alone and without a grid; its input files are found
        where they were (as given, then absolute) and must be unchanged (PhotoError otherwise).
        SettingsError: a setting out of range."""
        files = {name: _located(getattr(self, name), name) for name in ("background", "region")
                 if getattr(self, name) is not None}
        ip, pm = self.ip_adapter, self.photomaker
        return GenerateConfig(
            prompts=[self.prompt],
            negative_prompt=self.negative_prompt or "",
            num_images=1,
            seed=self.seed,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            grid=False,
            width=self.width,
            height=self.height,
            placeholders=[c["placeholder"] for c in self.concepts],
            background=files.get("background"),
            region=files.get("region"),
            ip_adapter=ip["weights"] if ip else None,
            ip_adapter_images=[_located(r, "IP-Adapter image") for r in ip["images"]] if ip else [],
            ip_adapter_scale=ip["scale"] if ip else 1.0,
            photomaker=pm["weights"] if pm else None,
            photomaker_images=[_located(r, "PhotoMaker image") for r in pm["images"]] if pm else [],
            photomaker_merge_step=pm.get("merge_step") if pm else None,
            photomaker_lora_scale=pm.get("lora_scale", 1.0) if pm else 1.0,
            vae=self.vae,
            model_config=self.model_config,
        )

    def batch_jobs(self) -> tuple[list[tuple[str, int]], int]:
        """The (prompt, seed) pairs sampled in the image's batch and its position among them (the image
        alone where no batch is recorded). SettingsError: a seed out of range."""
        if self.batch is None:
            return [(self.prompt, self.seed)], 0
        jobs = [(prompt, seed) for prompt, seed in self.batch["jobs"]]
        for _, seed in jobs:  # the other images' seeds are sampled again too
            if not 0 <= seed < SEED_LIMIT:
                raise SettingsError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {seed}")
        return jobs, self.batch["index"]


def image_metadata(prompt: str, seed: int, config: GenerateConfig, concepts: list[Concept], base_model: str,
                   size: tuple[int, int], *, concept_paths: list[str] | None = None, inputs: dict | None = None,
                   device: str | None = None, dtype: str | None = None,
                   batch: tuple[list[tuple[str, int]], int] | None = None, extra: dict | None = None) -> ImageRecord:
    """The record of the image of `prompt` and `seed` sampled with `config` and `concepts` on `base_model`
    at `size` (width, height). `concept_paths` (as given) let `regenerate` find the concepts again;
    `inputs`: `input_records(config)` where the run made them already (they read every input file);
    `batch`: the (prompt, seed) pairs sampled together and this image's index; `extra`: more keys."""
    placeholders = config.placeholders or [c.placeholder for c in concepts]
    entries = []
    for i, concept in enumerate(concepts):
        entry = {"placeholder": placeholders[i], "supercategory": concept.supercategory,
                 "fingerprint": concept.fingerprint(), "stage_window": list(concept.stage_window)}
        if concept_paths is not None:
            entry["path"] = str(concept_paths[i])
            entry["abs_path"] = str(Path(concept_paths[i]).expanduser().resolve())
        entries.append(entry)
    data = {
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
        **(input_records(config) if inputs is None else inputs),
        "device": device,
        "dtype": dtype,
        "batch": {"jobs": [list(job) for job in batch[0]], "index": batch[1]} if batch is not None else None,
        **(extra or {}),
    }
    return ImageRecord.from_json({key: value for key, value in data.items() if value is not None})


def input_records(config: GenerateConfig) -> dict:
    """The record's entries of `config`'s input files and plug-ins (background, region, IP-Adapter,
    PhotoMaker, VAE, model config); every file is read for its SHA-256 (PhotoError naming its flag)."""
    inputs = {}
    if config.background is not None:
        inputs["background"] = file_record(config.background, "--background")
        inputs["region"] = file_record(config.region, "--region")
    if config.ip_adapter is not None:
        inputs["ip_adapter"] = {"weights": config.ip_adapter, "scale": config.ip_adapter_scale,
                                "images": [file_record(p, "--ip-adapter-image") for p in config.ip_adapter_images]}
    if config.photomaker is not None:
        inputs["photomaker"] = {"weights": config.photomaker, "merge_step": config.photomaker_merge_step,
                                "lora_scale": config.photomaker_lora_scale,
                                "images": [file_record(p, "--photomaker-image") for p in config.photomaker_images]}
    if config.vae is not None:
        inputs["vae"] = config.vae
    if config.model_config is not None:
        inputs["model_config"] = config.model_config
    return inputs


def file_record(path: str | Path, flag: str | None = None) -> dict:
    """How a record refers to an input file: the path as given, absolute, and a short SHA-256. `flag`:
    the option that named the file, for the error when it cannot be read."""
    path = Path(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as err:
        given = f"{flag} {path}" if flag else str(path)
        raise PhotoError(f"cannot read {given} ({err.strerror or err.__class__.__name__})") from None
    return {"path": str(path), "abs_path": str(path.expanduser().resolve()), "sha256": digest}


def _located(record: Mapping, what: str) -> str:
    """A recorded input file (as given, then absolute) whose SHA-256 still matches."""
    for option in (record["path"], record["abs_path"]):
        if Path(option).is_file():
            digest = file_record(option)["sha256"]
            if digest != record["sha256"]:
                raise PhotoError(f"the {what} {option} changed since the image was made (sha256 {digest}, "
                                 f"image says {record['sha256']})")
            return option
    raise PhotoError(f"the {what} {record['path']} that made the image is gone; put it back to regenerate")


def png_info(record: ImageRecord) -> PngInfo:
    """The PNG text chunks of `record`: the A1111-style line and the JSON."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, (
        f"{record.prompt}\nNegative prompt: {record.negative_prompt}\n"
        f"Steps: {record.steps}, Sampler: {record.scheduler}, CFG scale: {record.guidance_scale}, "
        f"Seed: {record.seed}, Size: {record.width}x{record.height}, Model: {record.base_model}"
    ))
    info.add_text(METADATA_KEY, json.dumps(record.to_json()))
    return info


def read_image_metadata(path: str | Path) -> ImageRecord:
    """The record of a generated PNG, checked: PhotoError if it has none, or if it is not what
    `image_metadata` writes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    except UNREADABLE_IMAGE as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise PhotoError(f"cannot read {path} as an image ({reason})") from None
    if not text:
        raise PhotoError(f"{path} has no personamagic metadata (was it made by personamagic generate?)")
    try:
        data = json.loads(text)
    except BAD_JSON:
        raise PhotoError(f"{path}: its personamagic metadata is not valid JSON (the file was edited or "
                         "damaged)") from None
    try:
        return ImageRecord.from_json(data)
    except ValueError as err:
        raise PhotoError(f"{path}: its personamagic metadata is damaged ({err})") from None


def _frozen(value):
    """A JSON value made read-only: objects as mappings, lists as tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: _frozen(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    return value


def _thawed(value):
    """A read-only JSON value (`_frozen`) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _thawed(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thawed(item) for item in value]
    return value


# key: (check, what it must be, required) of the JSON `image_metadata` writes
_FILE_RECORD = {"path": (str, "text", True), "abs_path": (str, "text", True), "sha256": (str, "text", True)}
_CONCEPT_ENTRY = {"placeholder": (str, "text", True), "fingerprint": (str, "text", True),
                  "supercategory": (str, "text", False), "path": (str, "text", False), "abs_path": (str, "text", False)}
_IMAGE_FIELDS = {
    "prompt": (str, "text", True), "seed": (int, "a whole number", True), "steps": (int, "a whole number", True),
    "guidance_scale": (float, "a number", True), "scheduler": (str, "text", True), "concepts": (list, "a list", True),
    "negative_prompt": (str, "text", False), "width": (int, "a whole number", False),
    "height": (int, "a whole number", False), "base_model": (str, "text", False), "device": (str, "text", False),
    "dtype": (str, "text", False), "batch": (dict, "an object", False), "background": (dict, "an object", False),
    "region": (dict, "an object", False), "ip_adapter": (dict, "an object", False),
}


def _fault(data) -> str | None:
    """What is wrong with a record's JSON (None: it has every key `regenerate` reads, each of its type)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    fault = _fields_fault(data, _IMAGE_FIELDS, "")
    if fault:
        return fault
    if not data["concepts"]:
        return "concepts is empty (every image is made with at least one concept)"
    for i, entry in enumerate(data["concepts"]):
        fault = _fields_fault(entry, _CONCEPT_ENTRY, f"concepts[{i}].")
        if fault:
            return fault
    for name in ("background", "region"):
        if name in data and (fault := _fields_fault(data[name], _FILE_RECORD, f"{name}.")):
            return fault
    if "ip_adapter" in data:
        ip = data["ip_adapter"]
        fault = _fields_fault(ip, {"weights": (str, "text", True), "scale": (float, "a number", True),
                                   "images": (list, "a list", True)}, "ip_adapter.")
        for i, record in enumerate(ip.get("images", []) if fault is None else []):
            fault = fault or _fields_fault(record, _FILE_RECORD, f"ip_adapter.images[{i}].")
        if fault:
            return fault
    if "photomaker" in data:
        pm = data["photomaker"]
        fault = _fields_fault(pm, {"weights": (str, "text", True), "lora_scale": (float, "a number", True),
                                   "images": (list, "a list", True)}, "photomaker.")
        if fault is None and pm.get("merge_step") is not None and not is_int(pm["merge_step"]):
            fault = f"photomaker.merge_step must be a whole number, got {pm['merge_step']!r}"
        for i, record in enumerate(pm.get("images", []) if fault is None else []):
            fault = fault or _fields_fault(record, _FILE_RECORD, f"photomaker.images[{i}].")
        if fault:
            return fault
    for key in ("vae", "model_config"):
        if key in data and not isinstance(data[key], str):
            return f"{key} must be text, got {data[key]!r}"
    if "batch" in data:
        batch = data["batch"]
        jobs, index = batch.get("jobs"), batch.get("index")
        if not isinstance(jobs, list) or not jobs or not all(
            isinstance(job, list) and len(job) == 2 and isinstance(job[0], str) and is_int(job[1]) for job in jobs
        ):
            return "batch.jobs must be a list of [prompt, seed] pairs"
        if len(jobs) > MAX_BATCH_SIZE:
            return f"batch.jobs holds {len(jobs)} images, more than a batch can ({MAX_BATCH_SIZE})"
        if not is_int(index) or not 0 <= index < len(jobs):
            return f"batch.index must be a position in batch.jobs, got {index!r}"
        if jobs[index] != [data["prompt"], data["seed"]]:
            return "its batch does not hold its own prompt and seed"
    return None


def _fields_fault(record, fields: dict, prefix: str) -> str | None:
    if not isinstance(record, dict):
        return f"{prefix.rstrip('.') or 'the metadata'} must be an object, got {record!r}"
    for key, (kind, description, required) in fields.items():
        if key not in record:
            if required:
                return f"no {prefix}{key!r}"
            continue
        value = record[key]
        ok = is_int(value) if kind is int else is_number(value) if kind is float else isinstance(value, kind)
        if not ok:
            return f"{prefix}{key} must be {description}, got {value!r}"
    return None
