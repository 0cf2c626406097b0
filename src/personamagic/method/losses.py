"""Losses of PersonaMagic (paper Eq. 1-4, docs/method.md): pure functions over tensors. Their sum for a batch,
Eq. 5, is assembled on the model by `personamagic.training.objective`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet predicts, as diffusers' schedulers name it


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Face-masked denoising loss (Eq. 2): Σ M·(pred − target)² / Σ M per sample, mean over the batch.

    pred, target: (B, C, H, W); mask: (B or 1, 1, H, W) in [0, 1], broadcast over channels. Pixels
    where the mask is 0 do not contribute. Callers validate masks (never all-zero) when they are built.
    """
    # float32 throughout: in bf16 the mask's sum (thousands of latent pixels) would lose its last digits
    mask = mask.float().expand_as(pred)
    squared = (pred.float() - target.float()) ** 2 * mask
    per_sample = squared.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-8)
    return per_sample.mean()


def tandem_equilibrium_loss(
    attention: torch.Tensor,
    placeholder_mask: torch.Tensor,
    eos_index: torch.Tensor,
    temperature: float = 100.0,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Tandem-equilibrium loss (Eq. 1) on the text encoder's last-layer self-attention.

    attention: (B, H, L, L) probabilities, rows = queries, columns = keys (CLIP's mask is causal).
    placeholder_mask: (B, L) bool, True at the S* positions. eos_index: (B,) long, position of EOT.
    For each sample: j_S = the S* column with most mass, j_max = the strongest real word (strictly
    between SOT and EOT, not S*); over the rows that see both, (p_S, p_max) = softmax(τ·A[q, j_S],
    τ·A[q, j_max]); a_S = mean p_S, a_max = 1 − a_S; loss = −a_S·a_max, mean over the batch.
    Balanced attention gives the minimum −0.25; S* dominating gives ≈ 0. `check=False` skips the
    input checks (they read values back to the host) for prompts validated beforehand.
    """
    B, H, L, _ = attention.shape
    attention = attention.float()
    positions = torch.arange(L, device=attention.device)
    eos = eos_index.to(attention.device)[:, None]  # (B, 1)
    placeholder_mask = placeholder_mask.to(attention.device)
    candidates = (positions[None, :] > 0) & (positions[None, :] < eos) & ~placeholder_mask  # (B, L)
    if check and not bool(placeholder_mask.any(dim=1).all()):
        raise ValueError("tandem_equilibrium_loss: a prompt has no placeholder (S*) token")
    if check and not bool(candidates.any(dim=1).all()):
        raise ValueError("tandem_equilibrium_loss: a prompt has no real word besides S*; use a prompt with words")

    rows_to_eos = (positions[None, :] <= eos).to(attention.dtype)  # (B, L): rows q <= EOT
    column_mass = (attention * rows_to_eos[:, None, :, None]).sum(dim=(1, 2))  # (B, H, L, L) -> (B, L)
    very_negative = torch.finfo(column_mass.dtype).min
    j_s = column_mass.masked_fill(~placeholder_mask, very_negative).argmax(dim=1)  # (B,)
    j_max = column_mass.masked_fill(~candidates, very_negative).argmax(dim=1)  # (B,)

    first_row = torch.maximum(j_s, j_max)[:, None]
    rows = (positions[None, :] >= first_row) & (positions[None, :] <= eos)  # (B, L)
    batch = torch.arange(B, device=attention.device)
    a_s = attention[batch, :, :, j_s]  # (B, H, L): column j_S of every head and row
    a_m = attention[batch, :, :, j_max]
    p_s = torch.softmax(temperature * torch.stack([a_s, a_m], dim=-1), dim=-1)[..., 0]  # (B, H, L)
    rows = rows.to(p_s.dtype)[:, None, :]  # (B, 1, L)
    share_s = (p_s * rows).sum(dim=(1, 2)) / (rows.sum(dim=(1, 2)) * H)  # (B,)
    return -(share_s * (1.0 - share_s)).mean()


def identity_weight(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """λ_id(t) = cos(π·t / (2T)) (Eq. 4): 1 at t = 0, 0 at t = T."""
    return torch.cos(math.pi * timesteps.float() / (2 * num_train_timesteps))


def identity_loss(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L_id = 1 − cos(f(x̂0), f(x0)) (Eq. 3) per sample: (B, D), (B or 1, D) -> (B,)."""
    return 1.0 - F.cosine_similarity(embeddings.float(), reference.float().expand_as(embeddings), dim=-1)


def denoising_target(prediction_type: str, latents, noise, alphas_cumprod, timesteps) -> torch.Tensor:
    """What the UNet is trained to predict (float32): ε, or v = √ᾱ·ε − √(1−ᾱ)·x0 (v_prediction)."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, latents)
        return alpha * noise.float() - sigma * latents.float()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; PersonaMagic supports epsilon and v_prediction")


def predicted_original(prediction_type: str, noisy_latents, model_pred, alphas_cumprod, timesteps) -> torch.Tensor:
    """x̂0|t from the model output: (x_t − √(1−ᾱ)·ε̂)/√ᾱ, or √ᾱ·x_t − √(1−ᾱ)·v̂ for v_prediction."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, noisy_latents)
    noisy_latents, model_pred = noisy_latents.float(), model_pred.float()
    if prediction_type == "epsilon":
        return (noisy_latents - sigma * model_pred) / alpha
    if prediction_type == "v_prediction":
        return alpha * noisy_latents - sigma * model_pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}; PersonaMagic supports epsilon and v_prediction")


def _alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor):
    """√ᾱ_t and √(1−ᾱ_t) in float32, shaped (B, 1, 1, 1) to broadcast over latents."""
    abar = alphas_cumprod.to(like.device)[timesteps].float().view(-1, 1, 1, 1)
    return abar.sqrt(), (1 - abar).sqrt()
