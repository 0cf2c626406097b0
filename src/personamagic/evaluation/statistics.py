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



def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with a whole number `df` of degrees of freedom, by the finite series of
    Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df), with θ = atan(t/√df)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/π)(θ + sinθ·cosθ·(1 + 2/3·cos²θ + 2·4/(3·5)·cos⁴θ + …)), df − 2 powers of cosθ in all
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c2
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sinθ·(1 + 1/2·cos²θ + 1·3/(2·4)·cos⁴θ + …)
    for k in range(1, df // 2):
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return s * total


def student_t_quantile(level: float, df: int) -> float:
    """The t with P(|T| < t) = `level` (0.95: the 97.5% quantile) for `df` degrees of freedom, by bisection."""
    if not 0 < level < 1 or not isinstance(df, int) or df < 1:
        raise ValueError(f"need 0 < level < 1 and a whole df >= 1, got level={level}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Iterable[float], level: float = 0.95) -> dict:
    """{"mean", "ci", "n"}: the mean and the half-width of its `level` confidence interval by Student's t
    (sample standard deviation, ddof 1); ci is None for fewer than two values."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "ci": None, "n": 0}
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "ci": None, "n": 1}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return {"mean": mean, "ci": student_t_quantile(level, len(values) - 1) * sd / math.sqrt(len(values)),
            "n": len(values)}
