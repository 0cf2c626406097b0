"""Where the shipped learning-world model lives (`--model world`): a diffusers folder inside the
package, found without importing the world's code (`personamagic.world` builds and trains it)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ModelLoadError

WORLD = "world"  # the short name of the shipped world model (and of its judge) on the command line


def world_file(name: str) -> Path:
    """A file the package ships under `personamagic/world/`; ModelLoadError (what to do) if missing."""
    path = Path(str(resources.files("personamagic"))) / "world" / name
    if not path.is_file():
        raise ModelLoadError(f"the world's {name} is missing from this installation ({path}); reinstall "
                             "personamagic, or train it (personamagic world train-base / train-judge)")
    return path


def world_model_folder() -> Path:
    """The shipped diffusers folder of the world's base model."""
    return world_file("model/model_index.json").parent
