"""PersonaMagicPipeline: Stable Diffusion 1.x sampling with stage-regulated concepts (SPEC §4).

A diffusers `DiffusionPipeline` over the usual SD components. At every denoising step each loaded
concept's S* follows its stages:

| stage    | t range          | S* token embedding     | value residual |
|----------|------------------|------------------------|----------------|
| static 1 | t >= t_hi        | supercategory word     | none           |
| dynamic  | t_lo <= t < t_hi | mapper(t)              | mapper(t)      |
| static 2 | t < t_lo         | mapper(t_lo), frozen   | mapper(t_lo)   |

Conditional and unconditional branches run through the UNet in one batch (classifier-free guidance).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .attention import attention_processors
from .concept import Concept
from .conditioning import EmbeddingOverride, PlaceholderTokens, add_residuals, tokenize
from .errors import UserError

logger = logging.getLogger(__name__)

# Scheduler names for `--scheduler`, mapped to diffusers classes and config overrides.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by short name, on the base model's noise schedule."""
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
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
        stage = self.stage(t)
        if stage == "static1":
            embed = self.mapper.super_embedding.expand(self.mapper.config.num_vectors, -1)
            return embed, torch.zeros_like(embed)
        t_eff = t if stage == "dynamic" else self.window[0]
        timesteps = torch.tensor([t_eff], device=self.image_embed.device)
        embeddings, residuals = self.mapper(timesteps, self.image_embed)
        return embeddings[0], residuals[0]


class PersonaMagicPipeline(DiffusionPipeline):
    """Text-to-image with PersonaMagic concepts; the base model stays untouched."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.concepts: list[LoadedConcept] = []
        self.base_model_name = getattr(text_encoder.config, "_name_or_path", "")

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
            raise UserError(f"two concepts use the placeholder {placeholder!r}; give one another placeholder")
        tokens = PlaceholderTokens(self.tokenizer, placeholder, concept.mapper_config["num_vectors"], len(self.concepts))
        mapper = concept.build_mapper(self.device)
        image_embed = concept.mean_image_embed()[None].to(self.device)
        loaded = LoadedConcept(concept, mapper, tokens, image_embed)
        self.concepts.append(loaded)
        return loaded

    def rewrite_prompt(self, prompt: str) -> str:
        for loaded in self.concepts:
            prompt = loaded.tokens.rewrite(prompt)
        return prompt

    # -- conditioning ------------------------------------------------------------------------------

    def _stage_key(self, t: int) -> tuple:
        """Steps with the same key share text conditioning (static stages are computed once)."""
        return tuple(c.stage(t) if c.stage(t) != "dynamic" else t for c in self.concepts)

    def _encode(self, input_ids: torch.Tensor, t: int, override: EmbeddingOverride):
        """(B, L) ids -> K input (B, L, D) and V input (B, L, D) at timestep t."""
        vectors, residuals = {}, {}
        for loaded in self.concepts:
            embeds, res = loaded.vectors(t)
            for i, token_id in enumerate(loaded.tokens.ids):
                vectors[token_id] = embeds[i].to(self.text_encoder.dtype)
                residuals[token_id] = res[i]
        with override.vectors(vectors):
            hidden = self.text_encoder(input_ids)[0]
        return hidden, add_residuals(hidden, input_ids, residuals)

    # -- sampling ----------------------------------------------------------------------------------

    def check_prompts(self, prompts: list[str]) -> list[str]:
        """Warnings for prompts that mention none of the loaded concepts."""
        return [
            f"prompt {p!r} does not contain {' or '.join(c.tokens.placeholder for c in self.concepts)}; "
            "the concept will not appear"
            for p in prompts
            if self.concepts and not any(c.tokens.occurs_in(p) for c in self.concepts)
        ]

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
    ):
        # 1. prompts -> token ids (cond after uncond, one batch)
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
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        latents = latents.to(self.device, torch.float32) * self.scheduler.init_noise_sigma
        step_parameters = inspect.signature(self.scheduler.step).parameters
        extra = {"eta": eta} if "eta" in step_parameters else {}
        if "generator" in step_parameters:
            extra["generator"] = generator

        # 3. denoising loop, S* conditioning switched per step by each concept's stages
        override = EmbeddingOverride(self.text_encoder)
        cached_key, conditioning = None, None
        try:
            with attention_processors(self.unet):
                for t in self.progress_bar(self.scheduler.timesteps):
                    key = self._stage_key(int(t))
                    if key != cached_key:
                        conditioning, cached_key = self._encode(input_ids, int(t), override), key
                    hidden, values = conditioning
                    model_input = torch.cat([latents] * 2) if do_cfg else latents
                    model_input = self.scheduler.scale_model_input(model_input, t).to(self.unet.dtype)
                    noise_pred = self.unet(
                        model_input, t, hidden, cross_attention_kwargs={"value_hidden_states": values}
                    ).sample.float()
                    if do_cfg:
                        uncond, cond = noise_pred.chunk(2)
                        noise_pred = uncond + guidance_scale * (cond - uncond)
                    latents = self.scheduler.step(noise_pred, t, latents, **extra).prev_sample
        finally:
            override.remove()

        # 4. decode
        if output_type == "latent":
            return ImagePipelineOutput(images=latents)
        images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        images = self.image_processor.postprocess(images.float(), output_type=output_type)
        return ImagePipelineOutput(images=images)
