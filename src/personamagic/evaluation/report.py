"""The study's report: a summary table (markdown + JSON) and a Pareto plot of T-Sim vs I-Pre.

Rows are (dataset, method). Only records of the current plan count (a changed setting makes new item
ids, so stale results never mix in); an item recorded twice (e.g. by two launches) counts once.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .images import CONVENTIONS_NOTE, write_json
from .paper_points import PAPER, TABLE6, paper_dataset, paper_value
from .statistics import NO_FACE_CONVENTIONS, mean_ci, mean_std, summarize

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
PARETO_PNG = "pareto.png"

TEXT_LABELS = {
    "clip_s": "T-Sim: CLIP-S = 2.5·max(cos, 0) (Hessel et al.; the paper's scale)",
    "t_sim": "T-Sim: raw CLIP cosine",
}
WORLD_LABELS = ("world T-Sim: share of the prompt's context the judge reads",
                "world I-Pre: the judge's identity cosine to the photo")
IDENTITY_LABELS = {"paper": "I-Pre (no face = −1, the paper's rule)", "zero": "I-Pre (no face = 0)",
                   "excluded": "I-Pre (faces found only)"}


def summary_rows(config, plan, records: list[dict]) -> list[dict]:
    """One row per (dataset, method) with the statistics of its finished items."""
    item_ids = plan.item_ids
    unit_ids = {u.unit_id for u in plan.units}
    images, seen = defaultdict(list), set()
    for record in records:
        if record.get("type") == "image" and record["item"] in item_ids and record["item"] not in seen:
            seen.add(record["item"])
            images[(record["dataset"], record["method"])].append(record)
    train_s, windows = defaultdict(dict), defaultdict(dict)
    failed = defaultdict(set)
    for record in records:
        if record.get("unit") not in unit_ids:
            continue
        key = (record["dataset"], record["method"])
        if record.get("type") == "train" and record.get("train_s") is not None:
            train_s[key].setdefault(record["unit"], record["train_s"])
        if record.get("type") == "train" and record.get("stage_window") is not None:
            windows[key].setdefault(record["unit"], record["stage_window"])
        elif record.get("type") == "failed":
            failed[key].add(record["unit"])
    planned_units = defaultdict(int)
    for unit in plan.units:
        planned_units[(unit.dataset, unit.method)] += 1

    rows = []
    for dataset in config.datasets:
        reference = dataset.paper or paper_dataset(dataset.name)
        for method in config.methods:
            key = (dataset.name, method.name)
            rows_images = images[key]
            concepts = {r["unit"] for r in rows_images}
            generate_s = [r["generate_s"] for r in rows_images if r.get("generate_s") is not None]
            score_s = [r["score_s"] for r in rows_images if r.get("score_s") is not None]
            paper = _paper_point(method.paper_row, reference)
            rows.append({
                "dataset": dataset.name,
                "method": method.name,
                "preset": method.preset,
                "planned_concepts": planned_units[key],
                "concepts": len(concepts),
                "failed_concepts": len(failed[key] - concepts),
                "planned_images": planned_units[key] * len(config.prompts) * len(config.seeds),
                **summarize(rows_images),
                "per_identity": per_identity(rows_images),
                "stage_windows": [windows[key][u] for u in sorted(windows[key])],
                "train_s_per_concept": mean_std(train_s[key].values()),
                "generate_s_per_image": mean_std(generate_s),
                "wall_s": math.fsum([*train_s[key].values(), *generate_s, *score_s]),
                "paper": paper,
            })
    return rows


def per_identity(records: list[dict]) -> dict:
    """Each person's mean over their images (every repeat and prompt; under "people"), then the mean over
    people and its 95% confidence interval (Student's t): the spread that says whether two methods
    differ, as the people, not the images, are the sample. I-Pre with no face = 0."""
    people = defaultdict(list)
    for record in records:
        people[record["identity"]].append(record)
    means = {person: {"t_sim": math.fsum(r["t_sim"] for r in rs) / len(rs),
                      "i_pre": math.fsum(float(r["i_pre"]) if r["face_found"] else 0.0 for r in rs) / len(rs)}
             for person, rs in sorted(people.items())}
    return {"identities": len(people), "t_sim": mean_ci(m["t_sim"] for m in means.values()),
            "i_pre": mean_ci(m["i_pre"] for m in means.values()), "people": means}


def _paper_point(row: tuple | None, dataset: str | None) -> dict | None:
    if row is None:
        return None
    table, name = row
    value = paper_value(table, dataset, name)
    if value is None:
        return None
    return {"table": table, "row": list(name) if isinstance(name, tuple) else name, "dataset": dataset,
            "t_sim": value[0], "i_pre": value[1], "source": PAPER}


def write_report(output: Path, config, plan, records: list[dict]) -> dict:
    """Write summary.json, summary.md and pareto.png into `output`; return their paths."""
    rows = summary_rows(config, plan, records)
    done = sum(row["images"] for row in rows)
    total = sum(len(items) for items in plan.items.values())
    summary = {
        "complete": done == total,
        "images_done": done,
        "images_planned": total,
        "model": config.model,
        "clip_model": config.clip_model,
        "face_model": config.face_model,
        "face_detector": "yunet-2023mar-int8",
        "prompts": len(config.prompts),
        "seeds": list(config.seeds),
        "conventions": {name: CONVENTIONS_NOTE[name] for name in NO_FACE_CONVENTIONS},
        "text_scales": {"t_sim": "raw cosine", "t_sim_100": "100·cos (torchmetrics)",
                        "clip_s": "2.5·max(cos, 0) (Hessel et al. 2021; the paper's scale)"},
        "std": "population standard deviation over images (ddof 0)",
        "wall_s": "seconds of training + generation + scoring of a row, summed over the processes that did them",
        "rows": rows,
        "cost": study_cost(plan, records),
        "settings": study_settings(config, plan),
    }
    paths = {"json": output / SUMMARY_JSON, "markdown": output / SUMMARY_MD, "plot": output / PARETO_PNG}
    write_json(paths["json"], summary)
    markdown = markdown_summary(summary)
    write_text(paths["markdown"], markdown)
    pareto_plot(rows, paths["plot"], text_metric=config.plot_text_metric,
                identity_convention=config.plot_identity_convention,
                datasets=[(d.name, d.paper or paper_dataset(d.name)) for d in config.datasets],
                world=config.clip_model == "world")
    return {name: str(path) for name, path in paths.items()}


def machine_description() -> str:
    """Where a figure was measured: the CPU's model and cores, torch's thread count (a study's training
    runs can come out differently with another CPU model or thread count: float sums are taken in
    another order), and the GPU when there is one."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def study_settings(config, plan) -> dict:
    """What a reader needs to know to compare the report with another: when and where, how many people,
    the study-wide training and sampling settings."""
    import datetime

    sampling = config.generate_config("-")
    return {"date": datetime.date.today().isoformat(), "machine": machine_description(),
            "people": len({(u.dataset, u.identity) for u in plan.units}), "prompts": len(config.prompts),
            "train": dict(config.train), "sampling_steps": sampling.num_inference_steps,
            "guidance_scale": sampling.guidance_scale, "scheduler": sampling.scheduler}


def study_cost(plan, records: list[dict]) -> dict:
    """What the study's finished work took: seconds of training, generation and scoring summed over
    every process, the wall-clock span from the first start of a process (or the first record) to the
    last record of the current plan (idle time between runs included), and each
    method's units' own seconds (training + generation + scoring: `unit_s`)."""
    unit_ids = {u.unit_id for u in plan.units}
    mine = [r for r in records if r.get("unit") in unit_ids]
    train = {r["unit"]: r["train_s"] for r in mine if r.get("type") == "train" and r.get("train_s") is not None}
    images = {r["item"]: r for r in mine if r.get("type") == "image"}
    times = [r["time"] for r in mine + [r for r in records if r.get("type") == "start"] if r.get("time") is not None]
    unit_s = defaultdict(float)  # training + generation + scoring of each unit
    for unit, seconds in train.items():
        unit_s[unit] += seconds
    for r in images.values():
        unit_s[r["unit"]] += (r.get("generate_s") or 0.0) + (r.get("score_s") or 0.0)
    methods = {u.unit_id: u.method for u in plan.units}
    per_method = defaultdict(list)
    for unit, seconds in sorted(unit_s.items()):
        per_method[methods[unit]].append(seconds)
    return {"train_s": math.fsum(train.values()),
            "generate_s": math.fsum(r.get("generate_s") or 0.0 for r in images.values()),
            "score_s": math.fsum(r.get("score_s") or 0.0 for r in images.values()),
            "span_s": max(times) - min(times) if times else 0.0,
            "unit_s": dict(per_method)}


def write_text(path: Path, text: str) -> None:
    """Write text atomically."""
    from ..files import write_atomic

    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fmt(stat: dict, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _seconds(stat: dict) -> str:
    return "–" if not stat or stat.get("mean") is None else f"{stat['mean']:.1f}"


def markdown_table(rows: list[dict]) -> str:
    """The summary table: one line per (dataset, method)."""
    columns = ["dataset", "method", "concepts", "images", "T-Sim (cos)", "T-Sim (CLIP-S)", "I-Pre (−1)", "I-Pre (0)",
               "I-Pre (excl.)", "faces found", "train s/concept", "gen s/image", "wall s", "paper T-Sim / I-Pre"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        concepts = f"{row['concepts']}/{row['planned_concepts']}"
        if row["failed_concepts"]:
            concepts += f" ({row['failed_concepts']} failed)"
        rate = row["face_detection_rate"]
        paper = row["paper"]
        cells = [
            row["dataset"],
            row["method"],
            concepts,
            f"{row['images']}/{row['planned_images']}",
            _fmt(row["t_sim"]),
            _fmt(row["clip_s"]),
            *(_fmt(row["i_pre"][name]) for name in ("paper", "zero", "excluded")),
            "–" if rate is None else f"{100 * rate:.1f}%",
            _seconds(row["train_s_per_concept"]),
            _seconds(row["generate_s_per_image"]),
            f"{row['wall_s']:.0f}",
            "–" if paper is None else f"{paper['t_sim']:.3f} / {paper['i_pre']:.3f} ({paper['table']})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ci(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.3f}" + ("" if stat["ci"] is None else f" ± {stat['ci']:.3f}")


def _windows(windows: list) -> str:
    counts = defaultdict(int)
    for lo, hi in windows:
        counts[f"{lo}–{hi}"] += 1
    return ", ".join(f"{w} ×{n}" if n > 1 else w for w, n in counts.items()) or "–"


def identity_table(rows: list[dict], metrics: str = "real") -> str:
    """Means over people with 95% confidence intervals, the stage windows the runs used and training
    time: the table that compares methods."""
    text, identity = (("world T-Sim", "world I-Pre") if metrics == "world" else ("T-Sim (cos)", "I-Pre (no face = 0)"))
    columns = ["dataset", "method", "people", f"{text} (95% CI)", f"{identity} (95% CI)", "stage windows",
               "train s/concept"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        people = row["per_identity"]
        lines.append("| " + " | ".join([
            row["dataset"], row["method"], str(people["identities"]), _ci(people["t_sim"]), _ci(people["i_pre"]),
            _windows(row["stage_windows"]), _seconds(row["train_s_per_concept"]),
        ]) + " |")
    return "\n".join(lines) + "\n"


def markdown_summary(summary: dict) -> str:
    status = "complete" if summary["complete"] else "partial"
    world = summary["clip_model"] == "world"
    if world:
        scorers = ("the learning world's judge: world T-Sim is the share of the prompt's context attributes it "
                   "reads in the image, world I-Pre its identity cosine to the reference photo(s); every world "
                   "image shows one face, so the no-face rule is moot")
    else:
        scorers = (f"T-Sim with CLIP `{summary['clip_model']}`; I-Pre with `{summary['face_model']}` on YuNet "
                   "detections")
    cost = summary["cost"]
    return (
        f"# Evaluation summary ({status}: {summary['images_done']}/{summary['images_planned']} images)\n\n"
        f"Base model `{summary['model']}`; {scorers}.\n\n"
        f"Per person (mean over people of each person's mean; ± the 95% confidence interval, Student's t):\n\n"
        + identity_table(summary["rows"], "world" if world else "real")
        + f"\nCost: training {cost['train_s'] / 60:.1f} min, generation {cost['generate_s'] / 60:.1f} min, "
        f"scoring {cost['score_s'] / 60:.1f} min (summed over processes); first to last record "
        f"{cost['span_s'] / 60:.1f} min.\n\n"
        f"Per image (mean ± std over images, {summary['std']}); wall s: {summary['wall_s']}:\n\n"
        + markdown_table(summary["rows"])
        + "\nI-Pre conventions: " + "; ".join(f"**{k}**: {v}" for k, v in summary["conventions"].items()) + ".\n"
        + "T-Sim scales: " + "; ".join(f"**{k}**: {v}" for k, v in summary["text_scales"].items()) + ".\n"
        + f"Paper values: {PAPER}, Tables 1, 2 and 6 (SD v1.4; MTCNN + CosFace, no face = −1).\n"
    )


def _standard_error(stat: dict) -> float:
    return stat["std"] / math.sqrt(stat["n"]) if stat["n"] else 0.0


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (higher is better), by increasing x."""
    front = [p for p in points if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in points)]
    return sorted(set(front))


MARKERS = "osD^vP*Xh<>"  # one per method, so that points on top of each other stay distinguishable


def pareto_plot(rows: list[dict], path: Path, *, text_metric: str = "clip_s", identity_convention: str = "paper",
                datasets: list[tuple[str, str | None]] | None = None, world: bool = False) -> Path:
    """`pareto_figure`, written to `path` (PNG)."""
    from ..files import write_atomic

    figure = pareto_figure(rows, text_metric=text_metric, identity_convention=identity_convention, datasets=datasets,
                           world=world)
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=150))
    return path


def _point(row: dict, text_metric: str, identity_convention: str, world: bool):
    """(x, x error, y, y error) of a row: per-image means and standard errors, or (world) the means over
    people and their 95% intervals."""
    if world:
        people = row["per_identity"]
        x, y = people["t_sim"], people["i_pre"]
        return x["mean"], x["ci"] or 0.0, y["mean"], y["ci"] or 0.0
    x, y = row[text_metric] or {}, row["i_pre"][identity_convention]
    if x.get("mean") is None or y.get("mean") is None:
        return None, 0.0, None, 0.0
    return x["mean"], _standard_error(x), y["mean"], _standard_error(y)


def pareto_figure(rows: list[dict], *, text_metric: str = "clip_s", identity_convention: str = "paper",
                  datasets: list[tuple[str, str | None]] | None = None, world: bool = False):
    """T-Sim vs I-Pre per dataset (one panel each), ours filled, the paper's Table 6 hollow (Fig. 8).
    Methods whose points (nearly) coincide — CLIP-S clamps at 0, so two weak methods can share a dot —
    are named together beside the dot. `world`: the learning world's metrics, a point per method at its
    mean over people with the 95% interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = datasets or list(dict.fromkeys((r["dataset"], None) for r in rows))
    figure = Figure(figsize=(5.0 * len(datasets), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(datasets), squeeze=False)[0]
    for ax, (name, reference) in zip(axes, datasets):
        ours = []
        for row in rows:
            x, x_error, y, y_error = _point(row, text_metric, identity_convention, world)
            if row["dataset"] != name or x is None or y is None:
                continue
            ax.errorbar(x, y, xerr=x_error, yerr=y_error, fmt=MARKERS[len(ours) % len(MARKERS)], capsize=2,
                        label=row["method"])
            ours.append((x, y, row["method"]))
        if len(ours) > 1:
            front = pareto_front([(x, y) for x, y, _ in ours])
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="0.5", linewidth=0.8)
        for (x, y), methods in overlapping_points(ours).items():
            ax.annotate("overlap: " + ", ".join(methods), (x, y), textcoords="offset points", xytext=(5, -10),
                        fontsize=7, color="0.15")
        # The paper's numbers are on the CLIP-S scale with no face = −1: only comparable on those axes.
        if reference in TABLE6 and text_metric == "clip_s" and identity_convention == "paper":
            for method, (x, y) in TABLE6[reference].items():
                ax.scatter([x], [y], facecolors="none", edgecolors="0.3", marker="s")
                ax.annotate(f"{method} (paper)", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color="0.3")
        ax.set_title(name + (" (hollow: the paper's Table 6)" if reference in TABLE6 else ""), fontsize=9)
        ax.set_xlabel(WORLD_LABELS[0] if world else TEXT_LABELS[text_metric], fontsize=8)
        ax.set_ylabel(WORLD_LABELS[1] if world else IDENTITY_LABELS[identity_convention], fontsize=8)
        ax.grid(True, linewidth=0.3)
        if ours:
            ax.legend(fontsize=7, loc="best")
    if world:
        figure.suptitle("world T-Sim vs world I-Pre (higher is better; bars: 95% over people)", fontsize=9)
    else:
        figure.suptitle("T-Sim vs I-Pre (higher is better on both; error bars: standard error)", fontsize=10)
    return figure


def overlapping_points(points: list[tuple[float, float, str]], tolerance: float = 0.01) -> dict:
    """{(x, y): [methods]} for groups of two or more points closer than `tolerance` of each axis's span
    (at least 1e-3 absolute), the first point of a group naming where it is drawn."""
    if len(points) < 2:
        return {}
    spans = [max(max(p[i] for p in points) - min(p[i] for p in points), 0.1) for i in (0, 1)]
    groups: list[list] = []
    for x, y, method in points:
        for group in groups:
            gx, gy = group[0][:2]
            if abs(x - gx) <= max(tolerance * spans[0], 1e-3) and abs(y - gy) <= max(tolerance * spans[1], 1e-3):
                group.append((x, y, method))
                break
        else:
            groups.append([(x, y, method)])
    return {group[0][:2]: [m for _, _, m in group] for group in groups if len(group) > 1}
