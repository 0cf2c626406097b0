"""IP-Adapter as a plug-in (paper, Table 3): load one through diffusers and embed photos for it.

The adapter is loaded with diffusers' own `load_ip_adapter` (on a `PersonaMagicPipeline`, which has
diffusers' `IPAdapterMixin`), so every IP-Adapter file diffusers reads works here too. PersonaMagic's
attention processors keep the adapter's image attention while they apply the residual on V
(`attention.py`), so training and sampling run with both: the concept's stages steer the text
condition, the adapter adds the photo's image tokens at every step.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError, SettingsError
from ..files import first_line
from ..hub import hub_reference

logger = logging.getLogger(__name__)

MAX_SCALE = 10.0  # IP-Adapter weights beyond this only burn the image (diffusers' examples use 0.3-1.0)


@dataclass
class IPAdapterSpec:
    """Where an IP-Adapter is, in the terms of diffusers' `load_ip_adapter`."""

    model: str  # hub repo id ("h94/IP-Adapter") or local folder: pretrained_model_name_or_path_or_dict
    weight_name: str  # weights file in it, e.g. "ip-adapter_sd15.safetensors"
    subfolder: str = ""  # folder of the weights inside `model` ("models" in h94/IP-Adapter)
    image_encoder_folder: str = "image_encoder"  # CLIP vision model: relative to `subfolder`, or a path with "/"
    scale: float = 1.0  # weight of the image tokens (diffusers' default 1.0; IP-Adapter's authors often use 0.5-0.6)

    def __post_init__(self):
        if not 0 <= self.scale <= MAX_SCALE:
            raise SettingsError(f"--ip-adapter-scale must be in [0, {MAX_SCALE}], got {self.scale}")

    @classmethod
    def parse(cls, text: str, scale: float = 1.0) -> IPAdapterSpec:
        """`owner/repo/subfolder/file` on the hub (e.g. `h94/IP-Adapter/models/ip-adapter_sd15.safetensors`)
        or a local weights file (its image encoder in `image_encoder/` beside it)."""
        path = Path(text).expanduser()
        if path.is_file():
            return cls(model=str(path.parent), weight_name=path.name, scale=scale)
        reference = hub_reference(text)
        if reference is None or reference.filename is None:
            raise ModelLoadError(
                f"--ip-adapter {text!r} is neither a file nor owner/repo/[subfolder/]file on the hub "
                "(e.g. h94/IP-Adapter/models/ip-adapter_sd15.safetensors)"
            )
        subfolder, _, weight_name = reference.filename.rpartition("/")
        return cls(model=reference.repo_id, subfolder=subfolder, weight_name=weight_name, scale=scale)

    def describe(self) -> str:
        """The text `parse` reads back (for metadata and messages)."""
        if Path(self.model).is_dir():
            return str(Path(self.model) / self.subfolder / self.weight_name)
        return "/".join(part for part in (self.model, self.subfolder, self.weight_name) if part)

    def to_dict(self) -> dict:
        return asdict(self)


def load_ip_adapter(pipe, spec: IPAdapterSpec, *, local_files_only: bool = False) -> None:
    """`pipe.load_ip_adapter(...)` + `pipe.set_ip_adapter_scale(...)`; failures become one ModelLoadError."""
    try:
        pipe.load_ip_adapter(
            spec.model,
            subfolder=spec.subfolder,
            weight_name=spec.weight_name,
            image_encoder_folder=spec.image_encoder_folder,
            local_files_only=local_files_only,
        )
    except (OSError, ValueError, KeyError) as err:
        first = first_line(err)
        if "shape" in first and ("expected" in first or "mismatch" in first):
            raise ModelLoadError(f"the IP-Adapter {spec.describe()} does not fit this base model's UNet (its weights "
                                 "have other shapes: made for another model family?); use one made for this model "
                                 "(h94/IP-Adapter: models/ for SD-1.x, sdxl_models/ for SDXL)") from None
        raise ModelLoadError(f"could not load the IP-Adapter {spec.describe()} ({first})") from None
    if getattr(pipe, "image_encoder", None) is None:
        raise ModelLoadError(
            f"the IP-Adapter {spec.describe()} came without a CLIP image encoder (looked in "
            f"{spec.image_encoder_folder!r}); put one there"
        )
    pipe.set_ip_adapter_scale(spec.scale)
    logger.debug("IP-Adapter %s loaded (scale %s)", spec.describe(), spec.scale)


def num_ip_adapters(unet) -> int:
    """How many IP-Adapters are loaded on `unet` (0 when none)."""
    if getattr(unet.config, "encoder_hid_dim_type", None) != "ip_image_proj" or unet.encoder_hid_proj is None:
        return 0
    return len(unet.encoder_hid_proj.image_projection_layers)


@torch.no_grad()
def encode_images(pipe, images, adapter_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (positive, negative) inputs of one IP-Adapter, each (K, ...) for K images.

    As diffusers does: plain IP-Adapters take the CLIP image embedding (K, E) with zeros as the
    negative; the others (Plus, Full) take the penultimate hidden states (K, L, C), negative = those of
    a black image.
    """
    from diffusers.models.embeddings import ImageProjection

    if pipe.image_encoder is None or pipe.feature_extractor is None:
        raise ValueError("this pipeline has no IP-Adapter image encoder; load one with pipe.load_ip_adapter(...)")
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[adapter_index]
    encoder = pipe.image_encoder
    dtype = next(encoder.parameters()).dtype
    pixels = pipe.feature_extractor(images, return_tensors="pt").pixel_values.to(encoder.device, dtype)
    if isinstance(layer, ImageProjection):
        positive = encoder(pixels).image_embeds
        return positive, torch.zeros_like(positive)
    positive = encoder(pixels, output_hidden_states=True).hidden_states[-2]
    negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    return positive, negative


def training_embeds(pipe, photos) -> torch.Tensor:
    """(N, 1, ...) IP-Adapter inputs of N training photos, one per photo (`TrainingData.ip_adapter_embeds`)."""
    if num_ip_adapters(pipe.unet) != 1:
        raise SettingsError("training supports exactly one IP-Adapter")
    positive, _ = encode_images(pipe, list(photos))
    return positive[:, None]


def prepare_ip_adapter(pipe, ip_adapter_image, ip_adapter_image_embeds, batch_size: int, do_cfg: bool):
    """Per loaded IP-Adapter, its image input for the whole UNet batch ((uncond, cond) with guidance);
    None when no adapter is loaded.

    `ip_adapter_image`: one image (or list of images) per adapter. `ip_adapter_image_embeds`: one
    tensor per adapter as in diffusers: (1 or B, K, ...), with guidance the negative half first.
    """
    count = num_ip_adapters(pipe.unet)
    if count == 0:
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            raise ValueError("ip_adapter_image given but no IP-Adapter is loaded; call pipe.load_ip_adapter(...)")
        return None
    pairs = []
    if ip_adapter_image_embeds is not None:
        for embeds in ip_adapter_image_embeds:
            pairs.append(embeds.chunk(2) if do_cfg else (None, embeds))
    elif ip_adapter_image is not None:
        images = ip_adapter_image if isinstance(ip_adapter_image, list) and count > 1 else [ip_adapter_image]
        for index, image in enumerate(images):
            positive, negative = encode_images(pipe, image if isinstance(image, list) else [image], index)
            pairs.append((negative[None], positive[None]))  # (1, K, ...)
    else:
        raise ValueError(
            "an IP-Adapter is loaded: pass ip_adapter_image (or ip_adapter_image_embeds), "
            "or call pipe.unload_ip_adapter()"
        )
    if len(pairs) != count:
        raise ValueError(f"{len(pairs)} IP-Adapter inputs for {count} loaded IP-Adapters")
    embeds = []
    for negative, positive in pairs:
        parts = ([negative] if do_cfg else []) + [positive]
        parts = [p.expand(batch_size, *p.shape[1:]) if p.shape[0] == 1 else p for p in parts]
        embeds.append(torch.cat(parts).to(pipe.device, pipe.unet.dtype))
    return embeds
