"""The Triton backend (``backend="triton"``): fused gate + GEMM kernels for ``l0_linear`` and ``l0_conv2d``.

A layer's eval calls run its cached eval plan (:mod:`l0kernels.backends._plans`): linear plans with the
kernels of ``sparse_eval.py`` (the gather of ``x``'s active columns inside the GEMM loads; a GEMV for
1-16 rows), conv plans in PyTorch.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before this package
was imported (for tests; never picked by ``backend="auto"`` on the CPU). float16, bfloat16 and
float32; float64 goes to the torch backend. See ``linear.py`` and ``conv2d.py`` for the kernels.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..._dispatch import Backend, Conv2dCall, LinearCall, register_backend
from .. import _plans
from . import conv2d as _conv2d, linear as _linear
from ._gate_math import fraction_reasons, seed_tensor
from .linear import INTERPRET, TritonL0LinearFunction, TritonRowsLinearFunction
from .conv2d import TritonL0Conv2dFunction

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def _seed(call):
    """The custom ops' seed: a 0-d int64 tensor on the input's device in training, else None."""
    return seed_tensor(call.seed, call.x) if call.training else None


class TritonBackend(Backend):
    """Triton kernels with the gates drawn in-kernel from ``(seed, offset)``."""

    name = "triton"
    priority = 10

    def explain(self, call) -> List[str]:
        tensors = [call.x, call.weight, call.log_alpha] + ([call.bias] if call.bias is not None else [])
        return _tensor_reasons(call.x.dtype, tensors)

    def explain_paths(self, call) -> Dict[str, List[str]]:
        """``eval_plan`` (a layer's eval call on its cached plan, ``sparse_eval.py``) and ``open_set`` (a
        training call's kernels over the open set of its gates, once the layer's open fraction is at most
        ``L0K_TRITON_SKIP_BELOW``)."""
        sample = call.training and call.noise == "sample"
        if call.op == "linear":
            open_set = _linear.open_set_reasons(call.gate, sample, call.training)
        else:
            open_set = _conv2d.open_set_reasons(sample, call.training, call.groups)
        return {"eval_plan": _plans.plan_reasons(call),
                "open_set": open_set or fraction_reasons(call.log_alpha)}

    def auto_eligible(self, call) -> bool:
        return call.x.is_cuda

    def rows_reasons(self, x, weight, log_alpha=None) -> List[str]:
        out = _tensor_reasons(x.dtype, [x, weight])
        if _compiling():
            out.append("inside torch.compile a structure gate's producer runs masked (its kernels have no traced op)")
        if log_alpha is not None:
            out += fraction_reasons(log_alpha)
        return out

    def rows_linear(self, x, weight, bias, open_rows) -> torch.Tensor:
        b = bias if bias is None or bias.is_contiguous() else bias.contiguous()
        return TritonRowsLinearFunction.apply(x, weight, b, open_rows.index, open_rows.count)

    def linear(self, call: LinearCall) -> torch.Tensor:
        if _compiling():
            from ._ops import linear_op
            return linear_op(call.x, call.weight, call.log_alpha, _bias(call), _seed(call), call.gate,
                             call.training and call.noise == "sample", call.training, call.cfg.beta,
                             call.cfg.gamma, call.cfg.zeta, call.cfg.eps, call.group_size)
        return TritonL0LinearFunction.apply(call.x, call.weight, call.log_alpha, _bias(call), call.seed, call.gate,
                                            call.noise, call.training, call.cfg, call.group_size)

    def conv2d(self, call: Conv2dCall) -> torch.Tensor:
        if _compiling():
            from ._ops import conv2d_op
            return conv2d_op(call.x, call.weight, call.log_alpha, _bias(call), list(call.stride), list(call.padding),
                             list(call.dilation), call.groups, _seed(call),
                             call.training and call.noise == "sample", call.training, call.cfg.beta,
                             call.cfg.gamma, call.cfg.zeta, call.cfg.eps, call.group_size)
        return TritonL0Conv2dFunction.apply(call.x, call.weight, call.log_alpha, _bias(call), call.stride,
                                            call.padding, call.dilation, call.groups, call.seed, call.noise,
                                            call.training, call.cfg, call.group_size)


    def eval(self, call) -> torch.Tensor:
        from .sparse_eval import sparse_linear
        return _plans.serve(self, call, sparse_linear)

    def tune_key(self, call) -> Tuple:
        return _plans.plan_signature(call)


def _tensor_reasons(dtype: torch.dtype, tensors) -> List[str]:
    """Why the Triton kernels cannot take tensors of this dtype and these devices (empty: they can)."""
    out = []
    if dtype not in SUPPORTED_DTYPES:
        out.append(f"Triton backend supports float16/bfloat16/float32; use backend='torch' for "
                   f"{str(dtype).replace('torch.', '')}")
    if not all(t.is_cuda for t in tensors) and not (INTERPRET and all(t.device.type == "cpu" for t in tensors)):
        out.append("Triton backend needs CUDA tensors (CPU tensors run only under TRITON_INTERPRET=1, set "
                   "before l0kernels' Triton backend is imported), got device " + str(tensors[0].device))
    return out


def _bias(call) -> Optional[torch.Tensor]:
    """The call's bias as the kernels read it: one element after the other (a strided view is copied; autograd
    takes the gradient back to the view)."""
    b = call.bias
    return b if b is None or b.is_contiguous() else b.contiguous()


TRITON_BACKEND = register_backend(TritonBackend())
