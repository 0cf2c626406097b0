"""Loading real base models from their own files: a hub id, a local diffusers folder, a single file.

Every part is read from its own subfolder with its own class, as diffusers lays a model out:
`model_index.json` says which classes the parts are, `scheduler/scheduler_config.json` is the model's
noise schedule (used for the training noise and as the base of every sampler), `unet/`, `vae/`,
`text_encoder/`, `tokenizer/` (and `text_encoder_2/`, `tokenizer_2/` where the family has them) hold
the networks. `.safetensors` files are preferred; for fp16/bf16 the repo's `fp16` variant files are
used where it has them (half the download). The hub commit the files came from is kept in
`BaseComponents.revision`.

Single-file checkpoints (`.safetensors`, or a `.ckpt` that loads weights-only) carry weights but no
configs: their family is recognised from the tensor names, and the configs come from a diffusers folder
of that family (`model_config`) or from the family's reference repo in the hub cache (downloaded once
when online). The scheduler config comes from the same place.

Which family a model is, and whether PersonaMagic can drive it, is decided from the files before any
weights are read; every failure is one `ModelLoadError` line.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from .. import DEFAULT_BASE_MODEL
from ..errors import BAD_JSON, ModelLoadError, SettingsError
from ..families import FAMILIES, ModelFamily, offline_toy
from ..files import first_line, read_weights
from ..hub import MODEL_FILE_SUFFIXES, is_hub_id, resolve_file
from .components import BaseComponents
from .world import WORLD, world_model_folder
from .tiny import BUILT_MODELS, TINY, build_model

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_FILE = "scheduler_config.json"
HALF_VARIANT = "fp16"  # the variant name SD repos use for their half-precision files


def load_base_model(
    name: str,
    *,
    device=None,
    dtype=None,
    local_files_only: bool = False,
    revision: str | None = None,
    model_config: str | None = None,
    vae: str | None = None,
) -> BaseComponents:
    """Load a base model by hub id, local diffusers folder, single `.safetensors`/`.ckpt` file, or build
    `tiny`/`tiny-sdxl`/`random-sd1`, or the shipped learning-world model `world`. `revision`: a hub branch, tag or commit; `model_config`: a
    diffusers folder whose configs a single file uses; `vae`: another VAE (hub id or folder of an
    AutoencoderKL, e.g. an fp16-fixed SDXL VAE) to use instead of the model's. Raises ModelLoadError for
    models PersonaMagic cannot drive."""
    if model_config is not None and not Path(name).expanduser().is_file():
        raise SettingsError(f"--model-config is for a single .safetensors/.ckpt file, and {name} is not one (it brings "
                            "its own configs); drop --model-config")
    components = _components(name, device=device, dtype=dtype, local_files_only=local_files_only, revision=revision,
                             model_config=model_config)
    problems = components.family.problems(components)
    if problems:
        raise ModelLoadError(f"{name} is not a {components.family.title} model PersonaMagic can drive: "
                             f"{'; '.join(problems)}")
    if vae is not None:
        own = components.vae.config
        components.vae = load_vae(vae, dtype=dtype, local_files_only=local_files_only)
        problems = components.family.problems(components) + latent_space_problems(components.vae.config, own)
        if problems:
            raise ModelLoadError(f"--vae {vae} does not fit {name} ({components.family.title}): {'; '.join(problems)}; "
                                 "give a VAE made for this model family")
    return components.freeze().to(device=device, dtype=dtype)


def latent_space_problems(config, own) -> list[str]:
    """How another VAE's latent space differs from the model's own VAE's (its scaling factor, and the
    per-channel latents_mean/latents_std some VAEs have): a UNet is trained in one latent space only."""
    problems = []
    if not math.isclose(config.scaling_factor, own.scaling_factor, rel_tol=1e-3):
        problems.append(f"it scales latents by {config.scaling_factor:g}, the model's own VAE by "
                        f"{own.scaling_factor:g} (another latent space)")
    for key in ("latents_mean", "latents_std"):
        theirs, ours = getattr(config, key, None), getattr(own, key, None)
        if (theirs is None) != (ours is None) or (theirs is not None and not np.allclose(theirs, ours, rtol=1e-3)):
            problems.append(f"its {key} differs from the model's own VAE's")
    return problems


def load_vae(name: str, *, dtype=None, local_files_only: bool = False):
    """An AutoencoderKL by hub id or folder (its own repo, or a model's `vae/` subfolder)."""
    from diffusers import AutoencoderKL

    folder = Path(name).expanduser()
    subfolder = "vae" if (folder / "vae" / "config.json").is_file() else None
    try:
        return AutoencoderKL.from_pretrained(name, subfolder=subfolder, torch_dtype=dtype or torch.float32,
                                             local_files_only=local_files_only)
    except Exception as err:  # missing, corrupt or mismatched files
        raise ModelLoadError(f"could not load the VAE {name!r} ({first_line(err)}); pass a hub id or folder of an "
                             "AutoencoderKL") from None


def _components(name: str, *, device, dtype, local_files_only: bool, revision, model_config) -> BaseComponents:
    """The parts of a model, unchecked: built in code, or read from a file, folder or hub id."""
    if name in BUILT_MODELS:
        return build_model(name, device)
    if name == WORLD:  # the shipped diffusers folder, loaded as any user's folder, known by its short name
        components = load_diffusers(str(world_model_folder()), local_files_only=True, dtype=dtype)
        components.name = WORLD
        return components
    path = Path(name).expanduser()
    if path.is_file():
        return load_single_file(path, model_config=model_config, local_files_only=local_files_only, dtype=dtype)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{name} is a folder but not a diffusers model (no model_index.json); "
                "pass a diffusers folder, a .safetensors/.ckpt file or a hub id"
            )
        return load_diffusers(str(path), local_files_only=local_files_only, dtype=dtype)
    if is_hub_id(name):
        return load_diffusers(name, local_files_only=local_files_only, revision=revision, dtype=dtype)
    raise ModelLoadError(
        f"unknown model {name!r}: not a file, not a folder, not a hub id (owner/name); "
        f"use e.g. {DEFAULT_BASE_MODEL}, a local path, or one of {', '.join((*BUILT_MODELS, WORLD))}"
    )


# --------------------------------------------------------------------------------------------------
# reading a model's files


def read_json_file(name: str, filename: str, *, subfolder: str = "", revision: str | None = None,
                   local_files_only: bool = False, family: ModelFamily | None = None) -> tuple[dict, Path]:
    """A JSON object from a model folder or hub repo, and the local path it was read from. `family`: the
    model's, where it is known already; a missing file's message suggests that family's offline toy
    (else the one its name suggests), so that the toy is one the user's concepts and flags fit."""
    toy = offline_toy(name, family)
    path = resolve_file(
        name, what="model file", filename="/".join(part for part in (subfolder, filename) if part),
        advice="check that it is a complete diffusers model (folder or hub id), your network and hub login, "
        f"or use --model {toy} to try offline",
        revision=revision, local_files_only=local_files_only,
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, *BAD_JSON) as err:
        raise ModelLoadError(f"{path} is not readable JSON ({first_line(err)}); download the model again") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, not an object; download the model again")
    return data, path


def snapshot_revision(path: Path) -> str | None:
    """The commit of a file in a hub cache (`.../snapshots/<commit>/...`), else None."""
    parts = Path(path).parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        return parts[parts.index("snapshots") + 1]
    return None


def family_of_index(name: str, index: dict) -> ModelFamily:
    """The family a `model_index.json` describes; ModelLoadError naming what it is when none fits."""
    class_name = str(index.get("_class_name", ""))
    if "Inpaint" in class_name or "Img2Img" in class_name or "Refiner" in class_name:
        raise ModelLoadError(
            f"{name} is a {class_name} model (inpainting / refiner); PersonaMagic needs a text-to-image base "
            f"model such as {', '.join(f.default_model for f in FAMILIES.values())}"
        )
    for family in FAMILIES.values():
        if family.recognizes_index(index):
            return family
    what = "an SDXL" if "text_encoder_2" in index or "XL" in class_name else f"a {class_name or 'non-Stable-Diffusion'}"
    raise ModelLoadError(
        f"{name} is {what} model; PersonaMagic supports {', '.join(f.title for f in FAMILIES.values())} "
        f"(e.g. {', '.join(f.default_model for f in FAMILIES.values())})"
    )


def _component_class(index: dict, component: str, name: str):
    """The class `model_index.json` names for a component, from diffusers or transformers."""
    entry = index.get(component)
    if not isinstance(entry, list) or len(entry) != 2 or entry[0] not in ("diffusers", "transformers"):
        raise ModelLoadError(f"{name}'s model_index.json names no library class for {component!r}")
    import importlib

    module = importlib.import_module(entry[0])
    cls = getattr(module, entry[1], None)
    if cls is None:
        raise ModelLoadError(f"{name} needs {entry[0]}.{entry[1]} for {component}, which this {entry[0]} lacks; "
                             "upgrade it")
    return cls


def load_diffusers(name: str, *, local_files_only: bool = False, revision: str | None = None,
                   dtype=None) -> BaseComponents:
    """A diffusers-layout model (hub id or folder), each part from its own subfolder (module docstring)."""
    index, index_path = read_json_file(name, "model_index.json", revision=revision, local_files_only=local_files_only)
    family = family_of_index(name, index)
    hub = {"revision": revision, "local_files_only": local_files_only}
    scheduler_config, _ = read_json_file(name, SCHEDULER_CONFIG_FILE, subfolder="scheduler", family=family, **hub)
    variant = HALF_VARIANT if dtype in (torch.float16, torch.bfloat16) else None
    # Explicitly: transformers 5 would otherwise load in the dtype a config names (SDXL's say float16).
    dtype = dtype or torch.float32
    tokenizers, text_encoders = [], []
    for spec in family.encoders:
        tokenizer_class = _component_class(index, spec.tokenizer, name)
        tokenizers.append(_load_part(tokenizer_class, name, spec.tokenizer, hub))
        encoder_class = _component_class(index, spec.component, name)
        text_encoders.append(_load_part(encoder_class, name, spec.component, hub, variant=variant, dtype=dtype,
                                        dtype_key="dtype", attn_implementation="sdpa"))
    unet = _load_part(_component_class(index, "unet", name), name, "unet", hub, variant=variant, dtype=dtype)
    vae = _load_part(_component_class(index, "vae", name), name, "vae", hub, variant=variant, dtype=dtype)
    return BaseComponents(name, family, tokenizers, text_encoders, vae, unet, scheduler_config,
                          revision=snapshot_revision(index_path))


def _load_part(cls, name: str, subfolder: str, hub: dict, *, variant=None, dtype=None, dtype_key="torch_dtype",
               **kwargs):
    """`cls.from_pretrained(name, subfolder=...)`, with the half-precision variant where it exists."""
    if dtype is not None:
        kwargs[dtype_key] = dtype
    if variant is not None:
        try:
            return cls.from_pretrained(name, subfolder=subfolder, variant=variant, **hub, **kwargs)
        except Exception:  # noqa: BLE001 - the repo has no such variant (or it is not cached): use the full files
            logger.debug("%s/%s has no %s variant; loading the full-precision files", name, subfolder, variant)
    try:
        return cls.from_pretrained(name, subfolder=subfolder, **hub, **kwargs)
    except Exception as err:  # missing, corrupt or mismatched files: each library raises its own classes
        raise ModelLoadError(f"could not load the {subfolder} of {name!r} ({first_line(err)})") from None


# --------------------------------------------------------------------------------------------------
# single files


def checkpoint_tensor_shapes(path: Path) -> dict[str, tuple]:
    """Tensor names and shapes of a single-file checkpoint, without reading its weights (the
    safetensors header, or a weights-only, memory-mapped `torch.load` of a .ckpt)."""
    if path.suffix not in MODEL_FILE_SUFFIXES:
        raise ModelLoadError(f"{path}: unknown model file type {path.suffix!r}; use .safetensors or .ckpt")
    checkpoint = read_weights(path, lazy=True, advice="convert it to .safetensors where you trust it, or pass a "
                              "diffusers folder")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds no state dict of tensors; pass a Stable Diffusion checkpoint")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def family_of_checkpoint(path: Path, shapes: dict[str, tuple]) -> ModelFamily:
    """The family of a single-file checkpoint from its tensor names; ModelLoadError naming what it is else."""
    keys = set(shapes)
    unet_input = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if unet_input is None:
        raise ModelLoadError(f"{path} is not a Stable Diffusion checkpoint (no UNet weights found)")
    if len(unet_input) == 4 and unet_input[1] != 4:
        raise ModelLoadError(f"{path}'s UNet takes {unet_input[1]} input channels (an inpainting or depth model); "
                             "PersonaMagic needs a text-to-image model")
    for family in FAMILIES.values():
        if family.recognizes_checkpoint(keys):
            return family
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ModelLoadError(f"{path} is an SDXL refiner checkpoint (one OpenCLIP text encoder); PersonaMagic "
                             "needs a text-to-image base model such as stabilityai/stable-diffusion-xl-base-1.0 or a "
                             "fine-tune of it")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelLoadError(f"{path} is a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder); PersonaMagic "
                             f"supports {', '.join(f.title for f in FAMILIES.values())}")
    raise ModelLoadError(f"{path} is not a checkpoint of a family PersonaMagic supports "
                         f"({', '.join(f.title for f in FAMILIES.values())})")


def load_single_file(path: Path, *, model_config: str | None = None, local_files_only: bool = False,
                     dtype=None) -> BaseComponents:
    """A single-file checkpoint with the configs of its family (module docstring)."""
    import diffusers

    family = family_of_checkpoint(path, checkpoint_tensor_shapes(path))
    config = model_config or family.checkpoint_config_repo
    if model_config is not None:
        if not Path(model_config).expanduser().is_dir() and not is_hub_id(model_config):
            raise ModelLoadError(f"--model-config {model_config} is neither a folder nor a hub id; give the diffusers "
                                 f"folder (or hub id) of a {family.title} model whose configs {path.name} uses")
        index, _ = read_json_file(model_config, "model_index.json", family=family)
        if family_of_index(model_config, index) is not family:
            raise ModelLoadError(f"--model-config {model_config} is not a {family.title} model, but {path} is")
    try:
        scheduler_config, _ = read_json_file(config, SCHEDULER_CONFIG_FILE, subfolder="scheduler",
                                             local_files_only=local_files_only, family=family)
    except ModelLoadError:
        raise ModelLoadError(
            f"{path} is a {family.title} checkpoint, whose configs come from {config} (not in the local hub "
            f"cache, or offline); pass --model-config FOLDER (a diffusers folder of the same family, e.g. a "
            f"download of {family.checkpoint_config_repo}) or run once online"
        ) from None
    pipeline_class = getattr(diffusers, family.pipeline_class)
    kwargs = family.pipeline_kwargs()
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        pipe = pipeline_class.from_single_file(str(path), config=config, local_files_only=local_files_only, **kwargs)
    except Exception as err:  # shape mismatches, missing configs, corrupt tensors: each its own class
        raise ModelLoadError(f"could not load {path} ({first_line(err)})") from None
    tokenizers = [getattr(pipe, spec.tokenizer) for spec in family.encoders]
    text_encoders = [getattr(pipe, spec.component) for spec in family.encoders]
    for encoder in text_encoders:
        encoder.set_attn_implementation("sdpa")
    return BaseComponents(str(path), family, tokenizers, text_encoders, pipe.vae, pipe.unet, scheduler_config)


# --------------------------------------------------------------------------------------------------
# the photo's CLIP image encoder


DEFAULT_IMAGE_ENCODER = "openai/clip-vit-base-patch32"


def load_image_encoder(name: str, *, device=None, dtype=None, local_files_only: bool = False):
    """CLIP vision model with projection (+ its processor) by hub id / local path, or `tiny`."""
    from .tiny import RANDOM_IMAGE_ENCODER, build_random_image_encoder, build_tiny_image_encoder

    if name == TINY:
        model, processor = build_tiny_image_encoder()
    elif name == RANDOM_IMAGE_ENCODER:
        model, processor = build_random_image_encoder(device)
    else:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        try:
            model, info = CLIPVisionModelWithProjection.from_pretrained(name, local_files_only=local_files_only,
                                                                        output_loading_info=True)
            processor = CLIPImageProcessor.from_pretrained(name, local_files_only=local_files_only)
        except Exception as err:  # hub, file and config errors: all mean "cannot load it"
            raise ModelLoadError(
                f"could not load the CLIP image encoder {name!r} ({first_line(err)}); "
                "check the id/path or your network, or pass --image-encoder PATH (tiny: the offline toy)"
            ) from None
        # transformers fills missing weights at random without a word; a full CLIP checkpoint's text
        # weights are expected extras, missing vision weights are not
        missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
        if missing or info.get("mismatched_keys"):
            problem = f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else "weights of other shapes"
            raise ModelLoadError(f"the CLIP image encoder {name!r} does not fit CLIPVisionModelWithProjection "
                                 f"({problem}); pass --image-encoder with a CLIP model such as "
                                 "openai/clip-vit-base-patch32")
        model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype), processor
