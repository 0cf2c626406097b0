"""Score existing images: T-Sim against their prompts and I-Pre against reference photo(s).

Prompts come from the `personamagic` PNG metadata that `personamagic generate` writes (placeholders and
each concept's supercategory too), or one `prompt` given for every image. `scores.json` holds one
record per image and a summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomic
from ..errors import PhotoError, SettingsError
from ..faces.photos import load_photo, open_image, to_rgb
from ..prompts import PLACEHOLDER
from . import DEFAULT_CLIP_MODEL, DEFAULT_FACE_MODEL
from .datasets import IMAGE_SUFFIXES
from .statistics import NO_FACE_CONVENTIONS, summarize

SCORES_FILENAME = "scores.json"
# `personamagic generate` writes a contact sheet beside the images: it is not an image to score.
GRID_FILENAME = "grid.png"

CONVENTIONS_NOTE = {
    "paper": "no face -> -1 (PersonaMagic's rule)",
    "zero": "no face -> 0 (FastComposer)",
    "excluded": "no-face images left out (CelebBasis); see face_detection_rate",
}


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name, without generate's grid.png or hidden files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoError(f"{folder} is not a folder; pass the folder holding the generated images")
    images = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name != GRID_FILENAME and not p.name.startswith(".")
    )
    if not images:
        raise PhotoError(f"no images in {folder} ({', '.join(IMAGE_SUFFIXES)}); pass the folder of generated images")
    return images


def image_prompt(path: Path, prompt: str | None) -> tuple[str, dict[str, str | None]]:
    """(prompt, {placeholder: its concept's supercategory or None}) of an image: the given prompt,
    else the one in its PNG metadata with the concepts named there."""
    from ..jobs.image_record import read_image_metadata

    if prompt is not None:
        return prompt, {}
    try:
        meta = read_image_metadata(path)
    except PhotoError:
        raise PhotoError(f"{path} carries no prompt (no personamagic metadata); pass --prompt") from None
    return meta["prompt"], {c["placeholder"]: c.get("supercategory") for c in meta.get("concepts", [])
                            if c.get("placeholder")}


@dataclass
class ImageScores:
    """Per-image records, their summary, and the settings that produced them."""

    records: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"summary": self.summary, "images": self.records}


def score_images(
    paths: list[Path],
    references: list[str | Path],
    text_similarity,
    identity,
    *,
    prompt: str | None = None,
    supercategory: str = "face",
    placeholders: tuple[str, ...] = (PLACEHOLDER,),
    batch_size: int = 16,
) -> ImageScores:
    """Score `paths` with a loaded `TextSimilarity` and `IdentityPreservation` (see `evaluate_images`)."""
    from .text_similarity import replace_placeholders

    reference = identity.reference(references)
    records = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [to_rgb(open_image(p)) for p in chunk]
        prompts, concepts = zip(*(image_prompt(p, prompt) for p in chunk))
        # Every concept placeholder of the batch is replaced in every prompt of it: a placeholder of one
        # image's concept never stands for anything but a concept in another image's prompt. An image's
        # own concepts get the supercategory its metadata names; the others `supercategory`.
        batch_placeholders = (*placeholders, *(name for own in concepts for name in own))
        words = [replace_placeholders(p, batch_placeholders, supercategory, {k: v for k, v in own.items() if v})
                 for p, own in zip(prompts, concepts)]
        texts = text_similarity.score(images, words, placeholders=())
        for path, image, text_prompt, text in zip(chunk, images, prompts, texts):
            match = identity.score(image, reference)
            records.append({
                "path": str(path),
                "prompt": text_prompt,
                "text": text.text,
                "t_sim": text.t_sim,
                "t_sim_100": text.t_sim_100,
                "clip_s": text.clip_s,
                "i_pre": match.i_pre,
                "face_found": match.face_found,
                "num_faces": match.num_faces,
            })
    summary = {
        **summarize(records),
        "clip_model": text_similarity.name,
        "face_model": identity.name,
        "face_detector": getattr(identity, "detector_name", "yunet-2023mar-int8"),
        "supercategory": supercategory,
        "references": [str(r) for r in references],
        "conventions": {name: CONVENTIONS_NOTE[name] for name in NO_FACE_CONVENTIONS},
    }
    return ImageScores(records, summary)


def evaluate_images(
    folder: str | Path,
    references: list[str | Path],
    *,
    prompt: str | None = None,
    supercategory: str = "face",
    placeholders: tuple[str, ...] = (PLACEHOLDER,),
    clip_model: str | None = None,
    face_model: str = DEFAULT_FACE_MODEL,
    device: str = "auto",
    local_files_only: bool = False,
    output: str | Path | None = None,
    metrics: str = "real",
) -> ImageScores:
    """Score every image of `folder`; write `scores.json` into `output` when given.

    Placeholders are replaced by `supercategory` before CLIP tokenises the prompt. metrics: "real" (CLIP
    T-Sim, face-model I-Pre) or "world" (the learning world's judge: world T-Sim and world I-Pre, for
    images of the world model; `clip_model` and `face_model` are not used).
    """
    from ..jobs.assets import Asset, check_assets
    from ..models.devices import resolve_device
    from .identity_preservation import IdentityPreservation, load_face_embedder
    from .text_similarity import TextSimilarity

    if metrics not in METRICS:
        raise SettingsError(f"--metrics {metrics!r} is not one of {', '.join(METRICS)}")
    paths = list_images(folder)
    if not references:
        raise PhotoError("give a reference photo of the person (--reference PHOTO)")
    for reference in references:
        load_photo(reference)  # a wrong path fails before any model is loaded
    if metrics == "world":
        text_similarity, identity = world_metrics()
        scores = score_images(paths, references, text_similarity, identity, prompt=prompt,
                              supercategory=supercategory, placeholders=placeholders)
        if output is not None:
            write_json(Path(output) / SCORES_FILENAME, scores.to_dict())
        return scores
    assets = [Asset("the CLIP model of T-Sim", clip_model or DEFAULT_CLIP_MODEL, "--clip-model PATH, or tiny")]
    if "/" in face_model and not Path(face_model).exists():
        assets.append(Asset("the face model of I-Pre", face_model, "--face-model sface"))
    check_assets(assets, local_files_only=local_files_only)
    device_ = resolve_device(device)
    identity = IdentityPreservation(load_face_embedder(face_model, device=device_))
    text_similarity = TextSimilarity.load(clip_model or DEFAULT_CLIP_MODEL, device=device_,
                                          local_files_only=local_files_only)
    scores = score_images(paths, references, text_similarity, identity, prompt=prompt, supercategory=supercategory,
                          placeholders=placeholders)
    if output is not None:
        write_json(Path(output) / SCORES_FILENAME, scores.to_dict())
    return scores


METRICS = ("real", "world")  # --metrics


def world_metrics():
    """The world's (WorldTextSimilarity, WorldIdentityPreservation), from the shipped judge."""
    from ..world.judge import load_judge
    from .world_scoring import WorldIdentityPreservation, WorldTextSimilarity, world_judge_path

    judge = load_judge(world_judge_path())
    return WorldTextSimilarity(judge), WorldIdentityPreservation(judge)


def write_json(path: Path, data) -> None:
    """Write JSON atomically (a crash leaves the old file or the new one, never half of one)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
