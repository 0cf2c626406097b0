"""PhotoMaker v1's weights file: found (a local file or folder, or the hub), read without running any
pickled code, checked part by part, and turned into the ID encoder and the LoRA state dict."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ...errors import ModelLoadError
from ...files import read_weights
from ...hub import resolve_file
from . import HUB_REPO, WEIGHTS_NAME
from .encoder import PhotoMakerConfig, PhotoMakerIDEncoder, clip_attention_heads
from .lora import check_lora_state

PARTS = ("id_encoder", "lora_weights")  # the top-level keys of the official file, in its order


def load_photomaker(spec: str | Path = HUB_REPO, *, device=None, dtype=None, local_files_only: bool = False):
    """Read PhotoMaker v1 weights: returns `(id_encoder, lora_state_dict)`.

    `spec` is a hub repo id (`TencentARC/PhotoMaker`: its `photomaker-v1.bin`), `owner/repo/[folder/]file`
    on the hub, or a local file (or a folder holding `photomaker-v1.bin`). The file is read with
    `torch.load(weights_only=True)`, never a full unpickle (a `.safetensors` file with flat
    `id_encoder.*` / `lora_weights.*` keys, which the official loader also reads, works too). The
    encoder's sizes are read off the tensor shapes; it comes back in eval mode, frozen, in `dtype`
    (default float32) on `device` (default CPU). The LoRA state dict stays as stored, for
    `apply_photomaker_lora`. Every problem with the file is one `ModelLoadError`.
    """
    path = resolve_file(
        spec, what="PhotoMaker weights file", filename=WEIGHTS_NAME, local_files_only=local_files_only,
        advice=f"pass a local {WEIGHTS_NAME} (from the hub repo {HUB_REPO})",
    )
    state = read_weights(path, advice=f"use the official {WEIGHTS_NAME} or a file of plain tensors")
    if path.suffix == ".safetensors":
        state = _nest_by_prefix(state)
    encoder_state, lora_state = _split_weights(state, path)
    check_lora_state(lora_state, path)
    config = infer_photomaker_config(encoder_state, source=path)
    encoder = PhotoMakerIDEncoder(config)
    _check_encoder_state(encoder, encoder_state, path)
    encoder.load_state_dict(encoder_state, strict=True)
    encoder.to(device=device, dtype=dtype or torch.float32)
    return encoder.eval().requires_grad_(False), lora_state


def infer_photomaker_config(encoder_state: dict, *, source: str | Path = "the weights") -> PhotoMakerConfig:
    """The `PhotoMakerConfig` an `id_encoder` state dict was saved from, read off its tensor shapes."""

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        tensor = encoder_state.get(key)
        if tensor is None:
            raise ModelLoadError(f"{source} is not a PhotoMaker v1 ID encoder: it has no id_encoder.{key}")
        if tensor.ndim != ndim:
            raise ModelLoadError(f"{source}: id_encoder.{key} has shape {tuple(tensor.shape)}, expected {ndim} "
                                 "dimensions")
        return tuple(tensor.shape)

    hidden, channels, patch, _ = shape("vision_model.embeddings.patch_embedding.weight", 4)
    positions, _ = shape("vision_model.embeddings.position_embedding.weight", 2)
    patches_per_side = math.isqrt(positions - 1)  # positions = 1 CLS + (image / patch)^2 patches
    if patches_per_side < 1 or patches_per_side**2 != positions - 1:
        raise ModelLoadError(f"{source}: {positions} position embeddings are not 1 + a square number of patches")
    layers = {
        int(m.group(1)) for key in encoder_state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", key))
    }
    intermediate, _ = shape("vision_model.encoder.layers.0.mlp.fc1.weight", 2)
    projection_dim, _ = shape("visual_projection.weight", 2)
    projection_dim_2, _ = shape("visual_projection_2.weight", 2)
    (prompt_embed_dim,) = shape("fuse_module.layer_norm.weight", 1)
    fuse_hidden_dim, fuse_in = shape("fuse_module.mlp1.fc1.weight", 2)
    if fuse_in != prompt_embed_dim + projection_dim + projection_dim_2:
        raise ModelLoadError(
            f"{source}: fuse_module.mlp1 reads {fuse_in} features, but prompt {prompt_embed_dim} + ID "
            f"{projection_dim + projection_dim_2} = {prompt_embed_dim + projection_dim + projection_dim_2}"
        )
    try:
        return PhotoMakerConfig(
            image_size=patches_per_side * patch,
            patch_size=patch,
            num_channels=channels,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=len(layers),
            num_attention_heads=clip_attention_heads(hidden),
            projection_dim=projection_dim,
            projection_dim_2=projection_dim_2,
            prompt_embed_dim=prompt_embed_dim,
            fuse_hidden_dim=fuse_hidden_dim,
        )
    except ValueError as err:
        raise ModelLoadError(f"{source}: the ID encoder's shapes do not make a CLIP vision tower ({err})") from None


def _nest_by_prefix(flat: dict) -> dict[str, dict]:
    """`{"id_encoder.x": t, ...}` (a safetensors file is flat) -> `{"id_encoder": {"x": t}, ...}`."""
    nested: dict[str, dict] = {}
    for key, tensor in flat.items():
        group, _, name = key.partition(".")
        nested.setdefault(group, {})[name] = tensor
    return nested


def _split_weights(state, source: Path) -> tuple[dict, dict]:
    """`id_encoder` and `lora_weights` of a PhotoMaker file, checked to be dicts of tensors."""
    if not isinstance(state, dict):
        raise ModelLoadError(
            f"{source} holds a {type(state).__name__}, not PhotoMaker's {{'id_encoder': ..., 'lora_weights': ...}}"
        )
    missing = [name for name in PARTS if name not in state]
    extra = sorted(str(name) for name in state if name not in PARTS)
    if missing or extra:
        raise ModelLoadError(
            f"{source} is not a PhotoMaker v1 file: it needs exactly 'id_encoder' and 'lora_weights', "
            f"has {sorted(str(name) for name in state)}"
        )
    for name in PARTS:
        part = state[name]
        if not isinstance(part, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in part.items()
        ):
            raise ModelLoadError(
                f"{source}: '{name}' must be a dict of named tensors, got a {type(part).__name__} of other things"
            )
    return state["id_encoder"], state["lora_weights"]


def _check_encoder_state(encoder: PhotoMakerIDEncoder, encoder_state: dict, source: Path) -> None:
    """Same keys and shapes as `encoder`, or one ModelLoadError naming the first differences."""
    expected = encoder.state_dict()
    if any(key.startswith("qformer_perceiver.") for key in encoder_state):
        raise ModelLoadError(f"{source} is a PhotoMaker v2 file (it needs insightface ID embeddings); use "
                             "photomaker-v1.bin")
    missing = sorted(set(expected) - set(encoder_state))
    unexpected = sorted(set(encoder_state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{source} is not a PhotoMaker v1 ID encoder: missing id_encoder.{missing[:3]}, "
            f"unexpected id_encoder.{unexpected[:3]}"
        )
    wrong = [
        f"{key} {tuple(encoder_state[key].shape)} (expected {tuple(value.shape)})"
        for key, value in expected.items()
        if encoder_state[key].shape != value.shape
    ]
    if wrong:
        raise ModelLoadError(f"{source}: the ID encoder's tensors do not fit together: id_encoder.{wrong[0]}")
