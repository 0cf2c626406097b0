"""`ResidentModels`: one base model kept loaded across the jobs of a long-lived process (the web UI)."""

from __future__ import annotations

from .components import BaseComponents
from .loading import load_base_model


class ResidentModels:
    """Keeps the last base model loaded, for the jobs of a long-lived process (the web UI): `load` with
    the same model, device, dtype returns the same components instead of loading them again.

    The jobs leave a model as they found it (processors, hooks and configs are restored on exit; the
    tokenizer only gains placeholder tokens); jobs that would change it for good — an IP-Adapter
    plugged in, a compiled or channels-last UNet — load their own copy instead.
    """

    def __init__(self):
        self._key: tuple | None = None
        self._base: BaseComponents | None = None

    def load(self, name: str, *, device, dtype, local_files_only: bool = False, **kwargs) -> BaseComponents:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # unset options are the defaults
        key = (name, str(device), str(dtype), local_files_only, tuple(sorted(kwargs.items())))
        if key != self._key:
            self._key = self._base = None  # let the old model go before the next one loads
            self._base = load_base_model(name, device=device, dtype=dtype, local_files_only=local_files_only, **kwargs)
            self._key = key
        return self._base


