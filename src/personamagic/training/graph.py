"""The CUDA-graph training step: what makes a step fast on a GPU while keeping its arithmetic.

At batch 2 the eager step mostly waits for Python to launch kernels. The levers here:

* `StaticTextEncoder` runs a CLIP text encoder for 77-token prompts with its causal mask built once,
  so the whole step can be captured as a CUDA graph (transformers builds the mask inside `forward`).
* `GraphedStep` captures losses + backward of one step as a CUDA graph and replays it; the random draws
  are made outside the graph (from the trainer's generator) and copied into its static inputs.

The identity loss's face patch (`face_patches`) is the third lever.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import fields

import torch

from ..method.conditioning import causal_mask

logger = logging.getLogger(__name__)


class StaticTextEncoder:
    """A CLIP text model's forward for fixed-length prompts with a causal mask built once (`causal_mask`).

    Called as `TextConditioner.encode(..., forward=StaticTextEncoder())`: returns the hidden state the
    UNet reads (`hidden_layer`: None = the last hidden state, after the final norm; -2 = the penultimate
    layer's output) and the last hidden state, equal to transformers' `output_hidden_states` forward.
    Works with the transformers 5 layout (layers called as `layer(hidden_states, attention_mask)`);
    `supported(text_encoder)` says whether it applies.
    """

    @staticmethod
    def supported(text_encoder) -> bool:
        core = getattr(text_encoder, "text_model", text_encoder)
        layers = getattr(getattr(core, "encoder", None), "layers", None)
        if not layers or not hasattr(core, "embeddings") or not hasattr(core, "final_layer_norm"):
            return False
        parameters = list(inspect.signature(layers[0].forward).parameters)
        return parameters[:2] == ["hidden_states", "attention_mask"] and "causal_attention_mask" not in parameters

    def __call__(self, text_encoder, input_ids: torch.Tensor, hidden_layer: int | None):
        """(B, L) ids -> (the UNet's hidden state (B, L, D), the last hidden state (B, L, D))."""
        core = getattr(text_encoder, "text_model", text_encoder)
        hidden = core.embeddings(input_ids=input_ids)
        mask = causal_mask(input_ids.shape[1], hidden.device, hidden.dtype)
        states = [hidden]  # as transformers' hidden_states: the embeddings, then every layer's output
        for layer in core.encoder.layers:
            hidden = layer(hidden, mask)
            states.append(hidden)
        final = core.final_layer_norm(hidden)
        return (final if hidden_layer is None else states[hidden_layer]), final


class GraphedStep:
    """One training step (losses + backward) captured as a CUDA graph.

    `step(batch)` copies the batch into the graph's static inputs, replays, and returns the loss
    tensors (overwritten by the next replay). Gradients land in the mapper's `.grad` tensors, which
    the graph owns: never `zero_grad(set_to_none=True)` between replays.
    """

    def __init__(self, losses_fn, example_batch, parameters, warmup: int = 3):
        self.static = example_batch
        self.parameters = list(parameters)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as the CUDA graph docs ask
            for _ in range(warmup):
                for p in self.parameters:
                    p.grad = None
                out = losses_fn(self.static)
                out.total.backward()
        torch.cuda.current_stream().wait_stream(stream)
        for p in self.parameters:
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = losses_fn(self.static)
            out.total.backward()
        self.out = out

    def step(self, batch):
        for field in fields(batch):
            getattr(self.static, field.name).copy_(getattr(batch, field.name))
        self.graph.replay()
        return self.out


