"""Speed-ups of the training step that keep its arithmetic (PERF.md): what makes a step fast on a GPU.

At batch 2 the eager step mostly waits for Python to launch kernels. The levers here:

* `StaticTextEncoder` runs CLIP's text encoder for 77-token prompts with its causal mask built once,
  so the whole step can be captured as a CUDA graph (transformers builds the mask inside `forward`).
* `face_patches` precomputes, per photo, the latent patch under the aligned face crop, so the identity
  loss decodes ~1/8 of the latent instead of the whole 64x64 (an approximation: the VAE decoder sees
  less context; measured by the tests and the benchmark).
* `GraphedStep` captures losses + backward of one step as a CUDA graph and replays it; the random draws
  are made outside the graph (from the trainer's generator) and copied into its static inputs.
"""

from __future__ import annotations

import inspect
import logging
import math

import torch

from .conditioning import causal_mask

logger = logging.getLogger(__name__)


def check_compile_backend(name: str) -> None:
    """ValueError unless `name` is a `torch.compile` backend (inductor, aot_eager, cudagraphs, ...)."""
    backends = torch.compiler.list_backends(exclude_tags=())
    if name not in backends:
        raise ValueError(f"unknown torch.compile backend {name!r}; use inductor (the default) or one of "
                         f"{', '.join(b for b in backends if 'TESTING' not in b)}")


class StaticTextEncoder:
    """CLIPTextModel's forward for fixed-length prompts with a causal mask built once (`causal_mask`).

    Equivalent to `text_encoder(input_ids).last_hidden_state`. Works with the transformers 5 layout
    (layers called as `layer(hidden_states, attention_mask)`); `supported(text_encoder)` says whether
    it applies.
    """

    def __init__(self, text_encoder):
        self.core = getattr(text_encoder, "text_model", text_encoder)

    @staticmethod
    def supported(text_encoder) -> bool:
        core = getattr(text_encoder, "text_model", text_encoder)
        layers = getattr(getattr(core, "encoder", None), "layers", None)
        if not layers or not hasattr(core, "embeddings") or not hasattr(core, "final_layer_norm"):
            return False
        parameters = list(inspect.signature(layers[0].forward).parameters)
        return parameters[:2] == ["hidden_states", "attention_mask"] and "causal_attention_mask" not in parameters

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> last hidden state (B, L, D)."""
        hidden = self.core.embeddings(input_ids=input_ids)
        mask = causal_mask(input_ids.shape[1], hidden.device, hidden.dtype)
        for layer in self.core.encoder.layers:
            hidden = layer(hidden, mask)
        return self.core.final_layer_norm(hidden)


def face_patches(face_theta: torch.Tensor, latent_size: tuple[int, int], scale: int, margin: int):
    """Latent patches that cover each photo's aligned face crop.

    face_theta: (N, 2, 3) `affine_grid` matrices (output crop -> normalised image coordinates) for
    images of latent_size x scale pixels. Returns (flat indices (N, ph*pw) into the h*w latent grid,
    (ph, pw), patch thetas (N, 2, 3) for the decoded patches). All patches share one size so the
    batch stays rectangular; each is placed to cover its face and stay inside the latent.
    """
    h, w = latent_size
    H, W = h * scale, w * scale
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    boxes = []
    for theta in face_theta.float().cpu():
        normalised = corners @ theta.T  # (4, 3) x (3, 2) -> (4, 2) in [-1, 1] image units
        x = (normalised[:, 0] + 1) / 2 * W
        y = (normalised[:, 1] + 1) / 2 * H
        boxes.append((math.floor(y.min() / scale) - margin, math.ceil(y.max() / scale) + margin,
                      math.floor(x.min() / scale) - margin, math.ceil(x.max() / scale) + margin))
    ph = min(h, max(b[1] - b[0] for b in boxes))
    pw = min(w, max(b[3] - b[2] for b in boxes))
    indices, thetas = [], []
    for (y0, y1, x0, x1), theta in zip(boxes, face_theta.float().cpu()):
        y0 = min(max(0, (y0 + y1 - ph) // 2), h - ph)
        x0 = min(max(0, (x0 + x1 - pw) // 2), w - pw)
        rows = torch.arange(y0, y0 + ph)[:, None]
        cols = torch.arange(x0, x0 + pw)[None, :]
        indices.append((rows * w + cols).reshape(-1))
        # full-image normalised coords -> patch normalised coords (pixel centres kept)
        Hp, Wp, py, px = ph * scale, pw * scale, y0 * scale, x0 * scale
        to_patch = torch.tensor([[W / Wp, 0.0, (W - 2 * px) / Wp - 1], [0.0, H / Hp, (H - 2 * py) / Hp - 1],
                                 [0.0, 0.0, 1.0]])
        thetas.append((to_patch @ torch.cat([theta, torch.tensor([[0.0, 0.0, 1.0]])]))[:2])
    return torch.stack(indices), (ph, pw), torch.stack(thetas)


def gather_patches(latents: torch.Tensor, indices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) latents, (B, ph*pw) flat indices -> (B, C, ph, pw) patches (capture-safe gather)."""
    B, C = latents.shape[:2]
    flat = latents.flatten(2)  # (B, C, h*w)
    picked = flat.gather(2, indices[:, None, :].expand(B, C, -1))  # (B, C, ph*pw)
    return picked.view(B, C, *size)


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
        for name in ("image_index", "latents", "noise", "timesteps", "keep_residual", "te_prompt_index"):
            getattr(self.static, name).copy_(getattr(batch, name))
        self.graph.replay()
        return self.out


class GraphedUNet:
    """The UNet's forward for sampling, captured as one CUDA graph per input shape and replayed.

    At a batch of 1-2 images the eager UNet spends most of its time launching kernels (PERF.md:
    45 ms eager vs 12 ms replayed per CFG step at batch 2). Inputs are copied into the graph's static
    buffers; the output is a copy, safe to keep across replays.
    """

    def __init__(self, unet, warmup: int = 2):
        self.unet = unet
        self.warmup = warmup
        self.graphs: dict = {}

    def _capture(self, sample, timestep, encoder_hidden_states, value_hidden_states):
        static = [t.clone() for t in (sample, timestep, encoder_hidden_states, value_hidden_states)]

        def forward():
            return self.unet(static[0], static[1], static[2],
                             cross_attention_kwargs={"value_hidden_states": static[3]}).sample

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.warmup):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = forward()
        return graph, static, out

    def __call__(self, sample, timestep, encoder_hidden_states, value_hidden_states) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(())
        key = (tuple(sample.shape), tuple(encoder_hidden_states.shape), sample.dtype, timestep.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(sample, timestep, encoder_hidden_states, value_hidden_states)
        graph, static, out = self.graphs[key]
        for buffer, value in zip(static, (sample, timestep, encoder_hidden_states, value_hidden_states)):
            buffer.copy_(value)
        graph.replay()
        return out.clone()
