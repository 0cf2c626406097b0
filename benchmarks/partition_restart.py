"""Restart or continue the mapper after the partition warm-up? Measured on the tiny model (CPU).

Both variants run the same warm-up (100 full-schedule steps) and the same automatic partition, then
train in the found window; we compare the masked denoising loss on 32 fixed held-out (t, noise) draws
inside the window (lower is better) after 25, 50 and 100 main steps, over three seeds, at a learning
rate high enough to move the tiny model (3e-3; at the paper's 5e-5 the tiny model hardly changes in
100 steps, so both variants coincide). Writes benchmarks/results/partition_restart.json.

    python benchmarks/partition_restart.py
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from personamagic.faces import prepare_photo
from personamagic.identity import alignment_theta, build_tiny_identity_model
from personamagic.faces.masks import landmark_mask
from personamagic.models import build_tiny_components
from personamagic.jobs.personalize import pil_to_tensor
from personamagic.training import Trainer, TrainConfig, prepare_training_data

PHOTO = Path(__file__).parent.parent / "tests" / "data" / "astronaut.png"
CHECKPOINTS = (25, 50, 100)
LEARNING_RATE = 3e-3


def held_out_loss(trainer: Trainer, seed: int = 1234, count: int = 32) -> float:
    lo, hi = trainer.stage_window
    g = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(lo, hi, (count,), generator=g)
    noise = torch.randn(count, 4, 16, 16, generator=g)
    return trainer.masked_denoising_loss(timesteps, noise)


def run(restart: bool, learning_rate: float, seed: int) -> dict:
    base = build_tiny_components()
    photo = prepare_photo(PHOTO, base.resolution)
    encoder = build_tiny_identity_model()
    theta = alignment_theta(photo.face.landmarks, (base.resolution,) * 2, landmarks_order="yunet")[None]
    data = prepare_training_data(
        base.vae,
        pil_to_tensor(photo.image)[None],
        torch.from_numpy(landmark_mask(photo.face, base.resolution))[None, None],
        torch.randn(1, 16, generator=torch.Generator().manual_seed(0)),
        theta,
        encoder,
    )
    config = replace(TrainConfig(), learning_rate=learning_rate, seed=seed, restart_after_partition=restart,
                     max_train_steps=max(CHECKPOINTS))
    losses = {}
    with Trainer(base, data, config, encoder) as trainer:
        trainer.find_stage_window()
        losses[0] = held_out_loss(trainer)
        for steps in CHECKPOINTS:
            trainer.train(num_steps=steps)
            losses[steps] = held_out_loss(trainer)
    return {"window": list(trainer.stage_window), "held_out_masked_mse": losses}


def main() -> None:
    torch.set_num_threads(2)
    started = time.time()
    rows = []
    for seed in (0, 1, 2):
        for restart in (True, False):
            result = run(restart, LEARNING_RATE, seed)
            rows.append({"learning_rate": LEARNING_RATE, "seed": seed, "restart": restart, **result})
            print(rows[-1], flush=True)
    summary = {}
    for restart in (True, False):
        picked = [r for r in rows if r["restart"] == restart]
        summary["restart" if restart else "continue"] = {
            steps: sum(r["held_out_masked_mse"][steps] for r in picked) / len(picked) for steps in (0, *CHECKPOINTS)
        }
    out = {
        "what": "held-out masked MSE in the found window (lower is better) after N main steps, mean over "
                "seeds 0-2; tiny model, CPU, lr 3e-3, 100 warm-up steps",
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - started, 1),
        "summary": summary,
        "runs": rows,
    }
    path = Path(__file__).parent / "results" / "partition_restart.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    for key, values in summary.items():
        print(key, {k: round(v, 4) for k, v in values.items()})


if __name__ == "__main__":
    main()
