"""What exporting a concept to ComfyUI or A1111 costs, measured in the project's own pipeline: the
same prompts and seeds sampled with the full mapper, and with exactly what each export describes
(`stage_export.piecewise_concept`: K bins of the dynamic stage, or the one-vector textual inversion),
the value residual gone in every export. Reported: the mean absolute pixel difference to the full
mapper (0–255), and, on the world model, world I-Pre and T-Sim of each.
"""

from __future__ import annotations

import numpy as np
import torch

BINS = (1, 2, 4, 8)


def _images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                output_type="np").images  # (B, H, W, 3) in [0, 1]


def export_fidelity(base, concept, prompts: list[str], seeds: int = 2, steps: int = 50, guidance_scale: float = 8.0,
                    bins=BINS, score=None) -> dict:
    """{variant: {"pixel_difference": …, **score(images, prompts)}} for the full mapper, the mapper
    without its residual, K bins for each K in `bins`, and the one-vector export. `prompts` say the
    concept's placeholder; `score(pil_images, prompts)`: extra metrics (the world's), or None."""
    from ..pipeline import PersonaMagicPipeline
    from ..stage_export import piecewise_concept, stage_segments, static_segment, without_residual

    all_prompts = [p for p in prompts for _ in range(seeds)]
    all_seeds = [i % seeds for i in range(len(all_prompts))]
    variants = {"full mapper": None, "mapper, no residual": "no residual"}
    variants.update({f"{k} bin{'s' * (k > 1)}": stage_segments(concept, k) for k in bins})
    variants["one vector (textual inversion)"] = static_segment(concept)
    results, reference = {}, None
    for name, segments in variants.items():
        pipe = PersonaMagicPipeline.from_base(base)
        pipe.set_progress_bar_config(disable=True)
        loaded = pipe.load_concept(concept)
        if segments == "no residual":
            without_residual(loaded)
        elif segments is not None:
            piecewise_concept(loaded, segments)
        images = _images(pipe, all_prompts, all_seeds, steps, guidance_scale)
        reference = images if reference is None else reference
        row = {"pixel_difference": float(np.abs(images - reference).mean() * 255)}
        if score is not None:
            from PIL import Image

            row.update(score([Image.fromarray((im * 255).round().astype(np.uint8)) for im in images], all_prompts))
        results[name] = row
    return {"prompts": prompts, "seeds": seeds, "steps": steps, "guidance_scale": guidance_scale,
            "window": list(concept.window), "variants": results}


def fidelity_markdown(report: dict, model: str) -> str:
    """The report as a markdown table."""
    rows = report["variants"]
    extra = [k for k in next(iter(rows.values())) if k != "pixel_difference"]
    head = "| export | mean pixel difference to the full mapper (0–255) | " + " | ".join(extra) + " |"
    lines = [head.replace(" |  |", " |"), "|---" * (2 + len(extra)) + "|"]
    for name, row in rows.items():
        cells = [f"{row['pixel_difference']:.2f}"] + [f"{row[k]:.3f}" for k in extra]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return (f"*{model}, dynamic stage {report['window'][0]} ≤ t < {report['window'][1]}, "
            f"{len(report['prompts'])} prompts × {report['seeds']} seeds, DDIM {report['steps']}, CFG "
            f"{report['guidance_scale']:g}:*\n\n" + "\n".join(lines))
