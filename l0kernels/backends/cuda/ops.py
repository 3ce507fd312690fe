"""The extension's ops ``torch.ops.l0kernels.*`` (``l0kernels._C``, ``csrc/binding.cpp``) as thin wrappers, each
with its fake (meta) implementation beside it: the output shapes ``torch.compile`` traces with, no kernel run.

Arguments as in the op schemas: ``cfg`` is the list ``[beta, gamma, zeta, eps]`` (:func:`cfg_list`); ``seed`` a
0-d int64 tensor on the device, read there (None in eval); ``sample`` per-example gates (``noise="sample"``);
``index`` / ``count`` an open set (:class:`l0kernels._active.OpenSet`); ``mask`` which of ``(dx, dweight,
dlog_alpha, dbias)`` a backward computes (the others come back as empty tensors); ``group_size`` features
per gate. Importing this module raises ImportError when the extension is not built (the lazy loader then
registers a placeholder backend that gives the reason).
"""
from __future__ import annotations

from typing import List

import torch

from ..._gates import GateConfig
from ..._philox import seed_on

try:
    from ... import _C  # noqa: F401  (loading the library registers torch.ops.l0kernels)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(f"l0kernels._C is not built: {e}. Build it with a CUDA PyTorch and nvcc: "
                      "pip install --no-build-isolation -e . (see README, 'CUDA extension')") from e

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every op runs
_ops = torch.ops.l0kernels


def cfg_list(cfg: GateConfig) -> List[float]:
    """The ops' ``cfg`` argument."""
    return [cfg.beta, cfg.gamma, cfg.zeta, cfg.eps]


def _fake_grads(x, weight, log_alpha, bias, mask):
    like = (x, weight, log_alpha, bias)
    return tuple(torch.empty_like(t) if (m and t is not None) else x.new_empty((0,)) for t, m in zip(like, mask))


def uniform(seed, offsets):
    """``u_raw(seed, offsets)`` of docs/design.md §2 (float32, ``offsets``' shape)."""
    return _ops.uniform(seed, offsets)


@torch.library.register_fake("l0kernels::uniform")
def _uniform_fake(seed, offsets):
    return offsets.new_empty(offsets.shape, dtype=torch.float32)


def cuda_gates(log_alpha: torch.Tensor, seed, rows: int = -1, training: bool = True,
               cfg: GateConfig = GateConfig(), need_grad: bool = False):
    """The ``gates`` op: ``(z, dz)`` from the CUDA gate kernel; ``rows`` >= 0 gives ``(rows, *log_alpha.shape)``
    (per-example noise), -1 gives ``log_alpha.shape``; ``dz`` is None unless ``need_grad``. Eval when not
    training. ``seed``: an int or a 0-d int64 tensor (the op reads it on the device)."""
    z, dz = _ops.gates(log_alpha, rows, seed_on(seed, log_alpha.device) if training else None, training,
                       cfg_list(cfg), need_grad)
    return z, (dz if need_grad else None)


@torch.library.register_fake("l0kernels::gates")
def _gates_fake(log_alpha, rows, seed, training, cfg, need_grad):
    shape = ((rows,) if training and rows >= 0 else ()) + tuple(log_alpha.shape)
    z = log_alpha.new_empty(shape, dtype=torch.float32)
    return z, (torch.empty_like(z) if need_grad else z.new_empty((0,)))


def linear_fwd(x, weight, log_alpha, bias, seed, gate, sample, training, cfg, group_size=1):
    """The two-pass forward of ``l0_linear``: the gate kernel, a gated copy of ``x`` / ``W`` (or an in-place
    bias + gate epilogue), cuBLAS; every supported dtype. ``y``: ``x.shape[:-1] + (N,)``."""
    return _ops.linear_fwd(x, weight, log_alpha, bias, seed, gate, sample, training, cfg, group_size)


@torch.library.register_fake("l0kernels::linear_fwd")
def _linear_fwd_fake(x, weight, log_alpha, bias, seed, gate, sample, training, cfg, group_size=1):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def linear_fwd_fused(x, weight, log_alpha, bias, seed, gate, sample, training, cfg, group_size=1):
    """The one-launch forward: the GEMV for 1-16 rows (``csrc/l0_gemv.cuh``), the tensor-core GEMM above
    (``csrc/l0_gemm.cuh``; float16 / bfloat16 on sm_80+), gates drawn inside."""
    return _ops.linear_fwd_fused(x, weight, log_alpha, bias, seed, gate, sample, training, cfg, group_size)


@torch.library.register_fake("l0kernels::linear_fwd_fused")
def _linear_fwd_fused_fake(x, weight, log_alpha, bias, seed, gate, sample, training, cfg, group_size=1):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def sparse_linear(x, weight, bias, in_idx, out_idx, idle_idx, fill, out_features):
    """An eval plan (:class:`l0kernels.backends._plans.LinearPlan`) in one launch: ``y[:, out_idx] =
    x[:, in_idx] @ weight.T + bias``, the ``idle_idx`` outputs ``fill`` (or 0); ``x`` is ``(M, K)``."""
    return _ops.sparse_linear(x, weight, bias, in_idx, out_idx, idle_idx, fill, out_features)


@torch.library.register_fake("l0kernels::sparse_linear")
def _sparse_linear_fake(x, weight, bias, in_idx, out_idx, idle_idx, fill, out_features):
    return x.new_empty((x.shape[0], out_features))


def linear_bwd(grad, x, weight, log_alpha, bias, seed, gate, sample, training, cfg, mask, group_size=1):
    """``(dx, dweight, dlog_alpha, dbias)`` of the dense forward: gates drawn again from the seed, cuBLAS, and
    reduction kernels for ``dlog_alpha``."""
    return _ops.linear_bwd(grad, x, weight, log_alpha, bias, seed, gate, sample, training, cfg, mask, group_size)


@torch.library.register_fake("l0kernels::linear_bwd")
def _linear_bwd_fake(grad, x, weight, log_alpha, bias, seed, gate, sample, training, cfg, mask, group_size=1):
    return _fake_grads(x, weight, log_alpha, bias, mask)


def linear_open_fwd(x, weight, log_alpha, bias, seed, index, count, gate, cfg, group_size=1):
    """The training forward over the open set (batch noise, input or output gates; float16 / bfloat16 on
    sm_80+): the tensor-core GEMM over the gathered open features, ``count`` read in device memory."""
    return _ops.linear_open_fwd(x, weight, log_alpha, bias, seed, index, count, gate, cfg, group_size)


@torch.library.register_fake("l0kernels::linear_open_fwd")
def _linear_open_fwd_fake(x, weight, log_alpha, bias, seed, index, count, gate, cfg, group_size=1):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def linear_open_bwd(grad, x, weight, log_alpha, bias, seed, index, count, gate, cfg, mask, group_size=1):
    """The backward of :func:`linear_open_fwd`: every GEMM and ``dlog_alpha``'s dot products over the open
    features, exact zeros for closed ones (``csrc/l0_open.cuh``)."""
    return _ops.linear_open_bwd(grad, x, weight, log_alpha, bias, seed, index, count, gate, cfg, mask, group_size)


@torch.library.register_fake("l0kernels::linear_open_bwd")
def _linear_open_bwd_fake(grad, x, weight, log_alpha, bias, seed, index, count, gate, cfg, mask, group_size=1):
    return _fake_grads(x, weight, log_alpha, bias, mask)


def rows_linear_fwd(x, weight, bias, index, count):
    """A structure gate's producer over its open rows (float16 / bfloat16 on sm_80+): ``y[..., o] = x @ W[o].T +
    b[o]`` for the rows ``o`` of the open set ``(index, count)``, exact zeros for the others; the tensor-core GEMM
    over the gathered open rows, without gates."""
    return _ops.rows_linear_fwd(x, weight, bias, index, count)


@torch.library.register_fake("l0kernels::rows_linear_fwd")
def _rows_linear_fwd_fake(x, weight, bias, index, count):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def rows_linear_bwd(grad, x, weight, bias, index, count, mask):
    """``(dx, dweight, dbias)`` of :func:`rows_linear_fwd` (``mask``: which of the three), every GEMM over the open
    rows; the closed rows of ``dweight`` and ``dbias`` exact zeros."""
    return _ops.rows_linear_bwd(grad, x, weight, bias, index, count, mask)


@torch.library.register_fake("l0kernels::rows_linear_bwd")
def _rows_linear_bwd_fake(grad, x, weight, bias, index, count, mask):
    return tuple(torch.empty_like(t) if (m and t is not None) else x.new_empty((0,))
                 for t, m in zip((x, weight, bias), mask))


def conv2d_fwd(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training, cfg,
               group_size=1):
    """``l0_conv2d``'s forward: cuDNN, then the bias + channel-gate epilogue kernel."""
    return _ops.conv2d_fwd(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training,
                           cfg, group_size)


@torch.library.register_fake("l0kernels::conv2d_fwd")
def _conv2d_fwd_fake(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training, cfg,
                     group_size=1):
    return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)


def conv2d_bwd(grad, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training, cfg,
               mask, group_size=1):
    """The backward of :func:`conv2d_fwd`: cuDNN's dgrad / wgrad and the gate reduction kernels."""
    return _ops.conv2d_bwd(grad, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample,
                           training, cfg, mask, group_size)


@torch.library.register_fake("l0kernels::conv2d_bwd")
def _conv2d_bwd_fake(grad, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training,
                     cfg, mask, group_size=1):
    return _fake_grads(x, weight, log_alpha, bias, mask)


__all__ = ["SUPPORTED_DTYPES", "cfg_list", "uniform", "cuda_gates", "linear_fwd", "linear_fwd_fused", "sparse_linear",
           "linear_bwd", "linear_open_fwd", "linear_open_bwd", "rows_linear_fwd", "rows_linear_bwd", "conv2d_fwd",
           "conv2d_bwd"]
