"""`personamagic evaluate images|run`: score generated images, or run a whole study.

Wired into `personamagic.cli` by `add_parser(commands)` (the subparsers of the main parser) and
`run(args)` (the handler). Nothing heavy is imported until a command runs, so `--help` is instant.
`python -m personamagic.evaluation ...` runs the same commands without the main CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import DEFAULT_CLIP_MODEL, DEFAULT_FACE_MODEL
from .presets import STUDY_PRESETS


def add_parser(commands) -> None:
    """Register `evaluate` on an argparse subparsers object; sub-parsers use the same parser class."""
    add_commands(commands.add_parser("evaluate", help="measure T-Sim and I-Pre of images, or run a study"))


def add_commands(evaluate) -> None:
    """The `images` and `run` sub-commands, on `evaluate` (a parser)."""
    actions = evaluate.add_subparsers(dest="evaluate_command", required=True, parser_class=type(evaluate))

    images = actions.add_parser("images", help="score the images of a folder against a reference photo")
    images.add_argument("folder", help="folder of generated images (PNG metadata gives each its prompt)")
    images.add_argument("--reference", "-r", action="append", required=True,
                        help="photo of the person (repeatable: I-Pre is the mean cosine over them)")
    images.add_argument("--prompt", "-p", default=None, help="prompt of every image (default: from PNG metadata)")
    images.add_argument("--supercategory", default="face",
                        help="word that replaces a placeholder for CLIP where the image's metadata does not name "
                             "its concept's supercategory (face)")
    images.add_argument("--placeholder", default="S*", help="placeholder text in prompts (S*; metadata adds its own)")
    images.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                        help=f"CLIP for T-Sim: hub id, local folder, or tiny (an offline toy); downloads "
                             f"{DEFAULT_CLIP_MODEL} (~600 MB) once by default")
    images.add_argument("--face-model", default=DEFAULT_FACE_MODEL,
                        help="face recogniser for I-Pre: sface (OpenCV Zoo, default), sface-torch (the same "
                             "network in torch), dlib, or an ArcFace/CosFace .pth/.safetensors/.onnx file or hub path")
    images.add_argument("--metrics", choices=("real", "world"), default="real",
                        help="real: CLIP T-Sim and face-model I-Pre; world: the learning world's judge (world T-Sim: "
                             "share of the prompt's context shown; world I-Pre: world identity cosine)")
    images.add_argument("--output", "-o", default=None, help="folder for scores.json (default: the image folder)")
    images.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps")
    images.add_argument("--local-files-only", action="store_true", help="never download; use the local hub cache")

    study = actions.add_parser("run", help="train, generate and score a whole study (resumable, shardable)")
    study.add_argument("config",
                       help=f"study config (.json/.yaml) or a built-in study: {', '.join(STUDY_PRESETS)}")
    study.add_argument("--data-root", default=None,
                       help="folder that dataset paths are relative to (default: the config file's folder)")
    study.add_argument("--output", "-o", default=None, help="study folder (default: the config's output)")
    study.add_argument("--shard", default=None,
                       help="K/N: do the share of process K of N (default: RANK/WORLD_SIZE from the launcher)")
    study.add_argument("--dry-run", action="store_true", help="show what the study holds and what is left, run nothing")
    study.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    _add_world(actions)


def _add_world(actions) -> None:
    """`evaluate world`: the learning world's figures (docs/world.md)."""
    from ..cli.argtypes import positive_int, stage_window

    figures = actions.add_parser("world", help="measure the world model: prompt-following, likeness from one photo")
    figures.add_argument("--output", "-o", default="benchmarks/results/world-figures.json", help="JSON report")
    figures.add_argument("--images", default="docs/images", help="folder for the example sheets (world-*.png)")
    figures.add_argument("--people", type=positive_int, default=4, help="held-out people learnt from one photo (4)")
    figures.add_argument("--steps", type=positive_int, default=400, help="training steps per person (400)")
    figures.add_argument("--seeds", type=positive_int, default=4, help="seeds per editing prompt (4)")
    figures.add_argument("--captions", type=positive_int, default=100, help="captions of the prompt-following test")
    figures.add_argument("--learning-rate", type=float, default=None, help="the concepts' learning rate (train's: 5e-5)")
    figures.add_argument("--stage-window", type=stage_window, default=None, metavar="LO:HI",
                         help="a fixed dynamic stage instead of the automatic partition")


def run(args) -> int:
    """Handler of `personamagic evaluate ...`; user mistakes raise a PersonaMagicError (one `error:` line)."""
    from ..cli.common import quiet_libraries

    quiet_libraries(getattr(args, "verbose", False))
    if args.evaluate_command == "images":
        return _images(args)
    if args.evaluate_command == "world":
        return _world(args)
    return _study(args)


def _images(args) -> int:
    from .images import SCORES_FILENAME, evaluate_images

    output = args.output if args.output is not None else args.folder
    scores = evaluate_images(
        args.folder,
        args.reference,
        prompt=args.prompt,
        supercategory=args.supercategory,
        placeholders=(args.placeholder,),
        clip_model=args.clip_model,
        face_model=args.face_model,
        device=args.device,
        local_files_only=args.local_files_only,
        output=output,
        metrics=args.metrics,
    )
    s = scores.summary
    if args.metrics == "world":
        print(f"{s['images']} images, scored by the world's judge")
        print(f"world T-Sim (share of the prompt's context shown) {_stat(s['t_sim'])}")
        print(f"world I-Pre (identity cosine to the reference) {_stat(s['i_pre']['paper'])}")
        print(f"scores written to {Path(output) / SCORES_FILENAME}")
        return 0
    print(f"{s['images']} images; T-Sim with CLIP {s['clip_model']}; I-Pre with {s['face_model']} on YuNet faces")
    print(f"T-Sim  cosine {_stat(s['t_sim'])} | 100·cos {_stat(s['t_sim_100'], 1)} | CLIP-S {_stat(s['clip_s'])}")
    i_pre = s["i_pre"]
    print(f"I-Pre  no face = -1 (paper) {_stat(i_pre['paper'])} | = 0 {_stat(i_pre['zero'])} "
          f"| excluded {_stat(i_pre['excluded'])} (n={i_pre['excluded']['n']})")
    rate = s["face_detection_rate"]
    print(f"faces found in {s['faces_found']} of {s['images']} images ({100 * rate:.1f}%)")
    print(f"scores written to {Path(output) / SCORES_FILENAME}")
    return 0


def _stat(stat: dict, digits: int = 3) -> str:
    return "n/a" if stat["mean"] is None else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _study(args) -> int:
    from .config import load_study_config
    from .plan import Shard, plan_study
    from .study import run_study

    config = load_study_config(args.config, data_root=args.data_root, output=args.output)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    shard = Shard.parse(args.shard) if args.shard else Shard.from_environment()
    if args.dry_run:
        _print_plan(config, plan_study(config), shard)
        return 0
    result = run_study(config, shard)
    print(f"process {shard.index} of {shard.count}: {result.units} training runs; trained {result.trained}, "
          f"generated {result.generated} images, scored {result.scored}, skipped {result.skipped} already done"
          + (f", {result.failed} failed (see warnings; retried on the next run)" if result.failed else ""))
    if result.report is None:
        print(f"{result.remaining} images are left to other processes; the last one writes the report "
              f"(rerun this command to merge)")
        return 0
    with open(result.report["markdown"], encoding="utf-8") as f:
        print(f.read(), end="")
    print(f"report: {result.report['markdown']}, {result.report['json']}, {result.report['plot']}")
    return 0


def _print_plan(config, plan, shard) -> None:
    from collections import Counter

    from .ledger import read_records
    from .study import RESULTS_DIR

    done = {r["item"] for r in read_records(Path(config.output) / RESULTS_DIR) if r.get("type") == "image"}
    units = Counter((u.dataset, u.method) for u in plan.units)
    print(f"study folder {config.output}; base model {config.model}; {len(config.prompts)} prompts x "
          f"{len(config.seeds)} seeds per concept")
    for unit_key, count in units.items():
        items = [i for u in plan.units if (u.dataset, u.method) == unit_key for i in plan.items[u.unit_id]]
        left = sum(1 for i in items if i.item_id not in done)
        print(f"  {unit_key[0]} / {unit_key[1]}: {count} concepts, {len(items)} images, {left} left")
    mine = shard.take(plan.units)
    print(f"process {shard.index} of {shard.count} would handle {len(mine)} of {len(plan.units)} training runs")


def main(argv: list[str] | None = None) -> int:
    """`python -m personamagic.evaluation images|run ...`: the evaluate commands without the main CLI
    (also what `accelerate launch -m personamagic.evaluation run CONFIG` starts in every process)."""
    from ..cli.common import Parser, configure_logging, run_handler

    parser = Parser(prog="python -m personamagic.evaluation", description="Evaluate personalization.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show debug logs and tracebacks")
    add_commands(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    configure_logging(args.verbose)
    return run_handler(run, args)


def _world(args) -> int:

    from ..files import write_atomic
    from .world_figures import world_report

    options = {}
    if args.learning_rate is not None:
        options["learning_rate"] = args.learning_rate
    if args.stage_window is not None:
        options["stage_window"] = args.stage_window
    report = world_report(people=args.people, steps=args.steps, seeds=args.seeds, captions=args.captions,
                          images=Path(args.images), train_options=options, log=print)
    text = json.dumps(report, indent=2) + "\n"
    write_atomic(Path(args.output), lambda tmp: Path(tmp).write_text(text))
    print(f"figures written to {args.output}")
    return 0
