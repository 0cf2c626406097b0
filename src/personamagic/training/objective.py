"""The training objective of one batch (paper Eq. 5, docs/method.md) on a frozen base model of any family,
for one identity or for several whose samples share the batch (`training.group`), each its own L:

    x_t = √ᾱ·z + √(1−ᾱ)·ε                                z drawn from the photo's cached VAE posterior
    e, r = mapper(t, clip_image_embed)                   S* embedding and its value residual
    c = text_encoders("a photo of S*" with e)            K input; V input = c + r at S* (r dropped p=0.5)
    L = masked_mse(unet(x_t, t, c), target)              Eq. 2, target ε or v (the model's prediction type)
        + w_te · Σ_i w_i·L_te(attention of encoder i on a TE prompt)          Eq. 1
        + w_id · λ_id(t) · (1 − cos(f(decode(x̂0)), f(photo)))                 Eq. 3-4

The pure loss functions are in `personamagic.method.losses`; this module wires them to the model: the
text conditioning of the model's family, the UNet, the VAE decoder and the identity network, plus the
speed-ups that keep the arithmetic (one text-encoder batch for both prompts, the face patch, compiled
modules).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import ModelLoadError, SettingsError
from ..faces.alignment import warp_faces
from ..models.latents import LatentScale
from ..method.attention import attention_processors
from ..method.conditioning import LayerAttention, TextConditioner, UNetConditioning, add_residuals
from ..method.losses import (
    PREDICTION_TYPES,
    denoising_target,
    identity_loss,
    identity_weight,
    masked_mse,
    predicted_original,
    tandem_equilibrium_loss,
)
from ..method.tokens import eos_positions
from ..prompts import TANDEM_EQUILIBRIUM_PROMPTS
from .config import TrainConfig
from .data import Batch, TrainingData, concat
from .face_patches import face_patches, gather_patches
from .graph import StaticTextEncoder

logger = logging.getLogger(__name__)


@dataclass
class StepLosses:
    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # mse, te, id (unweighted)


class Objective:
    """L(t) of a batch for a mapper (module docstring). Open it (`with objective:`) to install the UNet's
    attention processors, the token-embedding overrides and the TE layer's probability capture; closing
    removes them all, leaving the base model as it was."""

    def __init__(self, base, data: TrainingData, config: TrainConfig, placeholder_ids: list[int], identity_encoder=None,
                 photomaker=None):
        from diffusers import DDPMScheduler

        self.base, self.data, self.config = base, data, config
        self.device, self.weight_dtype = base.device, base.dtype
        self.placeholder_ids = placeholder_ids
        # PhotoMaker plugged in (`adapters.photomaker_plugin.PhotoMaker`): S* is fused with each sample's
        # photo's ID embedding (`data.photomaker_embeds`) after the text encoders
        self.photomaker = photomaker
        if photomaker is not None and data.photomaker_embeds is None:
            raise ValueError("training with PhotoMaker needs the photos' ID embeddings (data.photomaker_embeds)")
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"{base.name} predicts {self.prediction_type!r} (its scheduler config's "
                                 f"prediction_type); PersonaMagic trains {' and '.join(PREDICTION_TYPES)} models")
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.latent_scale = LatentScale.of(base.vae)
        self.conditioner = TextConditioner(base)
        self._prepare_prompts()
        use_id = config.use_id_loss and config.id_weight > 0
        if use_id and (identity_encoder is None or data.identity_reference is None):
            raise ValueError("use_id_loss needs an identity encoder and data prepared with it")
        self.identity_encoder = identity_encoder if use_id else None
        self.optimized = config.optimize
        self.id_patches = None
        if self.optimized and self.identity_encoder is not None and config.id_face_patch:
            indices, size, thetas = face_patches(
                data.face_theta, tuple(data.latent_mean.shape[-2:]), base.vae_scale_factor, config.id_patch_margin
            )
            self.id_patches = (indices.to(self.device), size, thetas.to(self.device))
        # The networks the loss runs through; compiled ones when asked (the partition capture and
        # anything else outside the loss keep the plain modules).
        self.unet, self.vae_decode = base.unet, base.vae.decode
        if self.optimized and config.compile:
            logger.info("--compile: the first training step compiles the UNet, VAE decoder and identity "
                        "network (minutes; PyTorch caches the result on disk for later runs)")
            self.unet = torch.compile(base.unet, backend=config.compile_backend)
            self.vae_decode = torch.compile(base.vae.decode, backend=config.compile_backend)
            if self.identity_encoder is not None:
                self.identity_encoder = torch.compile(self.identity_encoder, backend=config.compile_backend)
        self.static_text = None
        self._te_layers: list[LayerAttention] = []
        self._processors = None

    def _prepare_prompts(self) -> None:
        """Tokenize the training and TE prompts once and validate them (so the hot loop need not)."""
        c = self.config
        rewrite = self._rewrite
        self.train_ids = self.conditioner.tokenize([rewrite(c.train_prompt.format(c.placeholder))], self.device)
        te_prompts = [rewrite(p.replace("S*", c.placeholder)) for p in TANDEM_EQUILIBRIUM_PROMPTS]
        self.te_ids = self.conditioner.tokenize(te_prompts, self.device)  # per tokenizer (P, L)
        placeholder = torch.tensor(self.placeholder_ids, device=self.device)
        for ids in (*self.train_ids, *self.te_ids):
            if bool((torch.isin(ids, placeholder).sum(dim=1) < len(self.placeholder_ids)).any()):
                raise SettingsError(f"--num-vectors {c.num_vectors} does not fit: with that many S* tokens the training "
                                    "prompts are cut at 77 tokens; use fewer vectors or a shorter --train-prompt")
        self.te_placeholder_mask = [torch.isin(ids, placeholder) for ids in self.te_ids]
        self.te_eos = [eos_positions(ids, tok.eos_token_id) for ids, tok in zip(self.te_ids, self.base.tokenizers)]
        encoders = len(self.base.text_encoders)
        weights = c.te_encoder_weights or tuple(1.0 / encoders for _ in range(encoders))
        if len(weights) != encoders:
            raise ValueError(f"te_encoder_weights has {len(weights)} weights for {encoders} text encoders")
        self.te_weights = weights
        if c.te_weight > 0:
            # Any attention will do to check the prompts (a placeholder and a real word in each), so
            # the loss can skip its own host-syncing checks in the hot loop.
            for mask, eos in zip(self.te_placeholder_mask, self.te_eos):
                P, L = mask.shape
                tandem_equilibrium_loss(torch.ones(P, 1, L, L, device=self.device), mask, eos)

    def _rewrite(self, prompt: str) -> str:
        tokens = " ".join(self.base.tokenizer.convert_ids_to_tokens(self.placeholder_ids))
        return prompt.replace(self.config.placeholder, tokens)

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "Objective":
        self.conditioner.open()
        if self.config.te_weight > 0:
            layer = self.base.family.te_layer
            self._te_layers = [LayerAttention(encoder, layer) for encoder in self.base.text_encoders]
        self._processors = attention_processors(self.base.unet)
        self._processors.__enter__()
        if self.optimized and all(StaticTextEncoder.supported(e) for e in self.base.text_encoders):
            self.static_text = StaticTextEncoder()
        self._gradient_checkpointing = self.base.unet.is_gradient_checkpointing
        if self.config.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
        return self

    def __exit__(self, *exc) -> None:
        if self.config.gradient_checkpointing and not self._gradient_checkpointing:
            self.base.unet.disable_gradient_checkpointing()
        self.static_text = None
        for layer in self._te_layers:
            layer.remove()
        self._te_layers = []
        self.conditioner.close()
        if self._processors is not None:
            self._processors.__exit__(*exc)
            self._processors = None

    # -- the pieces --------------------------------------------------------------------------------

    def per_token(self, vectors: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, V, W) -> {placeholder token id: (B, W)}, the form the override and the residuals take."""
        return {token_id: vectors[:, i] for i, token_id in enumerate(self.placeholder_ids)}

    def conditioning(self, input_ids: list, embeddings, residuals, image_index, *, forward=None):
        """UNet conditioning of prompts (one (B, L) id tensor per tokenizer) with S* = `embeddings`
        (B, V, D) and `residuals` (B, V, C) added to the V input."""
        hidden, pooled = self.conditioner.encode(input_ids, self.per_token(embeddings), check=False, forward=forward)
        return self._unet_conditioning(hidden, pooled, input_ids[0], residuals, image_index)

    def _unet_conditioning(self, hidden, pooled, ids, residuals, image_index) -> UNetConditioning:
        if self.photomaker is not None:
            hidden = self.photomaker.fuse(hidden, ids, self.placeholder_ids, self.data.photomaker_embeds[image_index])
        values = add_residuals(hidden, ids, self.per_token(residuals))
        added = {}
        if self.data.time_ids is not None:
            added = self.base.family.added_conditioning(pooled, self.data.time_ids[image_index].to(hidden.dtype))
        if self.data.ip_adapter_embeds is not None:
            embeds = self.data.ip_adapter_embeds[image_index].to(self.weight_dtype)  # (B, 1, ...)
            added = {**added, "image_embeds": [embeds]}
        return UNetConditioning(hidden, values, added)

    def denoise(self, noisy, timesteps, conditioning: UNetConditioning, unet=None) -> torch.Tensor:
        """UNet prediction with the residual-on-V conditioning (and any added conditioning: SDXL's sizes,
        an IP-Adapter's photo embedding). `unet`: the module to run instead of the loss's (possibly
        compiled) one."""
        return (unet or self.unet)(noisy.to(self.weight_dtype), timesteps, **conditioning.unet_kwargs()).sample

    def add_noise(self, latents, noise, timesteps) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    # -- Eq. 5 -------------------------------------------------------------------------------------

    def losses(self, mapper, batch: Batch, slices: list[slice] | None = None, id_patches=None) -> list[StepLosses]:
        """Eq. 5 of each identity whose samples share `batch` (differentiable w.r.t. the mappers).

        slices[i] holds identity i's samples (None: one identity, the whole batch) and `mapper` gives each
        sample its own identity's output (`group.GroupMapper`). The text encoders, the UNet and the VAE
        decoder run once on the whole batch; each identity's terms are means over its own samples, so they
        (and its mapper's gradient) are what it gets on its batch alone: every network here treats samples
        independently. id_patches: per slice, that identity's face patches (indices (N, ph*pw), (ph, pw),
        thetas (N, 2, 3), rows indexed like this objective's photos), since identities' patch sizes differ;
        None: this objective's own for every slice.
        """
        slices = slices or [slice(0, batch.size)]
        noisy, model_pred, target, te_attention = self._forward(mapper, batch)
        masks = self.data.masks[batch.image_index]
        identity = [None] * len(slices)
        if self.identity_encoder is not None:
            identity = self._identity(noisy, model_pred, batch, slices, id_patches or [self.id_patches] * len(slices))
        losses = []
        for s, identity_term in zip(slices, identity):
            terms = {"mse": masked_mse(model_pred[s], target[s], masks[s])}
            total = terms["mse"]
            if self.config.te_weight > 0:
                terms["te"] = self._tandem_equilibrium(batch.te_prompt_index[s], [a[s] for a in te_attention])
                total = total + self.config.te_weight * terms["te"]
            if identity_term is not None:
                terms["id"] = identity_term
                total = total + self.config.id_weight * terms["id"]
            losses.append(StepLosses(total, terms))
        return losses

    def _forward(self, mapper, batch: Batch):
        """The shared forward of a batch: noisy latents, the UNet's prediction and its target, and the TE
        layers' attention on each sample's TE prompt (None without the TE loss)."""
        B = batch.size
        noisy = self.add_noise(batch.latents, batch.noise, batch.timesteps)
        embeddings, residuals = mapper(batch.timesteps, self.data.image_embeds[batch.image_index])
        residuals = residuals * batch.keep_residual[:, None, None]  # (B, V, C) * (B, 1, 1)
        train_ids = [ids.expand(B, -1) for ids in self.train_ids]
        te_ids = [te[batch.te_prompt_index] for te in self.te_ids]
        te_attention = None
        if self.static_text is not None:
            # Training prompt and TE prompt through the text encoders as one batch of 2B.
            ids = [torch.cat([t, te]) for t, te in zip(train_ids, te_ids)] if self.config.te_weight > 0 else train_ids
            repeat = ids[0].shape[0] // B
            hidden, pooled = self.conditioner.encode(
                ids, self.per_token(embeddings.repeat(repeat, 1, 1)), check=False, forward=self.static_text
            )
            conditioning = self._unet_conditioning(
                hidden[:B], None if pooled is None else pooled[:B], train_ids[0], residuals, batch.image_index
            )
            if self.config.te_weight > 0:
                te_attention = [layer.take()[B:] for layer in self._te_layers]
        else:
            conditioning = self.conditioning(train_ids, embeddings, residuals, batch.image_index)
            if self.config.te_weight > 0:
                self.conditioner.encode(te_ids, self.per_token(embeddings), check=False)
                te_attention = [layer.take() for layer in self._te_layers]
        model_pred = self.denoise(noisy, batch.timesteps, conditioning)
        target = denoising_target(self.prediction_type, batch.latents, batch.noise, self.alphas_cumprod, batch.timesteps)
        return noisy, model_pred, target, te_attention

    def _tandem_equilibrium(self, te_prompt_index: torch.Tensor, te_attention: list) -> torch.Tensor:
        """Σ_i w_i · L_te of text encoder i on each sample's TE prompt (Eq. 1); te_prompt_index (B,)."""
        loss = 0.0
        for weight, attention, mask, eos in zip(self.te_weights, te_attention, self.te_placeholder_mask, self.te_eos):
            loss = loss + weight * tandem_equilibrium_loss(attention, mask[te_prompt_index], eos[te_prompt_index],
                                                           self.config.te_temperature, check=not self.optimized)
        return loss

    def _identity(self, noisy, model_pred, batch: Batch, slices: list[slice], id_patches: list) -> list[torch.Tensor]:
        """Each slice's λ_id(t)-weighted 1 − cos of the decoded x̂0's face with its photo's (Eq. 3-4): one VAE
        decode per face-patch size (slices of equal sizes share it), one identity-network call for all."""
        x0 = predicted_original(self.prediction_type, noisy, model_pred, self.alphas_cumprod, batch.timesteps)
        by_size: dict = {}
        for i, patch in enumerate(id_patches):
            by_size.setdefault(None if patch is None else patch[1], []).append(i)
        order = [i for members in by_size.values() for i in members]
        faces = []
        for size, members in by_size.items():
            index = [batch.image_index[slices[i]] for i in members]
            part = concat([x0[slices[i]] for i in members])
            if size is None:
                theta = self.data.face_theta[concat(index)]
            else:
                part = gather_patches(part, concat([id_patches[i][0][j] for i, j in zip(members, index)]), size)
                theta = concat([id_patches[i][2][j] for i, j in zip(members, index)])
            images = self.vae_decode(self.latent_scale.decode(part).to(self.base.vae.dtype)).sample
            faces.append(warp_faces(images.float(), theta, self.identity_encoder.input_size))
        image_index = concat([batch.image_index[slices[i]] for i in order])
        timesteps = concat([batch.timesteps[slices[i]] for i in order])
        per_sample = identity_loss(self.identity_encoder(concat(faces)), self.data.identity_reference[image_index])
        weighted = identity_weight(timesteps, self.num_train_timesteps) * per_sample
        identity = [None] * len(slices)
        for i, share in zip(order, weighted.split([batch.timesteps[slices[i]].shape[0] for i in order])):
            identity[i] = share.mean()
        return identity

    # -- evaluation --------------------------------------------------------------------------------

    @torch.no_grad()
    def held_out_loss(self, mapper, timesteps: torch.Tensor, noise: torch.Tensor, use_mapper: bool = True) -> float:
        """Mean masked MSE of photo 0 at fixed `timesteps` (K,) and `noise` (K, 4, h, w), without the
        residual dropout; `use_mapper=False` conditions S* on the plain supercategory word."""
        K = timesteps.shape[0]
        latents = self.latent_scale.encode(self.data.latent_mean[:1]).expand(K, -1, -1, -1)
        noisy = self.add_noise(latents, noise, timesteps)
        embeddings, residuals = mapper(timesteps, self.data.image_embeds[:1].expand(K, -1))
        if not use_mapper:
            embeddings = mapper.super_embedding.expand_as(embeddings)
            residuals = torch.zeros_like(residuals)
        image_index = torch.zeros_like(timesteps)
        conditioning = self.conditioning([ids.expand(K, -1) for ids in self.train_ids], embeddings, residuals,
                                         image_index)
        pred = self.denoise(noisy, timesteps, conditioning)
        target = denoising_target(self.prediction_type, latents, noise, self.alphas_cumprod, timesteps)
        return masked_mse(pred, target, self.data.masks[:1]).item()
