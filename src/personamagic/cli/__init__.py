"""The command-line interface (`personamagic ...`): see `main`."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
