"""Registration of the optional backends, imported on first use (Triton and the CUDA extension are heavy).

If a backend's module cannot be imported, a placeholder is registered that gives the import
error as its reason, so ``backend="triton"`` says *why* it cannot run instead of "unknown".
"""
from __future__ import annotations

import importlib

from ._dispatch import Backend, register_backend, register_lazy, _REGISTRY


class UnavailableBackend(Backend):
    priority = -100

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def explain(self, call):
        return [self.reason]

    def auto_eligible(self, call) -> bool:
        return False


def _loader(name: str, module: str):
    def load():
        try:
            importlib.import_module(module)  # the module calls register_backend itself
        except ImportError as e:  # triton missing, or the extension not built
            register_backend(UnavailableBackend(name, f"{module} could not be imported ({e})"))
        if name not in _REGISTRY:
            register_backend(UnavailableBackend(name, f"{module} registered no backend"))
    return load


def register_optional_backends() -> None:
    register_lazy("triton", _loader("triton", "l0kernels.backends.triton"))
    register_lazy("cuda", _loader("cuda", "l0kernels.backends.cuda"))
