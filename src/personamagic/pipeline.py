"""PersonaMagicPipeline: Stable Diffusion 1.x sampling with stage-regulated concepts (SPEC §4).

A diffusers `DiffusionPipeline` over the usual SD components. At every denoising step each loaded
concept's S* follows its stages:

| stage    | t range          | S* token embedding     | value residual |
|----------|------------------|------------------------|----------------|
| static 1 | t >= t_hi        | supercategory word     | none           |
| dynamic  | t_lo <= t < t_hi | mapper(t)              | mapper(t)      |
| static 2 | t < t_lo         | mapper(t_lo), frozen   | mapper(t_lo)   |

Conditional and unconditional branches of all prompts × seeds run through the UNet in one batch
(classifier-free guidance). Several concepts may share a prompt, each with its own placeholder and its
own stages (compositional generation, paper Fig. 12). Two more of the paper's applications are
arguments of `__call__`: localized customization (`background` + `region`, Blended Latent Diffusion,
`blend.py`) and the IP-Adapter plug-in (`pipe.load_ip_adapter(...)` from diffusers' `IPAdapterMixin`,
then `ip_adapter_image=`).

`attach_concepts(sd_pipe, concepts)` builds one on top of an existing diffusers
`StableDiffusionPipeline`, sharing its modules.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import IPAdapterMixin
from diffusers.utils.torch_utils import randn_tensor

from .attention import attention_processors
from .blend import blend_latents, latent_region, noised_background
from .concept import Concept
from .conditioning import EmbeddingOverride, PlaceholderTokens, add_residuals, tokenize
from .errors import UserError
from .fast import GraphedUNet
from .ip_adapter import encode_images, num_ip_adapters

logger = logging.getLogger(__name__)

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
    """(diffusers class name, config overrides) for a `--scheduler` name; UserError if unusable here."""
    from diffusers.schedulers import KarrasDiffusionSchedulers

    # The schedulers diffusers' Stable Diffusion pipelines accept; EDM's needs an EDM-trained model.
    compatible = {s.name for s in KarrasDiffusionSchedulers} - {"EDMEulerScheduler"}
    if name in SCHEDULERS:
        class_name, overrides = SCHEDULERS[name]
    elif name in compatible:
        class_name, overrides = name, {}
    else:
        raise UserError(
            f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} or a diffusers class name "
            "such as KDPM2DiscreteScheduler"
        )
    package = SCHEDULER_REQUIREMENTS.get(class_name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(f"scheduler {name!r} needs the package {package}: pip install {package}")
    return class_name, overrides


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by short name (`SCHEDULERS`) or class name, on the base model's noise schedule."""
    import diffusers

    class_name, overrides = scheduler_choice(name)
    return getattr(diffusers, class_name).from_config({**config, **overrides})


@dataclass
class LoadedConcept:
    """A concept attached to a pipeline: its mapper on the device and its placeholder tokens."""

    concept: Concept
    mapper: torch.nn.Module
    tokens: PlaceholderTokens
    image_embed: torch.Tensor  # (1, E)

    @property
    def window(self) -> tuple[int, int]:
        return self.concept.stage_window

    def stage(self, t: int) -> str:
        lo, hi = self.window
        return "static1" if t >= hi else "dynamic" if t >= lo else "static2"

    def vectors(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, D) token embeddings and (V, D) value residuals of S* at timestep t."""
        embeddings, residuals = self.vectors_at([t])
        return embeddings[0], residuals[0]

    def vectors_at(self, timesteps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V, D) token embeddings and (K, V, D) value residuals at K timesteps, in one mapper call."""
        lo, _ = self.window
        stages = [self.stage(t) for t in timesteps]
        t_eff = torch.tensor([t if s == "dynamic" else lo for t, s in zip(timesteps, stages)],
                             device=self.image_embed.device)
        embeddings, residuals = self.mapper(t_eff, self.image_embed.expand(len(timesteps), -1))
        static1 = torch.tensor([s == "static1" for s in stages], device=embeddings.device)[:, None, None]
        word = self.mapper.super_embedding.expand_as(embeddings)
        return torch.where(static1, word, embeddings), residuals.masked_fill(static1, 0.0)


@dataclass
class ScheduledConditioning:
    """Text conditioning for a whole sampling run: a table of encoded rows and, per denoising step,
    which rows make the batch."""

    hidden: torch.Tensor  # (R, L, D) text encoder outputs: the K input of cross-attention
    values: torch.Tensor  # (R, L, D) the same plus the mapper residuals: the V input
    rows: list  # per step i of the schedule: (B,) rows of the table

    def at(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) K input and (B, L, D) V input at step i (by position: reading a timestep's value
        off the GPU would wait for it at every step)."""
        return self.hidden[self.rows[i]], self.values[self.rows[i]]


class PersonaMagicPipeline(DiffusionPipeline, IPAdapterMixin):
    """Text-to-image with PersonaMagic concepts; the base model stays untouched."""

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["image_encoder", "feature_extractor"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, image_encoder=None, feature_extractor=None):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        self.concepts: list[LoadedConcept] = []
        self.base_model_name = getattr(text_encoder.config, "_name_or_path", "")
        self.graphed_unet: GraphedUNet | None = None  # see enable_cuda_graph()
        self.compiled_unet = None  # see enable_compile()

    @classmethod
    def from_base(cls, base, scheduler: str = "ddim") -> "PersonaMagicPipeline":
        """Build from `personamagic.models.BaseComponents`."""
        pipe = cls(
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            unet=base.unet,
            scheduler=make_scheduler(scheduler, base.scheduler_config),
        )
        pipe.base_model_name = base.name
        return pipe

    def set_scheduler(self, name: str) -> None:
        self.scheduler = make_scheduler(name, dict(self.scheduler.config))

    def enable_cuda_graph(self, enabled: bool = True) -> None:
        """Replay the UNet's forward from a CUDA graph (captured once per batch shape): same kernels,
        far fewer launches — at batch 1-2 the eager UNet mostly waits for them. CUDA only; not used
        with IP-Adapter inputs."""
        if enabled and self.device.type != "cuda":
            raise UserError("CUDA graphs need a CUDA device; run on --device cuda or without them")
        self.graphed_unet = GraphedUNet(self._denoiser()) if enabled else None

    def enable_compile(self, enabled: bool = True, backend: str = "inductor", channels_last: bool = True) -> None:
        """Run the UNet through `torch.compile`: fused kernels, worth it where sampling is compute-bound
        (large batches). The first call of each batch shape compiles (about a minute for SD-1.x;
        PyTorch caches the generated code on disk for later processes); further calls reuse it.
        `channels_last` also switches the UNet's weights to that memory format (same values) — the
        pairing PERF.md measured. Combines with `enable_cuda_graph`, which then replays compiled code.
        """
        if enabled and channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.compiled_unet = torch.compile(self.unet, backend=backend) if enabled else None
        if self.graphed_unet is not None:
            self.graphed_unet = GraphedUNet(self._denoiser())

    def _denoiser(self):
        """The UNet callable sampling uses: compiled when enabled, else the module itself."""
        return self.compiled_unet if self.compiled_unet is not None else self.unet

    # -- concepts ----------------------------------------------------------------------------------

    def load_concept(self, concept: Concept | str, placeholder: str | None = None) -> LoadedConcept:
        """Attach a concept (object or path); `placeholder` overrides the text that stands for it."""
        if not isinstance(concept, Concept):
            concept = Concept.load(concept)
        for warning in concept.check_compatible(
            self.text_encoder.config.hidden_size, self.scheduler.config.num_train_timesteps, self.base_model_name
        ):
            logger.warning(warning)
        placeholder = placeholder or concept.placeholder
        if any(c.tokens.placeholder == placeholder for c in self.concepts):
            raise UserError(
                f"two concepts use the placeholder {placeholder!r}; give each its own "
                "(--placeholder once per concept, e.g. --placeholder '<me>' --placeholder '<style>')"
            )
        num_vectors = concept.mapper_config["num_vectors"]
        tokens = PlaceholderTokens(self.tokenizer, placeholder, num_vectors, slot=len(self.concepts))
        mapper = concept.build_mapper(self.device)
        image_embed = concept.mean_image_embed()[None].to(self.device)
        loaded = LoadedConcept(concept, mapper, tokens, image_embed)
        self.concepts.append(loaded)
        return loaded

    def rewrite_prompt(self, prompt: str) -> str:
        """Replace every concept's placeholder by its tokens, in one pass, longest placeholder first,
        so that `S*` never eats the start of `S*2`."""
        if not self.concepts:
            return prompt
        by_text = {c.tokens.placeholder: c.tokens for c in self.concepts}
        pattern = "|".join(re.escape(p) for p in sorted(by_text, key=len, reverse=True))
        return re.sub(pattern, lambda m: " ".join(by_text[m.group(0)].tokens), prompt)

    # -- conditioning ------------------------------------------------------------------------------

    def _stage_key(self, t: int) -> tuple:
        """Steps with the same key share text conditioning (static stages are computed once)."""
        return tuple(c.stage(t) if c.stage(t) != "dynamic" else t for c in self.concepts)

    def _vectors(self, timesteps: list[int], rows: int) -> tuple[dict, dict]:
        """Per placeholder token id, its (K·rows, D) embeddings and residuals for K timesteps, each
        repeated for `rows` consecutive rows."""
        vectors, residuals = {}, {}
        for loaded in self.concepts:
            embeds, res = loaded.vectors_at(timesteps)  # (K, V, D)
            for i, token_id in enumerate(loaded.tokens.ids):
                vectors[token_id] = embeds[:, i].repeat_interleave(rows, 0).to(self.text_encoder.dtype)
                residuals[token_id] = res[:, i].repeat_interleave(rows, 0)
        return vectors, residuals

    def encode_at(self, input_ids: torch.Tensor, t: int, override: EmbeddingOverride):
        """(B, L) ids -> K input (B, L, D) and V input (B, L, D) at timestep t: each concept's tokens get
        that concept's embedding for its stage at t, and its residual is added to the V input there."""
        vectors, residuals = self._vectors([t], input_ids.shape[0])
        with override.vectors(vectors):
            hidden = self.text_encoder(input_ids)[0]
        return hidden, add_residuals(hidden, input_ids, residuals)

    def encode_schedule(self, input_ids: torch.Tensor, timesteps, chunk: int = 256) -> "ScheduledConditioning":
        """The text conditioning of every denoising step, in as few text-encoder calls as possible.

        Equivalent to `encode_at(input_ids, t)` at each t, but each distinct prompt is encoded once per
        distinct stage key (once in all if it holds no placeholder), all in batches of up to `chunk`
        rows: one call instead of one per dynamic step, and no repeated work for the negative prompt or
        for many images of one prompt.
        """
        steps = [int(t) for t in torch.as_tensor(timesteps).tolist()]  # one device read for all steps
        keys = [self._stage_key(t) for t in steps]
        distinct = list(dict.fromkeys(keys))  # in order of first use
        key_times = [steps[keys.index(k)] for k in distinct]
        # (B, L) -> (U, L) distinct prompts; inverse: (B,) row of each prompt in the distinct ones
        prompts, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
        placeholder_ids = torch.tensor([i for c in self.concepts for i in c.tokens.ids], dtype=prompts.dtype,
                                       device=prompts.device)
        dependent = torch.isin(prompts, placeholder_ids).any(dim=1)  # (U,)
        plain, personal = prompts[~dependent], prompts[dependent]
        P, D, K = plain.shape[0], personal.shape[0], len(distinct)
        # rows: the P plain prompts once, then the D personal prompts once per stage key (k-major)
        ids = torch.cat([plain, personal.repeat(K, 1)])
        vectors, residuals = self._vectors(key_times, D) if D else ({}, {})
        vectors = {i: torch.cat([v.new_zeros(P, v.shape[1]), v]) for i, v in vectors.items()}
        residuals = {i: torch.cat([r.new_zeros(P, r.shape[1]), r]) for i, r in residuals.items()}
        override = EmbeddingOverride(self.text_encoder)
        hidden = []
        try:
            for start in range(0, ids.shape[0], chunk):
                part = {i: v[start:start + chunk] for i, v in vectors.items()}
                with override.vectors(part):
                    hidden.append(self.text_encoder(ids[start:start + chunk])[0])
        finally:
            override.remove()
        hidden = torch.cat(hidden)  # (P + K·D, L, D)
        values = add_residuals(hidden, ids, residuals)
        # table row of distinct prompt u under key k
        position = torch.empty(K, prompts.shape[0], dtype=torch.long, device=prompts.device)
        position[:, ~dependent] = torch.arange(P, device=prompts.device)
        position[:, dependent] = P + torch.arange(K * D, device=prompts.device).view(K, D)
        rows = position[:, inverse]  # (K, B)
        return ScheduledConditioning(hidden, values, [rows[distinct.index(k)] for k in keys])

    # -- sampling ----------------------------------------------------------------------------------

    def check_prompts(self, prompts: list[str]) -> list[str]:
        """Warnings for prompts that mention none of the loaded concepts."""
        return [
            f"prompt {p!r} does not contain {' or '.join(c.tokens.placeholder for c in self.concepts)}; "
            "the concept will not appear"
            for p in prompts
            if self.concepts and not any(c.tokens.occurs_in(p) for c in self.concepts)
        ]

    def prepare_localized(self, background, region, batch_size: int, height: int, width: int):
        """Background image(s) and region mask(s) -> scaled background latents (B, C, h, w) and the
        latent region (B or 1, 1, h, w) in {0, 1}. Images are resized to (height, width)."""
        if (background is None) != (region is None):
            raise ValueError("localized generation needs both `background` and `region`")
        pixels = self.image_processor.preprocess(background, height=height, width=width)
        mask = self.mask_processor.preprocess(region, height=height, width=width)
        pixels = pixels.to(self.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mean.float() * self.vae.config.scaling_factor
        if latents.shape[0] not in (1, batch_size):
            raise ValueError(f"{latents.shape[0]} backgrounds for {batch_size} images")
        region = latent_region(mask.to(self.device), latents.shape[-2:])
        if not region.any():
            raise UserError("the region mask is empty at latent resolution; paint a larger white area")
        return latents.expand(batch_size, -1, -1, -1), region

    def prepare_ip_adapter(self, ip_adapter_image, ip_adapter_image_embeds, batch_size: int, do_cfg: bool):
        """Per loaded IP-Adapter, its image input for the whole UNet batch ((uncond, cond) with guidance).

        `ip_adapter_image`: one image (or list of images) per adapter. `ip_adapter_image_embeds`: one
        tensor per adapter as in diffusers: (1 or B, K, ...), with guidance the negative half first.
        """
        count = num_ip_adapters(self.unet)
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
                positive, negative = encode_images(self, image if isinstance(image, list) else [image], index)
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
            embeds.append(torch.cat(parts).to(self.device, self.unet.dtype))
        return embeds

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 8.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        eta: float = 0.0,
        background=None,
        region=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ):
        """Sample images; `prompt` may hold several prompts, one generator per image keeps each image
        independent of the batch it is in.

        background, region: localized customization (PIL image / tensor in [-1, 1]; mask: white = paint
        the concept here); the outside follows the background (Blended Latent Diffusion).
        ip_adapter_image / ip_adapter_image_embeds: inputs of IP-Adapters loaded with `load_ip_adapter`.
        """
        # 1. prompts -> token ids (uncond first, cond after: one batch for classifier-free guidance)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch_size = len(prompts)
        negative = negative_prompt if negative_prompt is not None else ""
        negatives = [negative] * batch_size if isinstance(negative, str) else list(negative)
        if len(negatives) * num_images_per_prompt == batch_size and len(negatives) != batch_size:
            negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        if len(negatives) != batch_size:
            raise ValueError(f"{len(negatives)} negative prompts for {batch_size} prompts")
        do_cfg = guidance_scale > 1.0
        texts = (negatives if do_cfg else []) + prompts
        input_ids = tokenize(self.tokenizer, [self.rewrite_prompt(p) for p in texts], self.device)

        # 2. timesteps and initial noise
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        shape = (batch_size, self.unet.config.in_channels, *latent_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        noise = latents.to(self.device, torch.float32)
        latents = noise * self.scheduler.init_noise_sigma
        step_parameters = inspect.signature(self.scheduler.step).parameters
        extra = {"eta": eta} if "eta" in step_parameters else {}
        if "generator" in step_parameters:
            extra["generator"] = generator

        # 3. localized customization: the outside starts as the background noised to the first step
        known = None
        if background is not None or region is not None:
            known, region_mask = self.prepare_localized(background, region, batch_size, height, width)
            latents = blend_latents(latents, noised_background(self.scheduler, known, noise, timesteps[0]), region_mask)

        # 4. IP-Adapter image tokens (constant over the steps)
        unet_kwargs = {}
        ip_embeds = self.prepare_ip_adapter(ip_adapter_image, ip_adapter_image_embeds, batch_size, do_cfg)
        if ip_embeds is not None:
            unet_kwargs["added_cond_kwargs"] = {"image_embeds": ip_embeds}

        # 5. text conditioning of every step (S* switched by each concept's stages), then denoising
        conditioning = self.encode_schedule(input_ids, timesteps)
        # The scheduler gets each timestep from a host copy: DDIM indexes its (CPU) alphas with it, which
        # with a device tensor would wait for the GPU at every step. The UNet gets the device one.
        host_timesteps = timesteps.cpu()
        unet = self._denoiser()
        with attention_processors(self.unet):
            for i, t in enumerate(self.progress_bar(timesteps)):
                hidden, values = conditioning.at(i)
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, host_timesteps[i]).to(self.unet.dtype)
                if self.graphed_unet is not None and not unet_kwargs:
                    noise_pred = self.graphed_unet(model_input, t, hidden, values).float()
                else:
                    noise_pred = unet(
                        model_input, t, hidden, cross_attention_kwargs={"value_hidden_states": values},
                        **unet_kwargs,
                    ).sample.float()
                if do_cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, host_timesteps[i], latents, **extra).prev_sample
                if known is not None:
                    next_t = timesteps[i + 1] if i + 1 < len(timesteps) else None  # None: the end
                    outside = noised_background(self.scheduler, known, noise, next_t)
                    latents = blend_latents(latents, outside, region_mask)

        # 6. decode
        if output_type == "latent":
            return ImagePipelineOutput(images=latents)
        images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        images = self.image_processor.postprocess(images.float(), output_type=output_type)
        return ImagePipelineOutput(images=images)


def attach_concepts(
    pipe,
    concepts: list,
    placeholders: list[str | None] | None = None,
    scheduler: str | None = None,
) -> PersonaMagicPipeline:
    """A `PersonaMagicPipeline` on the modules of an existing diffusers pipeline (no copy), with
    `concepts` (paths or `Concept`s) loaded.

    pipe: a `StableDiffusionPipeline` (or any pipeline with vae, text_encoder, tokenizer, unet and
    scheduler; its image_encoder/feature_extractor are shared too). The tokenizer is shared, so the
    concepts' placeholder tokens are added to it. `scheduler`: a `--scheduler` name to use instead of
    `pipe`'s scheduler (e.g. "ddim", the paper's); by default `pipe`'s scheduler is shared.
    """
    components = pipe.components
    missing = [k for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler") if components.get(k) is None]
    if missing:
        raise ValueError(
            f"the pipeline has no {', '.join(missing)}; attach concepts to a Stable Diffusion 1.x pipeline"
        )
    placeholders = list(placeholders) if placeholders is not None else [None] * len(concepts)
    if len(placeholders) != len(concepts):
        raise ValueError(f"{len(placeholders)} placeholders for {len(concepts)} concepts")
    result = PersonaMagicPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=components["scheduler"],
        image_encoder=components.get("image_encoder"),
        feature_extractor=components.get("feature_extractor"),
    )
    result.base_model_name = getattr(pipe, "name_or_path", None) or result.base_model_name
    if scheduler is not None:
        result.set_scheduler(scheduler)
    if hasattr(pipe, "_progress_bar_config"):
        result.set_progress_bar_config(**pipe._progress_bar_config)
    for concept, placeholder in zip(concepts, placeholders):
        result.load_concept(concept, placeholder)
    return result
