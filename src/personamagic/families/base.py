"""The model-family interface (see the package docstring): data about a family plus the few rules
that need code. Everything here is read-only and shared; the mechanisms that use it (text encoding,
the trainer, the pipeline, the loaders) live elsewhere and ask the family instead of assuming SD-1.x."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, and how its output reaches the UNet."""

    component: str  # its name among the pipeline's components ("text_encoder", "text_encoder_2")
    tokenizer: str  # the component name of its tokenizer
    # which hidden state is the UNet's cross-attention input: None = the last hidden state (after the
    # final layer norm, SD-1.x); -2 = the penultimate layer's output, without the final norm (SDXL)
    hidden_layer: int | None
    pooled: bool  # its projected end-of-text embedding is the UNet's added `text_embeds` (SDXL encoder 2)
    export_key: str | None  # key of its part in a textual-inversion file; None: the token itself (SD-1.x)


class ModelFamily:
    """What one family of base models is; subclasses fill in the class attributes."""

    name: str  # short id recorded in concepts ("sd1")
    title: str  # for messages ("Stable Diffusion 1.x")
    default_model: str  # hub id used when none is given
    suggested_models: tuple[str, ...]  # hub ids the web UI offers (the first is `default_model`)
    # words in a hub repo's name that suggest this family while its files, which would tell, are not
    # downloaded yet (the offline check's advice)
    repo_name_hints: tuple[str, ...] = ()
    tiny_model: str  # short name of its offline toy built in code: the real classes at a toy size (tests, CI)
    random_model: str  # short name of its build at the real sizes with random weights (benchmarks)
    image_size: int  # side of the images its base models are made for (tools that read no model default to it)
    pipeline_class: str  # the diffusers pipeline of this family (single-file loading, reference checks)
    encoders: tuple[TextEncoderSpec, ...]  # the text encoders, in the order their outputs are concatenated
    # index of the text-encoder layer whose self-attention the tandem-equilibrium loss reads: the last
    # layer whose output reaches the UNet
    te_layer: int
    partition_resolution: int  # side of the grid the partition's cross-attention maps are averaged on
    addition_embed_type: str | None = None  # the UNet's added conditioning (SDXL: "text_time")
    zero_empty_negative: bool = False  # a missing negative prompt is all zeros rather than the encoded ""
    # PhotoMaker v1 plugs in: its ID encoder's fuse MLP reads and writes this family's prompt embeddings
    supports_photomaker: bool = False
    # a single-file checkpoint of this family has keys starting with each of these (original LDM/SGM layout)
    checkpoint_prefixes: tuple[str, ...]
    # diffusers' default hub repo whose configs turn a single file of this family into a pipeline
    checkpoint_config_repo: str

    def recognizes_index(self, index: dict) -> bool:
        """Whether a diffusers `model_index.json` (as a dict) describes a model of this family."""
        raise NotImplementedError

    def recognizes_checkpoint(self, keys: set[str]) -> bool:
        """Whether a single-file checkpoint with these tensor names is of this family."""
        return all(any(key.startswith(prefix) for key in keys) for prefix in self.checkpoint_prefixes)

    def fits_modules(self, text_encoders: list, unet) -> bool:
        """Whether modules have this family's layout: its number of text encoders and the UNet's kind of
        added conditioning."""
        return len(text_encoders) == len(self.encoders) and unet.config.addition_embed_type == self.addition_embed_type

    def problems(self, components) -> list[str]:
        """What makes loaded `components` unusable as this family (empty when they fit)."""
        raise NotImplementedError

    def pipeline_kwargs(self) -> dict:
        """Arguments beyond its modules with which PersonaMagic builds the family's diffusers pipeline
        (`pipeline_class`, e.g. from a single file); none unless the family needs some."""
        return {}

    def added_conditioning(self, pooled, time_ids) -> dict:
        """The UNet's `added_cond_kwargs` for (B, P) pooled text embeddings and (B, 6) size ids (SDXL);
        empty for families that have none."""
        return {}

    def time_ids(self, original_size, crop_top_left, target_size):
        """Size conditioning of one image, (6,) as (h, w, top, left, h, w); None if the family has none."""
        return None

    def encoder_width_problems(self, widths: list[int]) -> list[str]:
        """What is wrong with a concept's per-encoder widths, by what every model of the family has (empty
        when nothing is known to be wrong); the loaded model's own widths are checked on load."""
        if len(widths) != len(self.encoders):
            return [f"{len(widths)} encoder width(s) for the family's {len(self.encoders)} text encoder(s)"]
        return []

    def export_tensors(self, token: str, vectors: list) -> dict:
        """The textual-inversion file's tensors for per-encoder (n, D_i) embeddings."""
        keys = [e.export_key for e in self.encoders]
        if keys == [None]:
            return {token: vectors[0]}
        return dict(zip(keys, vectors))

    def __repr__(self) -> str:
        return f"<model family {self.name}>"
