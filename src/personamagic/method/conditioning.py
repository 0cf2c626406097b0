"""Text conditioning (docs/method.md): S*'s vectors into the frozen text encoders, their outputs into the UNet.

* `EmbeddingOverride`: hooks on a text encoder's token embedding swap the placeholder ids for vectors
  supplied per call (the mapper's output, one per sample), so the encoder runs its own, unmodified forward.
* `add_residuals`: the mapper's value residual added to the text encoders' output at the S* positions;
  that sum is the V input of the UNet's cross-attention, the plain output its K input.
* `TextConditioner`: a base model's text encoders as its family uses them (which hidden state feeds
  the UNet, whether a pooled embedding goes in too), with one override per encoder and S*'s vectors
  split between them.
* `LayerAttention`: the self-attention probabilities of one text-encoder layer, for the
  tandem-equilibrium loss.
* `encode_schedule`: a whole sampling run's conditioning in as few text-encoder calls as possible.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from .stages import Stage
from .tokens import eos_positions, tokenize


class EmbeddingOverride:
    """Hooks on a text encoder's token embedding that replace placeholder ids by given vectors.

    Use `with override.vectors({token_id: (B, D) or (D,) tensor, ...}):` around text-encoder calls.
    Ids beyond the embedding table are looked up as id 0 and then replaced. An added id with no vector
    is an error (a placeholder never silently becomes token 0's word): it is checked at every call
    unless the caller validated its ids once and passed `check=False` (hot loops, CUDA-graph capture).
    """

    def __init__(self, text_encoder: nn.Module):
        self.embedding = text_encoder.get_input_embeddings()
        self.num_embeddings = self.embedding.num_embeddings
        self._vectors: dict[int, torch.Tensor] = {}
        self._check = True
        self._input_ids: torch.Tensor | None = None
        self._handles = [
            self.embedding.register_forward_pre_hook(self._before),
            self.embedding.register_forward_hook(self._after),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def vectors(self, vectors: dict[int, torch.Tensor], *, check: bool = True):
        previous = self._vectors, self._check
        self._vectors, self._check = vectors, check
        try:
            yield
        finally:
            self._vectors, self._check = previous

    def _before(self, module, args):
        (input_ids,) = args
        if self._check:
            self.check_ids(input_ids)
        self._input_ids = input_ids
        return (input_ids.masked_fill(input_ids >= self.num_embeddings, 0),)

    def _after(self, module, args, output):
        input_ids, self._input_ids = self._input_ids, None
        for token_id, vector in self._vectors.items():
            hit = (input_ids == token_id)[..., None]  # (B, L, 1)
            if vector.dim() == 2:
                vector = vector[:, None, :]  # (B, D) -> (B, 1, D)
            output = torch.where(hit, vector.to(output.dtype), output)
        return output

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Raise if `input_ids` holds added tokens that have no vector set (reads the ids on the host)."""
        extra = set(input_ids[input_ids >= self.num_embeddings].unique().tolist())
        missing = extra - set(self._vectors)
        if missing:
            raise RuntimeError(f"placeholder token ids {sorted(missing)} are in the prompt but no concept provides them")


def add_residuals(
    encoder_hidden_states: torch.Tensor, input_ids: torch.Tensor, residuals: dict[int, torch.Tensor]
) -> torch.Tensor:
    """Text encoder output + mapper residuals at the placeholder positions: the V input (docs/method.md).

    encoder_hidden_states: (B, L, C); input_ids: (B, L); residuals: {token_id: (B, C) or (C,)}.
    """
    values = encoder_hidden_states
    for token_id, residual in residuals.items():
        if residual.dim() == 2:
            residual = residual[:, None, :]  # (B, C) -> (B, 1, C)
        hit = (input_ids == token_id)[..., None].to(values.dtype)  # (B, L, 1)
        values = values + hit * residual.to(values.dtype)
    return values


@functools.lru_cache(maxsize=16)
def causal_mask(length: int, device, dtype) -> torch.Tensor:
    """(1, 1, L, L) additive causal mask: 0 on and below the diagonal, the dtype's minimum above. Built
    once per (length, device, dtype) and shared: callers only read it."""
    return torch.full((length, length), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)[None, None]


def text_layers(text_encoder: nn.Module):
    """The transformer layers of a CLIP text model (transformers 4 wraps the model once more)."""
    core = getattr(text_encoder, "text_model", text_encoder)
    return core.encoder.layers


class LayerAttention:
    """Keeps the attention probabilities (B, H, L, L) of one CLIP text-encoder layer (`layer`, an index
    into its layers: -1 the last, -2 the penultimate), which the tandem-equilibrium loss needs (docs/method.md).
    Only that layer runs eager attention, through its own copy of the config; every other layer keeps the
    model's fused kernel. `remove()` restores it.

    With SDPA, transformers passes no mask and asks the kernel for causal attention (`is_causal`),
    which eager attention ignores: the layer then gets the causal mask explicitly.
    """

    def __init__(self, text_encoder: nn.Module, layer: int = -1):
        self.module = text_layers(text_encoder)[layer].self_attn
        self._config = self.module.config
        eager = copy.copy(self._config)
        eager._attn_implementation = "eager"
        self.module.config = eager
        self._probabilities: torch.Tensor | None = None
        self._handles = [
            self.module.register_forward_pre_hook(self._add_causal_mask, with_kwargs=True),
            self.module.register_forward_hook(self._keep),
        ]

    def _add_causal_mask(self, module, args, kwargs):
        if len(args) > 1:  # forward(hidden_states, attention_mask): a positional mask
            if args[1] is not None:
                return None
            args = args[:1]
        elif kwargs.get("attention_mask") is not None:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return args, {**kwargs, "attention_mask": causal_mask(hidden.shape[1], hidden.device, hidden.dtype)}

    def _keep(self, module, args, output):
        self._probabilities = output[1]

    def take(self) -> torch.Tensor:
        """The probabilities of the latest forward, (B, H, L, L); raises if there was none since."""
        probabilities, self._probabilities = self._probabilities, None
        if probabilities is None:
            raise RuntimeError("no text-encoder forward since the last take()")
        return probabilities

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.module.config = self._config


# --------------------------------------------------------------------------------------------------
# the text encoders of a model family


@dataclass
class UNetConditioning:
    """What the UNet's cross-attention (and added embeddings) read for a batch."""

    hidden: torch.Tensor  # (B, L, C) text encoders' output: the K input of cross-attention
    values: torch.Tensor  # (B, L, C) the same plus the mapper residuals at S*: the V input
    added: dict = field(default_factory=dict)  # the UNet's added_cond_kwargs (SDXL: text_embeds, time_ids)

    def unet_kwargs(self) -> dict:
        """Keyword arguments of `unet(sample, timestep, **kwargs)`."""
        kwargs = {"encoder_hidden_states": self.hidden, "cross_attention_kwargs": {"value_hidden_states": self.values}}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


def _projected_pooled(text_encoder: nn.Module, last_hidden_state: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """The end-of-text token's final hidden state through the encoder's text projection, (B, P).

    Taken at the first end-of-text token of each prompt. transformers' own pooling takes the largest
    token id when a config keeps CLIP's legacy `eos_token_id` 2 (SD's do), which with added placeholder
    tokens (ids above the vocabulary's) would pool at S* instead of the end of the prompt.
    """
    pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device), eos]
    projection = getattr(text_encoder, "text_projection", None)
    return projection(pooled) if projection is not None else pooled


class TextConditioner:
    """A base model's text encoders as its family feeds them to the UNet, with S*'s vectors in place.

    One `EmbeddingOverride` per encoder is installed while the conditioner is open (`with` or
    `open()`/`close()`, nestable). `encode(input_ids, vectors)` takes one (B, L) id tensor per tokenizer and
    {token_id: (B, D)} vectors of the summed encoder width D, split between the encoders in order;
    it returns the concatenated hidden states (B, L, C) and the pooled embedding (B, P) or None.
    """

    def __init__(self, base):
        self.family = base.family
        self.tokenizers = list(base.tokenizers)
        self.text_encoders = list(base.text_encoders)
        self.widths = base.encoder_widths
        self.overrides: list[EmbeddingOverride] = []
        self._depth = 0  # open() calls not yet closed: nested users share one set of hooks

    def open(self) -> "TextConditioner":
        if self._depth == 0:
            self.overrides = [EmbeddingOverride(encoder) for encoder in self.text_encoders]
        self._depth += 1
        return self

    def close(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            for override in self.overrides:
                override.remove()
            self.overrides = []

    def __enter__(self) -> "TextConditioner":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, prompts: list[str], device=None) -> list[torch.Tensor]:
        """Prompts -> one (B, 77) id tensor per tokenizer, padded and truncated as Stable Diffusion does."""
        return [tokenize(tokenizer, prompts, device) for tokenizer in self.tokenizers]

    def split(self, vectors: dict[int, torch.Tensor]) -> list[dict[int, torch.Tensor]]:
        """{token_id: (..., D)} -> per encoder {token_id: (..., D_i)}, D = Σ D_i in the encoders' order."""
        parts = [{} for _ in self.widths]
        for token_id, vector in vectors.items():
            for part, piece in zip(parts, vector.split(self.widths, dim=-1)):
                part[token_id] = piece
        return parts

    def encode(self, input_ids: list[torch.Tensor], vectors: dict[int, torch.Tensor], *, check: bool = True,
               forward=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states (B, L, C) the UNet reads, and the pooled embedding (B, P) or None (see class).

        `forward(text_encoder, ids, hidden_layer)`: another way to run an encoder (the capture-safe
        `StaticTextEncoder`); by default transformers' own forward."""
        if not self.overrides:
            raise RuntimeError("TextConditioner.encode outside `with conditioner:` (no overrides installed)")
        hidden, pooled = [], None
        for spec, encoder, tokenizer, ids, override, part in zip(
            self.family.encoders, self.text_encoders, self.tokenizers, input_ids, self.overrides, self.split(vectors)
        ):
            eos = eos_positions(ids, tokenizer.eos_token_id)
            dtype = encoder.get_input_embeddings().weight.dtype
            with override.vectors({k: v.to(dtype) for k, v in part.items()}, check=check):
                if forward is not None:
                    states, final = forward(encoder, ids, spec.hidden_layer)
                else:
                    out = encoder(ids, output_hidden_states=spec.hidden_layer is not None)
                    final = out.last_hidden_state
                    states = final if spec.hidden_layer is None else out.hidden_states[spec.hidden_layer]
            hidden.append(states)
            if spec.pooled:
                pooled = _projected_pooled(encoder, final, eos)
        return torch.cat(hidden, dim=-1), pooled


# --------------------------------------------------------------------------------------------------
# a whole sampling run at once


@dataclass
class ScheduledConditioning:
    """Text conditioning for a whole sampling run: a table of encoded rows and, per denoising step,
    which rows make the batch."""

    hidden: torch.Tensor  # (R, L, C) text encoders' outputs: the K input of cross-attention
    values: torch.Tensor  # (R, L, C) the same plus the mapper residuals: the V input
    pooled: torch.Tensor | None  # (R, P) pooled embeddings (families that have them), else None
    rows: list  # per step i of the schedule: (B,) rows of the table
    ids: torch.Tensor | None = None  # (R, L) the first tokenizer's ids of each table row

    def at(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, L, C) K input, (B, L, C) V input and (B, P) pooled embedding or None at step i (by
        position: reading a timestep's value off the GPU would wait for it at every step)."""
        rows = self.rows[i]
        return self.hidden[rows], self.values[rows], None if self.pooled is None else self.pooled[rows]

    def replaced(self, hidden: torch.Tensor) -> "ScheduledConditioning":
        """The same schedule with other K inputs (R, L, C) for its rows (e.g. PhotoMaker's fused ones);
        the V inputs keep their residuals on top."""
        return ScheduledConditioning(hidden, self.values - self.hidden + hidden, self.pooled, self.rows, self.ids)

    def switched(self, other: "ScheduledConditioning", from_step: int) -> "ScheduledConditioning":
        """This schedule's rows before step `from_step`, `other`'s from there on (one table holding both)."""
        offset = self.hidden.shape[0]
        cat = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        rows = [r if i < from_step else other.rows[i] + offset for i, r in enumerate(self.rows)]
        return ScheduledConditioning(torch.cat([self.hidden, other.hidden]), torch.cat([self.values, other.values]),
                                     cat(self.pooled, other.pooled), rows, cat(self.ids, other.ids))

    def zeroing(self, count: int) -> "ScheduledConditioning":
        """The same with the first `count` rows of every step's batch all zeros (a missing negative prompt,
        None, on families that zero it; an explicit "" is encoded): a zero row is added to the table and
        those positions point to it."""
        zero = lambda t: torch.cat([t, t.new_zeros(1, *t.shape[1:])])  # noqa: E731
        last = self.hidden.shape[0]
        rows = [torch.cat([r.new_full((count,), last), r[count:]]) for r in self.rows]
        return ScheduledConditioning(zero(self.hidden), zero(self.values),
                                     None if self.pooled is None else zero(self.pooled), rows,
                                     None if self.ids is None else zero(self.ids))


def encode_schedule(conditioner: TextConditioner, concepts: list, input_ids: list[torch.Tensor], timesteps,
                    chunk: int = 256) -> ScheduledConditioning:
    """The text conditioning of every denoising step, in as few text-encoder calls as possible.

    concepts: objects with `.tokens.ids`, `.stage(t)` and `.vectors_at(timesteps)` (the pipeline's
    loaded concepts); input_ids: one (B, L) tensor per tokenizer. Equivalent to encoding the prompts
    at each timestep with every concept's vectors for its stage there, but each distinct prompt is
    encoded once per distinct stage key (once in all if it holds no placeholder), in batches of up to
    `chunk` rows: one call instead of one per dynamic step, and no repeated work for the negative
    prompt or for many images of one prompt.
    """
    steps = [int(t) for t in torch.as_tensor(timesteps).tolist()]  # one device read for all steps
    keys = [stage_key(concepts, t) for t in steps]
    distinct = list(dict.fromkeys(keys))  # in order of first use
    key_times = [steps[keys.index(k)] for k in distinct]
    # (B, E·L) ids of every tokenizer side by side -> (U, E·L) distinct prompts; inverse: (B,) row of each
    stacked = torch.cat(input_ids, dim=1)
    prompts, inverse = torch.unique(stacked, dim=0, return_inverse=True)
    placeholder_ids = torch.tensor([i for c in concepts for i in c.tokens.ids], dtype=prompts.dtype,
                                   device=prompts.device)
    dependent = torch.isin(prompts, placeholder_ids).any(dim=1)  # (U,)
    plain, personal = prompts[~dependent], prompts[dependent]
    P, D, K = plain.shape[0], personal.shape[0], len(distinct)
    # rows: the P plain prompts once, then the D personal prompts once per stage key (k-major)
    table = torch.cat([plain, personal.repeat(K, 1)])
    vectors, residuals = _schedule_vectors(concepts, key_times, D) if D else ({}, {})
    vectors = {i: torch.cat([v.new_zeros(P, v.shape[1]), v]) for i, v in vectors.items()}
    residuals = {i: torch.cat([r.new_zeros(P, r.shape[1]), r]) for i, r in residuals.items()}
    ids = list(table.split([ids.shape[1] for ids in input_ids], dim=1))
    hidden, pooled = [], []
    with conditioner:
        for start in range(0, table.shape[0], chunk):
            part = {i: v[start:start + chunk] for i, v in vectors.items()}
            h, p = conditioner.encode([x[start:start + chunk] for x in ids], part)
            hidden.append(h)
            pooled.append(p)
    hidden = torch.cat(hidden)  # (P + K·D, L, C)
    values = add_residuals(hidden, ids[0], residuals)
    pooled = None if pooled[0] is None else torch.cat(pooled)
    # table row of distinct prompt u under key k
    position = torch.empty(K, prompts.shape[0], dtype=torch.long, device=prompts.device)
    position[:, ~dependent] = torch.arange(P, device=prompts.device)
    position[:, dependent] = P + torch.arange(K * D, device=prompts.device).view(K, D)
    rows = position[:, inverse]  # (K, B)
    return ScheduledConditioning(hidden, values, pooled, [rows[distinct.index(k)] for k in keys], ids[0])


def stage_key(concepts: list, t: int) -> tuple:
    """Steps with the same key share text conditioning: each concept's stage, or t itself where the
    concept is dynamic (static stages are computed once)."""
    return tuple(c.stage(t) if c.stage(t) != Stage.DYNAMIC else t for c in concepts)


def _schedule_vectors(concepts: list, timesteps: list[int], rows: int) -> tuple[dict, dict]:
    """Per placeholder token id, its (K·rows, D) embeddings and (K·rows, C) residuals for K timesteps,
    each repeated for `rows` consecutive rows."""
    vectors, residuals = {}, {}
    for concept in concepts:
        embeds, res = concept.vectors_at(timesteps)  # (K, V, D), (K, V, C)
        for i, token_id in enumerate(concept.tokens.ids):
            vectors[token_id] = embeds[:, i].repeat_interleave(rows, 0)
            residuals[token_id] = res[:, i].repeat_interleave(rows, 0)
    return vectors, residuals
