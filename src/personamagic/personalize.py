"""The `train` job: photo(s) in, concept folder out (concept.safetensors, mask.png, checkpoints/).

Order matters for "nothing half-written": every check that can fail on user input (photos, faces,
masks, flags, models) runs before the output folder is touched; the concept and its side files are
written atomically at the end; checkpoints are written atomically as training goes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .concept import CONCEPT_FILENAME, Concept, write_atomic
from .errors import UserError
from .faces import FaceDetector, load_photo, prepare_photo
from .identity import DEFAULT_IDENTITY_MODEL, alignment_theta, load_identity_model
from .masks import clipseg_mask, landmark_mask, load_clipseg, load_mask_file, mask_overlay
from .plots import attention_figure, stages_figure
from .models import (
    DEFAULT_IMAGE_ENCODER,
    TINY,
    load_base_model,
    load_image_encoder,
    resolve_device,
    resolve_dtype,
)
from .training import TrainConfig, Trainer, latest_checkpoint, prepare_training_data

logger = logging.getLogger(__name__)

# Supercategories for which a face is detected, the crop centred on it and the identity loss used.
FACE_SUPERCATEGORIES = {"face", "person", "man", "woman", "boy", "girl", "child", "kid", "baby", "people"}
CHECKPOINT_DIR = "checkpoints"
MASK_PREVIEW = "mask.png"
STAGES_PLOT = "stages.png"
ATTENTION_PLOT = "attention.png"


@dataclass
class PersonalizeResult:
    concept_path: Path
    concept: Concept
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by the CLI)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase


def pil_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def check_output_folder(output: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber an existing concept unless asked; refuse a resume with nothing to resume."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder")
    if resume:
        if latest_checkpoint(output / CHECKPOINT_DIR) is None:
            raise UserError(f"nothing to resume in {output} (no checkpoints/); train without --resume")
    elif (output / CONCEPT_FILENAME).exists() and not overwrite:
        raise UserError(f"{output} already holds a concept; pass --overwrite to replace it or --resume to continue")
    elif (output / CHECKPOINT_DIR).is_dir() and any((output / CHECKPOINT_DIR).iterdir()) and not overwrite:
        raise UserError(f"{output} holds checkpoints of an unfinished run; pass --resume or --overwrite")


def personalize(
    photos: list[str],
    output: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    model: str = "CompVis/stable-diffusion-v1-4",
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
) -> PersonalizeResult:
    """Learn a concept from `photos` and write it to the folder `output`.

    mask: "auto" (CLIPSeg for real models, landmarks for tiny), "clipseg", "landmarks", "none" (whole
    image, for styles), or a mask image file (one photo only). image_encoder / identity_model: "auto"
    or a hub id / local path ("tiny" for the tiny stand-ins). `progress(step, total, logs, phase)` is
    called for every step, phase "warm-up" (before the automatic stage partition) or "train".
    ip_adapter: an `ip_adapter.IPAdapterSpec` (or its `owner/repo/subfolder/file` text) to train with
    that IP-Adapter plugged into the UNet (paper, Table 3); each photo is its input.
    resident: a `models.ResidentModels` to take the base model from (not with an IP-Adapter).
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    output = Path(output)
    notes: list[str] = []
    if not photos:
        raise UserError("give at least one photo")
    check_output_folder(output, overwrite=overwrite, resume=resume)
    is_face = config.supercategory in FACE_SUPERCATEGORIES
    if config.use_id_loss and not is_face:
        notes.append(f"identity loss off: supercategory {config.supercategory!r} is not a face")
        config = TrainConfig(**{**config.to_dict(), "use_id_loss": False})
    if model == TINY:
        notes.append("tiny model: a randomly initialised toy; it runs the whole method but its images are noise-like")

    # 1. photos, faces, masks (all user-input checks happen here, before anything is written)
    for photo in photos:
        load_photo(photo)  # fail on an unreadable photo before a multi-GB model load
    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    load = resident.load if resident is not None and ip_adapter is None else load_base_model
    base = load(model, device=device_, dtype=dtype_, local_files_only=local_files_only)
    size = base.resolution
    detector = FaceDetector() if is_face else None
    prepared = [prepare_photo(p, size, detect_face=is_face, detector=detector) for p in photos]
    mask_method = mask if mask != "auto" else ("landmarks" if model == TINY else "clipseg")
    masks = _make_masks(prepared, mask_method, config.supercategory)
    timings["load_and_mask_s"] = time.perf_counter() - started

    # 2. embeddings computed once: CLIP image embedding, VAE posterior, identity reference
    t0 = time.perf_counter()
    encoder_name = image_encoder if image_encoder != "auto" else (TINY if model == TINY else DEFAULT_IMAGE_ENCODER)
    clip_model, clip_processor = load_image_encoder(encoder_name, device=device_)
    with torch.no_grad():
        inputs = clip_processor(images=[p.image for p in prepared], return_tensors="pt").pixel_values.to(device_)
        image_embeds = clip_model(pixel_values=inputs.to(clip_model.dtype)).image_embeds.float()
    identity_encoder, face_theta = None, None
    if config.use_id_loss:
        spec = identity_model if identity_model != "auto" else (TINY if model == TINY else DEFAULT_IDENTITY_MODEL)
        identity_encoder = load_identity_model(spec, device=device_, dtype=dtype_)
        face_theta = torch.stack([
            alignment_theta(p.face.landmarks, (size, size), identity_encoder.input_size, landmarks_order="yunet")
            for p in prepared
        ])
    pixels = torch.stack([pil_to_tensor(p.image) for p in prepared])
    mask_tensor = torch.from_numpy(np.stack(masks))[:, None]
    data = prepare_training_data(base.vae, pixels, mask_tensor, image_embeds, face_theta, identity_encoder)
    if ip_adapter is not None:
        ip_adapter = _plug_in_ip_adapter(base, ip_adapter, data, [p.image for p in prepared], local_files_only)
    timings["encode_s"] = time.perf_counter() - t0

    # 3. train, checkpointing into output/checkpoints
    t0 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = output / CHECKPOINT_DIR
    with Trainer(base, data, config, identity_encoder) as trainer:
        if resume:
            checkpoint = latest_checkpoint(checkpoint_dir)
            trainer.load_checkpoint(checkpoint)
            notes.append(f"resumed from {checkpoint.name} (step {trainer.step_count})")
        if trainer.stage_window is None:
            trainer.find_stage_window(progress=_with_phase(progress, "warm-up"))
            timings["partition_s"] = time.perf_counter() - t0
            logger.info(_describe_partition(trainer.stages))
        t1 = time.perf_counter()
        trainer.train(progress=_with_phase(progress, "train"), checkpoint_dir=checkpoint_dir)
        timings["train_s"] = time.perf_counter() - t1
        concept = trainer.concept(
            base_model=base.name,
            image_encoder=encoder_name,
            extra={
                "photos": [Path(p.path).name for p in prepared],
                "mask": mask_method if mask_method in ("clipseg", "landmarks", "none") else "file",
                "num_faces": [p.num_faces for p in prepared],
                "identity_model": identity_model if config.use_id_loss else None,
                "dtype": str(dtype_).replace("torch.", ""),
                "device": device_.type,
                **({"ip_adapter": {"weights": ip_adapter.describe(), "scale": ip_adapter.scale}} if ip_adapter else {}),
            },
        )

    # 4. write the concept and its pictures atomically
    concept_path = concept.save(output)
    pictures = {MASK_PREVIEW: mask_overlay(prepared[0].image, masks[0])}
    if concept.stages.get("method") == "auto":
        pictures[STAGES_PLOT] = stages_figure(concept.stages, concept.num_train_timesteps)
        if trainer.attention_maps is not None:  # not kept across a resume
            pictures[ATTENTION_PLOT] = attention_figure(prepared[0].image, trainer.attention_maps, concept.stages)
    for name, picture in pictures.items():
        write_atomic(output / name, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
    # The run is complete: its resume points are no longer needed.
    for stale in checkpoint_dir.glob("step-*.safetensors"):
        stale.unlink()
    if checkpoint_dir.is_dir() and not any(checkpoint_dir.iterdir()):
        checkpoint_dir.rmdir()
    timings["total_s"] = time.perf_counter() - started
    return PersonalizeResult(concept_path, concept, notes, timings)


def _plug_in_ip_adapter(base, spec, data, photos, local_files_only: bool):
    """Load the IP-Adapter into `base.unet` through diffusers and give the trainer each photo's input."""
    from .ip_adapter import IPAdapterSpec, load_ip_adapter, training_embeds
    from .pipeline import PersonaMagicPipeline

    spec = spec if isinstance(spec, IPAdapterSpec) else IPAdapterSpec.parse(spec)
    pipe = PersonaMagicPipeline.from_base(base)
    load_ip_adapter(pipe, spec, local_files_only=local_files_only)
    data.ip_adapter_embeds = training_embeds(pipe, photos)  # (N, 1, E)
    return spec


def _with_phase(progress, phase: str):
    if progress is None:
        return None
    return lambda step, total, logs: progress(step, total, logs, phase)


def _describe_partition(stages: dict) -> str:
    t_lo, t_hi = stages["window"]
    text = f"stage partition: dynamic stage {t_lo} <= t < {t_hi}"
    if stages.get("flat"):
        text += " (flat IoU curve: no stage structure found, whole schedule used)"
    elif stages.get("widened"):
        text += " (widened to the minimum width)"
    return text


def _make_masks(prepared, method: str, supercategory: str) -> list[np.ndarray]:
    """One (size, size) {0,1} mask per photo, by the chosen method."""
    size = prepared[0].image.width
    if method == "landmarks":
        if any(p.face is None for p in prepared):
            raise UserError("--mask landmarks needs a face; use --mask clipseg, none or FILE for this supercategory")
        return [landmark_mask(p.face, size) for p in prepared]
    if method == "clipseg":
        model, processor = load_clipseg()
        return [clipseg_mask(p.image, supercategory, model, processor) for p in prepared]
    if method == "none":
        return [np.ones((size, size), dtype=np.float32) for _ in prepared]
    if not Path(method).is_file():
        raise UserError(f"--mask {method!r} is not auto, clipseg, landmarks, none, nor an existing mask file")
    if len(prepared) != 1:
        raise UserError("--mask FILE works with one photo; use --mask clipseg or landmarks with several photos")
    return [load_mask_file(method, prepared[0])]

