"""PhotoMaker v1's UNet LoRA (diffusers' old attention-processor format, `lora_weights` of the file):
its format checked, then loaded into an SDXL UNet through diffusers' own LoRA loader (peft), at a
strength that can be changed later."""

from __future__ import annotations

import math
import re

from ...errors import ModelLoadError

LORA_ADAPTER_NAME = "photomaker"  # the adapter name the official pipeline loads its LoRA under
# diffusers' old attention-processor LoRA key, the format of `lora_weights`
_LORA_KEY = re.compile(
    r"unet\.(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)\.weight"
)


def apply_photomaker_lora(pipe_or_unet, lora_state_dict: dict, scale: float = 1.0) -> None:
    """Load PhotoMaker's LoRA into an SDXL UNet (or a pipeline's) as diffusers does, at strength `scale`.

    A pipeline (anything with diffusers' `load_lora_weights`) gets `pipe.load_lora_weights(...,
    adapter_name="photomaker")`, the official call; a bare `UNet2DConditionModel` gets diffusers' SDXL
    loader's `load_lora_into_unet`, which reads the old `unet.*.processor.to_*_lora.*` keys too. Both need peft. Leave it unfused (no
    `fuse_lora`) to change the strength later with `set_photomaker_lora_scale`; 0 switches it off exactly.
    """
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import USE_PEFT_BACKEND

    _check_scale(scale)
    if not USE_PEFT_BACKEND:
        raise ModelLoadError("PhotoMaker's LoRA loads through peft: pip install 'peft>=0.17'")
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if LORA_ADAPTER_NAME in getattr(unet, "peft_config", {}):
        raise ModelLoadError(
            "PhotoMaker's LoRA is already loaded in this UNet: change its strength with set_photomaker_lora_scale"
        )
    check_lora_state(lora_state_dict, "the PhotoMaker LoRA")
    _check_lora_fits(unet, lora_state_dict)
    if hasattr(pipe_or_unet, "load_lora_weights"):
        pipe_or_unet.load_lora_weights(dict(lora_state_dict), adapter_name=LORA_ADAPTER_NAME)
    else:
        StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(
            dict(lora_state_dict), network_alphas=None, unet=unet, adapter_name=LORA_ADAPTER_NAME
        )
    set_photomaker_lora_scale(unet, scale)


def set_photomaker_lora_scale(pipe_or_unet, scale: float) -> None:
    """Set the strength of the loaded PhotoMaker LoRA alone (0: off, 1: as trained)."""
    from peft.tuners.lora import LoraLayer

    _check_scale(scale)
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if LORA_ADAPTER_NAME not in getattr(unet, "peft_config", {}):
        raise ModelLoadError("PhotoMaker's LoRA is not loaded in this UNet: call apply_photomaker_lora first")
    # diffusers' set_adapters would also reset the weights of any other LoRA; this is the per-layer call it makes.
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(LORA_ADAPTER_NAME, scale)


def check_lora_state(lora_state: dict, source) -> None:
    """`lora_state` is a non-empty LoRA in diffusers' old processor format, with matching ranks."""
    if not lora_state:
        raise ModelLoadError(f"{source} has no LoRA weights ('lora_weights' is empty)")
    ranks = {}
    for key, tensor in lora_state.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise ModelLoadError(
                f"{source}: LoRA key {key!r} is not in PhotoMaker's format "
                "unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight"
            )
        if tensor.ndim != 2:
            raise ModelLoadError(f"{source}: LoRA weight {key} has shape {tuple(tensor.shape)}, expected a matrix")
        pair = (match["module"], match["proj"])
        rank = tensor.shape[0] if match["side"] == "down" else tensor.shape[1]  # down (r, in), up (out, r)
        if ranks.setdefault(pair, rank) != rank:
            raise ModelLoadError(
                f"{source}: the down and up weights of {match['module']}.{match['proj']} have different ranks"
            )
    halves = {(m["module"], m["proj"], m["side"]) for m in map(_LORA_KEY.fullmatch, lora_state)}
    for module, proj in ranks:
        if {(module, proj, "down"), (module, proj, "up")} - halves:
            raise ModelLoadError(f"{source}: the LoRA of {module}.{proj} lacks its down or up weight")


def _check_lora_fits(unet, lora_state: dict) -> None:
    """Every LoRA weight names an attention projection of `unet` with matching sizes."""
    for key, tensor in lora_state.items():
        match = _LORA_KEY.fullmatch(key)
        try:
            attention = unet.get_submodule(match["module"])
            linear = attention.to_out[0] if match["proj"] == "to_out" else getattr(attention, match["proj"])
            sizes = (linear.in_features, linear.out_features)
        except AttributeError:
            raise ModelLoadError(
                f"the PhotoMaker LoRA does not fit this UNet (it has no {match['module']}.{match['proj']}); "
                "PhotoMaker v1 is made for SDXL"
            ) from None
        fits = tensor.shape[1] == sizes[0] if match["side"] == "down" else tensor.shape[0] == sizes[1]
        if not fits:
            raise ModelLoadError(
                f"the PhotoMaker LoRA does not fit this UNet ({key} is {tuple(tensor.shape)}, the layer maps "
                f"{sizes[0]} -> {sizes[1]}); PhotoMaker v1 is made for SDXL"
            )


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"PhotoMaker LoRA scale must be a finite number >= 0, got {scale}")
