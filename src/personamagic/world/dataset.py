"""The training set of the world's base model: renders of training identities in random contexts,
with their captions, drawn once into one `.npz` file (deterministic from its seed)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .attributes import CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES, IDENTITY_COUNT, is_held_out
from .captions import random_caption, random_context
from .render import render

ATTRIBUTE_NAMES = [a.name for a in IDENTITY_ATTRIBUTES + CONTEXT_ATTRIBUTES]


def training_identity(rng: np.random.Generator) -> int:
    """A random identity the base model may train on (never a held-out one)."""
    while True:
        identity = int(rng.integers(IDENTITY_COUNT))
        if not is_held_out(identity):
            return identity


def _render_chunk(args) -> dict:
    seed, start, count = args
    images, masks, labels, identities, captions = [], [], [], [], []
    for index in range(start, start + count):
        rng = np.random.default_rng([seed, index])
        identity = training_identity(rng)
        item = render(identity, random_context(rng), seed=int(rng.integers(2**31)))
        images.append(np.asarray(item.image))
        masks.append(np.asarray(item.mask) > 127)
        labels.append([a.index(item.attributes[a.name]) for a in IDENTITY_ATTRIBUTES + CONTEXT_ATTRIBUTES])
        identities.append(identity)
        captions.append(random_caption(item.attributes, rng))
    return {"images": np.stack(images), "masks": np.stack(masks), "labels": np.array(labels, dtype=np.int16),
            "identities": np.array(identities, dtype=np.int64), "captions": np.array(captions)}


def render_dataset(count: int, seed: int = 0, workers: int | None = None, chunk: int = 500) -> dict:
    """`count` renders of training identities: images (N, 64, 64, 3) uint8, masks (N, 64, 64) bool,
    labels (N, A) attribute indices in ATTRIBUTE_NAMES' order, identities (N,), captions (N,)."""
    jobs = [(seed, start, min(chunk, count - start)) for start in range(0, count, chunk)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_render_chunk, jobs))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def save_dataset(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **data)
    os.replace(partial, path)


def load_dataset(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as files:
        return {key: files[key] for key in files.files}
