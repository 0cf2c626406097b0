"""SFace in torch on this CPU: agreement with OpenCV, and its cost beside a tiny-model training step.

Prints one JSON object:
- min_cosine_vs_opencv / max_abs_difference_vs_opencv: over the two test photos and five edits of each
  (mirror, crop, 10° rotation, grayscale, JPEG q30), the lowest cosine and the largest element difference
  between the port's unit embedding and OpenCV's FaceRecognizerSF.feature of the same alignCrop crop;
- forward_s / forward_backward_s: SFace at batch 2 (112×112), no_grad forward and forward + backward to
  the input, median of `--runs` runs after one warm-up;
- tiny_step_s / tiny_step_sface_id_s: `Trainer.optimize_step` on `build_tiny_components()` (128×128) without
  the identity loss, and with it through SFace, median of `--runs` steps after one warm-up.

    python benchmarks/sface_cpu.py [--runs 7] [--threads N]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from personamagic.evaluation.identity_preservation import yunet_row
from personamagic.faces import FaceDetector, prepare_photo
from personamagic.faces.masks import landmark_mask
from personamagic.identity import alignment_theta, load_identity_model
from personamagic.identity.sface import sface_model_path
from personamagic.jobs.personalize import pil_to_tensor
from personamagic.models import build_tiny_components
from personamagic.models.tiny import TinyConfig
from personamagic.training import TrainConfig, Trainer, prepare_training_data

DATA = Path(__file__).parent.parent / "tests" / "data"
PHOTOS = ("astronaut.png", "grace_hopper.jpg")


def edits(rgb: np.ndarray, face) -> list[np.ndarray]:
    """The photo, mirrored, cropped around the face, rotated 10°, grayscale, JPEG at quality 30."""
    height, width = rgb.shape[:2]
    (cx, cy), side = face.center, max(face.size)
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, "JPEG", quality=30)
    rotation = cv2.getRotationMatrix2D((cx, cy), 10.0, 1.0)
    return [np.ascontiguousarray(image) for image in (
        rgb, rgb[:, ::-1], rgb[max(0, int(cy - side)):int(cy + side), max(0, int(cx - side)):int(cx + side)],
        cv2.warpAffine(rgb, rotation, (width, height), borderMode=cv2.BORDER_REFLECT),
        np.asarray(Image.fromarray(rgb).convert("L").convert("RGB")), np.asarray(Image.open(jpeg).convert("RGB")),
    )]


def agreement_with_opencv(encoder) -> tuple[float, float]:
    """(min cosine, max |difference|) of the unit embeddings over the photos and their edits."""
    detector, recognizer = FaceDetector(), cv2.FaceRecognizerSF.create(str(sface_model_path()), "")
    cosines, differences = [], []
    for name in PHOTOS:
        rgb = np.asarray(Image.open(DATA / name).convert("RGB"))
        for image in edits(rgb, detector.detect(Image.fromarray(rgb))[0]):
            face = detector.detect(Image.fromarray(image))[0]
            aligned = recognizer.alignCrop(np.ascontiguousarray(image[:, :, ::-1]), yunet_row(face))  # BGR
            theirs = recognizer.feature(aligned).reshape(-1)
            crop = torch.from_numpy(aligned[:, :, ::-1].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            with torch.no_grad():
                ours = encoder(crop)[0].numpy()
            theirs = theirs / np.linalg.norm(theirs)
            cosines.append(float(ours @ theirs))
            differences.append(float(np.abs(ours - theirs).max()))
    return min(cosines), max(differences)


def median_time(function, runs: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    encoder = load_identity_model("sface")
    load_s = time.perf_counter() - start
    size = encoder.input_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, 3, S, S)

    def forward():
        with torch.no_grad():
            encoder(images)

    def forward_backward():
        inputs = images.clone().requires_grad_(True)
        encoder(inputs).sum().backward()

    base = build_tiny_components()
    photo = prepare_photo(DATA / PHOTOS[0], base.resolution)
    theta = alignment_theta(photo.face.landmarks, (base.resolution,) * 2, encoder.input_size,
                            landmarks_order="yunet")[None]
    mask = torch.from_numpy(landmark_mask(photo.face, base.resolution))[None, None]
    embeds = torch.randn(1, TinyConfig().image_embed_dim, generator=torch.Generator().manual_seed(0))
    config = TrainConfig(max_train_steps=1000, use_id_loss=False, stage_window=(0, 1000), seed=0)

    def step_time(use_id_loss: bool) -> float:
        identity = encoder if use_id_loss else None
        data = prepare_training_data(base.vae, pil_to_tensor(photo.image)[None], mask, embeds, theta, identity)
        with Trainer(base, data, replace(config, use_id_loss=use_id_loss), identity) as trainer:
            return median_time(lambda: trainer.optimize_step(trainer.stage_window), args.runs)

    min_cosine, max_difference = agreement_with_opencv(encoder)
    print(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "opencv": cv2.__version__},
        "load_s": round(load_s, 3),
        "images_vs_opencv": 2 * 6,
        "min_cosine_vs_opencv": round(min_cosine, 8),
        "max_abs_difference_vs_opencv": float(f"{max_difference:.2e}"),
        "batch": 2,
        "forward_s": round(median_time(forward, args.runs), 4),
        "forward_backward_s": round(median_time(forward_backward, args.runs), 4),
        "tiny_step_s": round(step_time(False), 4),
        "tiny_step_sface_id_s": round(step_time(True), 4),
    }, indent=2))


if __name__ == "__main__":
    main()
