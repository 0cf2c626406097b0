"""UNet attention processors: residual-on-V cross-attention (SPEC §1), installed per layer by name.

`PersonaMagicAttnProcessor` is diffusers' scaled-dot-product attention with one change: on
cross-attention layers the values may come from `value_hidden_states` (the text encoder output plus the
mapper's residual at the S* positions) while the keys keep the plain text encoder output. It receives
`value_hidden_states` through the UNet's `cross_attention_kwargs`, the channel diffusers provides for
per-call processor arguments. Self-attention layers ignore it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class PersonaMagicAttnProcessor:
    """SDPA attention whose cross-attention V input can differ from its K input."""

    def __init__(self, name: str):
        self.name = name  # the layer's key in `unet.attn_processors`

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        value_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        if not is_cross:
            encoder_hidden_states = hidden_states
            value_hidden_states = hidden_states
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if value_hidden_states is None:
                value_hidden_states = encoder_hidden_states
            elif attn.norm_cross:
                value_hidden_states = attn.norm_encoder_hidden_states(value_hidden_states)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(value_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, N, heads*d) -> (B, heads, N, d)
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(attn, query, key, value, attention_mask)  # (B, heads, N, d)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, attn, query, key, value, attention_mask) -> torch.Tensor:
        """softmax(QKᵀ·scale)·V with the fused kernel; subclasses that need probabilities override it."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)


def is_cross_attention(name: str) -> bool:
    """diffusers names UNet cross-attention processors `...attn2.processor`."""
    return name.endswith("attn2.processor")


@contextlib.contextmanager
def attention_processors(unet, factory=PersonaMagicAttnProcessor):
    """Install `factory(name)` on every attention layer of `unet`; restore the previous ones on exit,
    also when the body raises."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({name: factory(name) for name in previous})
    try:
        yield
    finally:
        unet.set_attn_processor(previous)
