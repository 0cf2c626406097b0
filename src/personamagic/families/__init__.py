"""Base-model families: what differs between Stable Diffusion 1.x, SDXL, ... behind one interface.

A family (`ModelFamily`) owns the facts the rest of PersonaMagic must not assume: which text encoders
and tokenizers a model has, which layer of each feeds the UNet and whether a pooled embedding and size
conditioning go in as well, which text-encoder layer the tandem-equilibrium loss reads, the resolution
of the stage partition's attention maps, how the family is recognised from its files (a diffusers
`model_index.json`, the keys of a single-file checkpoint), the textual-inversion export format, the
short names of its models built in code, and which plug-ins fit it. Code outside this package asks a
family these questions and never tests which family it is. Adding a family means adding one module
here and naming it in `FAMILIES` (docs/architecture.md lists what the module must bring, and what the
seam does not cover yet).
"""

from __future__ import annotations

from .base import ModelFamily, TextEncoderSpec
from .sd1 import SD1
from .sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {SD1.name: SD1, SDXL.name: SDXL}


def family_named(name: str) -> ModelFamily:
    """The family registered as `name` ("sd1", ...); concepts record it so a model of another family
    is refused before sampling."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of_built_model(name: str) -> ModelFamily | None:
    """The family whose model built in code is called `name` (its `tiny_model` or `random_model`); None
    for any other name (a model read from files says its family in them)."""
    for family in FAMILIES.values():
        if name in (family.tiny_model, family.random_model):
            return family
    return None


def offline_toy(hub_id: str, family: ModelFamily | None = None) -> str:
    """The offline toy to suggest in place of a model that cannot be had: `family`'s where the caller
    knows it (a concept's), else that of the family the model's name suggests."""
    return (family or likely_family(hub_id)).tiny_model


def likely_family(hub_id: str) -> ModelFamily:
    """The family a hub model not downloaded yet most likely has (its config, which would tell, is what
    is missing): the family that suggests it, else one whose `repo_name_hints` its name holds, else SD-1.x
    (the family of the default base model)."""
    for family in FAMILIES.values():
        if hub_id in family.suggested_models:
            return family
    repo_name = hub_id.split("/")[-1].lower()
    for family in FAMILIES.values():
        if any(hint in repo_name for hint in family.repo_name_hints):
            return family
    return SD1


def family_of_modules(text_encoders: list, unet) -> ModelFamily:
    """The family whose layout these modules have (for pipelines built from modules, not files)."""
    for family in FAMILIES.values():
        if family.fits_modules(text_encoders, unet):
            return family
    raise ValueError(
        f"{len(text_encoders)} text encoder(s) and a UNet with added conditioning "
        f"{unet.config.addition_embed_type!r} fit no family PersonaMagic supports ({', '.join(FAMILIES)})"
    )


__all__ = ["FAMILIES", "ModelFamily", "SD1", "SDXL", "TextEncoderSpec", "family_named", "family_of_built_model",
           "family_of_modules", "likely_family", "offline_toy"]
