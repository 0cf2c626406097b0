"""Text conditioning: placeholder tokens and the token-embedding override (SPEC §1).

S* is written in prompts as plain text (default `S*`). Each concept gets `num_vectors` new tokens in
the tokenizer; their ids lie beyond the text encoder's embedding table, which is never resized or
modified. A pair of hooks on the token embedding swaps those ids for vectors supplied per call (the
mapper's output, one per sample), so the frozen text encoder runs its own, unmodified forward.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re

import torch
from torch import nn


class PlaceholderTokens:
    """The tokens one concept adds to a tokenizer, and how its placeholder text maps to them."""

    def __init__(self, tokenizer, placeholder: str, num_vectors: int, slot: int):
        if not placeholder or placeholder.strip() != placeholder:
            raise ValueError(f"placeholder must be non-empty text without surrounding spaces, got {placeholder!r}")
        self.placeholder = placeholder
        # Lower-case ASCII names: the CLIP tokenizer lower-cases text, so these match as typed.
        self.tokens = [f"<personamagic-{slot}-{i}>" for i in range(num_vectors)]
        tokenizer.add_tokens(self.tokens)
        self.ids = tokenizer.convert_tokens_to_ids(self.tokens)
        probe = tokenizer(" ".join(self.tokens), add_special_tokens=False).input_ids
        if probe != self.ids:
            raise RuntimeError(f"tokenizer split the placeholder tokens {self.tokens}: {probe}")

    def rewrite(self, prompt: str) -> str:
        """Replace every occurrence of the placeholder text by the concept's tokens."""
        return prompt.replace(self.placeholder, " ".join(self.tokens))

    def occurs_in(self, prompt: str) -> bool:
        return self.placeholder in prompt


def single_token_id(tokenizer, word: str) -> int:
    """Id of `word` if the tokenizer keeps it as one token, else ValueError."""
    if not re.fullmatch(r"[\w'-]+", word):
        raise ValueError(f"supercategory must be a single word, got {word!r}")
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"supercategory {word!r} is {len(ids)} tokens for this tokenizer; choose a word that is one token "
            "(face, person, cat, dog, cup, painting...)"
        )
    return ids[0]


def tokenize(tokenizer, prompts: list[str], device=None) -> torch.Tensor:
    """Prompts -> (B, 77) input ids, padded and truncated like Stable Diffusion does."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, L) ids -> (B,) index of the first end-of-text token (padding repeats it)."""
    return (input_ids == eos_token_id).int().argmax(dim=1)


class EmbeddingOverride:
    """Hooks on a text encoder's token embedding that replace placeholder ids by given vectors.

    Use `with override.vectors({token_id: (B, D) or (D,) tensor, ...}):` around text-encoder calls.
    Ids beyond the embedding table are looked up as id 0 (never used) and then replaced; an id with no
    vector set raises, so a placeholder can never silently fall back to a random row.
    """

    def __init__(self, text_encoder: nn.Module):
        self.embedding = text_encoder.get_input_embeddings()
        self.num_embeddings = self.embedding.num_embeddings
        self._vectors: dict[int, torch.Tensor] = {}
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
    def vectors(self, vectors: dict[int, torch.Tensor]):
        previous = self._vectors
        self._vectors = vectors
        try:
            yield
        finally:
            self._vectors = previous

    def _before(self, module, args):
        (input_ids,) = args
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
        """Raise if `input_ids` holds added tokens that have no vector set (call outside hot loops)."""
        extra = set(input_ids[input_ids >= self.num_embeddings].unique().tolist())
        missing = extra - set(self._vectors)
        if missing:
            raise RuntimeError(f"placeholder token ids {sorted(missing)} are in the prompt but no concept provides them")


def add_residuals(
    encoder_hidden_states: torch.Tensor, input_ids: torch.Tensor, residuals: dict[int, torch.Tensor]
) -> torch.Tensor:
    """Text encoder output + mapper residuals at the placeholder positions: the V input (SPEC §1).

    encoder_hidden_states: (B, L, D); input_ids: (B, L); residuals: {token_id: (B, D) or (D,)}.
    """
    values = encoder_hidden_states
    for token_id, residual in residuals.items():
        if residual.dim() == 2:
            residual = residual[:, None, :]  # (B, D) -> (B, 1, D)
        hit = (input_ids == token_id)[..., None].to(values.dtype)  # (B, L, 1)
        values = values + hit * residual.to(values.dtype)
    return values


@functools.lru_cache(maxsize=16)
def causal_mask(length: int, device, dtype) -> torch.Tensor:
    """(1, 1, L, L) additive causal mask: 0 on and below the diagonal, the dtype's minimum above. Built
    once per (length, device, dtype) and shared: callers only read it."""
    return torch.full((length, length), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)[None, None]


class LastLayerAttention:
    """Keeps the attention probabilities (B, H, L, L) of a CLIP text encoder's last layer, which the
    tandem-equilibrium loss needs (SPEC §3). Only that layer runs eager attention, through its own
    copy of the config; every other layer keeps the model's fused kernel. `remove()` restores it.

    With SDPA, transformers passes no mask and asks the kernel for causal attention (`is_causal`),
    which eager attention ignores: the layer then gets the causal mask explicitly.
    """

    def __init__(self, text_encoder: nn.Module):
        core = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 wraps the model once more
        self.module = core.encoder.layers[-1].self_attn
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
