"""PersonaMagicPipeline: sampling with stage-regulated concepts on a base model of any family (docs/method.md).

A diffusers `DiffusionPipeline` over the usual Stable Diffusion components. At every denoising step each
loaded concept's S* follows its stages (`StageWindow`):

| stage    | t range          | S* token embedding     | value residual |
|----------|------------------|------------------------|----------------|
| static 1 | t >= t_hi        | supercategory word     | none           |
| dynamic  | t_lo <= t < t_hi | mapper(t)              | mapper(t)      |
| static 2 | t < t_lo         | mapper(t_lo), frozen   | mapper(t_lo)   |

Conditional and unconditional branches of all prompts × seeds run through the UNet in one batch
(classifier-free guidance). Several concepts may share a prompt, each with its own placeholder and its
own stages (compositional generation, paper Fig. 12). Two more of the paper's applications are
arguments of `__call__`: localized customization (`background` + `region`, Blended Latent Diffusion,
`localized.py`) and the IP-Adapter plug-in (`pipe.load_ip_adapter(...)` from diffusers' `IPAdapterMixin`,
then `ip_adapter_image=`). How the text becomes the UNet's conditioning is the model family's
(`personamagic.families`).

`attach_concepts(sd_pipe, concepts)` builds one on top of an existing diffusers pipeline, sharing its
modules.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import re

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import IPAdapterMixin
from diffusers.utils.torch_utils import randn_tensor

from ..adapters.ip_adapter import prepare_ip_adapter
from ..concept import Concept
from ..errors import ConceptError, SettingsError
from ..models.latents import LatentScale
from ..families import family_of_modules
from ..method.attention import attention_processors
from ..method.conditioning import (
    ScheduledConditioning,
    TextConditioner,
    UNetConditioning,
    add_residuals,
    encode_schedule,
    stage_key,
)
from ..method.tokens import PlaceholderTokens
from ..models.components import TextEncoderWidths
from .concepts import LoadedConcept
from .graph import GraphedUNet
from .localized import blend_latents, noised_background, prepare_localized
from .schedulers import make_scheduler

logger = logging.getLogger(__name__)


class PersonaMagicPipeline(DiffusionPipeline, IPAdapterMixin, TextEncoderWidths):
    """Text-to-image with PersonaMagic concepts; the base model stays untouched."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _optional_components = ["image_encoder", "feature_extractor", "text_encoder_2", "tokenizer_2"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, image_encoder=None, feature_extractor=None,
                 text_encoder_2=None, tokenizer_2=None):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.family = family_of_modules([e for e in (text_encoder, text_encoder_2) if e is not None], unet)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        self.concepts: list[LoadedConcept] = []
        self.base_model_name = getattr(text_encoder.config, "_name_or_path", "")
        self.graphed_unet: GraphedUNet | None = None  # see enable_cuda_graph()
        self.compiled_unet = None  # see enable_compile()
        self.conditioner = TextConditioner(self)
        self.photomaker = None  # see load_photomaker()

    @classmethod
    def from_base(cls, base, scheduler: str = "ddim") -> "PersonaMagicPipeline":
        """Build from `personamagic.models.BaseComponents`; `scheduler` is a `--scheduler` name, on the
        base model's own scheduler config."""
        pipe = cls(scheduler=make_scheduler(scheduler, base.scheduler_config), **base.components())
        pipe.base_model_name = base.name
        return pipe

    # -- the family's parts ------------------------------------------------------------------------

    @property
    def tokenizers(self) -> list:
        return [getattr(self, spec.tokenizer) for spec in self.family.encoders]

    @property
    def text_encoders(self) -> list:
        return [getattr(self, spec.component) for spec in self.family.encoders]

    def set_scheduler(self, name: str) -> None:
        self.scheduler = make_scheduler(name, dict(self.scheduler.config))

    def enable_cuda_graph(self, enabled: bool = True) -> None:
        """Replay the UNet's forward from a CUDA graph (captured once per batch shape): same kernels,
        far fewer launches — at batch 1-2 the eager UNet mostly waits for them. CUDA only; not used
        with IP-Adapter inputs."""
        if enabled and self.device.type != "cuda":
            raise SettingsError("CUDA graphs need a CUDA device; run on --device cuda or without them")
        self.graphed_unet = GraphedUNet(self._denoiser()) if enabled else None

    def enable_compile(self, enabled: bool = True, backend: str = "inductor", channels_last: bool = True) -> None:
        """Run the UNet through `torch.compile`: fused kernels, worth it where sampling is compute-bound
        (large batches). The first call of each batch shape compiles (about a minute for SD-1.x;
        PyTorch caches the generated code on disk for later processes); further calls reuse it.
        `channels_last` also switches the UNet's weights to that memory format (same values).
        Combines with `enable_cuda_graph`, which then replays compiled code.
        """
        if enabled and channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.compiled_unet = torch.compile(self.unet, backend=backend) if enabled else None
        if self.graphed_unet is not None:
            self.graphed_unet = GraphedUNet(self._denoiser())

    def load_photomaker(self, spec=None, *, local_files_only: bool = False, encoder=None, lora=None):
        """Plug PhotoMaker in (`adapters.photomaker_plugin`): its LoRA goes into the UNet for good; prompts
        with `S* img` then fuse the ID embedding of `photomaker_images` into S* (SDXL models only)."""
        from ..adapters.photomaker_plugin import PhotoMaker, PhotoMakerSpec

        if not self.family.supports_photomaker:
            raise SettingsError(f"PhotoMaker works on SDXL models; this is a {self.family.title} model")
        self.photomaker = PhotoMaker.load(spec or PhotoMakerSpec(), self.unet, device=self.device, dtype=self.unet.dtype,
                                          local_files_only=local_files_only, encoder=encoder, lora=lora)
        return self.photomaker

    def _denoiser(self):
        """The UNet callable sampling uses: compiled when enabled, else the module itself."""
        return self.compiled_unet if self.compiled_unet is not None else self.unet

    # -- concepts ----------------------------------------------------------------------------------

    def load_concept(self, concept: Concept | str, placeholder: str | None = None) -> LoadedConcept:
        """Attach a concept (object or path); `placeholder` overrides the text that stands for it."""
        if not isinstance(concept, Concept):
            concept = Concept.load(concept)
        placeholder = placeholder or concept.placeholder
        for warning in concept.check_compatible(
            self.hidden_size, self.scheduler.config.num_train_timesteps, self.base_model_name, self.family.name,
            self.encoder_widths, placeholder=placeholder,
        ):
            logger.warning(warning)
        if any(c.tokens.placeholder == placeholder for c in self.concepts):
            raise SettingsError(
                f"two concepts use the placeholder {placeholder!r}; give each its own "
                "(--placeholder once per concept, e.g. --placeholder '<me>' --placeholder '<style>')"
            )
        num_vectors = concept.mapper_config["num_vectors"]
        tokens = PlaceholderTokens(self.tokenizers, placeholder, num_vectors, slot=len(self.concepts))
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

    def check_prompts(self, prompts: list[str]) -> list[str]:
        """Warnings for prompts that mention none of the loaded concepts."""
        return [
            f"prompt {p!r} does not contain {' or '.join(c.tokens.placeholder for c in self.concepts)}; "
            "the concept will not appear"
            for p in prompts
            if self.concepts and not any(c.tokens.occurs_in(p) for c in self.concepts)
        ]

    def check_photomaker_prompts(self, prompts: list[str]) -> list[str]:
        """With PhotoMaker loaded: warnings for prompts without its trigger after a placeholder
        (`S* img`), in which PhotoMaker's ID is not used."""
        from ..adapters.photomaker_plugin import trigger_pattern

        if self.photomaker is None:
            return []
        trigger = self.photomaker.spec.trigger
        if not self.concepts:
            return [f"prompt {p!r} says {trigger!r} but no concept is loaded: PhotoMaker fuses its ID into a "
                    f"concept's placeholder ('S* {trigger}'), so this prompt uses no ID"
                    for p in prompts if re.search(r"\b" + re.escape(trigger) + r"\b", p)]
        names = [c.tokens.placeholder for c in self.concepts]
        return [
            f"prompt {p!r} has no '{names[0]} {trigger}': PhotoMaker's ID is not used in it"
            for p in prompts
            if not any(re.search(trigger_pattern(name, trigger), p) for name in names)
        ]

    # -- conditioning ------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompts (placeholders rewritten) -> one (B, L) id tensor per tokenizer."""
        return self.conditioner.tokenize([self.rewrite_prompt(p) for p in prompts], self.device)

    def encode_at(self, input_ids: list[torch.Tensor], t: int):
        """K input (B, L, C), V input (B, L, C) and pooled embedding (B, P) or None of (B, L) ids (one
        tensor per tokenizer) at timestep t, in one text-encoder call: each concept's tokens get that
        concept's embedding for its stage at t, and its residual is added to the V input there. The
        step-by-step reference of `encode_schedule`."""
        batch = input_ids[0].shape[0]
        vectors, residuals = {}, {}
        for loaded in self.concepts:
            embeddings, res = loaded.vectors(t)  # (V, D), (V, C)
            for i, token_id in enumerate(loaded.tokens.ids):
                vectors[token_id] = embeddings[i].expand(batch, -1)
                residuals[token_id] = res[i]
        with self.conditioner:
            hidden, pooled = self.conditioner.encode(input_ids, vectors)
        return hidden, add_residuals(hidden, input_ids[0], residuals), pooled

    def stage_key(self, t: int) -> tuple:
        """Steps with the same key share text conditioning (static stages are computed once)."""
        return stage_key(self.concepts, t)

    def encode_schedule(self, input_ids: list[torch.Tensor], timesteps, chunk: int = 256) -> ScheduledConditioning:
        """The text conditioning of every denoising step in as few text-encoder calls as possible
        (`personamagic.method.conditioning.encode_schedule`)."""
        return encode_schedule(self.conditioner, self.concepts, input_ids, timesteps, chunk)

    # -- sampling ----------------------------------------------------------------------------------

    def prepare_localized(self, background, region, batch_size: int, height: int, width: int):
        """Background latents and latent region of localized generation (`localized.prepare_localized`)."""
        return prepare_localized(self, background, region, batch_size, height, width)

    def prepare_ip_adapter(self, ip_adapter_image, ip_adapter_image_embeds, batch_size: int, do_cfg: bool):
        """Each loaded IP-Adapter's input for the whole UNet batch (`adapters.ip_adapter.prepare_ip_adapter`)."""
        return prepare_ip_adapter(self, ip_adapter_image, ip_adapter_image_embeds, batch_size, do_cfg)

    def _check_arguments(self, prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                         photomaker_images) -> None:
        """One clear error per bad `__call__` argument, before any work: deeper in they surface as an
        IndexError, a ZeroDivisionError or NaN pixels. TypeError for a wrong type, ValueError for a bad value."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a str or a list of str, got {prompt!r}")
        if not prompts:
            raise ValueError("prompt must hold at least one prompt, got an empty list")
        negatives = [""] if negative_prompt is None else [negative_prompt] if isinstance(negative_prompt, str) \
            else negative_prompt
        if not isinstance(negatives, (list, tuple)) or not all(isinstance(n, str) for n in negatives):
            raise TypeError(f"negative_prompt must be None, a str or a list of str, got {negative_prompt!r}")
        max_steps = self.scheduler.config.num_train_timesteps  # a schedule has at most T steps
        for name, value, high in (("num_inference_steps", num_inference_steps, max_steps),
                                  ("num_images_per_prompt", num_images_per_prompt, None)):
            bound = f"from 1 to {high}" if high is not None else ">= 1"
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{name} must be a whole number {bound}, got {value!r}")
            if value < 1 or (high is not None and value > high):
                raise ValueError(f"{name} must be a whole number {bound}, got {value!r}")
        if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool):
            raise TypeError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        # NaN fails `> 1.0` and so would silently turn guidance off; inf makes NaN pixels.
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if photomaker_images is not None and self.photomaker is None:
            raise ValueError("photomaker_images given but no PhotoMaker is loaded; call pipe.load_photomaker(...)")

    def _prompt_texts(self, prompt, negative_prompt, num_images_per_prompt: int, do_cfg: bool):
        """Prompts and negatives -> the texts of one UNet batch (uncond first, cond after), the batch
        size, and whether the negative half is all zeros."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch_size = len(prompts)
        negative = negative_prompt if negative_prompt is not None else ""
        negatives = [negative] * batch_size if isinstance(negative, str) else list(negative)
        if len(negatives) * num_images_per_prompt == batch_size and len(negatives) != batch_size:
            negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        if len(negatives) != batch_size:
            raise ValueError(f"{len(negatives)} negative prompts for {batch_size} prompts")
        # A missing negative prompt (None) is all zeros on families that ask for it (SDXL's
        # force_zeros_for_empty_prompt), as diffusers does; an explicit "" is encoded like any text.
        zero_negative = do_cfg and self.family.zero_empty_negative and negative_prompt is None
        return (negatives if do_cfg else []) + prompts, batch_size, zero_negative

    def _initial_latents(self, batch_size: int, height: int, width: int, generator, latents):
        """The sampler's starting noise (float32) and the scaled initial latents."""
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        shape = (batch_size, self.unet.config.in_channels, *latent_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        noise = latents.to(self.device, torch.float32)
        return noise, noise * self.scheduler.init_noise_sigma

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
        photomaker_images: list | None = None,
    ):
        """Sample images; `prompt` may hold several prompts, one generator per image keeps each image
        independent of the batch it is in.

        background, region: localized customization (PIL image / tensor in [-1, 1]; mask: white = paint
        the concept here); the outside follows the background (Blended Latent Diffusion).
        ip_adapter_image / ip_adapter_image_embeds: inputs of IP-Adapters loaded with `load_ip_adapter`.
        photomaker_images: the person's photo(s) for PhotoMaker (`load_photomaker`), fused into S* where a
        prompt says `S* img`.
        """
        self._check_arguments(prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                              photomaker_images)

        # 1. prompts -> token ids (uncond first, cond after: one batch for classifier-free guidance)
        do_cfg = guidance_scale > 1.0
        texts, batch_size, zero_negative = self._prompt_texts(prompt, negative_prompt, num_images_per_prompt, do_cfg)

        # 2. timesteps and initial noise
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        noise, latents = self._initial_latents(batch_size, height, width, generator, latents)

        # 3. localized customization: the outside starts as the background noised to the first step
        known = region_mask = None
        if background is not None or region is not None:
            known, region_mask = prepare_localized(self, background, region, batch_size, height, width)
            latents = blend_latents(latents, noised_background(self.scheduler, known, noise, timesteps[0]), region_mask)

        # 4. IP-Adapter image tokens (constant over the steps)
        ip_embeds = prepare_ip_adapter(self, ip_adapter_image, ip_adapter_image_embeds, batch_size, do_cfg)

        # 5. text conditioning of every step (S* switched by each concept's stages), then denoising
        if self.photomaker is not None and photomaker_images is not None:
            conditioning = self._photomaker_schedule(texts, photomaker_images, timesteps, num_inference_steps)
        else:
            conditioning = self.encode_schedule(self.tokenize(texts), timesteps)
        if zero_negative:
            conditioning = conditioning.zeroing(batch_size)
        latents = self._denoise(latents, timesteps, conditioning, guidance_scale if do_cfg else None, generator,
                                eta, (height, width), ip_embeds, (known, noise, region_mask))

        # 6. decode
        if output_type == "latent":
            return ImagePipelineOutput(images=latents)
        images = self.image_processor.postprocess(self.decode(latents).float(), output_type=output_type)
        return ImagePipelineOutput(images=images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]; a VAE that overflows in fp16 (`force_upcast`, SDXL's) decodes in
        fp32 and goes back to fp16 after, as diffusers does."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            return vae.decode(LatentScale.of(vae).decode(latents).to(vae.dtype)).sample
        finally:
            if upcast:
                vae.to(torch.float16)

    def _photomaker_schedule(self, texts: list[str], images: list, timesteps, num_inference_steps: int):
        """The run's conditioning with PhotoMaker: text-only prompts up to its merge step, then prompts
        whose S* (the concept before the trigger) is fused with the images' ID embeddings."""
        id_embeds = self.photomaker.id_embeds(list(images))  # (1, N, D)
        text_only, fused, classes = [], [], set()
        for text in texts:
            for loaded in self.concepts:
                split = self.photomaker.split_prompt(text, loaded.tokens.placeholder, id_embeds.shape[1])
                if split is not None:
                    classes.add(loaded.tokens.placeholder)
                    break
            else:
                split = (text, text)
            text_only.append(split[0])
            fused.append(split[1])
        if len(classes) > 1:
            raise SettingsError(f"PhotoMaker fuses one concept per run; the prompts fuse {', '.join(sorted(classes))}")
        plain = self.encode_schedule(self.tokenize(text_only), timesteps)
        if not classes:
            return plain
        (placeholder,) = classes
        token_ids = next(c.tokens.ids for c in self.concepts if c.tokens.placeholder == placeholder)
        check_photomaker_vectors(placeholder, len(token_ids))
        merged = self.encode_schedule(self.tokenize(fused), timesteps)
        merged = merged.replaced(self.photomaker.fuse(merged.hidden, merged.ids, token_ids, id_embeds))
        # official: steps i <= start_merge_step use the text-only prompt
        return plain.switched(merged, self.photomaker.spec.merge_step_for(num_inference_steps) + 1)

    def _denoise(self, latents, timesteps, conditioning: ScheduledConditioning, guidance_scale, generator, eta,
                 size, ip_embeds, localized):
        """The denoising loop: each step's UNet batch from the scheduled conditioning, guidance, the
        scheduler's step, and the localized blend."""
        step_parameters = inspect.signature(self.scheduler.step).parameters
        extra = {"eta": eta} if "eta" in step_parameters else {}
        if "generator" in step_parameters:
            extra["generator"] = generator
        known, noise, region_mask = localized
        # The scheduler gets each timestep from a host copy: DDIM indexes its (CPU) alphas with it, which
        # with a device tensor would wait for the GPU at every step. The UNet gets the device one.
        host_timesteps = timesteps.cpu()
        unet = self._denoiser()
        time_ids = self.family.time_ids(size, (0, 0), size)  # the size conditioning, the same at every step
        with attention_processors(self.unet):
            for i, t in enumerate(self.progress_bar(timesteps)):
                hidden, values, pooled = conditioning.at(i)
                added = {}
                if time_ids is not None:
                    rows = time_ids.to(self.device, hidden.dtype)[None].expand(hidden.shape[0], -1)
                    added = self.family.added_conditioning(pooled.to(hidden.dtype), rows)
                if ip_embeds is not None:
                    added = {**added, "image_embeds": ip_embeds}
                step = UNetConditioning(hidden, values, added)
                model_input = torch.cat([latents] * 2) if guidance_scale is not None else latents
                model_input = self.scheduler.scale_model_input(model_input, host_timesteps[i]).to(self.unet.dtype)
                if self.graphed_unet is not None and GraphedUNet.supports(step):
                    noise_pred = self.graphed_unet(model_input, t, step).float()
                else:
                    noise_pred = unet(model_input, t, **step.unet_kwargs()).sample.float()
                if guidance_scale is not None:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, host_timesteps[i], latents, **extra).prev_sample
                if known is not None:
                    next_t = timesteps[i + 1] if i + 1 < len(timesteps) else None  # None: the end
                    latents = blend_latents(latents, noised_background(self.scheduler, known, noise, next_t), region_mask)
        return latents


def check_photomaker_vectors(placeholder: str, num_vectors: int) -> None:
    """PhotoMaker fuses its ID embedding into one token: a concept of several vectors cannot take it."""
    if num_vectors != 1:
        raise ConceptError(f"PhotoMaker fuses its ID into a one-vector concept; {placeholder!r} has {num_vectors} "
                           "vectors (--num-vectors): train it with --num-vectors 1, or generate without --photomaker")


def attach_concepts(
    pipe,
    concepts: list,
    placeholders: list[str | None] | None = None,
    scheduler: str | None = None,
) -> PersonaMagicPipeline:
    """A `PersonaMagicPipeline` on the modules of an existing diffusers pipeline (no copy), with
    `concepts` (paths or `Concept`s) loaded.

    pipe: a `StableDiffusionPipeline` (or any pipeline with vae, text_encoder, tokenizer, unet and
    scheduler, and text_encoder_2/tokenizer_2 for two-encoder families; its
    image_encoder/feature_extractor are shared too). The tokenizers are shared, so the concepts'
    placeholder tokens are added to them. `scheduler`: a `--scheduler` name to use instead of `pipe`'s
    scheduler (e.g. "ddim", the paper's); by default `pipe`'s scheduler is shared.
    """
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        raise TypeError(
            f"attach_concepts needs a diffusers Stable Diffusion pipeline (with vae, text_encoder, tokenizer, "
            f"unet and scheduler), got {type(pipe).__name__}"
        )
    missing = [k for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler") if components.get(k) is None]
    if missing:
        raise ValueError(
            f"the pipeline has no {', '.join(missing)}; attach concepts to a Stable Diffusion pipeline"
        )
    placeholders = list(placeholders) if placeholders is not None else [None] * len(concepts)
    if len(placeholders) != len(concepts):
        raise ValueError(f"{len(placeholders)} placeholders for {len(concepts)} concepts")
    names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "image_encoder", "feature_extractor",
             "text_encoder_2", "tokenizer_2")
    result = PersonaMagicPipeline(**{name: components.get(name) for name in names})
    result.base_model_name = getattr(pipe, "name_or_path", None) or result.base_model_name
    if scheduler is not None:
        result.set_scheduler(scheduler)
    if hasattr(pipe, "_progress_bar_config"):
        result.set_progress_bar_config(**pipe._progress_bar_config)
    for concept, placeholder in zip(concepts, placeholders):
        result.load_concept(concept, placeholder)
    return result
