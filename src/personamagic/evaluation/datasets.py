"""Identities of an evaluation dataset, and the photos each training run learns from.

Two folder layouts:
- `folders`: one sub-folder per identity holding its photos (LFW: `lfw/Aaron_Peirsol/*.jpg`);
- `files`: every image under the folder (recursively) is an identity of its own (CelebA-HQ's
  `CelebA-HQ-img/0.jpg ...`, FFHQ's `images1024x1024/00000/00000.png ...`);
- `world`: held-out people of the learning world, drawn into the folder as `folders` (`render_world_people`).
`auto` picks `folders` when the folder has sub-folders with images, else `files`; FFHQ's numbered
sub-folders of 1000 images look like identities to it, so name the layout for FFHQ.

Every random choice uses `random.Random` seeded with a string of the study seed, dataset, identity and
repeat: the same in every process and on every run, independent of PYTHONHASHSEED and of the order
in which items are done.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import PhotoError, SettingsError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LAYOUTS = ("auto", "folders", "files", "world")
MODES = ("one-shot", "few-shot")
# A `folders` identity with more photos than this is probably a shard of single-photo identities.
SUSPICIOUS_PHOTOS_PER_IDENTITY = 200


@dataclass(frozen=True)
class Identity:
    """One person of a dataset."""

    name: str  # folder name (folders) or path without suffix relative to the root (files)
    photos: tuple[Path, ...]  # sorted


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.parts)
    )


def discover_identities(root: str | Path, layout: str = "auto") -> list[Identity]:
    """The identities under `root`, sorted by name."""
    if layout not in LAYOUTS:
        raise SettingsError(f"unknown layout {layout!r}; use {', '.join(LAYOUTS)}")
    root = Path(root)
    if not root.is_dir():
        raise PhotoError(f"identities folder {root} does not exist; check the dataset path (see docs/evaluation.md)")
    if layout == "auto":
        has_folders = any(p.is_dir() and _images_under(p) for p in root.iterdir() if not p.name.startswith("."))
        layout = "folders" if has_folders else "files"
    if layout == "folders":
        identities = [
            Identity(folder.name, tuple(photos))
            for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if (photos := _images_under(folder))
        ]
        if identities and max(len(i.photos) for i in identities) > SUSPICIOUS_PHOTOS_PER_IDENTITY:
            logger.warning(
                "%s: an identity folder holds more than %d photos; if each image is a different person "
                "(FFHQ), set layout to files", root, SUSPICIOUS_PHOTOS_PER_IDENTITY,
            )
    else:
        identities = [Identity(p.relative_to(root).with_suffix("").as_posix(), (p,)) for p in _images_under(root)]
    if not identities:
        raise PhotoError(f"no images found under {root} ({', '.join(IMAGE_SUFFIXES)}); check the dataset path")
    return identities


def render_world_people(root: str | Path, count: int, photos: int = 1, first: int = 0) -> None:
    """`count` held-out people of the learning world (from index `first` of the held-out walk) drawn into
    `root` as a `folders` dataset: `person-<id>/photo-<k>.png`, k < `photos`, each the reference photo's
    plain studio context drawn from seed k (photo-0 is the person's reference photo). Every PNG carries
    its world record, so the world model redraws its exact face mask. The renderer is deterministic:
    files already there are kept."""
    from ..files import write_atomic
    from ..world.attributes import held_out_identities
    from ..world.render import render, save_render

    for person in held_out_identities(count, start=first):
        folder = Path(root) / f"person-{person}"
        for k in range(photos):
            path = folder / f"photo-{k}.png"
            if not path.is_file():
                write_atomic(path, lambda tmp, k=k: save_render(render(person, None, k), tmp, k))


def select_identities(
    identities: list[Identity], *, dataset: str, seed: int, max_identities: int | None = None, min_photos: int = 1
) -> list[Identity]:
    """Identities with at least `min_photos` photos; a seeded random `max_identities` of them, by name."""
    eligible = [i for i in identities if len(i.photos) >= min_photos]
    if not eligible:
        raise PhotoError(f"dataset {dataset!r}: no identity has {min_photos} or more photos; lower min_photos")
    if max_identities is not None and len(eligible) > max_identities:
        eligible = random.Random(f"{seed}:{dataset}:identities").sample(eligible, max_identities)
    return sorted(eligible, key=lambda i: i.name)


def training_photos(
    identity: Identity, *, mode: str, repeat: int, dataset: str, seed: int, max_photos: int | None = None
) -> list[Path]:
    """The photos one training run of `identity` learns from.

    one-shot: one photo drawn at random for each repeat (the paper's "randomly selected ... repeated
    five times"); few-shot: all photos, or a seeded random `max_photos` of them.
    """
    if mode not in MODES:
        raise SettingsError(f"unknown mode {mode!r}; use {' or '.join(MODES)}")
    rng = random.Random(f"{seed}:{dataset}:{identity.name}:{repeat}")
    photos = list(identity.photos)
    if mode == "one-shot":
        return [rng.choice(photos)]
    if max_photos is not None and len(photos) > max_photos:
        photos = sorted(rng.sample(photos, max_photos))
    return photos
