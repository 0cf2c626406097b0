"""Placeholder tokens and the token-embedding override (SPEC §1)."""

import pytest
import torch

from personamagic.method.conditioning import EmbeddingOverride, add_residuals
from personamagic.method.tokens import PlaceholderTokens, eos_positions, single_token_id, tokenize


def test_placeholder_tokens_are_single_ids_beyond_the_table(tiny_base):
    tokens = PlaceholderTokens(tiny_base.tokenizer, "S*", num_vectors=3, slot=0)
    assert len(tokens.ids) == 3 and min(tokens.ids) >= tiny_base.text_encoder.get_input_embeddings().num_embeddings
    ids = tokenize(tiny_base.tokenizer, [tokens.rewrite("a photo of S* in S*'s hat")])[0].tolist()
    assert ids.count(tokens.ids[0]) == 2 and ids.count(tokens.ids[2]) == 2


def test_supercategory_must_be_one_token(tiny_base):
    assert single_token_id(tiny_base.tokenizer, "face") == tiny_base.tokenizer("face").input_ids[1]
    with pytest.raises(ValueError, match="tokens"):
        single_token_id(tiny_base.tokenizer, "personamagicface")
    with pytest.raises(ValueError, match="single word"):
        single_token_id(tiny_base.tokenizer, "two words")


def test_override_replaces_exactly_the_placeholder_positions(tiny_base):
    tokenizer, text_encoder = tiny_base.tokenizer, tiny_base.text_encoder
    tokens = PlaceholderTokens(tokenizer, "S*", num_vectors=1, slot=0)
    face = single_token_id(tokenizer, "face")
    face_vector = text_encoder.get_input_embeddings().weight[face]
    with_placeholder = tokenize(tokenizer, [tokens.rewrite("a photo of S*")])
    plain = tokenize(tokenizer, ["a photo of face"])
    override = EmbeddingOverride(text_encoder)
    try:
        with override.vectors({tokens.ids[0]: face_vector}):
            out = text_encoder(with_placeholder)[0]
        assert torch.allclose(out, text_encoder(plain)[0], atol=1e-6)
        with override.vectors({tokens.ids[0]: torch.randn(2, face_vector.shape[0])}):
            batch = text_encoder(with_placeholder.expand(2, -1))[0]
        # Positions before S* cannot see it (causal), later ones differ per sample.
        position = with_placeholder[0].tolist().index(tokens.ids[0])
        assert torch.allclose(batch[0, :position], batch[1, :position])
        assert not torch.allclose(batch[0, position:], batch[1, position:])
    finally:
        override.remove()
    # Removed hooks: the embedding table rejects the new ids again.
    with pytest.raises(IndexError):
        text_encoder(with_placeholder)


def test_add_residuals_only_at_placeholders():
    hidden = torch.zeros(2, 5, 4)
    ids = torch.tensor([[1, 9, 2, 9, 3], [1, 2, 3, 4, 9]])
    values = add_residuals(hidden, ids, {9: torch.ones(2, 4)})
    assert values[0, 1].sum() == 4 and values[0, 3].sum() == 4 and values[1, 4].sum() == 4
    assert values.sum() == 12


def test_eos_positions_first_occurrence(tiny_base):
    ids = tokenize(tiny_base.tokenizer, ["a photo", "a photo of a face"])
    assert eos_positions(ids, tiny_base.tokenizer.eos_token_id).tolist() == [3, 6]
