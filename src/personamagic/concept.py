"""Concept files: `concept.safetensors` = the mapper's tensors + the photo's CLIP embedding + JSON metadata.

No pickle anywhere: tensors are safetensors, everything else is JSON in the safetensors header under the
key `personamagic`. Loading a concept never executes code. Files are written atomically (temporary file
in the same folder, fsync, `os.replace`), so a crash never leaves a half-written concept behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import BAD_JSON, ConceptError
from .files import load_safetensors, save_safetensors_atomic
from .method.mapper import MapperConfig, StageMapper
from .method.stages import StageWindow

FORMAT_VERSION = 2  # 2 adds the model family and the base model's revision; version 1 files are read too
READABLE_VERSIONS = (1, 2)
CONCEPT_FILENAME = "concept.safetensors"
METADATA_KEY = "personamagic"
MAPPER_PREFIX = "mapper."
IMAGE_EMBEDS_KEY = "image_embeds"
MAPPER_PROBES = 1000  # timesteps of the dynamic stage at which loading checks the mapper's output is finite
# the largest T (the base model's num_train_timesteps) a concept file may record: every Stable Diffusion
# schedule has 1000; a far larger number is a damaged file, not a model
MAX_TRAIN_TIMESTEPS = 100_000


class ConceptFileError(ValueError):
    """A fault in a concept file's metadata or tensors; `Concept.load` names the file in front of it."""


@dataclass
class Concept:
    """A learned concept: everything generation needs, without the photo or the training code."""

    mapper_state: dict[str, torch.Tensor]  # StageMapper.state_dict() (buffers included)
    image_embeds: torch.Tensor  # (N, E) CLIP image embeddings of the N training photos
    placeholder: str  # text that stands for the concept in prompts, e.g. "S*"
    supercategory: str  # single-token word used in static stage 1, e.g. "face"
    stage_window: tuple[int, int]  # (t_lo, t_hi): the dynamic stage is t_lo <= t < t_hi
    num_train_timesteps: int  # T of the base model's schedule
    base_model: str  # hub id / path / "tiny" the concept was trained on
    text_encoder_hidden_size: int  # D of that base model; a concept only fits models with the same D
    mapper_config: dict  # MapperConfig fields
    image_encoder: str = ""  # the CLIP vision model that produced image_embeds
    training: dict = field(default_factory=dict)  # the training configuration, for the record
    stages: dict = field(default_factory=dict)  # stage partition details (IoU curve, thresholds)
    extra: dict = field(default_factory=dict)  # anything else worth keeping (photo facts, timings)
    version: str = __version__  # package version that wrote the file
    family: str = "sd1"  # the base model's family (`personamagic.families`); version-1 files are SD-1.x
    base_revision: str | None = None  # hub commit of the base model's files, when loaded from the hub
    file_format: int = field(default=FORMAT_VERSION, compare=False)  # the format of the file it was read from

    def build_mapper(self, device=None) -> StageMapper:
        config = MapperConfig(**self.mapper_config)
        mapper = StageMapper(config, self.mapper_state["super_embedding"])
        mapper.load_state_dict(self.mapper_state)
        return mapper.to(device).eval().requires_grad_(False)

    def mean_image_embed(self) -> torch.Tensor:
        """(E,) the embedding generation uses: the mean over the training photos."""
        return self.image_embeds.float().mean(dim=0)

    def metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "package_version": self.version,
            "placeholder": self.placeholder,
            "supercategory": self.supercategory,
            "stage_window": list(self.stage_window),
            "num_train_timesteps": self.num_train_timesteps,
            "base_model": self.base_model,
            "text_encoder_hidden_size": self.text_encoder_hidden_size,
            "family": self.family,
            "base_revision": self.base_revision,
            "mapper_config": self.mapper_config,
            "image_encoder": self.image_encoder,
            "training": self.training,
            "stages": self.stages,
            "extra": self.extra,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {MAPPER_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.mapper_state.items()}
        tensors[IMAGE_EMBEDS_KEY] = self.image_embeds.detach().cpu().float().contiguous()
        return tensors

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to `path` (a folder gets `concept.safetensors` inside it)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / CONCEPT_FILENAME
        save_safetensors_atomic(self.tensors(), {METADATA_KEY: json.dumps(self.metadata())}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Concept":
        """Read a concept file (or a folder holding one). Anything that is not a whole, well-formed
        concept is one ConceptError naming the file and the fault: metadata of the wrong shape or type,
        a tensor the configuration needs that is missing or of the wrong shape or dtype, non-finite
        values. Loading never executes code."""
        path = resolve_concept_path(path)
        tensors, header = load_safetensors(path, error=ConceptError)
        try:
            meta = json.loads(header[METADATA_KEY])
        except (KeyError, *BAD_JSON):
            raise ConceptError(f"{path}: not a PersonaMagic concept (a safetensors file without readable concept "
                               "metadata)") from None
        try:
            return cls._from_file(tensors, meta)
        except ConceptFileError as fault:
            raise ConceptError(f"{path}: {fault}") from None

    @classmethod
    def _from_file(cls, tensors: dict[str, torch.Tensor], meta) -> "Concept":
        """The concept in a file's tensors and metadata, every field checked (ConceptFileError)."""
        if not isinstance(meta, dict):
            raise ConceptFileError(f"its metadata is a JSON {type(meta).__name__}, not an object; "
                                   "the file is damaged or not a PersonaMagic concept")
        if "format_version" not in meta:
            raise ConceptFileError("its metadata has no 'format_version'; the file is damaged or not a PersonaMagic "
                                   "concept")
        version = meta["format_version"]
        if not _is_kind(version, int):  # "2" or true is no format number, not a format this version cannot read
            raise ConceptFileError(f"concept format {version!r} is not a format number: metadata 'format_version' "
                                   "must be a whole number; the file is damaged")
        if version not in READABLE_VERSIONS:
            raise ConceptFileError(
                f"concept format {version!r}, this personamagic reads {FORMAT_VERSION}; use the personamagic "
                f"version that wrote it ({meta.get('package_version')})"
            )
        fields = _check_metadata(meta)
        mapper_state = {k[len(MAPPER_PREFIX):]: v for k, v in tensors.items() if k.startswith(MAPPER_PREFIX)}
        image_embeds = tensors.get(IMAGE_EMBEDS_KEY)
        stray = sorted(k for k in tensors if not k.startswith(MAPPER_PREFIX) and k != IMAGE_EMBEDS_KEY)
        if stray:
            raise ConceptFileError(f"tensor {stray[0]!r} belongs to no part of a concept")
        concept = cls(mapper_state=mapper_state, image_embeds=image_embeds, file_format=version, **fields)
        concept._check_tensors()
        return concept

    def _check_tensors(self) -> None:
        """Every tensor the mapper configuration implies, with its shape and dtype, finite; and a mapper
        whose output is finite over the dynamic stage (ConceptFileError)."""
        try:
            config = MapperConfig(**self.mapper_config)
            with torch.device("meta"):  # shapes and dtypes only: a garbled config allocates nothing
                expected = StageMapper(config, torch.zeros(config.text_embed_dim)).state_dict()
        except (TypeError, ValueError) as err:
            raise ConceptFileError(f"mapper_config does not build a mapper ({err})") from None
        for name in sorted(set(expected) | set(self.mapper_state)):
            key = MAPPER_PREFIX + name
            if name not in self.mapper_state:
                raise ConceptFileError(f"tensor {key!r} is missing (the mapper_config needs it)")
            if name not in expected:
                raise ConceptFileError(f"tensor {key!r} is not part of the mapper its mapper_config describes")
            _check_tensor(key, self.mapper_state[name], tuple(expected[name].shape), expected[name].dtype)
        if self.image_embeds is None:
            raise ConceptFileError(f"tensor {IMAGE_EMBEDS_KEY!r} (the photos' CLIP embeddings) is missing")
        E = config.image_embed_dim
        if self.image_embeds.dim() != 2 or self.image_embeds.shape[0] < 1:
            raise ConceptFileError(f"tensor {IMAGE_EMBEDS_KEY!r} has shape {tuple(self.image_embeds.shape)}, "
                                   f"expected (N, {E}) for N >= 1 photos")
        _check_tensor(IMAGE_EMBEDS_KEY, self.image_embeds, (self.image_embeds.shape[0], E), torch.float32)
        self._check_widths(config)
        # Finite weights can still overflow (1e30 everywhere): the embeddings generation and export
        # read must be finite too. At most MAPPER_PROBES timesteps of the dynamic stage are probed.
        window = self.window
        timesteps = torch.linspace(window.lo, window.hi - 1, min(MAPPER_PROBES, window.hi - window.lo)).round().long()
        with torch.no_grad():
            image_embeds = self.mean_image_embed()[None].expand(len(timesteps), -1)
            embeddings, residuals = self.build_mapper("cpu")(timesteps, image_embeds)
        if not (torch.isfinite(embeddings).all() and torch.isfinite(residuals).all()):
            raise ConceptFileError("its mapper gives NaN or infinite embeddings (weights out of range); "
                                   "the file is damaged: train the concept again")

    def _check_widths(self, config: MapperConfig) -> None:
        """The metadata's widths agree with the tensors and the family (ConceptFileError). The tensors pin
        the mapper_config's sizes (`super_embedding` is (D,), the heads (V·D, H) and (V·R, H)); what they
        leave open must still fit: the recorded text width, one width per text encoder of the family, and
        a value residual as wide as the text encoders' outputs side by side (where it is added)."""
        from .families import FAMILIES

        D = config.text_embed_dim
        if self.text_encoder_hidden_size != D:
            raise ConceptFileError(f"metadata 'text_encoder_hidden_size' is {self.text_encoder_hidden_size}, but its "
                                   f"tensors are of text width {D}; the file is damaged: train the concept again")
        family = FAMILIES[self.family]
        if len(config.encoder_widths) != len(family.encoders):
            raise ConceptFileError(f"mapper_config 'encoder_widths' {config.encoder_widths} has "
                                   f"{len(config.encoder_widths)} width(s), but a {family.title} model has "
                                   f"{len(family.encoders)} text encoder(s); the file is damaged")
        if config.residual_dim != D:
            raise ConceptFileError(f"mapper_config 'residual_dim' {config.residual_dim} is not the text width {D} "
                                   "(the value residual is added to the text encoders' output); the file is damaged")

    def fingerprint(self) -> str:
        """Short SHA-256 of the tensors and the fields that change generation (for image metadata)."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.tensors().items()):
            digest.update(key.encode())
            digest.update(tensor.numpy().tobytes())
        digest.update(json.dumps([self.placeholder, self.supercategory, list(self.stage_window)]).encode())
        return digest.hexdigest()[:16]

    def check_compatible(self, hidden_size: int, num_train_timesteps: int, base_model: str,
                         family: str = "sd1", encoder_widths: list[int] | None = None,
                         placeholder: str | None = None) -> list[str]:
        """Raise ConceptError if the concept cannot drive a base model of this family and shape (its text
        width; with `encoder_widths`, each text encoder's width in order); return warnings. `placeholder`:
        what the concept is called in this run (a renamed placeholder), for the messages."""
        name = placeholder or self.placeholder
        if family != self.family:
            from .families import FAMILIES

            trained = FAMILIES[self.family].title if self.family in FAMILIES else self.family
            now = FAMILIES[family].title if family in FAMILIES else family
            raise ConceptError(
                f"concept {name!r} was trained on a {trained} model ({self.base_model}); "
                f"{base_model} is a {now} model. Use --model {self.base_model} or another {trained} model"
            )
        # The mapper's own width decides what it can drive; the recorded one must agree with it.
        if hidden_size != self.text_encoder_hidden_size or hidden_size != self.mapper_config.get("text_embed_dim"):
            raise ConceptError(
                f"concept {name!r} was trained on {self.base_model} (text width "
                f"{self.text_encoder_hidden_size}); this base model's text width is {hidden_size}. "
                f"Use --model {self.base_model} or a model of the same family"
            )
        trained_widths = list(self.mapper_config.get("encoder_widths") or [hidden_size])
        if encoder_widths is not None and trained_widths != list(encoder_widths):
            raise ConceptError(
                f"concept {name!r} was trained on text encoders of widths {trained_widths}; this base "
                f"model's are {list(encoder_widths)}. Use --model {self.base_model} or a model of the same family"
            )
        if num_train_timesteps != self.num_train_timesteps:
            raise ConceptError(
                f"concept {name!r} expects {self.num_train_timesteps} training timesteps, "
                f"the base model has {num_train_timesteps}"
            )
        if not base_model:
            return [f"concept {name!r} was trained on {self.base_model}; this pipeline's model does not say its "
                    "name (no name_or_path), so whether it is the same model cannot be checked"]
        if base_model != self.base_model:
            return [f"concept {name!r} was trained on {self.base_model}, generating with {base_model}"]
        return []

    @property
    def window(self) -> StageWindow:
        """The dynamic stage as a `StageWindow` (the stage table of sampling and export)."""
        return StageWindow(*self.stage_window, self.num_train_timesteps)


def _check_metadata(meta: dict) -> dict:
    """The Concept fields in a file's metadata, each of its required type and range (ConceptFileError)."""
    from .families import FAMILIES

    def get(key, kind, description, default=dataclasses.MISSING):
        if key not in meta:
            if default is dataclasses.MISSING:
                raise ConceptFileError(f"its metadata has no {key!r}")
            return default
        value = meta[key]
        if not _is_kind(value, kind):
            raise ConceptFileError(f"metadata {key!r} must be {description}, got {value!r}")
        return value

    placeholder = get("placeholder", str, "text")
    if not placeholder.strip() or placeholder != placeholder.strip():
        raise ConceptFileError(f"metadata 'placeholder' must be non-empty text without surrounding spaces, "
                               f"got {placeholder!r}")
    supercategory = get("supercategory", str, "text")
    if not supercategory.strip():
        raise ConceptFileError("metadata 'supercategory' is empty")
    num_train_timesteps = get("num_train_timesteps", int, "a whole number")
    if not 1 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
        raise ConceptFileError(f"metadata 'num_train_timesteps' must be >= 1 and <= {MAX_TRAIN_TIMESTEPS}, "
                               f"got {num_train_timesteps}")
    window = get("stage_window", list, "[LO, HI]")
    whole = len(window) == 2 and all(_is_kind(t, int) for t in window)
    if not whole or not 0 <= window[0] < window[1] <= num_train_timesteps:
        raise ConceptFileError(f"metadata 'stage_window' must be two whole timesteps [LO, HI] with "
                               f"0 <= LO < HI <= {num_train_timesteps}, got {window!r}")
    hidden_size = get("text_encoder_hidden_size", int, "a whole number")
    if hidden_size < 1:
        raise ConceptFileError(f"metadata 'text_encoder_hidden_size' must be >= 1, got {hidden_size}")
    family = get("family", str, "text", "sd1")
    if family not in FAMILIES:
        raise ConceptFileError(f"model family {family!r} is not one this personamagic knows ({', '.join(FAMILIES)}); "
                               "use the personamagic version that wrote it")
    return {
        "placeholder": placeholder,
        "supercategory": supercategory,
        "stage_window": (window[0], window[1]),
        "num_train_timesteps": num_train_timesteps,
        "base_model": get("base_model", str, "text"),
        "text_encoder_hidden_size": hidden_size,
        "mapper_config": _check_mapper_config(get("mapper_config", dict, "an object")),
        "image_encoder": get("image_encoder", str, "text", ""),
        "training": get("training", dict, "an object", {}),
        "stages": get("stages", dict, "an object", {}),
        "extra": get("extra", dict, "an object", {}),
        "version": get("package_version", str, "text", ""),
        "family": family,
        "base_revision": get("base_revision", (str, type(None)), "text or null", None),
    }


def _check_mapper_config(config: dict) -> dict:
    """`mapper_config` with MapperConfig's fields only, each of its annotated type (ConceptFileError)."""
    types = {f.name: f.type for f in dataclasses.fields(MapperConfig)}
    for key, value in config.items():
        if key not in types:
            raise ConceptFileError(f"mapper_config has a field MapperConfig does not know: {key!r}")
        options = [option.strip() for option in str(types[key]).split("|")]
        if not any(_matches_annotation(value, option) for option in options):
            raise ConceptFileError(f"mapper_config {key!r} must be {types[key]}, got {value!r}")
    return config


def _matches_annotation(value, annotation: str) -> bool:
    kinds = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
    if annotation == "list[int]":
        return isinstance(value, list) and all(_is_kind(v, int) for v in value)
    return annotation not in kinds or _is_kind(value, kinds[annotation])


def _is_kind(value, kind) -> bool:
    """isinstance as JSON means it: a bool is not a number, an int is a float, a float is finite."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, (int, float)):
        return math.isfinite(value)
    return isinstance(value, kinds)


def _check_tensor(key: str, tensor: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != shape:
        raise ConceptFileError(f"tensor {key!r} has shape {tuple(tensor.shape)}, the mapper_config needs {shape}")
    if tensor.dtype != dtype:
        raise ConceptFileError(f"tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')}, "
                               f"expected {str(dtype).removeprefix('torch.')}")
    if not torch.isfinite(tensor).all():
        raise ConceptFileError(f"tensor {key!r} holds NaN or infinite values; the file is damaged: "
                               "train the concept again")


def resolve_concept_path(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            path = path / CONCEPT_FILENAME
        found = path.is_file()
    except OSError as err:  # a name too long, a folder on the way that may not be read
        raise ConceptError(f"cannot read {path}: {err.strerror or err}") from None
    if not found:
        raise ConceptError(f"no concept at {path}; pass a folder made by `personamagic train` or its "
                           "concept.safetensors")
    return path
