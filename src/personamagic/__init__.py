"""PersonaMagic: stage-regulated face personalization of Stable Diffusion (1.x and XL) from one photo.

`import personamagic` stays light (no torch, no diffusers); the public objects below load their
modules on first use.
"""

__version__ = "0.1.0"
DEFAULT_BASE_MODEL = "CompVis/stable-diffusion-v1-4"  # the base model when none is given: SD 1.4, as in the paper
# How one photo is learnt on the shipped world model (`--model world`; TrainConfig fields): the paper's 5e-5
# for 1,000 steps moves the mapper too little on that model, 5e-3 for 300 steps learns a likeness in about
# half a minute on a CPU (docs/world.md). The README's example, the web UI and the world studies use it.
WORLD_RECIPE = {"max_train_steps": 300, "learning_rate": 5e-3}

# public name -> module that defines it
_LAZY = {
    "PersonaMagicPipeline": "personamagic.pipeline",
    "attach_concepts": "personamagic.pipeline",
    "export_textual_inversion": "personamagic.export",
    "IPAdapterSpec": "personamagic.adapters.ip_adapter",
    "PhotoMakerSpec": "personamagic.adapters.photomaker_plugin",
}

__all__ = ["DEFAULT_BASE_MODEL", "WORLD_RECIPE", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'personamagic' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
