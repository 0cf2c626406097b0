"""Rehearse the GPU benchmark's code paths at Stable Diffusion 1.x sizes on a CPU, once each.

GPU time is scarce; this runs, at the real sizes (random weights, fp32), what `benchmarks/gpu.sh`
will time: the optimised and the plain training step (losses, backward), the text conditioning of a
50-step run step by step and at once, and a 2-step sampling run. About 6 minutes on 2 cores, 6 GB of
memory. It checks that everything is finite; its timings are CPU ones.

    python benchmarks/rehearse_sd1_cpu.py
"""

import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from personamagic.cli.bench_run import Setup, draw_photo, time_conditioning
from personamagic.models import RANDOM_SD1
from personamagic.pipeline import PersonaMagicPipeline
from personamagic.training import TrainConfig


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        rehearse(Path(folder))


def rehearse(folder: Path) -> None:
    start = time.perf_counter()
    config = TrainConfig(stage_window=(400, 800), max_train_steps=10, seed=0)
    setup = Setup(torch.device("cpu"), torch.float32, RANDOM_SD1, draw_photo(folder / "photo.png"), config, folder)
    print(f"models built in {time.perf_counter() - start:.0f} s")
    concept = None
    for name, cfg in (("optimised", config), ("plain", replace(config, optimize=False))):
        start = time.perf_counter()
        with setup.trainer(cfg) as trainer:
            out = trainer.losses(trainer.sample_batch())
            out.total.backward()
            terms = {k: v.item() for k, v in out.terms.items()}
            grad = torch.cat([p.grad.flatten() for p in trainer.mapper.parameters()])
            if not (all(math.isfinite(v) for v in terms.values()) and torch.isfinite(grad).all()):
                raise SystemExit(f"{name} step is not finite: {terms}")
            patch = trainer.id_patches[1] if trainer.id_patches is not None else "full image"
            print(f"{name} step: {terms}, mapper grad norm {grad.norm():.4f}, ID decode {patch}, "
                  f"{time.perf_counter() - start:.0f} s")
            concept = concept or trainer.concept(RANDOM_SD1)
    print(f"text conditioning of 50 steps, 1 image: {time_conditioning(setup, concept, [1], 50)[1]}")
    pipe = PersonaMagicPipeline.from_base(setup.base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(concept)
    start = time.perf_counter()
    images = pipe("a photo of S* as an astronaut", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    if not torch.isfinite(images).all():
        raise SystemExit("sampling is not finite")
    print(f"2-step sampling: {tuple(images.shape)}, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
