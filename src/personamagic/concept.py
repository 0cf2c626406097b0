"""Concept files: `concept.safetensors` = the mapper's tensors + the photo's CLIP embedding + JSON metadata.

No pickle anywhere: tensors are safetensors, everything else is JSON in the safetensors header under the
key `personamagic`. Loading a concept never executes code. Files are written atomically (temporary file
in the same folder, fsync, `os.replace`), so a crash never leaves a half-written concept behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import UserError
from .files import load_safetensors, save_safetensors_atomic
from .method.mapper import MapperConfig, StageMapper

FORMAT_VERSION = 2  # 2 adds the model family and the base model's revision; version 1 files are read too
READABLE_VERSIONS = (1, 2)
CONCEPT_FILENAME = "concept.safetensors"
METADATA_KEY = "personamagic"
MAPPER_PREFIX = "mapper."
IMAGE_EMBEDS_KEY = "image_embeds"


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
        tensors, header = load_safetensors(resolve_concept_path(path))
        try:
            meta = json.loads(header[METADATA_KEY])
        except (KeyError, json.JSONDecodeError):
            raise UserError(f"{path} is a safetensors file but not a PersonaMagic concept (no metadata)") from None
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise UserError(
                f"{path} has concept format {meta.get('format_version')}, this personamagic reads "
                f"{FORMAT_VERSION}; use the personamagic version that wrote it ({meta.get('package_version')})"
            )
        mapper_state = {k[len(MAPPER_PREFIX):]: v for k, v in tensors.items() if k.startswith(MAPPER_PREFIX)}
        return cls(
            mapper_state=mapper_state,
            image_embeds=tensors[IMAGE_EMBEDS_KEY],
            placeholder=meta["placeholder"],
            supercategory=meta["supercategory"],
            stage_window=tuple(meta["stage_window"]),
            num_train_timesteps=meta["num_train_timesteps"],
            base_model=meta["base_model"],
            text_encoder_hidden_size=meta["text_encoder_hidden_size"],
            mapper_config=meta["mapper_config"],
            image_encoder=meta.get("image_encoder", ""),
            training=meta.get("training", {}),
            stages=meta.get("stages", {}),
            extra=meta.get("extra", {}),
            version=meta.get("package_version", ""),
            family=meta.get("family", "sd1"),
            base_revision=meta.get("base_revision"),
        )

    def fingerprint(self) -> str:
        """Short SHA-256 of the tensors and the fields that change generation (for image metadata)."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.tensors().items()):
            digest.update(key.encode())
            digest.update(tensor.numpy().tobytes())
        digest.update(json.dumps([self.placeholder, self.supercategory, list(self.stage_window)]).encode())
        return digest.hexdigest()[:16]

    def check_compatible(self, hidden_size: int, num_train_timesteps: int, base_model: str,
                         family: str = "sd1") -> list[str]:
        """Raise UserError if the concept cannot drive a base model of this family and shape; return
        warnings."""
        if family != self.family:
            from .families import FAMILIES

            trained = FAMILIES[self.family].title if self.family in FAMILIES else self.family
            now = FAMILIES[family].title if family in FAMILIES else family
            raise UserError(
                f"concept {self.placeholder!r} was trained on a {trained} model ({self.base_model}); "
                f"{base_model} is a {now} model. Use --model {self.base_model} or another {trained} model"
            )
        if hidden_size != self.text_encoder_hidden_size:
            raise UserError(
                f"concept {self.placeholder!r} was trained on {self.base_model} (text width "
                f"{self.text_encoder_hidden_size}); this base model's text width is {hidden_size}. "
                f"Use --model {self.base_model} or a model of the same family"
            )
        if num_train_timesteps != self.num_train_timesteps:
            raise UserError(
                f"concept {self.placeholder!r} expects {self.num_train_timesteps} training timesteps, "
                f"the base model has {num_train_timesteps}"
            )
        if base_model != self.base_model:
            return [f"concept {self.placeholder!r} was trained on {self.base_model}, generating with {base_model}"]
        return []

    @property
    def window(self):
        """The dynamic stage as a `StageWindow` (the stage table of sampling and export)."""
        from .method.stages import StageWindow

        return StageWindow(*self.stage_window, self.num_train_timesteps)


def resolve_concept_path(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CONCEPT_FILENAME
    if not path.is_file():
        raise UserError(f"no concept at {path}; pass a folder made by `personamagic train` or its concept.safetensors")
    return path
