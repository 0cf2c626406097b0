"""The `train` job: photo(s) in, concept folder out (concept.safetensors, mask.png, stages.png,
attention.png, checkpoints/ while it runs).

Order matters for "nothing half-written": the output folder is locked first (a second run into it is
refused at once), every check that can fail on user input (flags, photos, faces, masks, models) runs
before anything is written, the concept and its pictures are written atomically at the end, and
checkpoints are written atomically as training goes. A run that fails leaves no folder it created
behind (only checkpoints a `--resume` can continue from are kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import DEFAULT_BASE_MODEL
from ..concept import CONCEPT_FILENAME, Concept
from ..errors import ConceptError, ModelLoadError, PhotoError, SettingsError
from ..faces import FaceDetector, load_photo, prepare_photo
from ..faces.alignment import alignment_theta
from ..faces.masks import DEFAULT_CLIPSEG, clipseg_mask, landmark_mask, load_clipseg, load_mask_file, mask_overlay
from ..files import FolderLock, disk_error, write_atomic
from ..identity.loading import default_identity_model, identity_file_reference, load_identity_model
from ..families import FAMILIES, family_of_built_model
from ..hub import is_hub_id
from ..models import (BUILT_MODELS, DEFAULT_IMAGE_ENCODER, TINY, TINY_MODELS, load_base_model, load_image_encoder,
                      resolve_device, resolve_dtype)
from ..adapters.ip_adapter import IPAdapterSpec
from .assets import Asset, check_assets, model_assets
from ..models.devices import DTYPE_NAMES
from ..models.world import WORLD
from ..training import TrainConfig, Trainer, latest_checkpoint, prepare_training_data
from .plots import attention_figure, stages_figure

logger = logging.getLogger(__name__)

# Supercategories for which a face is detected, the crop centred on it and the identity loss used.
FACE_SUPERCATEGORIES = {"face", "person", "man", "woman", "boy", "girl", "child", "kid", "baby", "people"}
MASK_METHODS = ("auto", "clipseg", "landmarks", "none", "world")
CHECKPOINT_DIR = "checkpoints"
MASK_PREVIEW = "mask.png"
STAGES_PLOT = "stages.png"
ATTENTION_PLOT = "attention.png"
# the pictures `train` writes beside a concept, with what each shows (the web UI's captions)
CONCEPT_PICTURES = ((STAGES_PLOT, "stage partition"), (ATTENTION_PLOT, "S* attention"), (MASK_PREVIEW, "training mask"))


@dataclass
class PersonalizeResult:
    concept_path: Path
    concept: Concept
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by the CLI)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    up_to_date: bool = False  # the folder already held the concept of these photos and settings: nothing ran


def pil_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def file_sha256(path) -> str:
    """Short SHA-256 of a file's bytes (photos are compared by content, not by name)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as err:
        raise PhotoError(f"cannot read {path} ({err.strerror or err})") from None


def check_folder_path(output: Path) -> None:
    """The output can be a folder: it is not a file, nor under one."""
    if output.exists() and not output.is_dir():
        raise SettingsError(f"--output {output} is a file; give a folder")
    if any(parent.exists() and not parent.is_dir() for parent in output.parents):
        raise SettingsError(f"--output {output} lies under a file; give a folder path")


def check_output_folder(output: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber an existing concept unless asked; refuse a resume with nothing to resume."""
    if overwrite and resume:
        raise SettingsError("--overwrite and --resume exclude each other")
    check_folder_path(output)
    if resume:
        if latest_checkpoint(output / CHECKPOINT_DIR) is None:
            raise SettingsError(f"nothing to resume in {output} (no checkpoints/); train without --resume")
    elif (output / CONCEPT_FILENAME).exists() and not overwrite:
        raise SettingsError(f"{output} already holds a concept; pass --overwrite to replace it or --resume to continue")
    elif (output / CHECKPOINT_DIR).is_dir() and any((output / CHECKPOINT_DIR).iterdir()) and not overwrite:
        raise SettingsError(f"{output} holds checkpoints of an unfinished run; pass --resume or --overwrite")


class OutputFolder:
    """The run's output folder, locked for the run (`FolderLock`). A folder this run created is removed
    again if the run fails before anything worth keeping (a checkpoint) was written."""

    def __init__(self, path: Path):
        self.path = path
        self.created = False
        self.lock = FolderLock(path)

    def __enter__(self) -> "OutputFolder":
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise disk_error(self.path, err) from None
        try:
            self.lock.acquire()
        except BaseException:
            self._remove_if_created()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.lock.release()
        if exc_type is not None:
            self._remove_if_created()

    def _remove_if_created(self) -> None:
        if not self.created or not self.path.is_dir():
            return
        checkpoints = self.path / CHECKPOINT_DIR
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()
        if not any(self.path.iterdir()):
            self.path.rmdir()


def personalize(
    photos: list[str],
    output: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    model: str = DEFAULT_BASE_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    mask: str = "auto",
    image_encoder: str = "auto",
    identity_model: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    local_files_only: bool = False,
    progress=None,
    ip_adapter=None,
    resident=None,
    revision: str | None = None,
    model_config: str | None = None,
    vae: str | None = None,
    resolution: int | None = None,
    photomaker=None,
    crop: str = "auto",
) -> PersonalizeResult:
    """Learn a concept from `photos` and write it to the folder `output`.

    mask: "auto" (CLIPSeg for real models, landmarks for tiny), "clipseg", "landmarks", "none" (whole
    image, for styles), or a mask image file (one photo only). image_encoder / identity_model: "auto"
    or a hub id / local path ("tiny" for the tiny stand-ins). `progress(step, total, logs, phase)` is
    called for every step, phase "warm-up" (before the automatic stage partition) or "train".
    ip_adapter: an `adapters.ip_adapter.IPAdapterSpec` (or its `owner/repo/subfolder/file` text) to train with
    that IP-Adapter plugged into the UNet (paper, Table 3); each photo is its input.
    resident: a `models.ResidentModels` to take the base model from (not with an IP-Adapter).
    revision / model_config: the hub revision of `model`, the config folder of a single-file model.
    vae: another VAE (hub id or folder, e.g. an fp16-fixed SDXL VAE); resolution: the side of the
    training crop (default: the model's, 512 on SD-1.x, 1024 on SDXL). photomaker: a
    `PhotoMakerSpec` (or its weights' hub id / path) to train with PhotoMaker plugged in (SDXL only).
    crop: "face" (crop square around the detected face), "none" (the photo is already a crop: its centre
    square, no detection; the identity loss then reads the whole image) or "auto" (none on the world
    model, whose photos are crops; face for face supercategories otherwise).
    """
    started = time.perf_counter()
    output = Path(output)
    if not photos:
        raise PhotoError("give at least one photo")
    if mask not in MASK_METHODS and not Path(mask).is_file():
        raise SettingsError(f"--mask {mask!r} is not auto, clipseg, landmarks, none, world, nor an existing mask file")
    check_resolution(resolution)
    if crop not in CROP_METHODS:
        raise SettingsError(f"--crop {crop!r} is not one of {', '.join(CROP_METHODS)}")
    def key() -> str:
        return run_key(photos, config, model=model, mask=mask, image_encoder=image_encoder,
                       identity_model=identity_model, revision=revision, model_config=model_config, vae=vae,
                       resolution=resolution, crop=crop, ip_adapter=ip_adapter, photomaker=photomaker, device=device,
                       dtype=dtype)

    if not overwrite and not resume and (output / CONCEPT_FILENAME).is_file():
        for photo in photos:
            load_photo(photo)  # an unreadable photo is named as always
        done = _same_run_done(output, key())
        if done is not None:
            return done
    check_output_folder(output, overwrite=overwrite, resume=resume)
    run = PersonalizeRun(photos, output, config, model, mask, image_encoder, identity_model, crop)
    run.resolution, run.vae = resolution, vae
    check_model_name(model, photomaker=photomaker is not None)
    spec = ip_adapter if ip_adapter is None or not isinstance(ip_adapter, str) else IPAdapterSpec.parse(ip_adapter)
    assets = run.assets() + model_assets(model, model_config=model_config, vae=vae, photomaker=photomaker,
                                         ip_adapter=spec)
    if resident is not None:  # the base model may be loaded already; the rest is checked all the same
        assets = [a for a in assets if a.what != "the base model"]
    check_assets(assets, local_files_only=local_files_only)
    for photo in photos:
        load_photo(photo)  # fail on an unreadable photo before a multi-GB model load
        if run.mask_method == "world":
            recorded_world_mask(photo)
    with OutputFolder(output):
        check_output_folder(output, overwrite=overwrite, resume=resume)  # again, now that the folder is ours
        if overwrite:  # the replaced run's resume points must not be taken for this run's
            for stale in (output / CHECKPOINT_DIR).glob("step-*.safetensors"):
                stale.unlink()
        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        shared = resident is not None and ip_adapter is None and photomaker is None  # plug-ins change the model
        load = resident.load if shared else load_base_model
        base = load(model, device=device_, dtype=dtype_, local_files_only=local_files_only, revision=revision,
                    model_config=model_config, vae=vae)
        data, prepared, masks, ip_adapter = run.prepare(base, device_, dtype_, local_files_only, ip_adapter)
        run.plug_in_photomaker(photomaker, base, data, [p.image for p in prepared], local_files_only)
        concept, trainer = run.train(base, data, resume, progress, ip_adapter, device_, dtype_)
        concept.extra["run_key"] = key()
        concept_path = _write_outputs(output, concept, trainer, prepared[0].image, masks[0])
    run.timings["total_s"] = time.perf_counter() - started
    return PersonalizeResult(concept_path, concept, run.notes, run.timings)


def run_key(photos: list[str], config: TrainConfig, **settings) -> str:
    """A fingerprint of a `personalize` call as given — the photos' and a mask file's contents, the
    TrainConfig and every other setting — recorded in the concept, so that the same command run again
    on its folder has nothing to do (as `make` would)."""
    def described(value):
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        return getattr(value, "to_dict", lambda: repr(value))()

    mask = settings["mask"]
    record = {"photos": [file_sha256(p) for p in photos], "config": config.to_dict(),
              **{k: described(v) for k, v in sorted(settings.items())},
              "mask": mask if mask in MASK_METHODS else f"file {file_sha256(mask)}"}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _same_run_done(output: Path, key: str) -> PersonalizeResult | None:
    """The result of a finished run with the same `run_key` in `output`, or None."""
    path = output / CONCEPT_FILENAME
    if not path.is_file():
        return None
    try:
        concept = Concept.load(output)
    except ConceptError:
        return None  # a damaged concept: the usual refusal names it
    if concept.extra.get("run_key") != key:
        return None
    note = (f"{output} already holds the concept of these photos and settings; nothing to do (pass --overwrite "
            "to train it again)")
    return PersonalizeResult(path, concept, [note], {}, up_to_date=True)


# the alignment of a photo taken as a crop (--crop none): the identity network reads the whole image
WHOLE_IMAGE = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
CROP_METHODS = ("auto", "face", "none")  # --crop: detect and crop around the face, or take the photo as a crop
MAX_RESOLUTION = 4096  # largest training crop side (as generate's largest image side)


def check_resolution(resolution: int | None) -> None:
    """`--resolution`: None (the model's) or a multiple of 64 from 64 to MAX_RESOLUTION."""
    if resolution is not None and (resolution < 64 or resolution % 64 or resolution > MAX_RESOLUTION):
        raise SettingsError(f"--resolution {resolution} must be a multiple of 64 from 64 to {MAX_RESOLUTION} "
                            "(e.g. 512, 768, 1024)")


def check_model_name(model: str, *, photomaker: bool = False) -> None:
    """Before anything loads: `model` names something loadable, and PhotoMaker is not asked of a model
    built in code whose family it does not fit (a downloaded model's family is checked once it has loaded)."""
    if not (model in BUILT_MODELS or model == WORLD or Path(model).expanduser().exists() or is_hub_id(model)):
        raise ModelLoadError(f"unknown model {model!r}: not a file, not a folder, not a hub id (owner/name); use e.g. "
                             f"{DEFAULT_BASE_MODEL}, a local path, or one of {', '.join((*BUILT_MODELS, WORLD))}")
    family = family_of_built_model(model)
    if photomaker and family is not None and not family.supports_photomaker:
        toy = next(f.tiny_model for f in FAMILIES.values() if f.supports_photomaker)
        raise SettingsError(f"PhotoMaker works on SDXL models; {model} is a {family.title} model (try --model {toy})")


class PersonalizeRun:
    """The steps of one personalize job and what they learn on the way (notes, timings, job facts); the
    jobs that train several concepts at once (`jobs.train_many`) run these steps for each."""

    def __init__(self, photos, output: Path, config: TrainConfig, model: str, mask: str, image_encoder: str,
                 identity_model: str, crop: str = "auto"):
        self.photos, self.output, self.model = list(photos), output, model
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()
        self.resolution: int | None = None  # the training crop's side (None: the model's)
        self.vae: str | None = None  # another VAE than the model's
        self.photomaker = None  # PhotoMaker plugged in (`plug_in_photomaker`)
        self.ip_adapter = None  # the IP-Adapter plugged in (`prepare`)
        self.is_face = config.supercategory in FACE_SUPERCATEGORIES
        if crop == "auto":
            crop = "none" if model == WORLD or not self.is_face else "face"
        self.detect_face = crop == "face"
        if config.use_id_loss and not self.is_face:
            self.notes.append(f"identity loss off: supercategory {config.supercategory!r} is not a face")
            config = TrainConfig(**{**config.to_dict(), "use_id_loss": False})
        toy = model in TINY_MODELS
        if toy:
            self.notes.append("tiny model: a randomly initialised toy; it runs the whole method but its images are "
                              "noise-like")
        self.config = config
        offline = toy or model == WORLD  # models whose companions (image encoder, identity model) ship too
        if mask == "auto" and model == WORLD:
            mask = "world"  # the renderer's mask, redrawn from the photo's world record
        if mask == "auto" and not self.detect_face and self.is_face:
            raise SettingsError("--crop none finds no face to mask: pass --mask clipseg, none or FILE")
        self.mask_method = mask if mask != "auto" else ("landmarks" if toy else "clipseg")
        self.encoder_name = image_encoder if image_encoder != "auto" else (TINY if offline else DEFAULT_IMAGE_ENCODER)
        self.identity_spec = None
        if config.use_id_loss:
            self.identity_spec = identity_model if identity_model != "auto" else default_identity_model(model)

    def assets(self) -> list[Asset]:
        """What this run reads from the hub besides the model (`jobs.assets`), to check before
        anything loads."""
        found = []
        if self.mask_method == "clipseg":
            found.append(Asset("CLIPSeg (the face mask)", DEFAULT_CLIPSEG, "--mask landmarks"))
        found.append(Asset("the CLIP image encoder", self.encoder_name, "--image-encoder PATH, or tiny"))
        if self.identity_spec is not None:
            found.append(Asset("the identity model", identity_file_reference(self.identity_spec),
                               "--identity-model sface, or --no-id-loss"))
        return found

    def job_facts(self, base) -> dict:
        """What a resume must match besides `TrainConfig` (`training.checkpoints`)."""
        return {
            "photos": [file_sha256(p) for p in self.photos],
            "base_model": base.name,
            "mask": self.mask_method if self.mask_method in MASK_METHODS else f"file {file_sha256(self.mask_method)}",
            "image_encoder": self.encoder_name,
            "identity_model": self.identity_spec,
            "resolution": self.resolution or base.resolution,
            "crop": "face" if self.detect_face else "none",
            "photomaker": self.photomaker.spec.to_dict() if self.photomaker else None,
            "ip_adapter": self.ip_adapter.to_dict() if self.ip_adapter else None,
            "vae": self.vae,
            "revision": base.revision,
        }

    def prepare(self, base, device, dtype, local_files_only: bool, ip_adapter, models: PhotoModels | None = None):
        """Photos, faces and masks, then the embeddings computed once (CLIP image embedding, VAE
        posterior, identity reference). `models`: the photo models to use (loaded once for several runs)."""
        models = models or PhotoModels()
        size = self.resolution or base.resolution
        multiple = base.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)
        if size % multiple:
            raise SettingsError(f"--resolution {size} is not a multiple of {multiple}, which this model's UNet needs")
        detector = models.face_detector() if self.detect_face else None
        prepared = [prepare_photo(p, size, detect_face=self.detect_face, detector=detector) for p in self.photos]
        self.num_faces = [p.num_faces for p in prepared]
        masks = _make_masks(prepared, self.mask_method, self.config.supercategory, local_files_only, models)
        self.timings["load_and_mask_s"] = time.perf_counter() - self.started
        t0 = time.perf_counter()
        clip_model, clip_processor = models.image_encoder(self.encoder_name, device, local_files_only)
        with torch.no_grad():
            inputs = clip_processor(images=[p.image for p in prepared], return_tensors="pt").pixel_values.to(device)
            image_embeds = clip_model(pixel_values=inputs.to(clip_model.dtype)).image_embeds.float()
        self.identity_encoder, face_theta = None, None
        if self.identity_spec is not None:
            self.identity_encoder = models.identity_model(self.identity_spec, device, dtype)
            face_theta = torch.stack([
                WHOLE_IMAGE if p.face is None else
                alignment_theta(p.face.landmarks, (size, size), self.identity_encoder.input_size, landmarks_order="yunet")
                for p in prepared
            ])
        pixels = torch.stack([pil_to_tensor(p.image) for p in prepared])
        mask_tensor = torch.from_numpy(np.stack(masks))[:, None]
        data = prepare_training_data(base.vae, pixels, mask_tensor, image_embeds, face_theta, self.identity_encoder)
        data.time_ids = training_time_ids(base.family, [p.crop for p in prepared], device)
        if ip_adapter is not None:
            ip_adapter = _plug_in_ip_adapter(base, ip_adapter, data, [p.image for p in prepared], local_files_only)
            self.ip_adapter = ip_adapter
        self.timings["encode_s"] = time.perf_counter() - t0
        return data, prepared, masks, ip_adapter

    def plug_in_photomaker(self, spec, base, data, photos, local_files_only: bool) -> None:
        """PhotoMaker's LoRA into the UNet and each photo's ID embedding for the trainer (`spec` None: off)."""
        if spec is None:
            return
        from ..adapters.photomaker_plugin import PhotoMaker, PhotoMakerSpec

        if not base.family.supports_photomaker:
            raise SettingsError(f"PhotoMaker works on SDXL models; {base.name} is a {base.family.title} model")
        spec = spec if isinstance(spec, PhotoMakerSpec) else PhotoMakerSpec(weights=str(spec))
        self.photomaker = PhotoMaker.load(spec, base.unet, device=base.device, dtype=base.dtype,
                                          local_files_only=local_files_only)
        data.photomaker_embeds = torch.cat([self.photomaker.id_embeds([photo]) for photo in photos])  # (N, 1, D)

    def train(self, base, data, resume: bool, progress, ip_adapter, device, dtype):
        """Partition (unless resumed past it or given a window) and train, checkpointing into
        output/checkpoints; returns the concept and the trainer."""
        t0 = time.perf_counter()
        checkpoint_dir = self.output / CHECKPOINT_DIR
        job = self.job_facts(base)
        with Trainer(base, data, self.config, self.identity_encoder, self.photomaker) as trainer:
            if resume:
                checkpoint = latest_checkpoint(checkpoint_dir)
                trainer.load_checkpoint(checkpoint, job)
                self.notes.append(f"resumed from {checkpoint.name} (step {trainer.step_count})")
            if trainer.stage_window is None:
                trainer.find_stage_window(progress=_with_phase(progress, "warm-up"))
                self.timings["partition_s"] = time.perf_counter() - t0
                logger.info(describe_partition(trainer.stages, trainer.config.min_dynamic_fraction))
            t1 = time.perf_counter()
            trainer.train(progress=_with_phase(progress, "train"), checkpoint_dir=checkpoint_dir, job=job)
            self.timings["train_s"] = time.perf_counter() - t1
            extra = self.concept_extra(job, ip_adapter, device, dtype)
            concept = trainer.concept(base_model=base.name, image_encoder=self.encoder_name, extra=extra)
        self.timings["training_total_s"] = time.perf_counter() - t0
        return concept, trainer

    def concept_extra(self, job: dict, ip_adapter, device, dtype) -> dict:
        """What the concept records about this run besides its TrainConfig (`Concept.extra`)."""
        return {
            "photos": [Path(p).name for p in self.photos],
            "photo_sha256": job["photos"],
            "mask": self.mask_method if self.mask_method in MASK_METHODS else "file",
            "num_faces": self.num_faces,
            "identity_model": self.identity_spec,
            "resolution": job["resolution"],
            "vae": self.vae,
            "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
            "device": device.type,
            **({"ip_adapter": {"weights": ip_adapter.describe(), "scale": ip_adapter.scale}} if ip_adapter else {}),
            **({"photomaker": self.photomaker.spec.to_dict()} if self.photomaker else {}),
        }


class PhotoModels:
    """The models that read the photos (face detector, CLIPSeg, CLIP image encoder, identity network),
    each loaded on first use and kept: one instance shared by several runs loads each model once."""

    def __init__(self):
        self._loaded: dict = {}

    def _get(self, key, load):
        if key not in self._loaded:
            self._loaded[key] = load()
        return self._loaded[key]

    def face_detector(self) -> FaceDetector:
        return self._get("face_detector", FaceDetector)

    def clipseg(self, local_files_only: bool):
        return self._get(("clipseg", local_files_only), lambda: load_clipseg(local_files_only=local_files_only))

    def image_encoder(self, name: str, device, local_files_only: bool):
        return self._get(("image_encoder", name, str(device), local_files_only),
                         lambda: load_image_encoder(name, device=device, local_files_only=local_files_only))

    def identity_model(self, spec: str, device, dtype):
        return self._get(("identity_model", spec, str(device), str(dtype)),
                         lambda: load_identity_model(spec, device=device, dtype=dtype))


def training_time_ids(family, crops, device) -> torch.Tensor | None:
    """(N, 6) size conditioning of each photo for families that have it (SDXL): the photo's size, where
    the crop starts once the photo is scaled as the crop was, and the training size (the convention of
    diffusers' SDXL training scripts: original size, crop top-left, target size, each (h, w))."""
    rows = []
    for crop in crops:
        scale = crop.size / crop.side
        width, height = crop.source_size
        row = family.time_ids((height, width), (round(crop.y0 * scale), round(crop.x0 * scale)), (crop.size, crop.size))
        if row is None:
            return None
        rows.append(row)
    return torch.stack(rows).to(device)


def _write_outputs(output: Path, concept: Concept, trainer, photo, mask) -> Path:
    """The concept and its pictures, each atomically; then the run's resume points go."""
    try:
        concept_path = concept.save(output)
        pictures = {MASK_PREVIEW: mask_overlay(photo, mask)}
        if concept.stages.get("method") == "auto":
            pictures[STAGES_PLOT] = stages_figure(concept.stages, concept.num_train_timesteps, concept.supercategory)
            if trainer.attention_maps is not None:
                pictures[ATTENTION_PLOT] = attention_figure(photo, trainer.attention_maps, concept.stages)
        for name, picture in pictures.items():
            write_atomic(output / name, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
    except OSError as err:
        raise disk_error(output, err) from None
    # The run is complete: its resume points are no longer needed.
    checkpoint_dir = output / CHECKPOINT_DIR
    for stale in checkpoint_dir.glob("step-*.safetensors"):
        stale.unlink()
    if checkpoint_dir.is_dir() and not any(checkpoint_dir.iterdir()):
        checkpoint_dir.rmdir()
    return concept_path


def _plug_in_ip_adapter(base, spec, data, photos, local_files_only: bool):
    """Load the IP-Adapter into `base.unet` through diffusers and give the trainer each photo's input."""
    from ..adapters.ip_adapter import IPAdapterSpec, load_ip_adapter, training_embeds
    from ..pipeline import PersonaMagicPipeline

    spec = spec if isinstance(spec, IPAdapterSpec) else IPAdapterSpec.parse(spec)
    pipe = PersonaMagicPipeline.from_base(base)
    load_ip_adapter(pipe, spec, local_files_only=local_files_only)
    data.ip_adapter_embeds = training_embeds(pipe, photos)  # (N, 1, E)
    return spec


def _with_phase(progress, phase: str):
    if progress is None:
        return None
    return lambda step, total, logs: progress(step, total, logs, phase)


def describe_partition(stages: dict, min_dynamic_fraction: float = 0.2) -> str:
    """One line on the automatic partition's result, with the final window."""
    t_lo, t_hi = stages["window"]
    text = f"stage partition: dynamic stage {t_lo} <= t < {t_hi}"
    if stages.get("flat"):
        text += " (flat IoU curve: no stage structure found, whole schedule used)"
    elif stages.get("widened"):
        text += f" (widened to the minimum width, {min_dynamic_fraction:.0%} of the schedule)"
    return text


def recorded_world_mask(path):
    """The face mask a world render records (its identity, context and seed); one PhotoError if none."""
    from ..world.render import recorded_mask

    mask = recorded_mask(path)
    if mask is None:
        raise PhotoError(f"{path} is not a world render (it records no person); pass its face mask with "
                         "--mask FILE, or draw the photo with personamagic world render")
    return mask


def _world_mask(photo, size: int) -> np.ndarray:
    """The recorded face mask of a world render, cropped like the photo."""
    from PIL import Image

    mask = recorded_world_mask(photo.path)
    if mask.size != photo.original.size:
        raise PhotoError(f"{photo.path} is {photo.original.width}x{photo.original.height} pixels, not the "
                         f"{mask.width}x{mask.height} of its world record; pass its face mask with --mask FILE")
    return (np.asarray(photo.crop.apply(mask, Image.Resampling.BILINEAR)) > 127).astype(np.float32)


def _make_masks(prepared, method: str, supercategory: str, local_files_only: bool = False,
                models: PhotoModels | None = None) -> list[np.ndarray]:
    """One (size, size) {0,1} mask per photo, by the chosen method (CLIPSeg from `models` if given)."""
    size = prepared[0].image.width
    if method == "landmarks":
        if any(p.face is None for p in prepared):
            raise PhotoError("--mask landmarks needs a face; use --mask clipseg, none or FILE for this supercategory")
        return [landmark_mask(p.face, size) for p in prepared]
    if method == "clipseg":
        model, processor = (models or PhotoModels()).clipseg(local_files_only)
        return [clipseg_mask(p.image, supercategory, model, processor) for p in prepared]
    if method == "none":
        return [np.ones((size, size), dtype=np.float32) for _ in prepared]
    if method == "world":
        return [_world_mask(p, size) for p in prepared]
    if len(prepared) != 1:
        raise SettingsError("--mask FILE works with one photo; use --mask clipseg or landmarks with several photos")
    return [load_mask_file(method, prepared[0])]
