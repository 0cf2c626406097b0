"""Losses on hand-made tensors (SPEC §3)."""

import math

import pytest
import torch

from personamagic.method.losses import (
    denoising_target,
    identity_loss,
    identity_weight,
    masked_mse,
    predicted_original,
    tandem_equilibrium_loss,
)

L = 8  # tokens: SOT, a, photo, of, S*, EOT, pad, pad


def causal_attention(column_weights: dict[int, float], eos: int = 5, heads: int = 2) -> torch.Tensor:
    """(1, H, L, L) causal rows: each row q spreads its mass over visible columns by the given weights."""
    attention = torch.zeros(1, heads, L, L)
    for q in range(L):
        weights = torch.tensor([column_weights.get(j, 0.01) if j <= q else 0.0 for j in range(L)])
        attention[0, :, q] = weights / weights.sum()
    return attention


def placeholder_at(position: int) -> torch.Tensor:
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, position] = True
    return mask


def test_te_loss_balanced_is_minus_quarter():
    attention = causal_attention({2: 0.4, 4: 0.4})  # "photo" and S* share the attention equally
    loss = tandem_equilibrium_loss(attention, placeholder_at(4), torch.tensor([5]))
    assert loss.item() == pytest.approx(-0.25, abs=1e-6)


def test_te_loss_dominated_is_near_zero():
    attention = causal_attention({2: 0.05, 4: 0.9})  # S* takes almost all attention
    loss = tandem_equilibrium_loss(attention, placeholder_at(4), torch.tensor([5]))
    assert -0.01 < loss.item() <= 0.0


def test_te_loss_picks_strongest_real_word():
    # "of" (3) is the strongest real word; balanced with S* -> -0.25 even though "photo" is weak.
    attention = causal_attention({2: 0.02, 3: 0.45, 4: 0.45})
    loss = tandem_equilibrium_loss(attention, placeholder_at(4), torch.tensor([5]))
    assert loss.item() == pytest.approx(-0.25, abs=1e-6)


def test_te_loss_is_batch_mean_and_differentiable():
    balanced = causal_attention({2: 0.4, 4: 0.4})
    dominated = causal_attention({2: 0.05, 4: 0.9})
    attention = torch.cat([balanced, dominated]).requires_grad_(True)
    loss = tandem_equilibrium_loss(attention, placeholder_at(4).repeat(2, 1), torch.tensor([5, 5]))
    single = tandem_equilibrium_loss(dominated, placeholder_at(4), torch.tensor([5]))
    assert loss.item() == pytest.approx((-0.25 + single.item()) / 2, abs=1e-6)
    loss.backward()
    assert torch.isfinite(attention.grad).all() and attention.grad.abs().sum() > 0


def test_te_loss_without_real_word_raises():
    # SOT, S*, EOT: no candidate word.
    attention = causal_attention({1: 0.5}, eos=2)
    with pytest.raises(ValueError, match="no real word"):
        tandem_equilibrium_loss(attention, placeholder_at(1), torch.tensor([2]))


def test_te_loss_without_placeholder_raises():
    attention = causal_attention({2: 0.5})
    with pytest.raises(ValueError, match="no placeholder"):
        tandem_equilibrium_loss(attention, torch.zeros(1, L, dtype=torch.bool), torch.tensor([5]))


def test_identity_weight_schedule():
    T = 1000
    weights = identity_weight(torch.tensor([0, 500, 1000]), T)
    assert weights[0].item() == pytest.approx(1.0)
    assert weights[1].item() == pytest.approx(math.cos(math.pi / 4))
    assert weights[2].item() == pytest.approx(0.0, abs=1e-7)
    assert torch.all(identity_weight(torch.arange(T), T).diff() < 0)


def test_masked_mse_ignores_unmasked_pixels():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    loss = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[:, :, 0, 0] += 100.0  # outside the mask
    assert masked_mse(changed, target, mask).item() == pytest.approx(loss.item())
    changed[:, :, 3, 3] += 1.0  # inside
    assert masked_mse(changed, target, mask).item() > loss.item()


def test_masked_mse_full_mask_is_plain_mse_and_per_sample_normalised():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert masked_mse(pred, target, torch.ones(1, 1, 8, 8)).item() == pytest.approx(
        torch.nn.functional.mse_loss(pred, target).item(), rel=1e-5
    )
    # A small mask on sample 0 and a big one on sample 1: each sample is a mean over its own region.
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :2, :2] = 1
    mask[1] = 1
    expected = ((pred[0, :, :2, :2] - target[0, :, :2, :2]) ** 2).mean() / 2 + ((pred[1] - target[1]) ** 2).mean() / 2
    assert masked_mse(pred, target, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_identity_loss_zero_for_same_embedding():
    embeddings = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    assert torch.allclose(identity_loss(embeddings, embeddings), torch.zeros(3), atol=1e-6)
    assert torch.allclose(identity_loss(embeddings, -embeddings), torch.full((3,), 2.0), atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_exact_prediction_recovers_clean_latent(prediction_type):
    from diffusers import DDPMScheduler

    from personamagic.models import SD1_SCHEDULER_CONFIG

    scheduler = DDPMScheduler.from_config({**SD1_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 900])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = denoising_target(prediction_type, latents, noise, scheduler.alphas_cumprod, timesteps)
    x0 = predicted_original(prediction_type, noisy, target, scheduler.alphas_cumprod, timesteps)
    assert torch.allclose(x0, latents, atol=1e-3)


def test_unknown_prediction_type_raises():
    with pytest.raises(ValueError, match="unknown prediction_type"):
        denoising_target("sample", torch.zeros(1), torch.zeros(1), torch.ones(10), torch.tensor([0]))
