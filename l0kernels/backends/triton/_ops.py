"""``torch.library`` custom ops around the Triton launchers, so ``torch.compile(fullgraph=True)`` can keep
an ``l0_linear``/``l0_conv2d`` call in its graph as one opaque op (with fake/meta shapes and autograd).

``TritonBackend`` calls these ops while ``torch.compiler.is_compiling()``; eager calls use the
autograd Functions of ``linear.py``/``conv2d.py`` directly (no dispatcher overhead). Ops:
``l0kernels_triton::linear``, ``linear_backward``, ``conv2d``, ``conv2d_backward``. ``sample`` is
``training and noise == "sample"``; ``seed`` is a 0-d int64 tensor on the input's device (docs/design.md §10:
a seed drawn in the graph stays a tensor, read by the kernels), None when ``training`` is False.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..._gates import GateConfig
from .conv2d import _channels_last, _geometry, conv2d_backward, conv2d_forward
from .linear import linear_backward, linear_forward, rows


def _fmt(t: Tensor):
    return torch.channels_last if _channels_last(t) else torch.contiguous_format


def _empty(t: Tensor, shape=None, fmt=torch.contiguous_format) -> Tensor:
    return torch.empty(tuple(t.shape) if shape is None else shape, dtype=t.dtype, device=t.device,
                       memory_format=fmt)


# ---------------------------------------------------------------------------------------------- linear

@torch.library.custom_op("l0kernels_triton::linear", mutates_args=())
def linear_op(x: Tensor, weight: Tensor, log_alpha: Tensor, bias: Optional[Tensor], seed: Optional[Tensor], gate: str,
              sample: bool, training: bool, beta: float, gamma: float, zeta: float, eps: float,
              group_size: int = 1) -> Tensor:
    n, k = weight.shape
    y = linear_forward(x.reshape(rows(x), k), weight, log_alpha, bias, seed, gate, sample, training,
                       GateConfig(beta, gamma, zeta, eps), group_size)
    return y.reshape(*x.shape[:-1], n)


@linear_op.register_fake
def _linear_fake(x, weight, log_alpha, bias, seed, gate, sample, training, beta, gamma, zeta, eps, group_size=1):
    return _empty(x, (*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("l0kernels_triton::linear_backward", mutates_args=())
def linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, log_alpha: Tensor, bias: Optional[Tensor], seed: Optional[Tensor],
                       gate: str, sample: bool, training: bool, beta: float, gamma: float, zeta: float,
                       eps: float, group_size: int = 1) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    n, k = weight.shape
    m = rows(x)
    dx, dw, dla, db = linear_backward(dy.reshape(m, n), x.reshape(m, k), weight, log_alpha, bias, seed, gate,
                                      sample, training, GateConfig(beta, gamma, zeta, eps), group_size=group_size)
    return dx.reshape(x.shape), dw, dla, (db if db is not None else weight.new_empty(0))


@linear_backward_op.register_fake
def _linear_backward_fake(dy, x, weight, log_alpha, bias, seed, gate, sample, training, beta, gamma, zeta, eps,
                          group_size=1):
    return _empty(x), _empty(weight), _empty(log_alpha), (_empty(bias) if bias is not None else weight.new_empty(0))


def _linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])  # x, weight, log_alpha, bias, seed
    ctx.conf = inputs[5:]


def _linear_grad(ctx, dy):
    x, weight, log_alpha, bias, seed = ctx.saved_tensors
    dx, dw, dla, db = linear_backward_op(dy, x, weight, log_alpha, bias, seed, *ctx.conf)
    return (dx, dw, dla, db if bias is not None else None) + (None,) * 9


linear_op.register_autograd(_linear_grad, setup_context=_linear_setup)


# ---------------------------------------------------------------------------------------------- conv2d

@torch.library.custom_op("l0kernels_triton::conv2d", mutates_args=())
def conv2d_op(x: Tensor, weight: Tensor, log_alpha: Tensor, bias: Optional[Tensor], stride: List[int],
              padding: List[int], dilation: List[int], groups: int, seed: Optional[Tensor], sample: bool, training: bool,
              beta: float, gamma: float, zeta: float, eps: float, group_size: int = 1) -> Tensor:
    return conv2d_forward(x, weight, log_alpha, bias, tuple(stride), tuple(padding), tuple(dilation), groups, seed,
                          sample, training, GateConfig(beta, gamma, zeta, eps), group_size)


@conv2d_op.register_fake
def _conv2d_fake(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training, beta, gamma,
                 zeta, eps, group_size=1):
    b, _, _, oh, ow = _geometry(x, weight, stride, padding, dilation)
    return _empty(x, (b, weight.shape[0], oh, ow), _fmt(x))


@torch.library.custom_op("l0kernels_triton::conv2d_backward", mutates_args=())
def conv2d_backward_op(dy: Tensor, x: Tensor, weight: Tensor, log_alpha: Tensor, bias: Optional[Tensor],
                       stride: List[int], padding: List[int], dilation: List[int], groups: int, seed: Optional[Tensor],
                       sample: bool, training: bool, beta: float, gamma: float, zeta: float,
                       eps: float, group_size: int = 1) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dw, dla, db = conv2d_backward(dy, x, weight, log_alpha, bias, tuple(stride), tuple(padding), tuple(dilation),
                                      groups, seed, sample, training, GateConfig(beta, gamma, zeta, eps),
                                      group_size=group_size)
    return (dx.contiguous(memory_format=_fmt(x)), dw.contiguous(memory_format=_fmt(weight)), dla,
            db if db is not None else weight.new_empty(0))


@conv2d_backward_op.register_fake
def _conv2d_backward_fake(dy, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training,
                          beta, gamma, zeta, eps, group_size=1):
    return (_empty(x, fmt=_fmt(x)), _empty(weight, fmt=_fmt(weight)), _empty(log_alpha),
            _empty(bias) if bias is not None else weight.new_empty(0))


def _conv2d_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4], inputs[8])  # x, weight, log_alpha, bias, seed
    ctx.conf = (inputs[4:8], inputs[9:])


def _conv2d_grad(ctx, dy):
    x, weight, log_alpha, bias, seed = ctx.saved_tensors
    geometry, rest = ctx.conf
    dx, dw, dla, db = conv2d_backward_op(dy, x, weight, log_alpha, bias, *geometry, seed, *rest)
    return (dx, dw, dla, db if bias is not None else None) + (None,) * 12


conv2d_op.register_autograd(_conv2d_grad, setup_context=_conv2d_setup)
