"""Base-model families: what differs between Stable Diffusion 1.x, SDXL, ... behind one interface.

A family (`ModelFamily`) owns the facts the rest of PersonaMagic must not assume: which text encoders
and tokenizers a model has, which layer of each feeds the UNet and whether a pooled embedding and size
conditioning go in as well, which text-encoder layer the tandem-equilibrium loss reads, the resolution
of the stage partition's attention maps, how the family is recognised from its files (a diffusers
`model_index.json`, the keys of a single-file checkpoint), and the textual-inversion export format.
Adding a family means adding one module here and naming it in `FAMILIES`.
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


def family_of_modules(text_encoders: list, unet) -> ModelFamily:
    """The family whose layout these modules have (for pipelines built from modules, not files)."""
    for family in FAMILIES.values():
        if family.fits_modules(text_encoders, unet):
            return family
    raise ValueError(
        f"{len(text_encoders)} text encoder(s) and a UNet with added conditioning "
        f"{unet.config.addition_embed_type!r} fit no family PersonaMagic supports ({', '.join(FAMILIES)})"
    )


__all__ = ["FAMILIES", "ModelFamily", "SD1", "SDXL", "TextEncoderSpec", "family_named", "family_of_modules"]
