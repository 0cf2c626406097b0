"""Shared fixtures: the tiny SD-1.x model (real classes, seeded) and the test photos."""

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"

# Tests never reach a model hub (CI has none): fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def astronaut() -> Path:
    return DATA / "astronaut.png"


@pytest.fixture
def grace_hopper() -> Path:
    return DATA / "grace_hopper.jpg"


@pytest.fixture
def tiny_base():
    from personamagic.models import build_tiny_components

    return build_tiny_components()
