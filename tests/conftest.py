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


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """A hub cache of tiny models under the real ids and file layouts, plus plain folders and single-file
    checkpoints beside it: the dict of paths that `hub_fixture.build_hub_cache` returns. Built once."""
    from hub_fixture import build_hub_cache

    return build_hub_cache(tmp_path_factory.mktemp("hub-fixture"))


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """Point huggingface_hub (and so diffusers and transformers) at `hub_cache`, offline.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into `huggingface_hub.constants` at import and
    looks them up there at call time, so those module attributes are patched too; the environment
    variables are for subprocesses (the CLI), where HF_HOME also keeps a user's token and settings out.
    """
    import huggingface_hub.constants as hub_constants

    cache = str(hub_cache["hub_cache"])
    home = hub_cache["root"] / "hf-home"
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", cache), ("HUGGINGFACE_HUB_CACHE", cache)):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_HUB_CACHE", cache)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return hub_cache
