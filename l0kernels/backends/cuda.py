"""The ``cuda`` backend: the compiled extension ``l0kernels._C`` (``csrc/``).

Ops ``torch.ops.l0kernels.{uniform, gates, linear_fwd, linear_bwd, conv2d_fwd, conv2d_bwd}`` are registered
by the extension (CUDA kernels); their fake (meta) implementations for ``torch.compile`` are
registered here. Forward: gate sampling kernel, gated copy of ``x`` / ``W`` fused with the cast or an
in-place bias + gate epilogue, cuBLAS / cuDNN for the GEMM and the convolution. Backward regenerates
the gates from the seed (no stored mask) and forms the ``log_alpha`` gradients with reduction
kernels, using the identities of :mod:`l0kernels.backends.torch_backend`.

Runs float32, float16 and bfloat16 CUDA tensors; float64 and CPU tensors go to the ``torch``
backend. Importing this module raises ImportError when the extension is not built, so the lazy
loader registers a placeholder that gives the reason.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .._dispatch import Backend, Conv2dCall, LinearCall, register_backend
from .._gates import GateConfig

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.l0kernels)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(f"l0kernels._C is not built: {e}. Build it with a CUDA PyTorch and nvcc: "
                      "pip install --no-build-isolation -e . (see README, 'CUDA extension')") from e

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ops = torch.ops.l0kernels


def _cfg(cfg: GateConfig):
    return [cfg.beta, cfg.gamma, cfg.zeta, cfg.eps]


def _grads(out, mask):
    return tuple(t if m else None for t, m in zip(out, mask))


def _fake_grads(x, weight, log_alpha, bias, mask):
    like = (x, weight, log_alpha, bias)
    return tuple(torch.empty_like(t) if (m and t is not None) else x.new_empty((0,)) for t, m in zip(like, mask))


@torch.library.register_fake("l0kernels::uniform")
def _uniform_fake(seed, offsets):
    return offsets.new_empty(offsets.shape, dtype=torch.float32)


@torch.library.register_fake("l0kernels::gates")
def _gates_fake(log_alpha, rows, seed, training, cfg, need_grad):
    shape = ((rows,) if training and rows >= 0 else ()) + tuple(log_alpha.shape)
    z = log_alpha.new_empty(shape, dtype=torch.float32)
    return z, (torch.empty_like(z) if need_grad else z.new_empty((0,)))


@torch.library.register_fake("l0kernels::linear_fwd")
def _linear_fwd_fake(x, weight, log_alpha, bias, seed, gate, sample, training, cfg):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


@torch.library.register_fake("l0kernels::linear_bwd")
def _linear_bwd_fake(grad, x, weight, log_alpha, bias, seed, gate, sample, training, cfg, mask):
    return _fake_grads(x, weight, log_alpha, bias, mask)


@torch.library.register_fake("l0kernels::conv2d_fwd")
def _conv2d_fwd_fake(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training, cfg):
    return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)


@torch.library.register_fake("l0kernels::conv2d_bwd")
def _conv2d_bwd_fake(grad, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training,
                     cfg, mask):
    return _fake_grads(x, weight, log_alpha, bias, mask)


def cuda_gates(log_alpha: torch.Tensor, seed: Optional[int], rows: int = -1, training: bool = True,
               cfg: GateConfig = GateConfig(), need_grad: bool = False):
    """``(z, dz)`` from the CUDA gate kernel: ``rows`` >= 0 gives ``(rows, *log_alpha.shape)`` (per-example
    noise), -1 gives ``log_alpha.shape``; ``dz`` is None unless ``need_grad``. Eval when not training."""
    z, dz = _ops.gates(log_alpha, rows, 0 if seed is None else seed, training, _cfg(cfg), need_grad)
    return z, (dz if need_grad else None)


class CudaL0LinearFunction(torch.autograd.Function):
    """``l0_linear`` on the CUDA extension; same arguments as ``L0LinearFunction.apply``:
    ``apply(x, weight, log_alpha, bias, seed, gate, noise, training, cfg)``."""

    @staticmethod
    def forward(ctx, x, weight, log_alpha, bias, seed, gate, noise, training, cfg):
        seed = 0 if seed is None else seed
        ctx.save_for_backward(x, weight, log_alpha, bias)
        ctx.conf = (seed, gate, noise == "sample", training, _cfg(cfg))
        return _ops.linear_fwd(x, weight, log_alpha, bias, seed, gate, noise == "sample", training, _cfg(cfg))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, log_alpha, bias = ctx.saved_tensors
        seed, gate, sample, training, cfg = ctx.conf
        mask = [bool(m) for m in ctx.needs_input_grad[:4]]
        mask[3] = mask[3] and bias is not None
        out = _ops.linear_bwd(dy, x, weight, log_alpha, bias, seed, gate, sample, training, cfg, mask)
        return _grads(out, mask) + (None,) * 5


class CudaL0Conv2dFunction(torch.autograd.Function):
    """``l0_conv2d`` on the CUDA extension; same arguments as ``L0Conv2dFunction.apply``:
    ``apply(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, noise, training, cfg)``."""

    @staticmethod
    def forward(ctx, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, noise, training, cfg):
        seed = 0 if seed is None else seed
        conv = (list(stride), list(padding), list(dilation), int(groups))
        ctx.save_for_backward(x, weight, log_alpha, bias)
        ctx.conf = conv + (seed, noise == "sample", training, _cfg(cfg))
        return _ops.conv2d_fwd(x, weight, log_alpha, bias, *conv, seed, noise == "sample", training, _cfg(cfg))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, log_alpha, bias = ctx.saved_tensors
        mask = [bool(m) for m in ctx.needs_input_grad[:4]]
        mask[3] = mask[3] and bias is not None
        out = _ops.conv2d_bwd(dy, x, weight, log_alpha, bias, *ctx.conf, mask)
        return _grads(out, mask) + (None,) * 8


def _why_not(x: torch.Tensor) -> Optional[str]:
    if not x.is_cuda:
        return f"the CUDA backend needs CUDA tensors, got device {x.device}"
    if x.dtype not in SUPPORTED_DTYPES:
        return (f"the CUDA backend runs float32, float16 and bfloat16, got {x.dtype} "
                "(float64 runs on backend='torch')")
    return None


class CudaBackend(Backend):
    """Compiled CUDA kernels + cuBLAS/cuDNN (``l0kernels._C``)."""

    name = "cuda"
    priority = 5

    def unsupported_linear(self, call: LinearCall) -> Optional[str]:
        return _why_not(call.x)

    def unsupported_conv2d(self, call: Conv2dCall) -> Optional[str]:
        return _why_not(call.x)

    def linear(self, call: LinearCall) -> torch.Tensor:
        return CudaL0LinearFunction.apply(call.x, call.weight, call.log_alpha, call.bias, call.seed, call.gate,
                                          call.noise, call.training, call.cfg)

    def conv2d(self, call: Conv2dCall) -> torch.Tensor:
        return CudaL0Conv2dFunction.apply(call.x, call.weight, call.log_alpha, call.bias, call.stride, call.padding,
                                          call.dilation, call.groups, call.seed, call.noise, call.training, call.cfg)


CUDA_BACKEND = register_backend(CudaBackend())

__all__ = ["CudaBackend", "CudaL0LinearFunction", "CudaL0Conv2dFunction", "cuda_gates", "CUDA_BACKEND"]
