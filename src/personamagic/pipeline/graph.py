"""The sampling UNet replayed from CUDA graphs: at a batch of 1-2 images the eager UNet mostly waits for
kernel launches (on an H100: 45 ms eager vs 12 ms replayed per guided step at batch 2)."""

from __future__ import annotations

import torch

from ..method.conditioning import UNetConditioning


def _tensors(conditioning: UNetConditioning) -> dict[str, torch.Tensor]:
    """The conditioning's tensors by name (added embeddings included): a graph's inputs."""
    named = {"hidden": conditioning.hidden, "values": conditioning.values}
    named.update({f"added.{k}": v for k, v in conditioning.added.items()})
    return named


def _conditioning(named: dict[str, torch.Tensor]) -> UNetConditioning:
    added = {k[len("added."):]: v for k, v in named.items() if k.startswith("added.")}
    return UNetConditioning(named["hidden"], named["values"], added)


class GraphedUNet:
    """The UNet's forward for sampling, captured as one CUDA graph per input shape and replayed.

    Inputs (the latents, the timestep and every tensor of the conditioning) are copied into the graph's
    static buffers; the output is a copy, safe to keep across replays. Conditioning that is not a plain
    tensor (IP-Adapter image embeddings come as lists) runs eagerly instead (`supports`).
    """

    def __init__(self, unet, warmup: int = 2):
        self.unet = unet
        self.warmup = warmup
        self.graphs: dict = {}

    @staticmethod
    def supports(conditioning: UNetConditioning) -> bool:
        return all(isinstance(v, torch.Tensor) for v in conditioning.added.values())

    def _capture(self, inputs: dict[str, torch.Tensor]):
        static = {k: v.clone() for k, v in inputs.items()}

        def forward():
            conditioning = _conditioning({k: v for k, v in static.items() if k not in ("sample", "timestep")})
            return self.unet(static["sample"], static["timestep"], **conditioning.unet_kwargs()).sample

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

    def __call__(self, sample, timestep, conditioning: UNetConditioning) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(())
        inputs = {"sample": sample, "timestep": timestep, **_tensors(conditioning)}
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items())
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, static, out = self.graphs[key]
        for name, value in inputs.items():
            static[name].copy_(value)
        graph.replay()
        return out.clone()
