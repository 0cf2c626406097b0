"""Residual-on-V attention processors (SPEC §1)."""

import pytest
import torch

from personamagic.method.attention import PersonaMagicAttnProcessor, attention_processors


def unet_inputs(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    hidden = torch.randn(2, 77, base.hidden_size, generator=g)
    return latents, torch.tensor([10, 600]), hidden


def test_without_residual_equals_diffusers_default(tiny_base):
    latents, t, hidden = unet_inputs(tiny_base)
    reference = tiny_base.unet(latents, t, hidden).sample
    with attention_processors(tiny_base.unet):
        ours = tiny_base.unet(latents, t, hidden).sample
        same_values = tiny_base.unet(latents, t, hidden, cross_attention_kwargs={"value_hidden_states": hidden}).sample
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(same_values, reference, atol=1e-5)


def test_values_change_output_but_not_keys(tiny_base):
    latents, t, hidden = unet_inputs(tiny_base)
    with attention_processors(tiny_base.unet):
        plain = tiny_base.unet(latents, t, hidden).sample
        values = hidden.clone()
        values[:, 4] += 1.0
        shifted = tiny_base.unet(latents, t, hidden, cross_attention_kwargs={"value_hidden_states": values}).sample
    assert not torch.allclose(plain, shifted)


def test_processors_installed_by_name_and_restored_after_error(tiny_base):
    unet = tiny_base.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with attention_processors(unet):
            installed = unet.attn_processors
            assert all(isinstance(p, PersonaMagicAttnProcessor) and p.name == n for n, p in installed.items())
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert set(after) == set(before) and all(after[n] is before[n] for n in before)
