"""Devices, dtypes and torch.compile backends: the user's words (`auto`, `bf16`, `inductor`) resolved and
checked before anything loads."""

from __future__ import annotations

import torch

from ..errors import SettingsError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; any other name is checked to exist."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingsError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(f"device {name!r} asked for but MPS is not available; use --device cpu")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA cards that support it (else fp16), fp32 on MPS (fp16 gives black images
    there) and on CPU."""
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise SettingsError(f"unknown dtype {name!r}; use auto, fp32, fp16 or bf16")
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise SettingsError("fp16 is not supported on the CPU; use --dtype fp32 (or bf16)")
    return dtype


def check_compile_backend(name: str) -> None:
    """SettingsError unless `name` is a `torch.compile` backend (inductor, aot_eager, cudagraphs, ...)."""
    backends = torch.compiler.list_backends(exclude_tags=())
    if name not in backends:
        raise SettingsError(f"unknown torch.compile backend {name!r}; use inductor (the default) or one of "
                            f"{', '.join(b for b in backends if 'TESTING' not in b)}")
