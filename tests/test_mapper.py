"""Stage mapper (SPEC §1)."""

import pytest
import torch

from personamagic.method.mapper import MapperConfig, StageMapper


def make_mapper(num_vectors=2, seed=0):
    torch.manual_seed(seed)
    config = MapperConfig(text_embed_dim=32, image_embed_dim=16, num_vectors=num_vectors, hidden_dim=24)
    return StageMapper(config, torch.randn(32))


def test_shapes_and_finiteness():
    mapper = make_mapper()
    embeddings, residuals = mapper(torch.tensor([0, 500, 999]), torch.randn(3, 16))
    assert embeddings.shape == (3, 2, 32) and residuals.shape == (3, 2, 32)
    assert torch.isfinite(embeddings).all() and torch.isfinite(residuals).all()


def test_untrained_mapper_is_the_supercategory_word():
    mapper = make_mapper()
    embeddings, residuals = mapper(torch.tensor([100, 700]), torch.randn(2, 16))
    assert torch.allclose(embeddings, mapper.super_embedding.expand(2, 2, 32), atol=1e-6)
    assert torch.count_nonzero(residuals) == 0


def test_embeddings_keep_the_supercategory_norm_and_vary_with_t():
    mapper = make_mapper()
    with torch.no_grad():
        for p in mapper.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    embeddings, residuals = mapper(torch.tensor([100, 700]), torch.randn(2, 16))
    norms = embeddings.norm(dim=-1)
    assert torch.allclose(norms, mapper.super_embedding.norm().expand_as(norms), rtol=1e-5)
    assert not torch.allclose(embeddings[0], embeddings[1])
    assert residuals.abs().sum() > 0


def test_state_dict_is_complete():
    mapper = make_mapper()
    state = mapper.state_dict()
    assert {"frequencies", "super_embedding"} <= set(state)
    rebuilt = StageMapper(mapper.config, state["super_embedding"])
    rebuilt.load_state_dict(state)
    t, e = torch.tensor([321]), torch.randn(1, 16)
    assert all(torch.equal(a, b) for a, b in zip(mapper(t, e), rebuilt(t, e)))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="num_vectors"):
        MapperConfig(text_embed_dim=32, image_embed_dim=16, num_vectors=0)
    with pytest.raises(ValueError, match="super_embedding"):
        StageMapper(MapperConfig(text_embed_dim=32, image_embed_dim=16), torch.randn(31))


def test_ablation_switches():
    torch.manual_seed(0)
    config = MapperConfig(text_embed_dim=32, image_embed_dim=16, time_dependent=False, use_residual=False)
    mapper = StageMapper(config, torch.randn(32))
    assert not any(name.startswith("residual") for name in mapper.state_dict())
    with torch.no_grad():
        for p in mapper.parameters():
            p.add_(torch.randn_like(p))
    embeddings, residuals = mapper(torch.tensor([10, 900]), torch.randn(2, 16))
    assert torch.equal(embeddings[0], embeddings[1])  # one embedding for every t
    assert torch.count_nonzero(residuals) == 0
