"""The paper's regularizer in one fused pass per layer and one autograd node per model (as cheap as weight decay).

``(1/N) * [ sum_g p_g * (lamba * |g| + 0.5 * wd * ||theta_g||^2) + 0.5 * wd * ||theta_ungated||^2 ]``

with ``p_g = P(z_g != 0) = sigmoid(log_alpha_g - beta * log(-gamma/zeta))``. Written with autograd ops this
costs several full-size passes and temporaries over the weight (``W**2``, its gradient ``2 W dY``, the
broadcast of the per-group gradient ...). :class:`RegularizerFunction` keeps only ``G``-sized tensors:

- forward: the group norms ``||theta_g||^2`` in one reduction pass over the weight (one C++ loop, or one
  ``vector_norm`` kernel: no ``W**2``; a half-type weight is still copied to float32 first), then ``G``-sized
  arithmetic;
- backward: ``dtheta = (wd / N) * p_g * theta`` written in one pass (the gradient itself is the only
  full-size tensor), ``dlog_alpha = (1/N) * p (1 - p) * (lamba |g| + 0.5 wd ||theta_g||^2)``.

A whole model's regularizer (``l0_regularizer``) is one :class:`RegularizerFunction` node over all its
layers, a single layer's (``layer.regularizer``) the same node over one. On CPU float32 each layer's pass is
one C++ call (``l0kernels._cpu.reg_forward`` / ``reg_backward``; a layer's whole
regularizer then costs about what its small torch ops' dispatch did); elsewhere torch ops, which are the
reference the tests compare with (``L0K_CPU_KERNELS=0`` turns the C++ calls off).

Layout: the weight is viewed as ``(rows, features)`` -- ``(N, K)`` for a linear layer, ``(C_out, rest)``
for a convolution -- and ``axis`` says where the gated features are: ``1`` the columns (input gates),
``0`` the rows (output gates, conv channels; a gated bias joins its row), ``None`` every weight (weight
gates). ``G`` gates over ``F`` features: gate ``j`` covers features ``j*F/G ... (j+1)*F/G - 1``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import config
from ._gates import GateConfig, compute_dtype
from ._philox import _cpu
from ._replay import replay_grads

_CPU_REG = _cpu is not None and hasattr(_cpu, "reg_forward") and config.CPU_KERNELS


def _in_cpp(log_alpha, weight, bias, axis) -> bool:
    """The C++ passes (``l0kernels._cpu.reg_forward`` / ``reg_backward``) take CPU float32 contiguous tensors."""
    return (_CPU_REG and axis is not None and weight.is_cpu and weight.dtype is torch.float32
            and log_alpha.dtype is torch.float32 and weight.is_contiguous() and log_alpha.is_contiguous()
            and weight.numel() > 0 and log_alpha.numel() > 0
            and (bias is None or (bias.dtype is torch.float32 and bias.is_contiguous())))


class LayerSpec(NamedTuple):
    """How one layer's tensors enter the regularizer: the weight viewed as ``(rows, features)`` with the
    gated features on ``axis``, whether a bias is gated with its row, ``lamba * |g|`` and the gate constants."""

    axis: Optional[int]
    bias_gated: bool
    lamba_size: float
    cfg: GateConfig


class RegularizerFunction(torch.autograd.Function):
    """``apply(layers, weight_decay, n, out_dtype, *tensors)`` -> 0-d tensor in ``out_dtype``: the sum over
    ``layers`` (a tuple of :class:`LayerSpec`) of each layer's term, ``tensors`` being ``(log_alpha, weight,
    bias)`` per layer (bias may be None). One autograd node for a whole model: the Python and autograd cost
    of a call does not grow with a node per layer (with a node per layer it was most of the cost on the CPU)."""

    @staticmethod
    def forward(ctx, layers, weight_decay: float, n: int, out_dtype, *tensors):
        wd = float(weight_decay)
        host = 0.0  # the C++ layers' terms, summed in double
        dev_terms = []
        saved, cpps = [], []
        for i, spec in enumerate(layers):
            log_alpha, weight, bias = tensors[3 * i: 3 * i + 3]
            shift = spec.cfg.beta * math.log(-spec.cfg.gamma / spec.cfg.zeta)
            cpp = _in_cpp(log_alpha, weight, bias, spec.axis)
            if cpp:  # one C++ call: the norms pass over the weight and the G-sized arithmetic
                g = log_alpha.numel()
                p = torch.empty(g, dtype=torch.float32)
                sq = torch.empty(g, dtype=torch.float32)
                rows = weight.shape[0]
                host += _cpu.reg_forward(spec.axis, weight.data_ptr(), rows, weight.numel() // rows,
                                         bias.data_ptr() if bias is not None else 0, spec.bias_gated,
                                         log_alpha.data_ptr(), g, float(spec.lamba_size), wd, shift, p.data_ptr(),
                                         sq.data_ptr())
            else:
                term, p, sq = _forward_torch(log_alpha, weight, bias, spec.axis, spec.bias_gated, spec.lamba_size,
                                             wd, shift)
                dev_terms.append(term.to(out_dtype))
            cpps.append(cpp)
            saved += [log_alpha, weight, bias, p, sq]
        device = tensors[1].device
        total = torch.tensor(host / n, dtype=out_dtype, device=device) if any(cpps) or not dev_terms else None
        for t in dev_terms:
            t = t.to(device) / n
            total = t if total is None else total + t
        ctx.cpps = cpps
        ctx.save_for_backward(*saved)
        ctx.conf = (layers, wd, n, tuple(t.dtype for t in tensors[0::3]))
        return total

    @staticmethod
    def backward(ctx, g):
        layers, wd, n, la_dtypes = ctx.conf
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        if torch.is_grad_enabled():  # create_graph=True: the torch formula through autograd (l0kernels/_replay.py)
            tensors = [t for i in range(len(layers)) for t in saved[5 * i: 5 * i + 3]]
            out_dtype = g.dtype

            def formula():
                total = None
                for i, spec in enumerate(layers):
                    log_alpha, weight, bias = tensors[3 * i: 3 * i + 3]
                    shift = spec.cfg.beta * math.log(-spec.cfg.gamma / spec.cfg.zeta)
                    term = _forward_torch(log_alpha, weight, bias, spec.axis, spec.bias_gated, spec.lamba_size, wd,
                                          shift)[0].to(g.device, out_dtype) / n
                    total = term if total is None else total + term
                return total

            return (None, None, None, None, *replay_grads(formula, tensors, needs, g))
        grads = []
        g_host = float(g) if any(ctx.cpps) else None  # a CPU scalar (the C++ layers are on the CPU)
        for i, spec in enumerate(layers):
            weight, bias, p, sq = saved[5 * i + 1: 5 * i + 5]
            need_la, need_w, need_b = needs[3 * i: 3 * i + 3]
            if ctx.cpps[i]:
                grads += _backward_cpp(spec, weight, bias, p, sq, g_host / n, wd, need_la, need_w, need_b)
            else:
                grads += _backward_torch(spec, weight, bias, p, sq, g.to(p.device, p.dtype) / n, wd, la_dtypes[i],
                                         need_la, need_w, need_b)
        return (None, None, None, None, *grads)


def _backward_cpp(spec, weight, bias, p, sq, c, wd, need_la, need_w, need_b):
    """``(dlog_alpha, dweight, dbias)`` of one layer in one C++ pass (``c``: the incoming gradient over N)."""
    rows = weight.shape[0]
    dla = torch.empty(p.shape, dtype=torch.float32) if need_la else None
    dw = torch.empty_like(weight) if (need_w and wd) else None
    db = torch.empty_like(bias) if (need_b and wd and bias is not None) else None
    _cpu.reg_backward(spec.axis, weight.data_ptr(), rows, weight.numel() // rows,
                      bias.data_ptr() if bias is not None else 0, spec.bias_gated, p.numel(), p.data_ptr(),
                      sq.data_ptr(), c, float(spec.lamba_size), wd, dla.data_ptr() if dla is not None else 0,
                      dw.data_ptr() if dw is not None else 0, db.data_ptr() if db is not None else 0)
    return [dla, dw, db]


def _backward_torch(spec, weight, bias, p, sq, c, wd, la_dtype, need_la, need_w, need_b):
    """``(dlog_alpha, dweight, dbias)`` of one layer in torch ops (the reference; ``c`` a 0-d tensor)."""
    axis, bias_gated, lamba_size = spec.axis, spec.bias_gated, spec.lamba_size
    dla = dw = db = None
    if need_la:
        inner = lamba_size + 0.5 * wd * sq if wd else torch.full_like(p, lamba_size)
        dla = (c * p * (1 - p) * inner).to(la_dtype)
    if wd and (need_w or need_b):
        s = (c * wd) * p  # per gate
        if axis is None:
            if need_w:
                dw = weight * s.to(weight.dtype)
            if need_b and bias is not None:
                db = bias * (c * wd).to(bias.dtype)
            return [dla, dw, db]
        rows = weight.shape[0]
        feats = weight.numel() // rows if axis == 1 else rows
        sf = s.repeat_interleave(feats // s.numel()) if s.numel() != feats else s  # per feature
        sf = sf.to(weight.dtype)
        if need_w:  # in the weight's own shape: a fresh tensor, not a view (autograd adds it in place)
            dw = weight * (sf if axis == 1 else sf.view((rows,) + (1,) * (weight.dim() - 1)))
        if need_b and bias is not None:
            db = bias * (sf if bias_gated else (c * wd).to(bias.dtype))
    return [dla, dw, db]


def _forward_torch(log_alpha, weight, bias, axis, bias_gated, lamba_size, wd, shift):
    """``(term, p, sq)`` in torch ops (the reference; any dtype and device). Differentiable where autograd
    records (the second-order backward); in place where nothing does."""
    cd = compute_dtype(weight.dtype)
    la = log_alpha.to(cd)
    p = torch.sigmoid(la - shift)
    w2 = weight.reshape(weight.shape[0], -1)
    b = bias
    sq = None
    recording = torch.is_grad_enabled()
    if wd:
        if axis is None:  # one gate per weight: its "group norm" is the weight's square
            sq = (w2.square() if w2.dtype == cd or recording else w2.to(cd).square_()).reshape(la.shape)
        else:  # one reduction kernel: no ``w**2`` temporary (half types: still the float32 copy vector_norm makes)
            sq = torch.linalg.vector_norm(w2, 2, dim=0 if axis == 1 else 1, dtype=cd)
            sq = sq.square() if recording else sq.square_()
            if b is not None and bias_gated:
                sq = sq + b.to(cd).square()
            g = la.numel()
            if sq.numel() != g:
                sq = sq.reshape(g, sq.numel() // g).sum(1)
        term = (p * (lamba_size + 0.5 * wd * sq)).sum()
        if b is not None and not bias_gated:
            term = term + 0.5 * wd * b.to(cd).square().sum()
    else:
        term = p.sum() * lamba_size
    return term, p, sq


def regularizer(layers, tensors, weight_decay, n, out_dtype) -> torch.Tensor:
    """:class:`RegularizerFunction` applied (arguments checked by the caller): ``layers`` a sequence of
    :class:`LayerSpec`, ``tensors`` the ``(log_alpha, weight, bias)`` of each."""
    return RegularizerFunction.apply(tuple(layers), weight_decay, n, out_dtype, *tensors)
