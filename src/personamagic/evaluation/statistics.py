"""Summary statistics of per-image scores, with I-Pre under the three no-face conventions.

Papers disagree on what an image without a detectable face scores, and the choice moves the mean a
lot, so every summary carries all three, plus the face-detection rate that explains the gaps:

| convention | an image with no face counts as | used by |
|------------|---------------------------------|---------|
| `paper`    | -1 (the cosine's minimum)       | PersonaMagic (AAAI 2025) |
| `zero`     | 0                               | FastComposer |
| `excluded` | nothing: left out of the mean   | CelebBasis (which also reports the count) |
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

# What an image without a face scores under each convention (None = left out of the mean).
NO_FACE_CONVENTIONS: dict[str, float | None] = {"paper": -1.0, "zero": 0.0, "excluded": None}


def mean_std(values: Iterable[float]) -> dict:
    """{"mean", "std", "n"}: mean and population standard deviation (ddof 0); None for no values."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = math.fsum(values) / len(values)
    variance = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return {"mean": mean, "std": math.sqrt(variance), "n": len(values)}


def identity_scores(records: Iterable[Mapping], convention: str) -> list[float]:
    """The I-Pre values of `records` (each with `face_found` and `i_pre`) under one convention."""
    if convention not in NO_FACE_CONVENTIONS:
        raise ValueError(f"unknown no-face convention {convention!r}; known: {', '.join(NO_FACE_CONVENTIONS)}")
    fill = NO_FACE_CONVENTIONS[convention]
    scores = []
    for record in records:
        if record["face_found"]:
            scores.append(float(record["i_pre"]))
        elif fill is not None:
            scores.append(fill)
    return scores


def summarize(records: Iterable[Mapping]) -> dict:
    """Means and standard deviations over images of T-Sim (three scales) and I-Pre (three conventions).

    Each record holds `t_sim` (raw cosine), `t_sim_100`, `clip_s`, `face_found` and `i_pre` (None when
    no face was found). Records without I-Pre (no reference) count in T-Sim only.
    """
    records = list(records)
    scored = [r for r in records if "face_found" in r and r["face_found"] is not None]
    found = sum(1 for r in scored if r["face_found"])
    return {
        "images": len(records),
        "t_sim": mean_std(r["t_sim"] for r in records),
        "t_sim_100": mean_std(r["t_sim_100"] for r in records),
        "clip_s": mean_std(r["clip_s"] for r in records),
        "i_pre": {name: mean_std(identity_scores(scored, name)) for name in NO_FACE_CONVENTIONS},
        "faces_found": found,
        "face_detection_rate": found / len(scored) if scored else None,
    }
