"""The ``torch`` backend: plain PyTorch, on every device; the reference for every other backend.

- ``reference.py``: the autograd Functions :class:`L0LinearFunction` / :class:`L0Conv2dFunction`, the op
  formulas (``linear_formula`` / ``conv2d_formula``, also the replay of the second-order backward), the
  gates of a call (``gates_for``);
- ``cpu_paths.py``: the C++ CPU fast paths the Functions take for float32 calls with one gate vector;
- ``skip.py``: the training path over the open groups only (CPU, batch noise);
- this module: :class:`TorchBackend` and its registration (importing ``l0kernels`` registers it).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..._dispatch import Backend, Conv2dCall, LinearCall, register_backend
from .. import _plans
from .reference import (L0Conv2dFunction, L0LinearFunction, conv2d_formula, conv2d_grads_replayed,
                        cpu_path_reasons, gates_for, linear_formula, linear_grads_replayed, skip_reasons)


class TorchBackend(Backend):
    """Plain PyTorch; runs every call on every device. The reference for every other backend."""

    name = "torch"
    priority = 0

    def explain(self, call) -> List[str]:
        return []  # every call, every device

    def explain_paths(self, call) -> Dict[str, List[str]]:
        """``eval_plan`` (a layer's eval call on its cached plan, in PyTorch; the Functions below do not run
        then), ``skip`` (a training call over its open groups, :mod:`.skip`), ``cpu_paths`` (the C++ CPU fast
        paths, :mod:`.cpu_paths`; the skipping path comes first)."""
        skip = skip_reasons(call)
        cpu = cpu_path_reasons(call) + ([] if skip or call.op != "linear" else ["the skipping path takes this call"])
        return {"eval_plan": _plans.plan_reasons(call), "skip": skip, "cpu_paths": cpu}

    def linear(self, call: LinearCall) -> torch.Tensor:
        return L0LinearFunction.apply(call.x, call.weight, call.log_alpha, call.bias, call.seed, call.gate,
                                      call.noise, call.training, call.cfg, call.group_size)

    def conv2d(self, call: Conv2dCall) -> torch.Tensor:
        return L0Conv2dFunction.apply(call.x, call.weight, call.log_alpha, call.bias, call.stride, call.padding,
                                      call.dilation, call.groups, call.seed, call.noise, call.training, call.cfg,
                                      call.group_size)

    def eval(self, call) -> torch.Tensor:
        """A layer's eval call on its cached plan, in PyTorch (cuBLAS on CUDA); else the op above."""
        return _plans.serve(self, call, _plans.linear_plan_torch)

    def tune_key(self, call) -> Tuple:
        return _plans.plan_signature(call)


TORCH_BACKEND = register_backend(TorchBackend())

__all__ = ["TorchBackend", "TORCH_BACKEND", "L0LinearFunction", "L0Conv2dFunction", "gates_for", "linear_formula",
           "conv2d_formula", "linear_grads_replayed", "conv2d_grads_replayed"]
