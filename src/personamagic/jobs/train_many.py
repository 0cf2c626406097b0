"""The `train-many` job: a folder of photos in, one concept folder per identity out, several identities
trained in each step (`training.group`).

Identities (`discover_identities`): each image directly in the folder is an identity of its own
(one-shot), or each sub-folder is one identity that learns from the images directly in it (few-shot);
nothing deeper is read. A folder holding both loose images and sub-folders with images is refused, since
either reading could be meant. Hidden entries, other files, concept folders, world renders' masks
(NAME.mask.png) and the other images personamagic made (`_made_by_us`: generated PNGs, concept
pictures) are ignored; the last are named in one note. The output folder lies outside the photos folder
(`_check_output`). The concept of an identity goes to OUTPUT/<name>: the image's stem or the
sub-folder's name, with every character but letters, digits, `.`, `_` and `-` replaced by `-`
(`safe_name`).

Each concept is the one `personamagic train` writes for the same photos and flags (same seed, same
concept; grouping changes the speed only): the photos are prepared by the same steps
(`personalize.PersonalizeRun`), the folder is locked and written the same way. Resumable: an identity
whose folder holds a concept is skipped, one with checkpoints resumes from them. Shardable: process k of
n (`--shard k/n`, or RANK/WORLD_SIZE from `accelerate launch`) takes every n-th identity in name order.
An identity that fails (unreadable photo, no face, a diverged loss, a checkpoint of other settings) is
reported and the others go on.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .. import DEFAULT_BASE_MODEL
from ..concept import CONCEPT_FILENAME
from ..errors import ConceptError, DiskError, FolderInUse, PersonaMagicError, PhotoError, SettingsError
from ..files import remove_empty_folders
from ..faces import load_photo
from ..models import load_base_model, resolve_device, resolve_dtype
from .assets import check_assets, model_assets
from .image_record import METADATA_KEY, UNREADABLE_IMAGE
from ..training import TrainConfig, Trainer, latest_checkpoint
from ..training.checkpoints import CheckpointError
from ..training.group import GroupTrainer, group_key
from .personalize import (
    CHECKPOINT_DIR,
    CONCEPT_PICTURES,
    MASK_METHODS,
    OutputFolder,
    PersonalizeResult,
    PersonalizeRun,
    PhotoModels,
    _write_outputs,
    check_model_name,
    check_resolution,
    check_folder_path,
    describe_partition,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class IdentityJob:
    """One concept to train: whose photos, into which folder, with which settings."""

    name: str  # how messages name it
    photos: tuple[str, ...]
    output: Path  # its concept folder
    config: TrainConfig
    mask: str = "auto"  # personalize(mask=...)


@dataclass
class TrainManyResult:
    """What a run did, identity by identity."""

    trained: dict[str, PersonalizeResult] = field(default_factory=dict)  # name -> its concept, notes, timings
    skipped: list[str] = field(default_factory=list)  # already held a concept
    held: dict[str, str] = field(default_factory=dict)  # name -> why: another live run is training it
    failed: dict[str, str] = field(default_factory=dict)  # name -> what went wrong, in one line
    identities: int = 0  # in the photos folder, every shard together
    shard: tuple[int, int] = (0, 1)  # (this process, processes)
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by the CLI)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load_s, train_s, total_s


def safe_name(text: str) -> str:
    """A photo or folder name as a concept folder name: letters, digits, `.`, `_`, `-` kept."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "identity"


MASK_SUFFIX = ".mask.png"  # the face mask `personamagic world render` writes beside a photo: never a photo
NAMED_AT_MOST = 5  # images the note of skipped ones names; the rest are counted


@dataclass
class PhotoScan:
    """What `discover_identities` found in a photos folder."""

    identities: list[tuple[str, tuple[Path, ...]]]  # (concept folder name, photos), by name
    skipped: list[Path] = field(default_factory=list)  # images personamagic made (`_made_by_us`): no photos

    def skipped_note(self) -> str | None:
        """One line naming the skipped images, so that a user who meant one as a photo sees why it is not."""
        if not self.skipped:
            return None
        names = ", ".join(str(p) for p in self.skipped[:NAMED_AT_MOST])
        more = f" and {len(self.skipped) - NAMED_AT_MOST} more" if len(self.skipped) > NAMED_AT_MOST else ""
        return (f"skipped {len(self.skipped)} images personamagic made (generated images, concept pictures), not "
                f"photos of a person: {names}{more}")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and not p.name.lower().endswith(MASK_SUFFIX))


def _photos_in(folder: Path, skipped: list[Path]) -> list[Path]:
    """The images of `folder` that may be photos; those personamagic made are added to `skipped`."""
    photos = []
    for image in _images_in(folder):
        (skipped if _made_by_us(image) else photos).append(image)
    return photos


def _made_by_us(image: Path) -> bool:
    """A picture `train` writes beside a concept (mask.png...), or a PNG `generate` wrote (it carries its
    record): a photos folder may hold them (copied, or an output folder pointed at), but they show no
    person to learn (a generated image would teach the concept its own output)."""
    return image.name.lower() in {name for name, _ in CONCEPT_PICTURES} or _has_generation_record(image)


def _has_generation_record(image: Path) -> bool:
    """Whether a PNG carries `generate`'s record (`image_record.METADATA_KEY`). Only the chunks before
    the pixels are read (where the record is written); an unreadable file is no record: it is named as a
    bad photo later, as any other."""
    if image.suffix.lower() != ".png":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(image) as png:
                return METADATA_KEY in png.info
    except UNREADABLE_IMAGE:
        return False


def _written_by_us(folder: Path) -> bool:
    """A concept folder (its concept or checkpoints): its pictures (mask.png, stages.png…) are never photos."""
    return (folder / CONCEPT_FILENAME).is_file() or _has_checkpoint(folder)


def discover_identities(photos_dir: str | Path) -> PhotoScan:
    """Every identity in `photos_dir` (module docstring), by name, and the images skipped as ours."""
    root = Path(photos_dir)
    if not root.is_dir():
        raise PhotoError(f"{root} is not a folder; give a folder of photos (or of one sub-folder per person)")
    if _written_by_us(root):
        raise PhotoError(f"{root} is a concept folder (it holds {CONCEPT_FILENAME} or training checkpoints), not a "
                         "folder of photos; give the folder of photos")
    scan = PhotoScan([])
    loose = _photos_in(root, scan.skipped)
    folders = {p: photos for p in sorted(root.iterdir())
               if p.is_dir() and not p.name.startswith(".") and not _written_by_us(p)
               and (photos := _photos_in(p, scan.skipped))}
    if loose and folders:
        raise PhotoError(f"{root} holds both images ({loose[0].name}...) and sub-folders of images "
                         f"({next(iter(folders)).name}/...); use one layout: an image per person, or a sub-folder "
                         "per person")
    found = [(safe_name(p.stem), (p,), p) for p in loose] or [(safe_name(p.name), tuple(photos), p)
                                                               for p, photos in folders.items()]
    if not found:
        skipped = f"; {scan.skipped_note()}" if scan.skipped else ""
        raise PhotoError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root} nor in its sub-folders{skipped}")
    sources: dict[str, list[str]] = {}
    for name, _, source in found:
        sources.setdefault(name.lower(), []).append(source.name)  # lower: case-insensitive file systems
    for name, _, _ in found:
        if len(sources[name.lower()]) > 1:
            raise PhotoError(f"{' and '.join(sources[name.lower()])} in {root} would share the concept folder "
                             f"{name!r}; rename one")
    scan.identities = sorted((name, photos) for name, photos, _ in found)
    return scan


def train_many(
    photos_dir: str | Path,
    output: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    identities_per_step: int = 1,
    shard=None,
    device: str = "auto",
    mask: str = "auto",
    **options,
) -> TrainManyResult:
    """One concept per identity of `photos_dir` (module docstring) into `output`/<name>, trained
    `identities_per_step` at a time. shard: a `shards.Shard` (default: from the launcher's
    environment, else the whole folder). options: those of `train_identities` (model, dtype, image_encoder,
    identity_model, local_files_only, revision, model_config, vae, resolution, crop, progress)."""
    from ..shards import Shard, process_device

    output = Path(output)
    if mask not in MASK_METHODS:
        raise SettingsError(f"--mask {mask!r}: train-many takes {', '.join(MASK_METHODS)} (a mask file fits one photo "
                            "only)")
    _check_output(output, Path(photos_dir))
    scan = discover_identities(photos_dir)
    identities = scan.identities
    shard = shard or Shard.from_environment()
    mine = identities[shard.index :: shard.count]
    jobs = [IdentityJob(name, tuple(str(p) for p in photos), output / name, config, mask) for name, photos in mine]
    _check_concept_folders(jobs, Path(photos_dir))
    if shard.count > 1:
        logger.info("process %d of %d: %d of %d identities", shard.index, shard.count, len(mine), len(identities))
    made = [p for p in (output, *output.parents) if not p.exists()][::-1]  # outermost first
    try:
        result = train_identities(jobs, identities_per_step=identities_per_step,
                                  device=process_device(device, shard), **options)
    finally:  # a run that wrote nothing (every identity failed, Ctrl-C before a checkpoint) leaves no folder
        remove_empty_folders(made)
    result.identities, result.shard = len(identities), (shard.index, shard.count)
    if scan.skipped:
        result.notes.insert(0, scan.skipped_note())
    return result


def _check_output(output: Path, photos_dir: Path) -> None:
    """The concepts folder is a folder, not under a file, and neither the photos folder nor inside it. This
    scan would not take the concepts for people (it reads one level of sub-folders and skips concept
    folders), but other readers of a photos folder do: a study's dataset reads every image below it
    (`evaluation.datasets`), so `photos/concepts/ada/mask.png` would be a person there."""
    if output.exists() and not output.is_dir():
        raise SettingsError(f"--output {output} is a file; give a folder")
    above = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if above is not None:
        raise SettingsError(f"--output {output} lies under {above}, which is a file; give a folder")
    out, root = output.resolve(), photos_dir.resolve()
    if out == root or root in out.parents:
        where = "is the photos folder" if out == root else f"lies inside the photos folder {photos_dir}"
        raise SettingsError(f"--output {output} {where}; put the concepts beside the photos instead, e.g. "
                            f"--output {_beside(photos_dir)}")


def _beside(photos_dir: Path) -> Path:
    """A concepts folder next to the photos folder: `concepts`, or `NAME-concepts` for photos in `concepts`."""
    photos_dir = photos_dir.resolve()  # `.` has no parent to name otherwise
    beside = photos_dir.parent / "concepts"
    return beside if beside != photos_dir else photos_dir.parent / f"{photos_dir.name}-concepts"


def _check_concept_folders(jobs: list[IdentityJob], photos_dir: Path) -> None:
    """No concept folder is the photos folder or holds it (an output folder above the photos: `-o w` for
    photos in `w/people/` and a person called `people`); none lies inside it, as its output does not."""
    root = photos_dir.resolve()
    for job in jobs:
        folder = job.output.resolve()
        if folder == root or folder in root.parents:
            raise SettingsError(f"the concept of {job.name!r} would go to {job.output}, which is or holds the photos "
                                f"folder {photos_dir}; give an --output outside the photos, or rename that person")


def train_identities(
    jobs: list[IdentityJob],
    *,
    identities_per_step: int = 1,
    model: str = DEFAULT_BASE_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    image_encoder: str = "auto",
    identity_model: str = "auto",
    local_files_only: bool = False,
    revision: str | None = None,
    model_config: str | None = None,
    vae: str | None = None,
    resolution: int | None = None,
    crop: str = "auto",
    progress=None,
) -> TrainManyResult:
    """Train `jobs` on one base model, loaded once, `identities_per_step` identities per step: those whose
    settings agree on `training.group.SHARED_FIELDS` share groups, in the order given. A job whose
    folder holds a concept is skipped; one with checkpoints resumes. progress(name, step, total, logs,
    phase) is called for every step of every identity, phase "warm-up" or "train"."""
    started = time.perf_counter()
    if identities_per_step < 1:
        raise SettingsError(f"--identities-per-step must be >= 1, got {identities_per_step}")
    check_resolution(resolution)
    check_model_name(model)
    result = TrainManyResult()
    runs: dict[str, tuple[IdentityJob, PersonalizeRun]] = {}
    for job in jobs:
        if (job.output / CONCEPT_FILENAME).is_file():
            result.skipped.append(job.name)
            continue
        try:
            if job.mask not in MASK_METHODS and not Path(job.mask).is_file():
                raise SettingsError(f"--mask {job.mask!r} is not {', '.join(MASK_METHODS)}, nor an existing mask file")
            check_folder_path(job.output)  # what is in it is looked at once its lock is ours
            for photo in job.photos:
                load_photo(photo)  # fail on an unreadable photo before the model loads
        except PersonaMagicError as err:
            _failed(result, job.name, err)
            continue
        try:
            run = PersonalizeRun(job.photos, job.output, job.config, model, job.mask, image_encoder, identity_model,
                                 crop)
        except PersonaMagicError as err:
            _failed(result, job.name, err)
            continue
        run.resolution, run.vae = resolution, vae
        runs[job.name] = (job, run)
    if not runs:
        result.timings["total_s"] = time.perf_counter() - started
        return result
    assets = model_assets(model, model_config=model_config, vae=vae)
    assets += [a for _, run in runs.values() for a in run.assets()]
    check_assets(list(dict.fromkeys(assets)), local_files_only=local_files_only)

    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    base = load_base_model(model, device=device_, dtype=dtype_, local_files_only=local_files_only, revision=revision,
                           model_config=model_config, vae=vae)
    models = PhotoModels()  # every identity's photos are read with the same models, loaded once
    _load_shared_models(models, [run for _, run in runs.values()], device_, dtype_, local_files_only)
    result.timings["load_s"] = time.perf_counter() - started
    queues: dict[tuple, list] = {}
    for job, run in runs.values():
        queues.setdefault(group_key(run.config), []).append((job, run))
    for queue in queues.values():
        while queue:
            _train_group(queue, identities_per_step, base, models, device_, dtype_, local_files_only, progress,
                         result)
    result.notes = list(dict.fromkeys(note for r in result.trained.values() for note in r.notes
                                      if not note.startswith("resumed from")))
    result.timings["total_s"] = time.perf_counter() - started
    result.timings["train_s"] = result.timings["total_s"] - result.timings["load_s"]
    return result


def _load_shared_models(models: PhotoModels, runs: list[PersonalizeRun], device, dtype, local_files_only: bool):
    """The image encoder and identity network the runs use, loaded before any identity starts: one
    that cannot load is the whole run's mistake (one error), not each identity's."""
    for name in dict.fromkeys(run.encoder_name for run in runs):
        models.image_encoder(name, device, local_files_only)
    for spec in dict.fromkeys(run.identity_spec for run in runs if run.identity_spec is not None):
        models.identity_model(spec, device, dtype)


def _has_checkpoint(folder: Path) -> bool:
    return latest_checkpoint(folder / CHECKPOINT_DIR) is not None


def _stop_if_the_disk_is_full(err: Exception) -> None:
    """A full disk is the run's fault, not an identity's: every identity after it would fail the same way,
    so the run stops with one line (each folder is released as it is, and its checkpoints stay)."""
    if isinstance(err, DiskError):
        stopped = DiskError(f"{err}; the run stopped: the concepts and checkpoints written so far are kept, so "
                            f"{err.remedy} and run the same command again to continue")
        stopped.errno = err.errno
        raise stopped from None


def _give_up(result: TrainManyResult, slot: "_Slot", err: PersonaMagicError) -> None:
    """This identity failed: recorded in `result`, its folder released as the error leaves it (a full
    disk stops the whole run instead)."""
    _stop_if_the_disk_is_full(err)
    _failed(result, slot.job.name, err)
    slot.folder.__exit__(type(err), err, None)
    slot.folder = None


def _failed(result: TrainManyResult, name: str, err: Exception) -> None:
    message = str(err)
    message = message[len(name) + 2:] if message.startswith(f"{name}: ") else message
    logger.warning("%s failed: %s", name, message)
    result.failed[name] = message


class _Slot:
    """One identity of a group being trained: its job, run, locked folder, data and trainer."""

    def __init__(self, job: IdentityJob, run: PersonalizeRun):
        self.job, self.run = job, run
        self.folder = OutputFolder(job.output)
        self.prepared = self.masks = self.trainer = self.facts = None


def _train_group(queue: list, size: int, base, models: PhotoModels, device, dtype, local_files_only: bool, progress,
                 result: TrainManyResult) -> None:
    """Take up to `size` identities off `queue` whose photos prepare, train them in one group, write
    each concept; a failing identity is recorded in `result` and its place goes to the next in line."""
    started = time.perf_counter()
    slots: list[_Slot] = []
    with ExitStack() as stack:
        while queue and len(slots) < size:
            slot = _Slot(*queue.pop(0))
            try:
                slot.folder.__enter__()
            except FolderInUse as err:  # another run (another process, another machine) has it: its job
                result.held[slot.job.name] = str(err)
                continue
            except PersonaMagicError as err:
                _stop_if_the_disk_is_full(err)
                _failed(result, slot.job.name, err)
                continue
            stack.push(_release(slot))
            # Now that the folder is ours, look again: a run that held it may have finished it, or left
            # checkpoints to resume.
            if (slot.job.output / CONCEPT_FILENAME).is_file():
                result.skipped.append(slot.job.name)
                slot.folder.__exit__(None, None, None)
                slot.folder = None
                continue
            resume = _has_checkpoint(slot.job.output)
            try:
                if not resume and any((slot.job.output / CHECKPOINT_DIR).glob("*")):
                    raise ConceptError(f"{slot.job.output / CHECKPOINT_DIR} holds no usable checkpoint; delete it to "
                                       "train this identity again")
                data, slot.prepared, slot.masks, _ = slot.run.prepare(base, device, dtype, local_files_only, None,
                                                                      models)
                slot.facts = slot.run.job_facts(base)
                slot.trainer = Trainer(base, data, slot.run.config, slot.run.identity_encoder)
                if resume:
                    _resume(slot)
            except SettingsError:  # the same for every identity: the run stops (its folders released)
                raise
            except PersonaMagicError as err:
                _give_up(result, slot, err)
                continue
            slots.append(slot)
        if not slots:
            return
        names = [s.job.name for s in slots]
        logger.info("training %s in one step", ", ".join(names) if len(names) > 1 else names[0])
        report = None
        if progress is not None:
            def report(i, step, total, logs, phase):
                progress(names[i], step, total, logs, phase)
        t0 = time.perf_counter()
        with GroupTrainer([s.trainer for s in slots], names) as group:
            errors = group.train(report, [s.job.output / CHECKPOINT_DIR for s in slots], [s.facts for s in slots])
        train_s = time.perf_counter() - t0
        for i, slot in enumerate(slots):
            if i in errors:
                _give_up(result, slot, errors[i])
                continue
            trainer, run = slot.trainer, slot.run
            if trainer.stages.get("method") == "auto":
                logger.info("%s: %s", slot.job.name, describe_partition(trainer.stages, trainer.config.min_dynamic_fraction))
            extra = run.concept_extra(slot.facts, None, device, dtype)
            concept = trainer.concept(base_model=base.name, image_encoder=run.encoder_name, extra=extra)
            try:
                path = _write_outputs(slot.job.output, concept, trainer, slot.prepared[0].image, slot.masks[0])
            except PersonaMagicError as err:
                _give_up(result, slot, err)
                continue
            slot.folder.__exit__(None, None, None)
            slot.folder = None
            group_s = time.perf_counter() - started
            # this identity's share of its group's time (photos, training, writing)
            run.timings.update({"train_s": train_s, "group_s": group_s, "identities_per_step": len(slots),
                                "total_s": group_s / len(slots)})
            result.trained[slot.job.name] = PersonalizeResult(path, concept, run.notes, run.timings)


def _resume(slot: _Slot) -> None:
    """Load the slot's latest checkpoint; one it cannot use is reported with train-many's way out."""
    checkpoint = latest_checkpoint(slot.job.output / CHECKPOINT_DIR)
    try:
        slot.trainer.load_checkpoint(checkpoint, slot.facts)
    except CheckpointError as err:
        other = f"{err.alternative}, or " if err.alternative else ""
        raise ConceptError(f"{err.fault}; {other}delete {slot.job.output} to train this identity again") from None
    slot.run.notes.append(f"resumed from {checkpoint.name} (step {slot.trainer.step_count})")


def _release(slot: _Slot):
    """Exit callback: a slot's folder still locked when the group ends early (Ctrl-C, an error) is
    released the way a failed `personalize` releases it (its checkpoints kept)."""

    def release(exc_type, exc, tb):
        if slot.folder is not None:
            slot.folder.__exit__(exc_type or PersonaMagicError, exc, tb)
        return False

    return release
