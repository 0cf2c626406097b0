"""Training the stage mapper (SPEC §2-3): the loop, its losses, checkpoints and resume.

One step, for a batch of B samples (paper's Eq. 5):

    t ~ U[t_lo, t_hi)                                    timesteps inside the dynamic stage
    x_t = √ᾱ·z + √(1−ᾱ)·ε                                z drawn from the photo's cached VAE posterior
    e, r = mapper(t, clip_image_embed)                   S* embedding and its value residual
    c = text_encoder("a photo of S*" with e)             K input; V input = c + r at S* (r dropped p=0.5)
    L = masked_mse(unet(x_t, t, c), ε) + w_te·L_te(text attention on a TE prompt)
        + w_id·λ_id(t)·(1 − cos(ArcFace(decode(x̂0)), ArcFace(photo)))

Everything but the mapper is frozen. All randomness comes from one torch.Generator on the training
device, whose state is saved in checkpoints, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .attention import attention_processors
from .concept import Concept, load_safetensors, save_safetensors_atomic
from .conditioning import (
    EmbeddingOverride,
    LastLayerAttention,
    PlaceholderTokens,
    add_residuals,
    eos_positions,
    single_token_id,
    tokenize,
)
from .errors import UserError
from .fast import GraphedStep, StaticTextEncoder, check_compile_backend, face_patches, gather_patches
from .identity import warp_faces
from .losses import (
    denoising_target,
    identity_loss,
    identity_weight,
    masked_mse,
    predicted_original,
    tandem_equilibrium_loss,
)
from .mapper import MapperConfig, StageMapper
from .prompts import TANDEM_EQUILIBRIUM_PROMPTS
from .stages import StagePartition, attention_iou, average_maps, capturing_attention, partition_stages

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
DEFAULT_PARTITION_WARMUP_STEPS = 100  # SPEC §2.1
CAPTURE_PROMPT = "a photo of {}"  # the prompt of the attention capture (paper, Fig. 2)


@dataclass
class TrainConfig:
    """Hyper-parameters of one concept's training. Defaults follow the paper (appendix) and SPEC.md."""

    placeholder: str = "S*"  # text standing for the concept in prompts
    supercategory: str = "face"  # single-token word: static stage 1 uses it, the mapper starts from it
    num_vectors: int = 1  # token positions S* expands to (SPEC §1; paper: 1, authors' code: 4)
    train_prompt: str = "a photo of {}"  # training prompt, {} = placeholder (paper, Fig. 2)
    max_train_steps: int = 1000  # optimizer steps (paper: 1000 iterations)
    train_batch_size: int = 2  # samples per step (paper: 2)
    learning_rate: float = 5e-5  # AdamW learning rate (paper: 5e-5)
    weight_decay: float = 0.01  # AdamW weight decay (paper: 0.01)
    adam_beta1: float = 0.9  # AdamW β1 (paper)
    adam_beta2: float = 0.999  # AdamW β2 (paper)
    adam_epsilon: float = 1e-8  # AdamW ε (PyTorch default)
    seed: int = 0  # seeds the training generator: same seed, same device -> same concept
    stage_window: tuple[int, int] | None = None  # (t_lo, t_hi) dynamic stage; None = find it (SPEC §2)
    lambda1: float = 0.7  # relative-IoU threshold that ends static stage 1 (paper, Table 2)
    lambda2: float = 0.8  # relative-IoU threshold above which static stage 2 begins (paper, Table 2)
    # full-schedule steps before the attention capture (SPEC §2.1: 100); None: 100, or max_train_steps
    # if fewer, so that a short run is not mostly warm-up
    partition_warmup_steps: int | None = None
    partition_timesteps: int = 50  # sampling-grid timesteps probed by the capture (50 DDIM steps)
    partition_resolution: int = 16  # attention maps are averaged on this grid (16x16)
    min_dynamic_fraction: float = 0.2  # narrower dynamic stages are widened to this share of T
    restart_after_partition: bool = False  # True: mapper back to its initial weights after the warm-up
    # (measured on the tiny model: continuing reaches a lower in-window loss, benchmarks/partition_restart.py)
    te_weight: float = 1e-3  # w_te, weight of the tandem-equilibrium loss (authors' code)
    te_temperature: float = 100.0  # τ of the TE softmax (authors' code)
    id_weight: float = 1.0  # w_id, weight of the identity loss (SPEC §3)
    use_id_loss: bool = True  # identity loss on (needs an identity encoder; off for non-face concepts)
    bypass_drop: float = 0.5  # probability of zeroing the value residual per sample (NeTI, SPEC §1)
    checkpoint_every: int = 0  # write a resumable checkpoint every N steps (0 = never)
    mapper_hidden_dim: int = 128  # width of the mapper's MLPs (authors' code: 128)
    time_frequencies: int = 64  # sinusoid frequencies of the mapper's timestep encoding
    mapper_time_dependent: bool = True  # False: one embedding for all t (textual-inversion ablation)
    mapper_residual: bool = True  # False: no value residual (ablation)
    optimize: bool = True  # speed-ups (fast.py); False = the plain reference step, every speed-up off
    cuda_graph: bool = True  # with optimize on CUDA: replay each step from a captured CUDA graph
    id_face_patch: bool = True  # with optimize: decode only the latent patch under the face for L_id
    id_patch_margin: int = 2  # latent pixels added around the aligned face crop's footprint
    sync_every: int = 10  # with optimize: steps between loss read-backs (progress, NaN check)
    compile: bool = False  # with optimize: torch.compile the UNet, VAE decoder and identity net (1st step compiles)
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" traces without code generation
    gradient_accumulation_steps: int = 1  # low-memory mode: the batch runs as this many micro-batches
    gradient_checkpointing: bool = False  # low-memory mode: recompute UNet activations in backward

    def __post_init__(self):
        if isinstance(self.stage_window, list):
            self.stage_window = tuple(self.stage_window)
        positive = ("num_vectors", "max_train_steps", "train_batch_size", "mapper_hidden_dim", "time_frequencies",
                    "partition_timesteps", "partition_resolution", "sync_every", "gradient_accumulation_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "te_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "te_weight", "id_weight", "checkpoint_every", "partition_warmup_steps",
                     "id_patch_margin"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2", "bypass_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.train_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"train_batch_size {self.train_batch_size} must be a multiple of gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}"
            )
        if not 0 <= self.lambda1 <= self.lambda2 <= 1:
            raise ValueError(f"need 0 <= lambda1 <= lambda2 <= 1, got {self.lambda1}, {self.lambda2}")
        if not 0 < self.min_dynamic_fraction <= 1:
            raise ValueError(f"min_dynamic_fraction must be in (0, 1], got {self.min_dynamic_fraction}")
        if "{}" not in self.train_prompt:
            raise ValueError(f"train_prompt must contain {{}} where the placeholder goes, got {self.train_prompt!r}")
        if self.stage_window is not None:
            lo, hi = self.stage_window
            if not 0 <= lo < hi:
                raise ValueError(f"stage_window must be LO:HI with 0 <= LO < HI, got {lo}:{hi}")
        if self.compile:
            check_compile_backend(self.compile_backend)

    @property
    def warmup_steps(self) -> int:
        """The partition warm-up's length: `partition_warmup_steps`, by default 100 or fewer (see there)."""
        if self.partition_warmup_steps is not None:
            return self.partition_warmup_steps
        return min(DEFAULT_PARTITION_WARMUP_STEPS, self.max_train_steps)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["stage_window"] = list(self.stage_window) if self.stage_window is not None else None
        return out


@dataclass
class TrainingData:
    """What the loop needs from the N training photos, computed once before training."""

    latent_mean: torch.Tensor  # (N, 4, h, w) mean of the VAE posterior (unscaled)
    latent_std: torch.Tensor  # (N, 4, h, w) its standard deviation
    masks: torch.Tensor  # (N, 1, h, w) face masks at latent resolution, in [0, 1], never all zero
    image_embeds: torch.Tensor  # (N, E) CLIP image embeddings (projection space)
    face_theta: torch.Tensor | None = None  # (N, 2, 3) affine_grid matrices aligning each face for ArcFace
    identity_reference: torch.Tensor | None = None  # (N, D_id) identity embeddings of the photos
    ip_adapter_embeds: torch.Tensor | None = None  # (N, 1, ...) IP-Adapter image embeds, when plugged in

    @property
    def num_images(self) -> int:
        return self.latent_mean.shape[0]


@torch.no_grad()
def prepare_training_data(
    vae,
    pixels: torch.Tensor,
    masks: torch.Tensor,
    image_embeds: torch.Tensor,
    face_theta: torch.Tensor | None = None,
    identity_encoder=None,
) -> TrainingData:
    """Encode the photos once: VAE posterior (mean, std), latent masks, identity references.

    pixels: (N, 3, H, W) in [-1, 1]; masks: (N, 1, H, W) in [0, 1] at pixel resolution;
    face_theta: (N, 2, 3) from `identity.alignment_theta`, needed with an identity encoder.
    """
    if masks.flatten(1).sum(1).min() <= 0:
        raise UserError("a face mask is empty; use another --mask method or a mask file that marks the face")
    device, dtype = vae.device, vae.dtype
    posterior = vae.encode(pixels.to(device, dtype)).latent_dist
    latent_size = posterior.mean.shape[-2:]
    latent_masks = torch.nn.functional.interpolate(masks.float().to(device), size=latent_size, mode="area")
    reference = None
    if identity_encoder is not None:
        if face_theta is None:
            raise ValueError("the identity loss needs the faces' alignment (face_theta)")
        faces = warp_faces(pixels.to(device, torch.float32), face_theta.to(device), identity_encoder.input_size)
        reference = identity_encoder(faces).float()
    return TrainingData(
        latent_mean=posterior.mean.float(),
        latent_std=posterior.std.float(),
        masks=latent_masks,
        image_embeds=image_embeds.float().to(device),
        face_theta=None if face_theta is None else face_theta.float().to(device),
        identity_reference=reference,
    )


@dataclass
class Batch:
    """The random draws of one step (all from the trainer's generator)."""

    image_index: torch.Tensor  # (B,) which photo each sample uses
    latents: torch.Tensor  # (B, 4, h, w) scaled latents drawn from the posterior
    noise: torch.Tensor  # (B, 4, h, w) ε
    timesteps: torch.Tensor  # (B,) long
    keep_residual: torch.Tensor  # (B,) 1.0 keeps the value residual, 0.0 drops it
    te_prompt_index: torch.Tensor  # (B,) which TE prompt each sample uses


@dataclass
class StepLosses:
    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # mse, te, id (unweighted)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class Trainer:
    """Trains one concept's stage mapper on a frozen base model. Use as a context manager:

        with Trainer(base, data, config, identity_encoder) as trainer:
            trainer.train(progress=...)
            concept = trainer.concept()

    Entering installs the UNet attention processors and the token-embedding hooks; leaving removes
    them (also on error), leaving the base model exactly as it was.
    """

    def __init__(self, base, data: TrainingData, config: TrainConfig, identity_encoder=None):
        from diffusers import DDPMScheduler

        self.base, self.data, self.config = base, data, config
        self.device, self.weight_dtype = base.device, base.dtype
        tokenizer, text_encoder = base.tokenizer, base.text_encoder
        try:
            super_id = single_token_id(tokenizer, config.supercategory)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.tokens = PlaceholderTokens(tokenizer, config.placeholder, config.num_vectors, slot=0)
        self.eos_token_id = tokenizer.eos_token_id

        super_embedding = text_encoder.get_input_embeddings().weight[super_id].detach().float().cpu()
        mapper_config = MapperConfig(
            text_embed_dim=base.hidden_size,
            image_embed_dim=data.image_embeds.shape[-1],
            num_vectors=config.num_vectors,
            time_frequencies=config.time_frequencies,
            hidden_dim=config.mapper_hidden_dim,
            time_dependent=config.mapper_time_dependent,
            use_residual=config.mapper_residual,
        )
        with torch.random.fork_rng(devices=[]):  # the mapper's initial weights follow the seed too
            torch.manual_seed(config.seed)
            self.mapper = StageMapper(mapper_config, super_embedding).to(self.device)
        self.mapper.train()
        self.initial_mapper_state = {k: v.clone() for k, v in self.mapper.state_dict().items()}
        self.optimizer = self._make_optimizer()
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.step_count = 0

        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.scaling_factor = base.vae.config.scaling_factor
        self.stage_window = config.stage_window
        self.stages: dict = {"method": "fixed", "window": list(config.stage_window)} if config.stage_window else {}
        self.attention_maps: torch.Tensor | None = None  # (K, r, r) from the partition capture

        prompt = self.tokens.rewrite(config.train_prompt.format(config.placeholder))
        self.train_ids = tokenize(tokenizer, [prompt], self.device)  # (1, L)
        te_prompts = [self.tokens.rewrite(p.replace("S*", config.placeholder)) for p in TANDEM_EQUILIBRIUM_PROMPTS]
        self.te_ids = tokenize(tokenizer, te_prompts, self.device)  # (P, L)
        self.te_placeholder_mask = torch.isin(self.te_ids, torch.tensor(self.tokens.ids, device=self.device))
        self.te_eos = eos_positions(self.te_ids, self.eos_token_id)

        use_id = config.use_id_loss and config.id_weight > 0
        if use_id and (identity_encoder is None or data.identity_reference is None):
            raise ValueError("use_id_loss needs an identity encoder and data prepared with it")
        self.identity_encoder = identity_encoder if use_id else None
        self._override: EmbeddingOverride | None = None
        self._last_attention: LastLayerAttention | None = None  # for the TE loss
        self._processors = None

        # Speed-ups (fast.py). The plain path (optimize=False) is the reference they are tested against.
        self.optimized = config.optimize
        self.static_text: StaticTextEncoder | None = None
        self.graphed: GraphedStep | None = None
        self.id_patches = None
        if self.optimized and self.identity_encoder is not None and config.id_face_patch:
            self.id_patches = face_patches(
                data.face_theta, tuple(data.latent_mean.shape[-2:]), base.vae_scale_factor, config.id_patch_margin
            )
            self.id_patches = (self.id_patches[0].to(self.device), self.id_patches[1], self.id_patches[2].to(self.device))
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
        self.use_graph = (
            self.optimized and config.cuda_graph and self.device.type == "cuda"
            and config.gradient_accumulation_steps == 1 and not config.gradient_checkpointing
        )
        if config.te_weight > 0:
            # Validate the TE prompts once (any attention will do), so the loss can skip its own
            # host-syncing checks in the hot loop.
            P, L = self.te_ids.shape
            tandem_equilibrium_loss(torch.ones(P, 1, L, L, device=self.device), self.te_placeholder_mask, self.te_eos)

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "Trainer":
        self._override = EmbeddingOverride(self.base.text_encoder)
        if self.config.te_weight > 0:
            self._last_attention = LastLayerAttention(self.base.text_encoder)
        self._processors = attention_processors(self.base.unet)
        self._processors.__enter__()
        if self.optimized and StaticTextEncoder.supported(self.base.text_encoder):
            self.static_text = StaticTextEncoder(self.base.text_encoder)
        if self.config.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
        return self

    def __exit__(self, *exc) -> None:
        if self.config.gradient_checkpointing:
            self.base.unet.disable_gradient_checkpointing()
        self.static_text = None
        self.graphed = None
        if self._last_attention is not None:
            self._last_attention.remove()
            self._last_attention = None
        if self._override is not None:
            self._override.remove()
            self._override = None
        if self._processors is not None:
            self._processors.__exit__(*exc)
            self._processors = None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.AdamW(
            self.mapper.parameters(),
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            weight_decay=c.weight_decay,
            # One fused kernel instead of a dozen launches per step on CUDA (same update rule).
            fused=True if self.config.optimize and self.device.type == "cuda" else None,
        )

    def restart_mapper(self) -> None:
        """Back to the initial weights with a fresh optimizer (after the partition warm-up, SPEC §2.6)."""
        with torch.no_grad():  # in place: a captured CUDA graph keeps pointing at these tensors
            for name, value in self.mapper.state_dict().items():
                value.copy_(self.initial_mapper_state[name])
        self.optimizer = self._make_optimizer()

    # -- one step ----------------------------------------------------------------------------------

    def sample_batch(self, window: tuple[int, int] | None = None, generator: torch.Generator | None = None) -> Batch:
        """Draw one batch; `window` (t_lo, t_hi) defaults to the dynamic stage."""
        if window is None and self.stage_window is None:
            raise RuntimeError("no stage window yet: call find_stage_window() first or set one in TrainConfig")
        lo, hi = window or self.stage_window
        g, B, d = generator or self.generator, self.config.train_batch_size, self.device
        data = self.data
        image_index = torch.randint(0, data.num_images, (B,), generator=g, device=d)
        latent_noise = torch.randn(data.latent_mean[image_index].shape, generator=g, device=d)
        latents = (data.latent_mean[image_index] + data.latent_std[image_index] * latent_noise) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=g, device=d)
        timesteps = torch.randint(lo, hi, (B,), generator=g, device=d)
        keep = (torch.rand((B,), generator=g, device=d) >= self.config.bypass_drop).float()
        te_index = torch.randint(0, self.te_ids.shape[0], (B,), generator=g, device=d)
        return Batch(image_index, latents, noise, timesteps, keep, te_index)

    def encode_prompt(self, input_ids, embeddings, residuals):
        """Text encoder output with S* = `embeddings` (B, V, D), and the V input with `residuals` added."""
        with self._override.vectors(self._per_token(embeddings.to(self.weight_dtype))):
            encoder_hidden_states = self.base.text_encoder(input_ids)[0]
        value_hidden_states = add_residuals(encoder_hidden_states, input_ids, self._per_token(residuals))
        return encoder_hidden_states, value_hidden_states

    def _per_token(self, vectors: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, V, D) -> {placeholder token id: (B, D)}, the form the override and the residuals take."""
        return {token_id: vectors[:, i] for i, token_id in enumerate(self.tokens.ids)}

    def denoise(self, noisy, timesteps, encoder_hidden_states, value_hidden_states, image_index,
                unet=None) -> torch.Tensor:
        """UNet prediction with the residual-on-V conditioning; with an IP-Adapter loaded on the UNet,
        each sample's photo embedding goes in through `added_cond_kwargs` (plug-in mode).
        `unet`: the module to run instead of the loss's (possibly compiled) one."""
        kwargs = {}
        if self.data.ip_adapter_embeds is not None:
            embeds = self.data.ip_adapter_embeds[image_index].to(self.weight_dtype)  # (B, 1, ...)
            kwargs["added_cond_kwargs"] = {"image_embeds": [embeds]}
        return (unet or self.unet)(
            noisy.to(self.weight_dtype),
            timesteps,
            encoder_hidden_states,
            cross_attention_kwargs={"value_hidden_states": value_hidden_states},
            **kwargs,
        ).sample

    def losses(self, batch: Batch) -> StepLosses:
        """All loss terms of one batch (differentiable w.r.t. the mapper)."""
        B = batch.timesteps.shape[0]
        noisy = self.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        embeddings, residuals = self.mapper(batch.timesteps, self.data.image_embeds[batch.image_index])
        residuals = residuals * batch.keep_residual[:, None, None]  # (B, V, D) * (B, 1, 1)
        input_ids = self.train_ids.expand(B, -1)
        te_attention = None
        if self.static_text is not None:
            # Training prompt and TE prompt through the text encoder as one batch of 2B.
            ids = input_ids
            if self.config.te_weight > 0:
                ids = torch.cat([input_ids, self.te_ids[batch.te_prompt_index]])
            repeat = ids.shape[0] // B
            with self._override.vectors(self._per_token(embeddings.repeat(repeat, 1, 1).to(self.weight_dtype))):
                hidden = self.static_text(ids)
            encoder_hidden_states = hidden[:B]
            value_hidden_states = add_residuals(encoder_hidden_states, input_ids, self._per_token(residuals))
            if self.config.te_weight > 0:
                te_attention = self._last_attention.take()[B:]
        else:
            encoder_hidden_states, value_hidden_states = self.encode_prompt(input_ids, embeddings, residuals)
        model_pred = self.denoise(noisy, batch.timesteps, encoder_hidden_states, value_hidden_states, batch.image_index)
        target = denoising_target(self.prediction_type, batch.latents, batch.noise, self.alphas_cumprod, batch.timesteps)
        terms = {"mse": masked_mse(model_pred, target, self.data.masks[batch.image_index])}
        total = terms["mse"]

        if self.config.te_weight > 0:
            if te_attention is None:
                te_ids = self.te_ids[batch.te_prompt_index]
                with self._override.vectors(self._per_token(embeddings.to(self.weight_dtype))):
                    self.base.text_encoder(te_ids)
                te_attention = self._last_attention.take()
            terms["te"] = tandem_equilibrium_loss(
                te_attention,
                self.te_placeholder_mask[batch.te_prompt_index],
                self.te_eos[batch.te_prompt_index],
                self.config.te_temperature,
                check=not self.optimized,
            )
            total = total + self.config.te_weight * terms["te"]

        if self.identity_encoder is not None:
            x0 = predicted_original(self.prediction_type, noisy, model_pred, self.alphas_cumprod, batch.timesteps)
            theta = self.data.face_theta[batch.image_index]
            if self.id_patches is not None:
                indices, size, patch_theta = self.id_patches
                x0 = gather_patches(x0, indices[batch.image_index], size)
                theta = patch_theta[batch.image_index]
            images = self.vae_decode((x0 / self.scaling_factor).to(self.weight_dtype)).sample
            faces = warp_faces(images.float(), theta, self.identity_encoder.input_size)
            per_sample = identity_loss(self.identity_encoder(faces), self.data.identity_reference[batch.image_index])
            weights = identity_weight(batch.timesteps, self.num_train_timesteps)
            terms["id"] = (weights * per_sample).mean()
            total = total + self.config.id_weight * terms["id"]
        return StepLosses(total, terms)

    def step(self) -> dict[str, float]:
        """One optimizer step in the dynamic stage; returns the loss terms as floats."""
        self.step_count += 1
        return self._check(self._optimize(self.stage_window), f"step {self.step_count}")

    def _optimize(self, window: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Draw a batch with t in `window` and take one optimizer step; returns the loss terms as
        (device) tensors, without reading them back."""
        batch = self.sample_batch(window)
        if self.use_graph:
            if self.graphed is None:
                # The capture runs on a batch from its own generator: the training draws stay the
                # same sequence whichever path trains.
                example = self.sample_batch(window, torch.Generator(self.device).manual_seed(0))
                try:
                    self.graphed = GraphedStep(self.losses, example, self.mapper.parameters())
                except RuntimeError as err:  # a capture-unsafe op in some library version: run eagerly
                    logger.warning("CUDA graph capture failed (%s); training without it", str(err).splitlines()[0])
                    self.use_graph = False
                    for p in self.mapper.parameters():
                        p.grad = None
        if self.use_graph:
            out = self.graphed.step(batch)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            accumulation = self.config.gradient_accumulation_steps
            total, terms = 0.0, {}
            for micro in _split_batch(batch, accumulation):
                out = self.losses(micro)
                (out.total / accumulation).backward()
                total = total + out.total.detach() / accumulation
                for k, v in out.terms.items():
                    terms[k] = terms.get(k, 0.0) + v.detach() / accumulation
            out = StepLosses(total, terms)
        self.optimizer.step()
        # Copies: a graph replay overwrites its outputs, and these are read back steps later.
        return {"loss": out.total.detach().clone(), **{k: v.detach().clone() for k, v in out.terms.items()}}

    @staticmethod
    def _check(logs: dict[str, torch.Tensor], where: str) -> dict[str, float]:
        """Read the loss terms back; raise TrainingDiverged on NaN/inf naming the step."""
        values = {k: float(v) for k, v in logs.items()}
        if not all(math.isfinite(v) for v in values.values()):
            bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
            raise TrainingDiverged(
                f"training diverged at {where} ({bad}); lower --learning-rate, "
                "use --dtype fp32, or check the photo and mask"
            )
        return values

    # -- stage partition (SPEC §2) -----------------------------------------------------------------

    def find_stage_window(self, progress=None) -> StagePartition:
        """Warm up over the whole schedule, capture S*'s attention, partition, set `stage_window`.

        progress(step, total, logs) is called after every warm-up step. Afterwards the mapper
        restarts from its initial weights or continues, as `restart_after_partition` says.
        """
        c, T = self.config, self.num_train_timesteps
        warmup = c.warmup_steps
        pending = []
        for k in range(1, warmup + 1):
            pending.append(self._optimize((0, T)))
            if k % self._sync_interval() == 0 or k == warmup:
                self._read_back(pending, k, warmup, "warm-up step", progress)
                pending = []
        timesteps, maps = self.capture_attention(c.partition_timesteps, c.partition_resolution)
        mask = self.data.masks[0, 0].cpu()
        iou = [attention_iou(m, mask) for m in maps.cpu()]
        partition = partition_stages(
            timesteps.tolist(), iou, c.lambda1, c.lambda2,
            min_dynamic_fraction=c.min_dynamic_fraction, num_train_timesteps=T,
        )
        # No static 1 / no static 2: the dynamic stage runs to the end of the schedule.
        t_hi = partition.t_hi if partition.has_static1 else T
        t_lo = partition.t_lo if partition.has_static2 else 0
        self.stage_window = (t_lo, t_hi)
        self.attention_maps = maps.cpu()
        self.stages = {
            "method": "auto",
            **partition.to_dict(),
            "window": [t_lo, t_hi],
            "warmup_steps": warmup,
            "restarted": c.restart_after_partition,
            "resolution": c.partition_resolution,
        }
        if c.restart_after_partition:
            self.restart_mapper()
        return partition

    @torch.no_grad()
    def capture_attention(self, num_timesteps: int, resolution: int, chunk: int = 10):
        """S*'s cross-attention map at each timestep of a `num_timesteps`-step DDIM grid.

        Photo 0's latent is noised with one fixed-seed noise draw (independent of the training
        generator), the prompt is "a photo of S*" with the current mapper. Returns timesteps (K,)
        descending and maps (K, resolution, resolution) in [0, 1].
        """
        from diffusers import DDIMScheduler

        grid = DDIMScheduler.from_config(self.base.scheduler_config)
        grid.set_timesteps(num_timesteps)
        timesteps = grid.timesteps.to(self.device)
        generator = torch.Generator(self.device).manual_seed(self.config.seed + 1)
        latents = self.data.latent_mean[:1] * self.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        prompt = self.tokens.rewrite(CAPTURE_PROMPT.format(self.config.placeholder))
        ids = tokenize(self.base.tokenizer, [prompt], self.device)
        columns = torch.nonzero(torch.isin(ids[0], torch.tensor(self.tokens.ids, device=self.device)))[:, 0]
        maps = []
        for t in timesteps.split(chunk):
            b = t.shape[0]
            noisy = self.noise_scheduler.add_noise(latents.expand(b, -1, -1, -1), noise.expand(b, -1, -1, -1), t)
            embeddings, residuals = self.mapper(t, self.data.image_embeds[:1].expand(b, -1))
            hidden, values = self.encode_prompt(ids.expand(b, -1), embeddings, residuals)
            with capturing_attention(self.base.unet, columns) as store:
                self.denoise(noisy, t, hidden, values, torch.zeros_like(t), unet=self.base.unet)
            maps.append(average_maps(store, resolution))
        return timesteps.cpu(), torch.cat(maps)

    def _read_back(self, pending: list[dict], last: int, total: int, label: str, progress) -> None:
        """Read back the losses of the steps that ended at step `last`, check each (naming it `label`
        and its number), and report each to `progress(step, total, logs)`."""
        for j, logs in enumerate(pending, start=last - len(pending) + 1):
            values = self._check(logs, f"{label} {j}")
            if progress is not None:
                progress(j, total, values)

    def _sync_interval(self) -> int:
        return self.config.sync_every if self.optimized else 1

    def train(self, num_steps: int | None = None, progress=None, checkpoint_dir: Path | None = None) -> None:
        """Run until `num_steps` (default: max_train_steps) steps are done in total.

        progress(step, total, logs) is called for every step (in the optimized path in bursts of
        `sync_every`, when the losses are read back). With `checkpoint_dir` and `checkpoint_every` > 0,
        a resumable checkpoint is written there every that many steps.
        """
        total = num_steps if num_steps is not None else self.config.max_train_steps
        every = self.config.checkpoint_every
        pending = []
        while self.step_count < total:
            self.step_count += 1
            pending.append(self._optimize(self.stage_window))
            step = self.step_count
            checkpoint_due = checkpoint_dir is not None and every and step % every == 0 and step < total
            if step % self._sync_interval() == 0 or step == total or checkpoint_due:
                self._read_back(pending, step, total, "step", progress)
                pending = []
            if checkpoint_due:
                self.save_checkpoint(checkpoint_dir / checkpoint_name(step))
                _remove_older_checkpoints(checkpoint_dir, keep=step)

    # -- evaluation helpers ------------------------------------------------------------------------

    @torch.no_grad()
    def masked_denoising_loss(self, timesteps: torch.Tensor, noise: torch.Tensor, use_mapper: bool = True) -> float:
        """Mean masked MSE of photo 0 at fixed `timesteps` (K,) and `noise` (K, 4, h, w), without
        the residual dropout; `use_mapper=False` conditions S* on the plain supercategory word."""
        K = timesteps.shape[0]
        latents = (self.data.latent_mean[:1] * self.scaling_factor).expand(K, -1, -1, -1)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        image_embeds = self.data.image_embeds[:1].expand(K, -1)
        embeddings, residuals = self.mapper(timesteps, image_embeds)
        if not use_mapper:
            embeddings = self.mapper.super_embedding.expand_as(embeddings)
            residuals = torch.zeros_like(residuals)
        encoder_hidden_states, value_hidden_states = self.encode_prompt(
            self.train_ids.expand(K, -1), embeddings, residuals
        )
        pred = self.denoise(noisy, timesteps, encoder_hidden_states, value_hidden_states, torch.zeros_like(timesteps))
        target = denoising_target(self.prediction_type, latents, noise, self.alphas_cumprod, timesteps)
        return masked_mse(pred, target, self.data.masks[:1]).item()

    # -- checkpoints and export --------------------------------------------------------------------

    def save_checkpoint(self, path: Path) -> None:
        """Mapper + optimizer + step + generator state, as safetensors + JSON (no pickle)."""
        tensors = {f"mapper.{k}": v for k, v in self.mapper.state_dict().items()}
        state = self.optimizer.state_dict()
        for index, param_state in state["state"].items():
            for key, value in param_state.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
        tensors["rng.generator"] = self.generator.get_state()
        header = {
            "checkpoint_format": CHECKPOINT_FORMAT,
            "package_version": __version__,
            "step": self.step_count,
            "stage_window": list(self.stage_window) if self.stage_window else None,
            "stages": self.stages,
            "param_groups": state["param_groups"],
            "config": self.config.to_dict(),
        }
        save_safetensors_atomic(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, {"checkpoint": json.dumps(header)}, path
        )

    def load_checkpoint(self, path: Path) -> None:
        tensors, header = load_safetensors(path)
        try:
            meta = json.loads(header["checkpoint"])
        except (KeyError, json.JSONDecodeError):
            raise UserError(f"{path} is not a personamagic training checkpoint") from None
        if meta.get("checkpoint_format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} has checkpoint format {meta.get('checkpoint_format')}, expected {CHECKPOINT_FORMAT}")
        self.mapper.load_state_dict({k[len("mapper."):]: v for k, v in tensors.items() if k.startswith("mapper.")})
        optimizer_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value.to(self.device) if value.dim() else value
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": meta["param_groups"]})
        self.generator.set_state(tensors["rng.generator"])
        self.step_count = meta["step"]
        if meta.get("stage_window"):
            self.stage_window = tuple(meta["stage_window"])
            self.stages = meta.get("stages", {})

    def concept(self, base_model: str, image_encoder: str = "", extra=None) -> Concept:
        """The trained concept, ready to save."""
        return Concept(
            mapper_state={k: v.detach().cpu().clone() for k, v in self.mapper.state_dict().items()},
            image_embeds=self.data.image_embeds.detach().cpu(),
            placeholder=self.config.placeholder,
            supercategory=self.config.supercategory,
            stage_window=tuple(int(t) for t in self.stage_window),
            num_train_timesteps=self.num_train_timesteps,
            base_model=base_model,
            text_encoder_hidden_size=self.base.hidden_size,
            mapper_config=self.mapper.config.to_dict(),
            image_encoder=image_encoder,
            training={**self.config.to_dict(), "steps_done": self.step_count},
            stages=self.stages,
            extra=extra or {},
        )


def _split_batch(batch: Batch, parts: int) -> list[Batch]:
    """A batch as `parts` equal micro-batches (gradient accumulation)."""
    if parts == 1:
        return [batch]
    fields = ("image_index", "latents", "noise", "timesteps", "keep_residual", "te_prompt_index")
    chunks = [getattr(batch, name).chunk(parts) for name in fields]
    return [Batch(*(chunk[i] for chunk in chunks)) for i in range(parts)]


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}.safetensors"


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []
    return found[-1] if found else None


def _remove_older_checkpoints(folder: Path, keep: int) -> None:
    for path in folder.glob("step-*.safetensors"):
        if path.name != checkpoint_name(keep):
            path.unlink(missing_ok=True)
