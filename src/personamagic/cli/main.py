"""The `personamagic` command: one module per command (`train`, `generate`, `export`, `inspect`,
`bench`, plus `personamagic.evaluation.cli` and `personamagic.ui.cli`) over the shared `common`.

Heavy libraries (torch, diffusers, transformers) are imported inside the commands, so `--help` is
instant. User mistakes end as one `error: ...` line and exit code 2; `--verbose` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import Parser, configure_logging, run_handler

# command -> the module that defines its `add_parser(commands)` and `run(args)`
COMMAND_MODULES = {
    "train": "personamagic.cli.train",
    "train-many": "personamagic.cli.train_many",
    "generate": "personamagic.cli.generate",
    "export": "personamagic.cli.export",
    "inspect": "personamagic.cli.inspect",
    "evaluate": "personamagic.evaluation.cli",
    "ui": "personamagic.ui.cli",
    "bench": "personamagic.cli.bench",
    "world": "personamagic.cli.world",
}
# Shapes stay fixed through training and sampling, so cuDNN's per-shape autotune pays off.
AUTOTUNED = ("train", "train-many", "generate", "bench", "evaluate", "ui")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="personamagic", description="Personalize Stable Diffusion to a face from one photo.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show debug logs and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMAND_MODULES.values():
        importlib.import_module(module).add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad flag already reported in one line
        return int(exit_.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(args.verbose)
    if args.command in AUTOTUNED:
        import torch

        torch.backends.cudnn.benchmark = True
    return run_handler(importlib.import_module(COMMAND_MODULES[args.command]).run, args)


if __name__ == "__main__":
    sys.exit(main())
