"""What the ComfyUI/A1111 export loses, measured: sampling with K bins (and the one-vector export)
against the full mapper, same prompts and seeds, in the project's own pipeline.

    python benchmarks/export_fidelity.py tiny    # a tiny concept (random weights: pixels only)
    python benchmarks/export_fidelity.py world   # the world model's held-out person (world I-Pre and T-Sim too)

Writes benchmarks/results/export-fidelity-<model>.json and the README's table between its
`export-fidelity` markers.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of S* on a beach", "a photo of S* wearing a red hat", "a sketch of S*",
           "a painting of S* in a city"]


def concept_for(model: str, work: Path):
    from personamagic.jobs.personalize import personalize
    from personamagic.training import TrainConfig

    if model == "tiny":
        return personalize([str(ROOT / "tests/data/astronaut.png")], work / "c", TrainConfig(max_train_steps=30),
                           model="tiny").concept
    photo = ROOT / "examples/world/person-15838.png"
    return personalize([str(photo)], work / "c", TrainConfig(max_train_steps=300, learning_rate=float(
        sys.argv[2]) if len(sys.argv) > 2 else 5e-5), model="world").concept


def main(model: str) -> int:
    from PIL import Image

    from personamagic.evaluation.export_fidelity import export_fidelity, fidelity_markdown
    from personamagic.models import load_base_model

    score = None
    if model == "world":
        from personamagic.world import world_judge_path
        from personamagic.world.judge import load_judge
        from personamagic.world.metrics import world_i_pre, world_t_sim

        judge = load_judge(world_judge_path())
        photo = Image.open(ROOT / "examples/world/person-15838.png")

        def score(images, prompts):
            return {"world I-Pre": float(sum(world_i_pre(judge, images, photo)) / len(images)),
                    "world T-Sim": float(sum(world_t_sim(judge, images, prompts)) / len(images))}

    with tempfile.TemporaryDirectory() as work:
        concept = concept_for(model, Path(work))
    report = export_fidelity(load_base_model(model), concept, PROMPTS, seeds=4 if model == "world" else 2,
                             score=score)
    out = ROOT / "benchmarks" / "results" / f"export-fidelity-{model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = fidelity_markdown(report, {"tiny": "tiny (random weights)", "world": "the world model"}[model])
    readme = ROOT / "README.md"
    marker = f"export-fidelity-{model}"
    text = readme.read_text()
    block = f"<!-- {marker}:start -->\n{table}\n<!-- {marker}:end -->"
    if f"<!-- {marker}:start -->" in text:
        readme.write_text(re.sub(rf"<!-- {marker}:start -->.*<!-- {marker}:end -->", lambda _: block, text, flags=re.S))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
