"""The work of a study: units (training runs) and items (images), their ids, and who does what.

- a *unit* is one training run (dataset, identity, repeat, method) -> one concept;
- an *item* is one image of a unit (prompt, seed) -> one generated PNG and its scores.

Ids are hashes of everything that determines the result (photos, effective TrainConfig, base model,
sampling settings, metric models): a changed setting makes new items instead of silently mixing old
results in, and the same config plans the same ids in every process and on every run. Units are
dealt to processes round-robin in the order of a hash of their ids, so each is done exactly once
without any process talking to another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..shards import Shard, process_device  # noqa: F401 (re-exported: the study's shards)
from .config import GENERATE_KEYS, MethodConfig, StudyConfig
from .datasets import discover_identities, render_world_people, select_identities, training_photos

# TrainConfig fields that do not change the learned concept, left out of unit ids.
NON_RESULT_TRAIN_KEYS = ("checkpoint_every",)


@dataclass(frozen=True)
class Unit:
    """One training run: a concept learnt from `photos` by `method`."""

    unit_id: str  # identity slug, repeat and a hash of everything that determines the concept
    dataset: str  # DatasetConfig.name
    identity: str  # Identity.name
    repeat: int  # 0..repeats-1; shifts the training seed and the one-shot photo draw
    method: str  # MethodConfig.name
    photos: tuple[str, ...]  # absolute paths of the training photos (also the I-Pre references)
    train: dict = field(hash=False, compare=False)  # TrainConfig.to_dict()
    mask: str = "auto"  # personalize(mask=...)
    plugin: dict | None = field(default=None, hash=False, compare=False)  # MethodConfig.effective_plugin
    concept_unit: str | None = None  # the unit whose concept this one samples (MethodConfig.concept_of)
    sampler: str = "personamagic"  # MethodConfig.sampler
    subject: str | None = None  # MethodConfig.subject

    @property
    def folder(self) -> Path:
        """The unit's place under concepts/ and images/."""
        return Path(slug(self.dataset)) / slug(self.method) / self.unit_id


@dataclass(frozen=True)
class Item:
    """One image of a unit and its scores."""

    item_id: str  # hash of image_id and the metric models
    image_id: str  # hash of the unit, prompt, seed and sampling settings: the PNG's identity
    unit_id: str  # the unit whose concept makes the image
    prompt: str  # with the placeholder, as given to the pipeline
    seed: int  # torch.Generator seed of the image (as `personamagic generate --seed`)

    def filename(self) -> str:
        return f"{slug(self.prompt)[:40]}-seed{self.seed}-{self.image_id[:8]}.png"


@dataclass
class Plan:
    units: list[Unit]  # in planning order: dataset, identity, repeat, method
    items: dict[str, list[Item]]  # unit_id -> its items, prompt-major

    @property
    def item_ids(self) -> set[str]:
        return {item.item_id for items in self.items.values() for item in items}


def slug(text: str) -> str:
    """Lower-case [a-z0-9+-] only: safe as one path component."""
    return re.sub(r"[^a-z0-9+]+", "-", text.lower()).strip("-") or "x"


def digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


def plan_study(config: StudyConfig) -> Plan:
    """Every unit and item of the study, the same in every process and run."""
    units, items = [], {}
    for dataset in config.datasets:
        root = Path(dataset.identities)
        layout = dataset.layout
        if layout == "world":  # the study draws its people (the same files on every run)
            render_world_people(root, dataset.max_identities, dataset.world_photos, dataset.first_person)
            layout = "folders"
        identities = select_identities(
            discover_identities(root, layout), dataset=dataset.name, seed=config.seed,
            max_identities=dataset.max_identities, min_photos=dataset.min_photos,
        )
        for identity in identities:
            for repeat in range(dataset.repeats):
                photos = training_photos(identity, mode=dataset.mode, repeat=repeat, dataset=dataset.name,
                                         seed=config.seed, max_photos=dataset.max_photos)
                trained = {}  # method name -> its unit, for the methods that sample another's concept
                for method in sorted(config.methods, key=lambda m: m.effective_concept_of is not None):
                    unit = _unit(config, dataset.name, identity.name, repeat, method, photos, root,
                                 trained.get(method.effective_concept_of))
                    trained[method.name] = unit
                for method in config.methods:  # in the config's order
                    units.append(trained[method.name])
                    items[trained[method.name].unit_id] = _items(config, trained[method.name])
    return Plan(units, items)


def _unit(config: StudyConfig, dataset: str, identity: str, repeat: int, method: MethodConfig, photos,
          root: Path, source: Unit | None = None) -> Unit:
    """The unit of `method` on one identity and repeat; `source`: the unit whose concept it samples."""
    train = source.train if source is not None else method.train_config(config.train, repeat).to_dict()
    key = {
        "dataset": dataset,
        "identity": identity,
        "repeat": repeat,
        "method": method.name,
        "photos": [Path(p).relative_to(root).as_posix() for p in photos],
        "train": {k: v for k, v in train.items() if k not in NON_RESULT_TRAIN_KEYS},
        "mask": method.effective_mask,
        "model": config.model,
        "image_encoder": config.image_encoder,
        "identity_model": _identity_model(config) if train["use_id_loss"] else None,
        **({"plugin": method.effective_plugin} if method.effective_plugin else {}),
        **({"concept": source.unit_id} if source is not None else {}),
        **({"sampler": method.sampler} if method.sampler != "personamagic" else {}),
        **({"subject": method.subject} if method.subject else {}),
    }
    unit_id = f"{slug(identity)[:40]}-r{repeat}-{digest(key)[:10]}"
    return Unit(unit_id, dataset, identity, repeat, method.name, tuple(str(p) for p in photos), train,
                method.effective_mask, method.effective_plugin, source.unit_id if source is not None else None,
                method.sampler, method.subject)


def _identity_model(config: StudyConfig) -> str:
    """The study's identity model with "auto" resolved: "auto" changes meaning when the default does
    (it was ArcFace, it is SFace), and a unit's id, which names its concept on disk, must not."""
    from ..identity.loading import default_identity_model

    return default_identity_model(config.model) if config.identity_model == "auto" else config.identity_model


def _items(config: StudyConfig, unit: Unit) -> list[Item]:
    sampling = dataclasses.asdict(config.generate_config("-"))
    sampling = {k: sampling[k] for k in GENERATE_KEYS if k != "batch_size"}  # batch size: memory, not result
    items = []
    for prompt in config.prompts:
        for seed in config.seeds:
            image_id = digest({"unit": unit.unit_id, "prompt": prompt, "seed": seed, "sampling": sampling})
            item_id = digest({"image": image_id, "clip_model": config.clip_model, "face_model": config.face_model,
                              "supercategory": unit.train["supercategory"]})
            items.append(Item(item_id[:16], image_id[:16], unit.unit_id, prompt, seed))
    return items




