"""`BaseComponents`: the frozen parts of a base model that PersonaMagic drives, whatever its family."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families import ModelFamily


class TextEncoderWidths:
    """`encoder_widths` and `hidden_size` of anything that has a `text_encoders` list."""

    @property
    def encoder_widths(self) -> list[int]:
        """Token-embedding width of each text encoder (768 on SD-1.x; 768 and 1280 on SDXL)."""
        return [encoder.get_input_embeddings().embedding_dim for encoder in self.text_encoders]

    @property
    def hidden_size(self) -> int:
        """The encoders' token-embedding widths summed: the width of S*'s embedding."""
        return sum(self.encoder_widths)


@dataclass
class BaseComponents(TextEncoderWidths):
    """A loaded base model. Everything is frozen (`requires_grad_(False)`, eval mode): PersonaMagic
    trains only its stage mapper."""

    name: str  # what the user asked for: hub id, local path, or "tiny"
    family: ModelFamily  # which kind of model it is (what differs between SD-1.x, SDXL, ...)
    tokenizers: list  # transformers CLIP tokenizers, one per text encoder, in the family's order
    text_encoders: list  # transformers CLIP text models (SDPA attention), in the family's order
    vae: torch.nn.Module  # diffusers AutoencoderKL
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    scheduler_config: dict  # the model's own scheduler/scheduler_config.json (`_class_name` included)
    revision: str | None = None  # the hub commit the files came from (None: a local folder, file or built model)

    @property
    def tokenizer(self):
        """The first tokenizer (the only one on SD-1.x)."""
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first text encoder (the only one on SD-1.x)."""
        return self.text_encoders[0]

    @property
    def cross_attention_dim(self) -> int:
        """Width of the UNet's cross-attention input (the value residual's width)."""
        return self.unet.config.cross_attention_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The square image side the model was trained at (512 for SD-1.x)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [*self.text_encoders, self.vae, self.unet]

    def components(self) -> dict:
        """The parts by their diffusers pipeline names (tokenizer, text_encoder, ..., unet, vae)."""
        parts = {"unet": self.unet, "vae": self.vae}
        for spec, tokenizer, encoder in zip(self.family.encoders, self.tokenizers, self.text_encoders):
            parts[spec.tokenizer], parts[spec.component] = tokenizer, encoder
        return parts

    def to(self, device=None, dtype=None) -> "BaseComponents":
        """Move and cast every part; a VAE that overflows in fp16 (`force_upcast` in its config: SDXL's)
        stays in fp32 when fp16 is asked for, and is fed fp32 latents (its dtype is what callers read)."""
        for module in self.modules:
            target = dtype
            if module is self.vae and dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
                target = torch.float32
            # Passing an unchanged dtype makes diffusers warn about fp32-kept modules: only cast on change.
            if target is not None and target != module.dtype:
                module.to(device=device, dtype=target)
            else:
                module.to(device=device)
        return self

    def freeze(self) -> "BaseComponents":
        for module in self.modules:
            module.eval().requires_grad_(False)
        return self
