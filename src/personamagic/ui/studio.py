"""What the web page can do, without the web page: the concept library, photo checks and previews,
and the personalize / generate / regenerate jobs. `app.py` only wires these to Gradio components,
so everything here is usable (and tested) from plain Python.

Library layout (`--library`, default ./personamagic-library):

    <name>/concept.safetensors, mask.png, stages.png   one folder per concept (as `personamagic train`
                                                      writes them, so CLI-made concepts are listed too)
    images/<job-id>/*.png, grid.png                     one folder per generation job
    .staging/<job-id>/photos/, concept/                a personalization in progress (never listed)

A personalization trains into its own staging folder and is renamed into the library only when it
is complete, so the library never shows a half-trained concept, and cancelling or a failure deletes
the staging folder. Only one server should use a library at a time: at start it deletes leftover
staging folders of runs that a crash interrupted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from ..concept import CONCEPT_FILENAME, Concept
from ..errors import ConceptError, PersonaMagicError, PhotoError, SettingsError
from ..models import TINY_MODELS, ResidentModels
from ..models.world import WORLD
from .jobs import Job, JobQueue, new_job_id

if TYPE_CHECKING:  # the jobs load when a job runs
    from ..jobs.image_record import ImageRecord

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
STAGING_DIR = ".staging"
RESERVED_NAMES = {IMAGES_DIR}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Bigger uploads are refused before they are decoded; phone photos are 2-15 MB.
DEFAULT_MAX_UPLOAD_MB = 50
# Side of the face crop shown in the preview (SD-1.x resolution; the crop's framing does not depend on it).
PREVIEW_SIZE = 512
MASK_CHOICES = ("auto", "landmarks", "clipseg", "none")


@dataclass
class ConceptEntry:
    """A concept in the library, as the page lists it."""

    name: str  # folder name inside the library
    folder: Path  # the concept's folder (holds concept.safetensors)
    placeholder: str  # text standing for it in prompts, e.g. "S*"
    supercategory: str  # e.g. "face"
    base_model: str  # the model it was trained on (generation uses it)
    steps: int | None  # training steps done (None for concepts that do not record it)

    @property
    def label(self) -> str:
        return f"{self.name} — {self.placeholder} · {self.supercategory} · {self.base_model}"


class Library:
    """Concept folders and generation outputs under one root folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise SettingsError(f"--library {self.root} is a file; give a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self._fingerprints: dict[Path, tuple[int, str]] = {}  # folder -> (mtime_ns, fingerprint)

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES_DIR

    @property
    def staging_dir(self) -> Path:
        return self.root / STAGING_DIR

    def remove_stale_staging(self) -> None:
        """Delete staging folders left by a server that was killed mid-training."""
        if self.staging_dir.is_dir():
            for folder in self.staging_dir.iterdir():
                logger.warning("removing %s, left by an interrupted personalization", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def concepts(self) -> list[ConceptEntry]:
        """Every readable concept folder directly under the root, by name."""
        entries = []
        for folder in sorted(self.root.iterdir()):
            if not (folder / CONCEPT_FILENAME).is_file() or folder.name.startswith("."):
                continue
            try:
                concept = Concept.load(folder)
            except ConceptError as err:
                logger.warning("skipping %s: %s", folder, err)
                continue
            entries.append(ConceptEntry(
                folder.name, folder, concept.placeholder, concept.supercategory, concept.base_model,
                concept.training.get("steps_done"),
            ))
        return entries

    def concept_folder(self, name: str) -> Path:
        """The folder of an existing concept (ConceptError if there is none)."""
        folder = self.root / name
        if Path(name).name != name or name.startswith(".") or not (folder / CONCEPT_FILENAME).is_file():
            raise ConceptError(f"there is no concept {name!r} in the library; refresh the list")
        return folder

    def free_folder(self, name: str) -> Path:
        """`name`, or `name-2`, `name-3`... whichever is not taken yet."""
        folder, n = self.root / name, 1
        while folder.exists():
            n += 1
            folder = self.root / f"{name}-{n}"
        return folder

    def find_fingerprint(self, fingerprint: str) -> Path | None:
        """The concept folder whose concept has this fingerprint (as stored in image metadata)."""
        for entry in self.concepts():
            stamp = (entry.folder / CONCEPT_FILENAME).stat().st_mtime_ns
            cached = self._fingerprints.get(entry.folder)
            if cached is None or cached[0] != stamp:
                cached = (stamp, Concept.load(entry.folder).fingerprint())
                self._fingerprints[entry.folder] = cached
            if cached[1] == fingerprint:
                return entry.folder
        return None


def check_name(name: str) -> str:
    """A new concept's name, stripped: a plain folder name (SettingsError otherwise)."""
    name = (name or "").strip()
    if not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
        raise SettingsError(
            f"concept name {name!r} is not usable; use letters, digits, '-', '_' or '.' "
            f"(up to 64, starting with a letter or digit; not {', '.join(sorted(RESERVED_NAMES))})"
        )
    return name


def parse_stage_window(text: str) -> tuple[int, int] | None:
    """`auto` -> None (automatic partition), `LO:HI` -> (LO, HI)."""
    text = (text or "").strip().lower()
    if text in ("", "auto"):
        return None
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise SettingsError(f"stage window must be auto or LO:HI (e.g. 400:800), got {text!r}") from None
    if not 0 <= lo < hi <= 1000:
        raise SettingsError(f"stage window needs 0 <= LO < HI <= 1000, got {text}")
    return lo, hi


# --------------------------------------------------------------------------------------------------
# photos


def display_name(path) -> str:
    """The file name the user uploaded (Gradio keeps it as the last part of its temporary path)."""
    return Path(path).name


def user_message(err: PersonaMagicError, paths) -> str:
    """The error's message with temporary upload paths replaced by the names the user knows."""
    text = str(err)
    for path in paths:
        text = text.replace(str(path), display_name(path))
    return text


def check_upload_size(path, max_mb: float) -> None:
    size = Path(path).stat().st_size
    if size > max_mb * 1024 * 1024:
        raise PhotoError(
            f"{display_name(path)} is {size / 1024 / 1024:.0f} MB; upload photos under {max_mb:g} MB"
        )


_detectors = threading.local()  # YuNet is not thread-safe and page events run in a thread pool


def _detector():
    from ..faces.detection import FaceDetector

    if not hasattr(_detectors, "detector"):
        _detectors.detector = FaceDetector()
    return _detectors.detector


def preview_photo(path, supercategory: str, mask: str, max_upload_mb: float,
                  crop: bool = True) -> tuple[Image.Image, str]:
    """The training crop of a photo with its face box and landmarks drawn on it and the training mask
    tinted (`mask`: landmarks, clipseg, none or world), and a caption. Raises a PersonaMagicError for
    anything the training would refuse (too big, not an image, no face). crop False: the photo is already
    a crop (the world model's), nothing is detected."""
    from ..faces.crop import prepare_photo
    from ..faces.masks import landmark_mask, mask_overlay
    from ..jobs.personalize import FACE_SUPERCATEGORIES

    check_upload_size(path, max_upload_mb)
    is_face = supercategory in FACE_SUPERCATEGORIES and crop
    try:
        photo = prepare_photo(path, PREVIEW_SIZE, detect_face=is_face, detector=_detector() if is_face else None)
    except PersonaMagicError as err:
        raise PersonaMagicError(user_message(err, [path])) from None
    name = display_name(path)
    if photo.face is None:
        if mask == "landmarks":
            raise PhotoError(f"{name}: the landmark mask needs a face; choose mask clipseg or none for "
                             f"supercategory {supercategory!r}")
        caption = (f"{name}: no face detection for supercategory {supercategory!r} (centre crop)" if crop else
                   f"{name}: taken as it is (the world model's photos are crops)")
    else:
        caption = f"{name}: face found (score {photo.face.score:.2f})"
        if photo.num_faces > 1:
            caption += f", the largest of {photo.num_faces}"
    if mask == "landmarks":
        image = mask_overlay(photo.image, landmark_mask(photo.face, PREVIEW_SIZE))
        caption += "; red: landmark mask"
    elif mask == "world":
        from ..jobs.personalize import recorded_world_mask

        recorded = recorded_world_mask(path).resize((PREVIEW_SIZE, PREVIEW_SIZE))
        image = mask_overlay(photo.image, (np.asarray(recorded) > 127).astype(np.float32))
        caption += "; red: the world render's own face mask"
    elif mask == "none":
        image = mask_overlay(photo.image, np.ones((PREVIEW_SIZE, PREVIEW_SIZE), np.float32))
        caption += "; whole image learned (mask none)"
    else:
        image = photo.image.copy()
        caption += "; CLIPSeg mask computed when training starts (saved as mask.png)"
    if photo.face is not None:
        _draw_face(image, photo.face)
    return image, caption


def _draw_face(image: Image.Image, face) -> None:
    draw = ImageDraw.Draw(image)
    width = max(2, image.width // 200)
    draw.rectangle([float(v) for v in face.box], outline=(0, 200, 0), width=width)
    for x, y in face.landmarks:
        r = width * 1.5
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 200, 0))


# --------------------------------------------------------------------------------------------------
# the jobs


class Studio:
    """The UI's backend: a library, one job queue, and the device settings every job uses."""

    def __init__(
        self,
        library: Library,
        jobs: JobQueue | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        local_files_only: bool = False,
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    ):
        self.library = library
        self.jobs = jobs or JobQueue()
        self.device, self.dtype, self.local_files_only = device, dtype, local_files_only
        self.max_upload_mb = max_upload_mb
        self._submitting = threading.Lock()  # two tabs must not both claim one concept name
        self.resident = ResidentModels()  # the base model stays loaded from one job to the next
        library.remove_stale_staging()

    def close(self) -> None:
        self.jobs.close()

    # -- photos ------------------------------------------------------------------------------------

    def preview(self, paths, supercategory: str, mask: str, model: str) -> tuple[list, list[str]]:
        """[(image, caption)] for the photos that pass, and one error line per photo that does not."""
        if mask not in MASK_CHOICES:
            raise SettingsError(f"mask must be one of {', '.join(MASK_CHOICES)}, got {mask!r}")
        if mask == "auto":  # what personalize() picks
            mask = "world" if model == WORLD else "landmarks" if model in TINY_MODELS else "clipseg"
        previews, errors = [], []
        for path in paths or []:
            try:
                previews.append(preview_photo(path, supercategory, mask, self.max_upload_mb, crop=model != WORLD))
            except PersonaMagicError as err:
                errors.append(str(err))
        return previews, errors

    # -- personalize -------------------------------------------------------------------------------

    def submit_personalize(
        self,
        photos,
        name: str,
        config,
        *,
        model: str,
        mask: str = "auto",
        identity_model: str = "auto",
    ) -> Job:
        """Check the request, copy the photos into a fresh staging folder, queue the training."""
        name = check_name(name)
        photos = [Path(p) for p in photos or []]
        if not photos:
            raise PhotoError("upload at least one photo of the person first")
        if not config.supercategory.strip():
            raise SettingsError("choose a supercategory (face for a person)")
        _, errors = self.preview(photos, config.supercategory, mask, model)
        if errors:
            raise PhotoError("; ".join(errors))
        with self._submitting:
            return self._submit_personalize(photos, name, config, model, mask, identity_model)

    def _submit_personalize(self, photos, name, config, model, mask, identity_model) -> Job:
        from ..jobs.personalize import personalize

        if (self.library.root / name).exists():
            raise SettingsError(f"the library already has {name!r}; choose another name")
        if any(j.kind == "personalize" and j.label == name for j in self.jobs.active()):
            raise SettingsError(f"a personalization named {name!r} is already queued; choose another name")

        job_id = new_job_id()
        folder = self.library.staging_dir / job_id
        (folder / "photos").mkdir(parents=True)
        copies = []
        for index, photo in enumerate(photos):
            copy = folder / "photos" / f"{index:02d}-{display_name(photo)}"
            shutil.copyfile(photo, copy)
            copies.append(str(copy))

        def work(job: Job):
            def progress(step, total, logs, phase="train"):
                job.report(step, total, logs, phase)

            result = personalize(
                copies, folder / "concept", config, model=model, device=self.device, dtype=self.dtype,
                mask=mask, identity_model=identity_model, local_files_only=self.local_files_only,
                progress=progress, resident=self.resident,
            )
            job.report(config.max_train_steps, config.max_train_steps, phase="saving")  # last chance to cancel
            target = self.library.free_folder(name)
            notes = list(result.notes)
            if target.name != name:
                notes.append(f"{name!r} was taken meanwhile; saved as {target.name!r}")
            os.rename(folder / "concept", target)
            shutil.rmtree(folder, ignore_errors=True)
            return {"name": target.name, "folder": target, "notes": notes,
                    "stage_window": list(result.concept.stage_window)}

        return self.jobs.submit(Job("personalize", folder, work, label=name, id=job_id))

    # -- generate ----------------------------------------------------------------------------------

    def submit_generate(self, concept_names: list[str], config, *, model: str | None = None) -> Job:
        """Queue a generation into a new `images/<job-id>/` folder."""
        if not concept_names:
            raise SettingsError("pick at least one concept from the library list")
        folders = [self.library.concept_folder(name) for name in concept_names]
        return self._submit_generate(folders, config, model, label=", ".join(concept_names))

    def submit_regenerate(self, image_path) -> tuple[Job, ImageRecord]:
        """Queue `generate.regenerate` of a generated PNG (same prompt, seed, settings and batch, so
        the same pixels on the same device type and dtype); returns the job and the image's record
        (so the page can show the settings). Its concepts are looked up in the library by fingerprint,
        else where the record says they were."""
        from ..jobs.generate import regenerate
        from ..jobs.image_record import read_image_metadata

        try:
            record = read_image_metadata(image_path)
        except PhotoError as err:
            raise PhotoError(user_message(err, [image_path])) from None
        found = [self.library.find_fingerprint(entry["fingerprint"]) for entry in record.concepts]
        concept_paths = [str(folder) for folder in found] if found and all(found) else None
        job_id = new_job_id()
        folder = self.library.images_dir / job_id
        folder.mkdir(parents=True)

        def work(job: Job):
            try:
                result = regenerate(image_path, folder, concept_paths=concept_paths, device=self.device,
                                    local_files_only=self.local_files_only, resident=self.resident)
            except PersonaMagicError as err:
                raise PersonaMagicError(user_message(err, [image_path])) from None
            return {"images": [image.path for image in result.images], "grid": None, "notes": result.notes}

        job = Job("generate", folder, work, label=f"regenerate seed {record.seed}", id=job_id)
        return self.jobs.submit(job), record

    def _submit_generate(self, folders: list[Path], config, model: str | None, label: str) -> Job:
        from ..jobs.generate import generate

        placeholders: dict[str, str] = {}
        for folder in folders:
            placeholder = Concept.load(folder).placeholder
            if placeholder in placeholders:
                raise ConceptError(
                    f"{placeholders[placeholder]} and {folder.name} both use the placeholder {placeholder!r}; "
                    "to use them together, train one of them with another placeholder (e.g. S2*)"
                )
            placeholders[placeholder] = folder.name
        job_id = new_job_id()
        folder = self.library.images_dir / job_id
        folder.mkdir(parents=True)

        def work(job: Job):
            result = generate(
                [str(f) for f in folders], folder, config, model=model, device=self.device, dtype=self.dtype,
                local_files_only=self.local_files_only, progress=lambda done, total: job.report(done, total),
                resident=self.resident,
            )
            return {"images": [image.path for image in result.images], "grid": result.grid, "notes": result.notes}

        return self.jobs.submit(Job("generate", folder, work, label=label, id=job_id))
