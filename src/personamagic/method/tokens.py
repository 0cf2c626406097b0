"""Placeholder tokens: how S* is written in prompts and which token ids stand for it.

S* is plain text in prompts (default `S*`). Each concept gets `num_vectors` new tokens in the tokenizers;
their ids lie beyond the text encoders' embedding tables, which are never resized or modified (the
token-embedding override of `conditioning` supplies their vectors per call).
"""

from __future__ import annotations

import re

import torch

from ..errors import SettingsError


class PlaceholderTokens:
    """The tokens one concept adds to the base model's tokenizers, and how its placeholder text maps to
    them. With several tokenizers (SDXL) the same tokens are added to each and must get the same ids
    (they share CLIP's vocabulary), so one list of ids serves every text encoder."""

    def __init__(self, tokenizers, placeholder: str, num_vectors: int, slot: int):
        if not isinstance(placeholder, str) or not placeholder.strip() or placeholder.strip() != placeholder:
            raise SettingsError(f"placeholder must be non-empty text without surrounding spaces, got {placeholder!r}")
        self.placeholder = placeholder
        # Lower-case ASCII names: the CLIP tokenizer lower-cases text, so these match as typed.
        self.tokens = [f"<personamagic-{slot}-{i}>" for i in range(num_vectors)]
        self.ids: list[int] | None = None
        for tokenizer in tokenizers if isinstance(tokenizers, (list, tuple)) else [tokenizers]:
            tokenizer.add_tokens(self.tokens)
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            probe = tokenizer(" ".join(self.tokens), add_special_tokens=False).input_ids
            if probe != ids:
                raise RuntimeError(f"tokenizer split the placeholder tokens {self.tokens}: {probe}")
            if self.ids is not None and ids != self.ids:
                raise RuntimeError(f"the tokenizers gave the placeholder tokens different ids: {self.ids}, {ids}")
            self.ids = ids

    def rewrite(self, prompt: str) -> str:
        """Replace every occurrence of the placeholder text by the concept's tokens."""
        return prompt.replace(self.placeholder, " ".join(self.tokens))

    def occurs_in(self, prompt: str) -> bool:
        return self.placeholder in prompt


def single_token_id(tokenizer, word: str) -> int:
    """Id of `word` if the tokenizer keeps it as one token, else SettingsError."""
    if not re.fullmatch(r"[\w'-]+", word):
        raise SettingsError(f"supercategory must be a single word, got {word!r}")
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise SettingsError(
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
