"""`personamagic train-many PHOTOS_DIR --output CONCEPTS_DIR`: one concept per identity of a folder, several
identities trained in each step.

Exit code 0 when every identity has its concept, 1 when some failed (each named on an `error:` line at
the end), 2 for a mistake that stops everything (a bad flag, a folder that mixes the two layouts).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .argtypes import positive_int
from .common import add_device_flags
from .train import add_training_arguments, model_options

EXIT_SOME_FAILED = 1


def add_parser(commands) -> None:
    many = commands.add_parser("train-many", help="learn one concept per photo (or per sub-folder) of a folder, "
                                                  "several identities per training step")
    many.add_argument("photos_dir", metavar="PHOTOS_DIR",
                      help="a folder of photos, one person each; or of sub-folders, one person each with all their "
                           "photos (not both)")
    many.add_argument("--output", "-o", required=True, metavar="CONCEPTS_DIR",
                      help="folder of concept folders, one per identity, named after its photo or sub-folder")
    many.add_argument("--identities-per-step", type=positive_int, default=1, metavar="K",
                      help="identities trained in one step (1); the same concepts for any K, K=4-8 is faster on a "
                           "large GPU (see personamagic bench), memory grows with K")
    many.add_argument("--shard", default=None, metavar="K/N",
                      help="train the K-th of N shares of the identities (0-based); default: RANK/WORLD_SIZE from "
                           "accelerate launch or torchrun, else all")
    add_training_arguments(many, mask_file=False)
    add_device_flags(many)


class IdentityProgress:
    """One tqdm bar over the steps of every identity being trained (warm-up and training together),
    growing as identities start; the latest identity's losses beside it."""

    def __init__(self):
        self.bar = None
        self.seen: set = set()

    def __call__(self, name, step, total, logs, phase) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=0, desc="training", unit="step", file=sys.stderr)
        if (name, phase) not in self.seen:
            self.seen.add((name, phase))
            self.bar.total += total - step + 1
            self.bar.refresh()
        self.bar.set_postfix({"identity": name, **{k: f"{v:.4f}" for k, v in logs.items()}}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args) -> int:
    from ..errors import Interrupted
    from ..jobs.train_many import train_many
    from .common import quiet_libraries
    from .train import train_config

    quiet_libraries(args.verbose)
    from ..shards import Shard

    shard = Shard.parse(args.shard) if args.shard is not None else Shard.from_environment()
    config = train_config(args)
    progress = IdentityProgress()
    try:
        result = train_many(args.photos_dir, args.output, config, identities_per_step=args.identities_per_step,
                            shard=shard, progress=progress, **model_options(args))
    except KeyboardInterrupt:
        progress.close()
        if not Path(args.output).is_dir():  # the run had written nothing, and removed the folder it made
            raise Interrupted("interrupted before any concept or checkpoint was written; nothing was kept") from None
        raise Interrupted("interrupted; finished concepts and checkpoints are kept: run the same command again to "
                          "continue") from None
    finally:
        progress.close()
    for note in result.notes:
        print(f"note: {note}")
    index, count = result.shard
    if count > 1:
        print(f"process {index} of {count}: {len(result.trained) + len(result.skipped) + len(result.failed)} of "
              f"{result.identities} identities")
    for name, trained in result.trained.items():
        lo, hi = trained.concept.stage_window
        resumed = "".join(f"; {n}" for n in trained.notes if n.startswith("resumed from"))
        print(f"{name}: concept written to {trained.concept_path} (dynamic stage {lo} <= t < {hi}{resumed})")
    if result.skipped:
        print(f"{len(result.skipped)} already trained, skipped: {', '.join(result.skipped)}")
    if result.held:
        print(f"note: {len(result.held)} being trained by another run, left to it: {', '.join(result.held)}")
    if result.trained:
        train_s = result.timings.get("train_s", 0.0)
        per_step = max(r.timings.get("identities_per_step", 1) for r in result.trained.values())
        count = len(result.trained)
        print(f"trained {count} identit{'y' if count == 1 else 'ies'} in {result.timings['total_s']:.1f} s "
              f"(training {train_s:.1f} s, up to {per_step} per step)")
    for name, message in result.failed.items():
        print(f"error: {name}: {message}", file=sys.stderr)
    return EXIT_SOME_FAILED if result.failed else 0
