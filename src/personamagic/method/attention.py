"""UNet attention processors: residual-on-V cross-attention (docs/method.md), installed per layer by name.

`PersonaMagicAttnProcessor` is diffusers' scaled-dot-product attention with one change: on
cross-attention layers the values may come from `value_hidden_states` (the text encoder output plus the
mapper's residual at the S* positions) while the keys keep the plain text encoder output. It receives
`value_hidden_states` through the UNet's `cross_attention_kwargs`, the channel diffusers provides for
per-call processor arguments. Self-attention layers ignore it.

IP-Adapter plug-in (paper, Table 3). diffusers' `load_ip_adapter` replaces every cross-attention
processor by an `IPAdapterAttnProcessor2_0` that owns the adapter's extra projections (`to_k_ip`,
`to_v_ip`) and its `scale`, and the UNet then hands cross-attention layers a tuple
`(text_states, [image_tokens, ...])`. `attention_processors` keeps that layer's IP-Adapter processor
on the PersonaMagic processor it installs (`ip_adapter`), so both run: the text part with the
residual on V, plus the decoupled image attention `scale · softmax(Q·K_ipᵀ)·V_ip` of every adapter,
exactly as diffusers computes it. The adapter's modules and scale are used in place, not copied, so
`pipe.set_ip_adapter_scale(...)` keeps working.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class PersonaMagicAttnProcessor:
    """SDPA attention whose cross-attention V input can differ from its K input."""

    def __init__(self, name: str, ip_adapter=None):
        self.name = name  # the layer's key in `unet.attn_processors`
        # diffusers' IP-Adapter processor of this layer (to_k_ip, to_v_ip, scale), when one is loaded.
        self.ip_adapter = ip_adapter

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        value_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ip_hidden_states = None
        if isinstance(encoder_hidden_states, tuple):  # (text, [image tokens per adapter]) with an IP-Adapter
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
            if self.ip_adapter is None:
                raise RuntimeError(f"{self.name} received IP-Adapter image tokens but has no IP-Adapter projections")
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
        if ip_hidden_states is not None:
            hidden_states = hidden_states + self.image_attention(attn, query, ip_hidden_states)
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

    def image_attention(self, attn, query: torch.Tensor, ip_hidden_states: list) -> torch.Tensor:
        """IP-Adapter's decoupled cross-attention, Σ_adapters scale·softmax(Q·K_ipᵀ·s)·V_ip (Ye et al. 2023).

        query: (B, heads, N, d); ip_hidden_states: one (B, images, tokens, C) or (B, tokens, C) tensor
        per adapter. Returns (B, heads, N, d). Adapters whose scale is 0 are skipped, as in diffusers.
        """
        batch_size, heads, _, head_dim = query.shape
        out = torch.zeros_like(query)
        ip = self.ip_adapter
        for states, scale, to_k_ip, to_v_ip in zip(ip_hidden_states, ip.scale, ip.to_k_ip, ip.to_v_ip):
            if isinstance(scale, (list, tuple)):
                raise ValueError("per-image IP-Adapter scales need IP-Adapter masks, which are not supported")
            if scale == 0:
                continue
            states = states.to(query.dtype)
            # (B, [images,] tokens, C) -> (B, images·tokens, heads·d) -> (B, heads, images·tokens, d)
            ip_key = to_k_ip(states).reshape(batch_size, -1, heads, head_dim).transpose(1, 2)
            ip_value = to_v_ip(states).reshape(batch_size, -1, heads, head_dim).transpose(1, 2)
            out = out + scale * F.scaled_dot_product_attention(query, ip_key, ip_value, scale=attn.scale)
        return out


def is_cross_attention(name: str) -> bool:
    """diffusers names UNet cross-attention processors `...attn2.processor`."""
    return name.endswith("attn2.processor")


def ip_adapter_of(processor):
    """The IP-Adapter processor behind an installed processor (diffusers' own, or one a PersonaMagic
    processor keeps), or None. Recognised by its projections, so every diffusers variant qualifies."""
    if isinstance(processor, PersonaMagicAttnProcessor):
        return processor.ip_adapter
    if hasattr(processor, "to_k_ip") and hasattr(processor, "to_v_ip") and hasattr(processor, "scale"):
        return processor
    return None


@contextlib.contextmanager
def attention_processors(unet, factory=PersonaMagicAttnProcessor):
    """Install `factory(name)` on every attention layer of `unet`; restore the previous ones on exit,
    also when the body raises.

    Layers that carry an IP-Adapter (diffusers' processor, or a PersonaMagic processor installed
    around one) pass it on to the new processor, which must then be a `PersonaMagicAttnProcessor`.
    """
    previous = dict(unet.attn_processors)
    installed = {}
    for name, old in previous.items():
        processor = factory(name)
        ip_adapter = ip_adapter_of(old)
        if ip_adapter is not None:
            if not isinstance(processor, PersonaMagicAttnProcessor):
                raise TypeError(f"{name} has an IP-Adapter; its processor must be a PersonaMagicAttnProcessor")
            processor.ip_adapter = ip_adapter
        installed[name] = processor
    unet.set_attn_processor(installed)
    try:
        yield
    finally:
        unet.set_attn_processor(previous)
