"""Registration of the optional backends, imported on first use (Triton and the CUDA extension are heavy)."""
from __future__ import annotations

import importlib

from ._dispatch import register_lazy


def _loader(module: str):
    def load():
        try:
            importlib.import_module(module)  # the module calls register_backend itself
        except ImportError:
            pass  # its backend stays unregistered; get_backend() names what is registered
    return load


def register_optional_backends() -> None:
    register_lazy("triton", _loader("l0kernels.backends.triton"))
    register_lazy("cuda", _loader("l0kernels.backends.cuda"))
