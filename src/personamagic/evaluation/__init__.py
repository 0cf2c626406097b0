"""Evaluation of personalization: the paper's two numbers, T-Sim and I-Pre, and whole studies.

- `text_similarity`: T-Sim, CLIP similarity of prompt (placeholder -> supercategory) and image.
- `identity_preservation`: I-Pre, cosine of face-recognition embeddings (SFace by default).
- `statistics`: means and standard deviations under the three no-face conventions.
- `images`: score a folder of generated images (`personamagic evaluate images`).
- `datasets`, `presets`, `ledger`, `study`: train x generate x score studies, sharded and resumable
  (`personamagic evaluate run`).
- `report`, `paper_points`: summary tables and the Pareto plot against the paper's published points.

This package imports nothing heavy at import time, so `personamagic --help` stays instant.
"""

# Defaults shared by the CLI (which must not import torch to build its --help) and the metrics.
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"  # OpenAI CLIP ViT-B/32, as the TI / NeTI papers
DEFAULT_FACE_MODEL = "sface"  # OpenCV Zoo SFace on YuNet detections (Apache-2.0, offline)
