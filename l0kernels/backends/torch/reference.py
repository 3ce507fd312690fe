"""The torch backend's reference: docs/design.md §3 in plain PyTorch, on any device.

Two autograd Functions, :class:`L0LinearFunction` and :class:`L0Conv2dFunction`. Forward
draws the gates from ``(seed, offset)``; backward draws them again. Autograd keeps x, weight,
log_alpha, bias and the seed, never a mask or an activation. For batch noise and eval gates
the log_alpha gradient of output/channel gates needs ``sum_m dY*h`` with ``h`` the un-gated
output; it is formed from GEMMs backward does anyway:
``sum_m dY[m,n] h[m,n] = sum_k W[n,k] (dY^T x)[n,k] + b[n] sum_m dY[m,n]``.
Per-example output gates recompute ``h`` (one extra GEMM/conv) instead of storing it.
Training calls with one gate vector per call on the CPU run over the open groups only
(:mod:`.skip`, :mod:`l0kernels._active`); they also keep the gathered weight for the backward. Float32 CPU
calls with one gate vector take the C++ fast paths (:mod:`.cpu_paths`) where they do not skip.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ... import _active
from ..._gates import GateConfig, compute_dtype, eval_gates_and_grad, sample_gate_tensor
from ..._replay import replay_grads
from . import cpu_paths, skip


def _save(ctx, x, weight, log_alpha, bias, seed, *extra) -> None:
    """Keep the inputs and the seed for backward: a tensor seed goes through ``save_for_backward`` (as
    ``torch.compile`` and saved-tensor hooks expect), an int beside the config. ``extra``: more tensors
    (the skipping path's gathered weight)."""
    ctx.save_for_backward(x, weight, log_alpha, bias, seed if isinstance(seed, torch.Tensor) else None, *extra)
    ctx.int_seed = None if isinstance(seed, torch.Tensor) else seed


def _saved(ctx):
    """``(x, weight, log_alpha, bias, seed, extra)`` as :func:`_save` kept them."""
    x, weight, log_alpha, bias, seed, *extra = ctx.saved_tensors
    return x, weight, log_alpha, bias, (ctx.int_seed if seed is None else seed), extra


def gates_for(log_alpha: torch.Tensor, seed, noise_shape: Tuple[int, ...], training: bool,
              cfg: GateConfig, need_grad: bool = True, group_size: int = 1):
    """``(z, dz)`` for a call: sampled over ``noise_shape`` in training, ``z_eval`` (log_alpha's shape) else.
    With ``group_size > 1`` the noise tensor is over the gates and ``z``/``dz`` are returned per feature
    (gate ``j`` repeated for features ``j*g ... j*g+g-1``, the last dimension)."""
    if training:
        z, dz = sample_gate_tensor(log_alpha, seed, noise_shape, cfg, need_grad)
    else:
        z, dz = eval_gates_and_grad(log_alpha, cfg, need_grad)
    if group_size != 1:
        z = expand_groups(z, group_size)
        dz = expand_groups(dz, group_size) if dz is not None else None
    return z, dz


def expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-gate values (last dim G) as per-feature values (last dim G * group_size)."""
    return t if group_size == 1 else t.repeat_interleave(group_size, dim=-1)


def sum_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-feature values (last dim G * group_size) summed over each gate's features (last dim G)."""
    return t if group_size == 1 else t.reshape(*t.shape[:-1], t.shape[-1] // group_size, group_size).sum(-1)


def linear_noise_shape(gate: str, noise: str, m: int, n: int, k: int, group_size: int = 1) -> Tuple[int, ...]:
    g = {"in": k, "out": n}.get(gate)
    if gate == "weight":
        return (n, k)
    g //= group_size
    return (m, g) if noise == "sample" else (g,)


def _open_gates(log_alpha: torch.Tensor, seed, cfg: GateConfig, need_grad: bool, group_size: int = 1):
    """``(z, dz, open index)`` of one training gate vector (``noise="batch"``), per feature (a grouped gate
    repeated over its ``group_size`` features; the index lists open features)."""
    z, dz = gates_for(log_alpha, seed, (log_alpha.shape[0],), True, cfg, need_grad, group_size)
    return z, dz, _active.open_index(z)


def _skip_decision(x: torch.Tensor, log_alpha: torch.Tensor, seed, training: bool, noise: str, cfg: GateConfig,
                   group_size: int, macs_per_group: int, conv: bool = False, structure: Optional[str] = None):
    """``(reasons, opened)``: why the call does not take the path that skips closed groups (:mod:`.skip`: training,
    one gate vector per call, a CPU tensor, :func:`l0kernels._active.skip_reasons`; empty where it does) and,
    where it does, :func:`_open_gates` of its gates (else None). Backward draws the same gates again from the
    seed (``ctx.skip`` records the forward's decision). The reasons that need no gates come first: a call they
    rule out (a layer too small to skip even with every gate closed) draws none."""
    features = log_alpha.shape[0] * group_size
    reasons = skip.reasons(x, training, noise, features, macs_per_group, structure)
    if reasons:
        return reasons, None
    z, dz = gates_for(log_alpha, seed, (log_alpha.shape[0],), True, cfg, False, group_size)
    # per feature: a grouped gate's open set lists its features (``macs_per_group`` per feature)
    reasons = _active.skip_reasons(features, macs_per_group, int(torch.count_nonzero(z)), conv)
    return reasons, (None if reasons else (z, dz, _active.open_index(z)))


def _linear_skip(x, log_alpha, seed, gate, noise, training, cfg, group_size, m, n, k):
    """:func:`_skip_decision` of a linear call (``x`` viewed as ``(m, k)``, ``weight`` ``(n, k)``)."""
    structure = "gate='weight': every weight has its own gate, no group to skip" if gate == "weight" else None
    return _skip_decision(x, log_alpha, seed, training, noise, cfg, group_size, m * (n if gate == "in" else k),
                          structure=structure)


def _conv2d_skip(x, weight, log_alpha, seed, stride, groups, noise, training, cfg, group_size):
    """:func:`_skip_decision` of a convolution."""
    # multiply-adds of one output channel, about (the output size from the strides alone)
    macs = x.shape[0] * (x.shape[2] * x.shape[3]) // (stride[0] * stride[1]) * math.prod(weight.shape[1:])
    structure = f"groups={groups}: the skipping path needs groups == 1" if groups != 1 else None
    return _skip_decision(x, log_alpha, seed, training, noise, cfg, group_size, macs, conv=True, structure=structure)


def skip_reasons(call) -> List[str]:
    """Why the checked (cast) ``call`` does not take the path that skips closed groups (empty: it does); a
    training call's gates are drawn from its seed for the open-set part, as the Function draws them."""
    with torch.no_grad():
        if call.op == "linear":
            n, k = call.weight.shape
            return _linear_skip(call.x, call.log_alpha, call.seed, call.gate, call.noise, call.training, call.cfg,
                                call.group_size, math.prod(call.x.shape[:-1]), n, k)[0]
        return _conv2d_skip(call.x, call.weight, call.log_alpha, call.seed, call.stride, call.groups, call.noise,
                            call.training, call.cfg, call.group_size)[0]


def cpu_path_reasons(call) -> List[str]:
    """Why the checked (cast) ``call`` does not take the C++ CPU paths (:mod:`.cpu_paths`; empty: it does, the
    forward of input gates and the backward of input and output gates where log_alpha needs a gradient)."""
    if call.op == "conv2d":
        return ["a convolution: the C++ paths are for linear layers"]
    out = ["gate='weight': the C++ paths gate input or output features"] if call.gate == "weight" else []
    return out + cpu_paths.reasons(call.x, call.weight, call.log_alpha, not call.training or call.noise == "batch")


def linear_formula(x2, weight, log_alpha, bias, seed, gate, noise, training, cfg, group_size=1) -> torch.Tensor:
    """docs/design.md §3's linear op on ``x2`` ``(M, K)`` in plain PyTorch ops: differentiable in every input where
    autograd records (the second-order backward, :mod:`l0kernels._replay`), the plain forward elsewhere."""
    n, k = weight.shape
    z, _ = gates_for(log_alpha, seed, linear_noise_shape(gate, noise, x2.shape[0], n, k, group_size), training, cfg,
                     need_grad=False, group_size=group_size)
    zx = z.to(x2.dtype)
    if gate == "in":
        return F.linear(x2 * zx, weight, bias)
    if gate == "out":
        y = F.linear(x2, weight, bias)
        return y * zx if torch.is_grad_enabled() else y.mul_(zx)  # in place when nothing records
    return F.linear(x2, weight * zx, bias)


def linear_grads_replayed(dy, x, weight, log_alpha, bias, seed, gate, noise, training, cfg, group_size, needs):
    """``(dx, dweight, dlog_alpha, dbias)`` of the linear op with a graph (``create_graph=True``): the
    second-order backward every backend's linear Function takes (:mod:`l0kernels._replay`)."""
    k = weight.shape[1]

    def formula():
        x2 = x.reshape(math.prod(x.shape[:-1]), k)
        y = linear_formula(x2, weight, log_alpha, bias, seed, gate, noise, training, cfg, group_size)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    return replay_grads(formula, (x, weight, log_alpha, bias), needs[:4], dy)


class L0LinearFunction(torch.autograd.Function):
    """``l0_linear`` of docs/design.md §3 on the torch backend.

    ``apply(x, weight, log_alpha, bias, seed, gate, noise, training, cfg[, group_size])``; ``x`` is
    ``(..., K)``; ``group_size`` (default 1) features per gate for ``gate="in"``/``"out"``.
    """

    @staticmethod
    def forward(ctx, x, weight, log_alpha, bias, seed, gate, noise, training, cfg, group_size=1):
        n, k = weight.shape
        x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), k)  # not -1: K may be 0
        m = x2.shape[0]
        opened = _linear_skip(x, log_alpha, seed, gate, noise, training, cfg, group_size, m, n, k)[1]
        if gate != "weight" and training and noise == "batch":
            _active.count_path("linear-" + gate, "fwd", "skip" if opened else "dense")
        if opened is not None:
            y, wo = skip.linear_forward(gate, x2, weight, bias, opened[0], opened[2])
        elif gate == "in" and cpu_paths.applies(x, weight, log_alpha, not training or noise == "batch"):
            y = F.linear(cpu_paths.in_gate_input(x2, log_alpha, seed, training, cfg, group_size), weight, bias)
        else:
            y = linear_formula(x2, weight, log_alpha, bias, seed, gate, noise, training, cfg, group_size)
        # the skipping path also keeps the gathered weight (its open columns/rows: at most W's size)
        _save(ctx, x, weight, log_alpha, bias, seed, *((wo,) if opened is not None else ()))
        ctx.conf = (gate, noise, training, cfg, group_size)
        ctx.skip = opened is not None
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x, weight, log_alpha, bias, seed, wo = _saved(ctx)
        gate, noise, training, cfg, group_size = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True: gradients with a graph of their own
            return linear_grads_replayed(dy, x, weight, log_alpha, bias, seed, gate, noise, training, cfg, group_size,
                                         ctx.needs_input_grad) + (None,) * 6
        n, k = weight.shape
        x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), k)  # not -1: K may be 0
        m = x2.shape[0]
        dy = dy if dy.dim() == 2 else dy.reshape(m, n)
        need_x, need_w, need_la, need_b = ctx.needs_input_grad[:4]
        if ctx.skip:
            _active.count_path("linear-" + gate, "bwd", "skip")
            z, dz, idx = _open_gates(log_alpha, seed, cfg, need_la, group_size)
            dx, dw, dla, db = skip.linear_backward(gate, dy, x2, weight, wo[0], bias, z, dz, idx, need_x,
                                                    need_w, need_la, need_b)
            if dx is not None:
                dx = dx.reshape(x.shape)
            if dla is not None:
                dla = sum_groups(dla, group_size).to(log_alpha.dtype)
            return dx, dw, dla, db, None, None, None, None, None, None
        if need_la and gate != "weight" and cpu_paths.applies(x, weight, log_alpha, not training or noise == "batch"):
            dx, dw, dla, db = _cpu_linear_backward(dy, x2, weight, log_alpha, bias, seed, gate, training, cfg,
                                                   need_x, need_w, need_b, group_size)
            if dx is not None and x.dim() != 2:
                dx = dx.reshape(x.shape)
            return dx, dw, dla, db, None, None, None, None, None, None
        z, dz = gates_for(log_alpha, seed, linear_noise_shape(gate, noise, m, n, k, group_size), training, cfg,
                          need_la, group_size)
        cd = compute_dtype(x.dtype)
        zx = z.to(x.dtype)
        dx = dw = dla = db = None
        if gate == "in" and z.dim() == 2:  # per-example input gates
            g = dy @ weight if (need_x or need_la) else None
            if need_x:
                dx = g * zx
            if need_w:
                dw = dy.t() @ (x2 * zx)
            if need_la:
                dla = (g.to(cd) * x2.to(cd) * dz).sum(0)
            if need_b and bias is not None:
                db = dy.sum(0)
        elif gate == "in":
            # dlog_alpha_k = dz_k sum_m (dY W)[m,k] x[m,k] = dz_k sum_n W[n,k] (dY^T x)[n,k], and
            # dW = (dY^T x) z. Where dz_k != 0 the gate is strictly inside (0, 1), so
            # (dY^T x)[:, k] = dW[:, k] / z_k: two GEMMs, as for a dense layer.
            if need_x:
                dx = (dy @ weight) * zx
            if need_w or need_la:
                dw = dy.t() @ (x2 * zx)
            if need_la:
                inside = dz != 0
                ratio = torch.where(inside, dz / torch.where(inside, z, torch.ones_like(z)), torch.zeros_like(dz))
                dla = (weight.to(cd) * dw.to(cd)).sum(0) * ratio
            if not need_w:
                dw = None
            if need_b and bias is not None:
                db = dy.sum(0)
        elif gate == "out" and z.dim() == 2:  # per-example output gates
            dyz = dy * zx
            if need_x:
                dx = dyz @ weight
            if need_w:
                dw = dyz.t() @ x2
            if need_b and bias is not None:
                db = dyz.sum(0)
            if need_la:
                h = F.linear(x2, weight, bias)
                dla = (dy.to(cd) * h.to(cd) * dz).sum(0)
        elif gate == "out":
            if need_x:
                dx = (dy * zx) @ weight
            p = dy.t() @ x2 if (need_w or need_la) else None
            if need_w:
                dw = p * zx[:, None]
            colsum = dy.sum(0, dtype=cd) if (need_b or need_la) else None
            if need_b and bias is not None:
                db = (colsum * z).to(bias.dtype)
            if need_la:
                hdy = (weight.to(cd) * p.to(cd)).sum(1)
                if bias is not None:
                    hdy = hdy + bias.to(cd) * colsum
                dla = hdy * dz
        else:  # weight gates
            if need_x:
                dx = dy @ (weight * zx)
            p = dy.t() @ x2 if (need_w or need_la) else None
            if need_w:
                dw = p * zx
            if need_la:
                dla = p.to(cd) * weight.to(cd) * dz
            if need_b and bias is not None:
                db = dy.sum(0)
        if dx is not None:
            dx = dx.reshape(x.shape)
        if dla is not None:
            dla = sum_groups(dla, group_size).to(log_alpha.dtype)
        return dx, dw, dla, db, None, None, None, None, None, None


def _cpu_linear_backward(dy, x2, weight, log_alpha, bias, seed, gate, training, cfg, need_x, need_w, need_b,
                         group_size=1):
    """The backward of input/output gates with one gate vector per call on the CPU paths
    (``cpu_paths.gate_backward``): the same GEMMs as a dense layer plus one C++ pass for dlog_alpha."""
    dx = db = None
    if gate == "in":
        dw, dla, z = cpu_paths.gate_backward(1, dy.t() @ x2, weight, log_alpha, seed, training, cfg,
                                              group_size=group_size)
        if need_x:
            dx = (dy @ weight).mul_(z)
        if need_b and bias is not None:
            db = dy.sum(0)
    else:
        colsum = dy.sum(0)
        dw, dla, z = cpu_paths.gate_backward(0, dy.t() @ x2, weight, log_alpha, seed, training, cfg,
                                              bias * colsum if bias is not None else None, group_size)
        if need_x:
            dx = (dy * z) @ weight
        if need_b and bias is not None:
            db = colsum * z
    return dx, (dw if need_w else None), dla, db


def _conv_backward(grad, x, weight, call_args, mask):
    stride, padding, dilation, groups = call_args
    return torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride), list(padding),
                                               list(dilation), False, [0, 0], groups, mask)


def conv2d_formula(x, weight, log_alpha, bias, conv_args, seed, noise, training, cfg, group_size=1) -> torch.Tensor:
    """docs/design.md §3's conv2d op in plain PyTorch ops (see :func:`linear_formula`); ``conv_args`` is
    ``(stride, padding, dilation, groups)``."""
    c = weight.shape[0] // group_size
    shape = (x.shape[0], c) if noise == "sample" else (c,)
    z, _ = gates_for(log_alpha, seed, shape, training, cfg, need_grad=False, group_size=group_size)
    zx = z.to(x.dtype)
    return F.conv2d(x, weight, bias, *conv_args) * (zx[:, :, None, None] if zx.dim() == 2 else zx[:, None, None])


def conv2d_grads_replayed(dy, x, weight, log_alpha, bias, conv_args, seed, noise, training, cfg, group_size, needs):
    """``(dx, dweight, dlog_alpha, dbias)`` of the conv2d op with a graph (see :func:`linear_grads_replayed`)."""
    return replay_grads(lambda: conv2d_formula(x, weight, log_alpha, bias, conv_args, seed, noise, training, cfg,
                                               group_size), (x, weight, log_alpha, bias), needs[:4], dy)


class L0Conv2dFunction(torch.autograd.Function):
    """``l0_conv2d`` of docs/design.md §3 (output-channel gates) on the torch backend.

    ``apply(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, noise, training, cfg[,
    group_size])``; ``group_size`` (default 1) output channels per gate.
    """

    @staticmethod
    def forward(ctx, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, noise, training, cfg,
                group_size=1):
        opened = _conv2d_skip(x, weight, log_alpha, seed, stride, groups, noise, training, cfg, group_size)[1]
        if training and noise == "batch":
            _active.count_path("conv2d", "fwd", "skip" if opened else "dense")
        if opened is not None:
            y, wo = skip.conv2d_forward(x, weight, bias, (stride, padding, dilation, groups), opened[0], opened[2])
        else:
            y = conv2d_formula(x, weight, log_alpha, bias, (stride, padding, dilation, groups), seed, noise, training,
                               cfg, group_size)
        _save(ctx, x, weight, log_alpha, bias, seed, *((wo,) if opened is not None else ()))
        ctx.conf = (stride, padding, dilation, groups, noise, training, cfg, group_size)
        ctx.skip = opened is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, log_alpha, bias, seed, wo = _saved(ctx)
        stride, padding, dilation, groups, noise, training, cfg, group_size = ctx.conf
        conv_args = (stride, padding, dilation, groups)
        if torch.is_grad_enabled():  # create_graph=True: gradients with a graph of their own
            return conv2d_grads_replayed(dy, x, weight, log_alpha, bias, conv_args, seed, noise, training, cfg,
                                         group_size, ctx.needs_input_grad) + (None,) * 9
        c = weight.shape[0] // group_size
        need_x, need_w, need_la, need_b = ctx.needs_input_grad[:4]
        shape = (x.shape[0], c) if noise == "sample" else (c,)
        if ctx.skip:
            _active.count_path("conv2d", "bwd", "skip")
            z, dz, idx = _open_gates(log_alpha, seed, cfg, need_la, group_size)
            dx, dw, dla, db = skip.conv2d_backward(dy, x, weight, wo[0], bias, conv_args, z, dz, idx, need_x,
                                                    need_w, need_la, need_b)
            if dla is not None:
                dla = sum_groups(dla, group_size).to(log_alpha.dtype)
            return dx, dw, dla, db, None, None, None, None, None, None, None, None, None
        z, dz = gates_for(log_alpha, seed, shape, training, cfg, need_la, group_size)
        cd = compute_dtype(x.dtype)
        zx = z.to(x.dtype)
        zb = zx[:, :, None, None] if zx.dim() == 2 else zx[:, None, None]
        dyz = dy * zb
        dx = dw = dla = db = None
        if z.dim() == 2:  # per-example channel gates: recompute h for dlog_alpha
            if need_x or need_w:
                dx, dw, _ = _conv_backward(dyz, x, weight, conv_args, [need_x, need_w, False])
            if need_b and bias is not None:
                db = dyz.sum((0, 2, 3))
            if need_la:
                h = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
                dla = ((dy.to(cd) * h.to(cd)).sum((2, 3)) * dz).sum(0)
        else:
            if need_x:
                dx = _conv_backward(dyz, x, weight, conv_args, [True, False, False])[0]
            p = _conv_backward(dy, x, weight, conv_args, [False, True, False])[1] if (need_w or need_la) else None
            if need_w:
                dw = p * zx[:, None, None, None]
            colsum = dy.sum((0, 2, 3), dtype=cd) if (need_b or need_la) else None
            if need_b and bias is not None:
                db = (colsum * z).to(bias.dtype)
            if need_la:
                hdy = (weight.to(cd) * p.to(cd)).sum((1, 2, 3))
                if bias is not None:
                    hdy = hdy + bias.to(cd) * colsum
                dla = hdy * dz
        if dla is not None:
            dla = sum_groups(dla, group_size).to(log_alpha.dtype)
        return dx, dw, dla, db, None, None, None, None, None, None, None, None, None
