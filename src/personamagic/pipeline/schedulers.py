"""Samplers by name: `--scheduler ddim|dpm++|euler-a|...` or any diffusers class that fits a Stable
Diffusion model, always built on the base model's own scheduler config (its noise schedule, prediction
type, timestep spacing and offset), as diffusers' pipelines do with `Scheduler.from_config(pipe.scheduler.config)`."""

from __future__ import annotations

import importlib.util

from ..errors import SettingsError

# Scheduler names for `--scheduler`, mapped to diffusers classes and config overrides. Any other
# diffusers scheduler that fits SD-1.x (`KarrasDiffusionSchedulers`) is accepted by its class name.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
# Schedulers that need a package PersonaMagic does not install.
SCHEDULER_REQUIREMENTS = {"LMSDiscreteScheduler": "scipy", "DPMSolverSDEScheduler": "torchsde"}


def scheduler_choice(name: str) -> tuple[str, dict]:
    """(diffusers class name, config overrides) for a `--scheduler` name; SettingsError if unusable here."""
    from diffusers.schedulers import KarrasDiffusionSchedulers

    # The schedulers diffusers' Stable Diffusion pipelines accept; EDM's needs an EDM-trained model.
    compatible = {s.name for s in KarrasDiffusionSchedulers} - {"EDMEulerScheduler"}
    if name in SCHEDULERS:
        class_name, overrides = SCHEDULERS[name]
    elif name in compatible:
        class_name, overrides = name, {}
    else:
        raise SettingsError(
            f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} or a diffusers class name "
            "such as KDPM2DiscreteScheduler"
        )
    package = SCHEDULER_REQUIREMENTS.get(class_name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise SettingsError(f"scheduler {name!r} needs the package {package}: pip install {package}")
    return class_name, overrides


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by short name (`SCHEDULERS`) or class name, on the base model's noise schedule."""
    import diffusers

    class_name, overrides = scheduler_choice(name)
    return getattr(diffusers, class_name).from_config({**config, **overrides})
