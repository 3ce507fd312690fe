"""The ``cuda`` backend: the compiled extension ``l0kernels._C`` (``csrc/``).

- ``ops.py``: the extension's ops ``torch.ops.l0kernels.{uniform, gates, linear_fwd, linear_fwd_fused,
  sparse_linear, linear_bwd, linear_open_fwd, linear_open_bwd, rows_linear_fwd, rows_linear_bwd, conv2d_fwd,
  conv2d_bwd}`` (CUDA kernels,
  cuBLAS, cuDNN) as thin wrappers, with the fake (meta) implementations ``torch.compile`` traces with;
- ``functions.py``: the autograd Functions :class:`CudaL0LinearFunction` / :class:`CudaL0Conv2dFunction` (and
  :class:`CudaRowsLinearFunction`, a structure gate's producer over its open rows) and
  their per-call choices: the ``fused`` / ``two_pass`` forward, the open-set path of training calls (linear,
  and convolutions through im2col);
- this module: the switches below, :class:`CudaBackend` and its registration, the eval runner.

Switches (set them here, e.g. ``l0kernels.backends.cuda.SKIP_BELOW = 1.0``; ``functions.py`` reads them here
on every call; their defaults come from :mod:`l0kernels.config`):

- ``GEMM_IMPL`` (``L0K_CUDA_GEMM``; :func:`gemm_impl` within a block): ``fused``, ``two_pass`` or ``auto``, the
  forward of ``l0_linear`` and of a layer's eval plan;
- ``SKIP_BELOW`` (``L0K_CUDA_SKIP_BELOW``) / ``CONV_SKIP_BELOW`` (``L0K_CUDA_CONV_SKIP_BELOW``): the open
  fraction at or below which a layer's training calls run over the open set (1: always);
- ``IM2COL_MAX_BYTES`` (``L0K_CUDA_IM2COL_MAX_BYTES``): the largest im2col matrix the conv open-set path builds.

``l0_conv2d`` runs cuDNN plus the epilogue kernel (in training possibly over the open channels). A layer's
eval calls run its cached plan (:mod:`l0kernels.backends._plans`) with the same forward choice: ``fused`` is
``sparse_linear`` (the same kernels, no gates, gathering the active inputs and scattering the active
outputs), ``two_pass`` cuBLAS on the plan.

Runs float32, float16 and bfloat16 CUDA tensors; float64 and CPU tensors go to the ``torch`` backend.
Importing this package raises ImportError when the extension is not built, so the lazy loader
(:mod:`l0kernels._lazy`) registers a placeholder that gives the reason.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

import torch

from ... import _active, config
from ..._autotune import AUTOTUNER
from ..._dispatch import Backend, Conv2dCall, LinearCall, register_backend
from .. import _plans
from . import ops  # raises ImportError without the extension
from .ops import SUPPORTED_DTYPES, cuda_gates
from .functions import (FUSED_MAX_ROWS, GEMV_MAX_ROWS, CudaL0Conv2dFunction, CudaL0LinearFunction,
                        CudaRowsLinearFunction, conv_open_set_reasons, conv_skips_closed, forward_impls,
                        forward_reasons, fused_why_not, open_set, open_set_reasons, rows_reasons, skips_closed)

# the switches (module doc); functions.py reads them from this module on every call
GEMM_IMPLS = ("auto", "fused", "two_pass")
GEMM_IMPL = config.CUDA_GEMM  # one of GEMM_IMPLS (l0kernels.config checks it)
SKIP_BELOW = config.CUDA_SKIP_BELOW
CONV_SKIP_BELOW = config.CUDA_CONV_SKIP_BELOW
IM2COL_MAX_BYTES = config.CUDA_IM2COL_MAX_BYTES


@contextlib.contextmanager
def gemm_impl(name: str):
    """Within the block, the CUDA backend's ``l0_linear`` forward (and eval runner) uses ``name``: ``fused``,
    ``two_pass`` or ``auto`` (see the module doc)."""
    global GEMM_IMPL
    if name not in GEMM_IMPLS:
        raise ValueError(f"gemm_impl must be one of {GEMM_IMPLS}, got {name!r}")
    old, GEMM_IMPL = GEMM_IMPL, name
    try:
        yield
    finally:
        GEMM_IMPL = old


def _sparse_linear(x2: torch.Tensor, plan) -> torch.Tensor:
    return ops.sparse_linear(x2, plan.weight, plan.bias, plan.in_idx, plan.out_idx, plan.idle_idx, plan.fill,
                             plan.out_features)


def eval_linear_plan(x2: torch.Tensor, plan) -> torch.Tensor:
    """Run a linear eval plan on ``x2`` ``(M, K)``: ``fused`` is the extension's ``sparse_linear``,
    ``two_pass`` cuBLAS on the plan (:func:`forward_impls`; ``auto`` times the two once per plan shape)."""
    runners = {"fused": _sparse_linear, "two_pass": _plans.linear_plan_torch}
    impls = forward_impls(x2)
    if len(impls) == 1:
        return runners[impls[0]](x2, plan)
    key = ("cuda.sparse_linear", x2.device, x2.dtype, x2.shape[0], tuple(plan.weight.shape), plan.in_idx is not None,
           plan.out_idx is not None, plan.fill is not None, plan.out_features)
    pick = AUTOTUNER.pick(key, {name: (lambda fn=runners[name]: fn(x2, plan)) for name in impls}, x2.device)
    return runners[pick](x2, plan)


class CudaBackend(Backend):
    """Compiled CUDA kernels + cuBLAS/cuDNN (``l0kernels._C``)."""

    name = "cuda"
    priority = 5

    def explain(self, call) -> List[str]:
        out = []
        if not call.x.is_cuda:
            out.append(f"the CUDA backend needs CUDA tensors, got device {call.x.device}")
        if call.x.dtype not in SUPPORTED_DTYPES:
            out.append(f"the CUDA backend runs float32, float16 and bfloat16, got {call.x.dtype} "
                       "(float64 runs on backend='torch')")
        return out

    def explain_paths(self, call) -> Dict[str, List[str]]:
        """``eval_plan`` (a layer's eval call on its cached plan, run by :func:`eval_linear_plan`); linear:
        ``fused`` / ``two_pass`` (the forward, :func:`forward_reasons`; also the runner of a linear plan) and
        ``open_set`` (a training call over its open features, once the layer's open fraction is at most
        ``SKIP_BELOW``; it replaces the forward above); conv2d: ``im2col_open_set`` (the open-set ops on the
        im2col form, at most ``CONV_SKIP_BELOW``; else cuDNN)."""
        paths = {"eval_plan": _plans.plan_reasons(call)}
        if call.op == "linear":
            paths.update(forward_reasons(call.x))
            reasons = open_set_reasons(call.x, call.gate, call.noise, call.training)
            paths["open_set"] = reasons or _active.fraction_reasons(call.log_alpha, SKIP_BELOW, "L0K_CUDA_SKIP_BELOW")
        else:
            conv = (call.stride, call.padding, call.dilation, call.groups)
            reasons = conv_open_set_reasons(call.x, call.weight, conv, call.noise, call.training)
            paths["im2col_open_set"] = reasons or _active.fraction_reasons(call.log_alpha, CONV_SKIP_BELOW,
                                                                           "L0K_CUDA_CONV_SKIP_BELOW")
        return paths

    def rows_reasons(self, x, weight, log_alpha=None) -> List[str]:
        out = rows_reasons(x)
        if torch.compiler.is_compiling():
            out.append("inside torch.compile a structure gate's producer runs masked")
        if log_alpha is not None:
            out += _active.fraction_reasons(log_alpha, SKIP_BELOW, "L0K_CUDA_SKIP_BELOW")
        return out

    def rows_linear(self, x, weight, bias, open_rows) -> torch.Tensor:
        return CudaRowsLinearFunction.apply(x, weight, bias, open_rows.index, open_rows.count)

    def linear(self, call: LinearCall) -> torch.Tensor:
        return CudaL0LinearFunction.apply(call.x, call.weight, call.log_alpha, call.bias, call.seed, call.gate,
                                          call.noise, call.training, call.cfg, call.group_size)

    def conv2d(self, call: Conv2dCall) -> torch.Tensor:
        return CudaL0Conv2dFunction.apply(call.x, call.weight, call.log_alpha, call.bias, call.stride, call.padding,
                                          call.dilation, call.groups, call.seed, call.noise, call.training, call.cfg,
                                          call.group_size)

    def eval(self, call) -> torch.Tensor:
        return _plans.serve(self, call, eval_linear_plan)

    def tune_key(self, call) -> Tuple:
        return _plans.plan_signature(call)


CUDA_BACKEND = register_backend(CudaBackend())

__all__ = ["CudaBackend", "CUDA_BACKEND", "CudaL0LinearFunction", "CudaL0Conv2dFunction", "CudaRowsLinearFunction",
           "GEMM_IMPLS", "GEMM_IMPL",
           "SKIP_BELOW", "CONV_SKIP_BELOW", "IM2COL_MAX_BYTES", "gemm_impl", "skips_closed", "conv_skips_closed",
           "open_set", "open_set_reasons", "conv_open_set_reasons", "cuda_gates", "fused_why_not", "forward_impls",
           "forward_reasons", "eval_linear_plan", "SUPPORTED_DTYPES",
           "FUSED_MAX_ROWS", "GEMV_MAX_ROWS"]
