"""`personamagic bench`: measure personalize and generate speed on this machine."""

from __future__ import annotations

from .argtypes import non_negative_int, positive_int
from ..bench_sections import DEFAULT_SECTIONS, SECTIONS


def add_parser(commands) -> None:
    bench = commands.add_parser("bench", help="measure personalize and generate speed on this machine")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    bench.add_argument("--steps", type=positive_int, default=None, help="training steps (1000 on GPU, 20 on CPU)")
    bench.add_argument("--warmup-steps", type=non_negative_int, default=None,
                       help="partition warm-up steps (100 on GPU, 10 on CPU)")
    bench.add_argument("--photo", default=None, help="face photo (default: the repository's test photo)")
    bench.add_argument("--output", "-o", default=None,
                       help="JSON file (default: bench-<device>-<date>.json in the working directory)")
    # The default list first: argparse breaks a word longer than a line where the line ends.
    bench.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                       help="default: " + ",".join(DEFAULT_SECTIONS) + "; the plain step (one identity, every "
                            "speed-up off) is always measured. Comma-separated parts to measure, from: "
                            + "; ".join(f"{name} ({what})" for name, what in SECTIONS.items()) + ". A step figure "
                            "is the median ms of steps at batch 2 with the identity loss, each reading its losses "
                            "back, the first step timed apart")


def run(args) -> int:
    from pathlib import Path

    from ..bench import PHOTO, SECTIONS, format_table, run_benchmark
    from ..errors import SettingsError
    from .common import quiet_libraries

    quiet_libraries(args.verbose)
    sections = [part.strip() for part in args.sections.split(",") if part.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SettingsError(f"unknown --sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    result = run_benchmark(args.device, args.steps, args.warmup_steps, Path(args.photo) if args.photo else PHOTO,
                           output=Path(args.output) if args.output else None, sections=sections)
    print(format_table(result))
    print(f"results written to {result['output']}")
    return 0
