"""Write the figures of `personamagic evaluate world` (and the learning test's broken runs) into
docs/world.md and the world model's card between their `figures` markers, so that no number there is
typed by hand.

    python benchmarks/world_doc.py [benchmarks/results/world-figures.json] [benchmarks/results/world-breaks.json]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from personamagic.evaluation.statistics import mean_ci  # noqa: E402

DOC = ROOT / "docs" / "world.md"
CARD = ROOT / "src" / "personamagic" / "world" / "model" / "README.md"  # the model card


def _mean_ci(values) -> str:
    """The mean ± the half-width of its 95% interval by Student's t (a handful of people: not 1.96)."""
    stat = mean_ci(values)
    return f"{stat['mean']:.3f}" if stat["ci"] is None else f"{stat['mean']:.3f} ± {stat['ci']:.3f}"


def figures_markdown(report: dict, breaks: dict | None) -> str:
    judge, vae, following, likeness = report["judge"], report["vae"], report["prompt_following"], report["likeness"]
    lines = [f"Measured {report['date']} on {report['machine']} by `personamagic evaluate world` "
             f"(`benchmarks/results/world-figures.json`).", ""]
    log = ROOT / "src/personamagic/world/model/training_log.json"
    if log.is_file():
        training = json.loads(log.read_text())
        config = training["config"]
        lines += [f"**Training** (`src/personamagic/world/model/training_log.json`): the VAE's last 100-step mean "
                  f"reconstruction MSE {training['vae'][-1][1]:.4f} after {config['vae_steps']:,} steps; the UNet and "
                  f"text encoder {config['unet_steps']:,} steps in {training['unet_seconds'] / 60:.0f} minutes, last "
                  f"100-step mean ε-MSE {training['unet'][-1][1]:.4f}.", "",
                  "![Loss curves of the VAE and the UNet](../src/personamagic/world/model/loss.png)", ""]
    same, full = judge["identity_cosine_same"], judge["identity_cosine_same_in_full_view"]
    verdict = ("meets the target of ≥ 0.85" if same >= 0.85 else
               f"misses the target of ≥ 0.85 across every context ({same:.3f}: hats hide the hair, sunglasses the "
               f"eyes, a far face is small) and meets it for faces in full view ({full:.3f})" if full >= 0.85 else
               "misses the target of ≥ 0.85")
    lines += ["**The judge** on held-out people ({} people × {} random contexts of renders):".format(
        judge["identities"], judge["contexts"]), "",
        "| pairs | identity cosine, same person | different people |", "|---|---|---|",
        f"| every context | {same:.3f} | {judge['identity_cosine_different']:.3f} |",
        f"| both faces in full view (no hat, no sunglasses, not far) | {full:.3f} | "
        f"{judge['identity_cosine_different_in_full_view']:.3f} |", "",
        f"The same-person cosine {verdict}; the different-people cosine "
        + ("is under the target of ≤ 0.3 in both. "
           if max(judge["identity_cosine_different"], judge["identity_cosine_different_in_full_view"]) <= 0.3
           else "misses the target of ≤ 0.3. ") +
        f"Lowest attribute accuracy: {min(judge['accuracy'].values()):.3f} "
        f"({min(judge['accuracy'], key=judge['accuracy'].get)}).", ""]
    rec = vae["judge_on_reconstructions"]
    lines += [f"**The VAE**: reconstruction MSE {vae['reconstruction_mse']:.4f} (pixels in [−1, 1]) on "
              f"{vae['images']} held-out renders; on reconstructions the judge's identity cosine is "
              f"{rec['identity_cosine_same']:.3f} same / {rec['identity_cosine_different']:.3f} different, its "
              f"lowest attribute accuracy {min(rec['accuracy'].values()):.3f} "
              f"({min(rec['accuracy'], key=rec['accuracy'].get)}).", ""]
    per = following["per_attribute"]
    lines += [f"**The base model follows its prompts**: context accuracy {following['context_accuracy']:.3f} on "
              f"{following['captions']} held-out captions that name every context attribute (DDIM 50, "
              "guidance 8). Per attribute:", "",
              "| " + " | ".join(per) + " |", "|" + "---|" * len(per),
              "| " + " | ".join(f"{v:.2f}" for v in per.values()) + " |", "",
              "![Base model samples of held-out captions](images/world-base.png)", ""]
    people = likeness["people"]
    options = likeness.get("train_options") or {}
    lr = options.get("learning_rate", 5e-5)
    window = options.get("stage_window")
    stage = f"the fixed window {window[0]}–{window[1]}" if window else "the automatic partition after a 100-step warm-up"
    lines += [f"**A held-out person from one photo** ({len(people)} people, {likeness['steps']} training steps "
              f"each, learning rate {lr:g} (the paper: 5e-5 for 1,000 steps), the paper's other defaults — batch 2, "
              f"{stage}; 10 editing prompts × {likeness['seeds']} seeds; mean ± 95% CI over people, by Student's t):", "",
              "| prompt | world I-Pre | world T-Sim |", "|---|---|---|",
              f"| concept (`a photo of S* …`) | {_mean_ci([p['i_pre'] for p in people])} | "
              f"{_mean_ci([p['t_sim'] for p in people])} |",
              f"| supercategory (`a photo of a face …`) | {_mean_ci([p['i_pre_supercategory'] for p in people])} | "
              f"{_mean_ci([p['t_sim_supercategory'] for p in people])} |",
              f"| concept − supercategory, paired by person | "
              f"{_mean_ci([p['i_pre'] - p['i_pre_supercategory'] for p in people])} | "
              f"{_mean_ci([p['t_sim'] - p['t_sim_supercategory'] for p in people])} |", "",
              "| person | window found | I-Pre gain over the supercategory | T-Sim | training time |",
              "|---|---|---|---|---|"]
    for p in people:
        lines.append(f"| {p['identity']} | {p['stage_window'][0]} ≤ t < {p['stage_window'][1]} | "
                     f"{p['i_pre'] - p['i_pre_supercategory']:+.3f} | {p['t_sim']:.3f} | {p['train_seconds']:.0f} s |")
    lines.append("")
    lines += _emergence_markdown(people[0])
    if breaks:
        method = breaks.get("method", {})
        where = (f", measured {method['date']} on {method['machine']}" if "date" in method else "")
        lines += [f"**The learning test can fail** (`tests/test_world_learning.py`, held-out person "
                  f"{method.get('identity', '?')}, its window {_window(method)}, `PERSONAMAGIC_WORLD_BREAKS=1`"
                  f"{where}): what it reported with the method broken on purpose —", "",
                  "| run | world I-Pre | supercategory | gain | world T-Sim | verdict |", "|---|---|---|---|---|---|"]
        for name, run in breaks.items():
            gain = run["i_pre"] - run["i_pre_supercategory"]
            lines.append(f"| {name} | {run['i_pre']:.3f} | {run['i_pre_supercategory']:.3f} | {gain:+.3f} | "
                         f"{run['t_sim']:.3f} | {run.get('verdict', '')} |")
        lines.append("")
    return "\n".join(lines)


def _window(run: dict) -> str:
    window = run.get("stage_window")
    return f"{window[0]} ≤ t < {window[1]}" if window else "?"


def emergence_point(run: dict) -> int | None:
    """The first timestep of the sampler (from T down) at which S*'s x̂0 is at least half of the way
    from the supercategory's to S*'s final I-Pre: where the concept's identity is painted in."""
    concept, plain = run["emergence"]["S*"], run["emergence"]["a face"]
    gain = [c - p for c, p in zip(concept["i_pre"], plain["i_pre"])]
    if gain[-1] <= 0:
        return None
    return next(t for t, g in zip(concept["timesteps"], gain) if g >= gain[-1] / 2)


def _emergence_markdown(run: dict) -> list[str]:
    if not run.get("emergence"):
        return []
    t_lo, t_hi = run["stage_window"]
    t = emergence_point(run)
    where = ("never: S*'s final image is no closer to the photo than the supercategory's" if t is None else
             f"at t = {t}, " + ("inside the dynamic stage" if t_lo <= t < t_hi else
                                "before the dynamic stage (in static 1)" if t >= t_hi else
                                "after the dynamic stage (in static 2)"))
    return [f"**The automatic partition on the world model** (person {run['identity']}): the IoU of S*'s "
            f"attention with the face mask over the timesteps gave the dynamic stage {t_lo} ≤ t < {t_hi}. "
            "To see whether that is where the identity is painted in, the sampler's prediction of the clean "
            "image (x̂0) is decoded at every DDIM step and scored against the photo, for S* and for \"a face\" "
            f"({run['emergence']['S*']['seeds']} seeds): S*'s lead reaches half of its final value {where}.", "",
            "![The partition's IoU curve and stages, with world I-Pre of x̂0 over the steps](images/world-stages.png)",
            ""]


def card_markdown(report: dict) -> str:
    """The quality figures of the model card: the few a user of the model asks first."""
    judge, following, people = report["judge"], report["prompt_following"], report["likeness"]["people"]
    gain = _mean_ci([p["i_pre"] - p["i_pre_supercategory"] for p in people])
    return "\n".join([
        f"Measured {report['date']} on {report['machine']} (`personamagic evaluate world`; details in docs/world.md):",
        "",
        f"- prompt-following: context accuracy {following['context_accuracy']:.3f} on {following['captions']} "
        "held-out captions (DDIM 50, guidance 8);",
        f"- a held-out person from one photo ({len(people)} people, {report['likeness']['steps']} steps): world I-Pre "
        f"{gain} above the supercategory prompt's, world T-Sim "
        f"{_mean_ci([p['t_sim'] for p in people])} (mean ± 95% CI over people);",
        f"- the judge that scores them: identity cosine {judge['identity_cosine_same']:.3f} same person "
        f"({judge['identity_cosine_same_in_full_view']:.3f} in full view), "
        f"{judge['identity_cosine_different']:.3f} different people.",
    ])


def _replace_block(path: Path, block: str) -> None:
    text = path.read_text()
    if "<!-- figures:start -->" not in text:
        raise SystemExit(f"{path} has no <!-- figures:start --> marker")
    block = "<!-- figures:start -->\n" + block + "\n<!-- figures:end -->"
    path.write_text(re.sub(r"<!-- figures:start -->.*<!-- figures:end -->", lambda _: block, text, flags=re.S))
    print(f"updated {path}")


def main(argv: list[str]) -> int:
    report = json.loads(Path(argv[0] if argv else ROOT / "benchmarks/results/world-figures.json").read_text())
    breaks_path = Path(argv[1]) if len(argv) > 1 else ROOT / "benchmarks/results/world-breaks.json"
    breaks = json.loads(breaks_path.read_text()) if breaks_path.is_file() else None
    _replace_block(DOC, figures_markdown(report, breaks))
    _replace_block(CARD, card_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
