"""Write the `world` study's report into docs/evaluation.md between its `world-study` markers, so that no
number there is typed by hand: the per-method table (means over people with 95% confidence intervals,
the stage windows, training time), the paper's claims as paired differences over the same people, and
the study's cost.

    personamagic evaluate run world --output runs/world
    cp runs/world/summary.json benchmarks/results/world-study.json
    cp runs/world/pareto.png docs/images/world-pareto.png
    python benchmarks/world_study_doc.py [benchmarks/results/world-study.json ...]

Several reports (the one-shot study, the few-shot variant, the λ grid) are written one after the other;
with no argument, every committed one of `STUDIES`.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from personamagic.evaluation.report import identity_table  # noqa: E402
from personamagic.evaluation.statistics import mean_ci, student_t_quantile  # noqa: E402

DOC = ROOT / "docs" / "evaluation.md"
START, END = "<!-- world-study:start -->", "<!-- world-study:end -->"
STUDIES = ("world-study", "world-few-shot-study", "world-table2-study")  # in the order the doc shows them

# (claim, method A, method B): the paper says A is ahead of B; measured as A − B per person.
CLAIMS = [
    ("Table 6: ahead of NeTI-like dynamic embeddings (no stages)", "personamagic", "no stages (vanilla)"),
    ("Table 6: ahead of textual inversion", "personamagic", "textual-inversion"),
    ("the automatic partition ahead of the fixed 400–800 window", "personamagic", "personamagic 400-800"),
    ("Table 1: the tandem-equilibrium loss helps", "personamagic", "w/o TE loss"),
    ("Table 1: the identity loss helps", "personamagic", "w/o identity loss"),
    ("the value residual helps", "personamagic", "w/o residual"),
    ("a likeness at all: ahead of the supercategory word", "personamagic", "supercategory"),
    ("what the textual-inversion export keeps", "textual-inversion-export", "personamagic"),
    ("against the person said in words", "personamagic", "attributes"),
    ("words carry some of the person", "attributes", "supercategory"),
]


def paired(rows: dict, a: str, b: str, metric: str) -> dict | None:
    """Mean and 95% CI over people of A − B (the people both methods were measured on)."""
    if a not in rows or b not in rows:
        return None
    pa, pb = rows[a]["per_identity"]["people"], rows[b]["per_identity"]["people"]
    people = sorted(set(pa) & set(pb))
    return mean_ci(pa[p][metric] - pb[p][metric] for p in people) if people else None


def verdict(stat: dict | None) -> str:
    if stat is None or stat["mean"] is None:
        return "not measured"
    if stat["ci"] is None:
        return "one person: no interval"
    if stat["mean"] == 0 and stat["ci"] == 0:
        return "equal"
    if stat["mean"] - stat["ci"] > 0:
        return "ahead"
    if stat["mean"] + stat["ci"] < 0:
        return "behind"
    return "not resolved"


def _diff(stat: dict | None) -> str:
    if stat is None or stat["mean"] is None:
        return "–"
    return f"{stat['mean']:+.3f}" + ("" if stat["ci"] is None else f" ± {stat['ci']:.3f}")


def people_needed(stat: dict | None) -> str:
    """How many people the interval would need to exclude 0 at the measured mean and spread (normal
    approximation: n = (1.96·sd / mean)²); "–" where it already does or nothing was measured."""
    if stat is None or stat["mean"] is None or stat["ci"] is None or verdict(stat) != "not resolved":
        return "–"
    sd = stat["ci"] / student_t_quantile(0.95, stat["n"] - 1) * math.sqrt(stat["n"])
    return "no number" if stat["mean"] == 0 else str(math.ceil((1.96 * sd / abs(stat["mean"])) ** 2))


def claims_table(summary: dict, dataset: str) -> str:
    rows = {r["method"]: r for r in summary["rows"] if r["dataset"] == dataset}
    lines = ["| claim | A − B | world I-Pre: A − B | world T-Sim: A − B | I-Pre | T-Sim | people to resolve (I-Pre / T-Sim) |",
             "|---|---|---|---|---|---|---|"]
    for claim, a, b in CLAIMS:
        i_pre, t_sim = paired(rows, a, b, "i_pre"), paired(rows, a, b, "t_sim")
        lines.append(f"| {claim} | {a} − {b} | {_diff(i_pre)} | {_diff(t_sim)} | {verdict(i_pre)} | {verdict(t_sim)} | "
                     f"{people_needed(i_pre)} / {people_needed(t_sim)} |")
    return "\n".join(lines) + "\n"


def study_markdown(summary: dict, name: str, pareto: str | None) -> str:
    cost = summary["cost"]
    settings = summary.get("settings", {})
    datasets = list(dict.fromkeys(r["dataset"] for r in summary["rows"]))
    text = [f"#### {', '.join(datasets)} (`{name}`)", ""]
    if settings:
        train = settings["train"]
        text += [f"{settings['people']} held-out people, {settings['prompts']} editing prompts × "
                 f"{len(summary['seeds'])} seeds, {train.get('max_train_steps')} training steps at learning rate "
                 f"{train.get('learning_rate')}, {settings['scheduler'].upper()} {settings['sampling_steps']} steps "
                 f"with guidance {settings['guidance_scale']:g}; measured {settings['date']} on "
                 f"{settings['machine']}.", ""]
    typical = sum(statistics.median(times) * len(times) for times in cost.get("unit_s", {}).values())
    text += [identity_table(summary["rows"], "world"),
             f"Cost on that machine: training {cost['train_s'] / 60:.1f} min, generation "
             f"{cost['generate_s'] / 60:.1f} min, scoring {cost['score_s'] / 60:.1f} min; the whole study "
             f"{cost['span_s'] / 60:.1f} min of wall-clock time to its last record"
             + (f"; every unit at its method's median unit time (which a few slow units do not move) "
                f"{typical / 60:.1f} min" if typical else "") + ".", ""]
    for dataset in datasets:
        text += [f"The paper's claims as paired differences over the same people ({dataset}; ahead / behind: "
                 "the 95% interval excludes 0):", "", claims_table(summary, dataset)]
    if pareto:
        text += [f"![world T-Sim against world I-Pre per method]({pareto})", ""]
    return "\n".join(text)


RERUNS = {"world-study": "world-study-rerun"}  # a committed study and its second run, from a fresh clone


def rerun_markdown(first: dict, second: dict, name: str) -> str:
    """The study run twice: each method's means over people in the second run against the first run's
    95% intervals, so that a reader sees what "reproduces within its CIs" amounts to."""
    rows = {(r["dataset"], r["method"]): r["per_identity"] for r in first["rows"]}
    lines = [f"**Run again** (`{name}`, measured {second['settings']['date']} on {second['settings']['machine']}, "
             "from a fresh clone): each method's means over people against the first run's mean ± 95% CI.", "",
             "| method | world I-Pre, first run | second run | within? | world T-Sim, first run | second run | within? |",
             "|---|---|---|---|---|---|---|"]
    inside = total = 0
    for row in second["rows"]:
        before = rows.get((row["dataset"], row["method"]))
        if before is None:
            continue
        cells = []
        for metric in ("i_pre", "t_sim"):
            a, b = before[metric], row["per_identity"][metric]
            within = a["ci"] is not None and abs(b["mean"] - a["mean"]) <= a["ci"]
            inside, total = inside + within, total + 1
            cells += [f"{a['mean']:.3f} ± {a['ci']:.3f}" if a["ci"] is not None else f"{a['mean']:.3f}",
                      f"{b['mean']:.3f}", "yes" if within else "**no**"]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    same = sum(1 for r in second["rows"] for p, v in r["per_identity"]["people"].items()
               if rows.get((r["dataset"], r["method"])) and
               rows[(r["dataset"], r["method"])]["people"].get(p) == v)
    units = sum(len(r["per_identity"]["people"]) for r in second["rows"])
    lines += ["", f"{inside} of {total} means fall within the first run's intervals; {same} of {units} "
              "(method, person) results are identical to the first run's to the last digit.", ""]
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    # by default every committed study report, so that a plain run keeps each section
    paths = paths or [str(ROOT / f"benchmarks/results/{name}.json") for name in STUDIES
                      if (ROOT / f"benchmarks/results/{name}.json").is_file()]
    parts = []
    for path in paths:
        summary = json.loads(Path(path).read_text())
        name = Path(path).stem
        pareto = ROOT / "docs" / "images" / f"{name.replace('-study', '-pareto')}.png"
        parts.append(study_markdown(summary, name, f"images/{pareto.name}" if pareto.is_file() else None))
        rerun = Path(path).with_name(f"{RERUNS.get(name, '')}.json")
        if name in RERUNS and rerun.is_file():
            parts.append(rerun_markdown(summary, json.loads(rerun.read_text()), rerun.stem))
    doc = DOC.read_text()
    block = f"{START}\n" + "\n".join(parts) + f"\n{END}"
    if START not in doc:
        raise SystemExit(f"{DOC} has no {START} marker")
    DOC.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S))
    print(f"wrote {len(paths)} report(s) into {DOC}")


if __name__ == "__main__":
    main(sys.argv[1:])
