"""The learning world: synthetic people drawn by the project (`render`), a small SD-1.x-shaped base
model trained on them (`model/`, `--model world`), and the world's own identity and context metrics
(`judge.safetensors`, `--identity-model world`, `evaluate images --metrics world`). docs/world.md says
what it is, how it was made and what it cannot tell about real faces."""

from __future__ import annotations

from pathlib import Path

from ..models.world import WORLD, world_file, world_model_folder

__all__ = ["WORLD", "world_judge_path", "world_model_folder"]


def world_judge_path() -> Path:
    """The shipped weights of the world's judge (identity encoder and context classifier)."""
    return world_file("judge.safetensors")
