"""The paper's per-layer regularizer in one fused pass (as cheap as weight decay).

``(1/N) * [ sum_g p_g * (lamba * |g| + 0.5 * wd * ||theta_g||^2) + 0.5 * wd * ||theta_ungated||^2 ]``

with ``p_g = P(z_g != 0) = sigmoid(log_alpha_g - beta * log(-gamma/zeta))``. Written with autograd ops this
costs several full-size passes and temporaries over the weight (``W**2``, its gradient ``2 W dY``, the
broadcast of the per-group gradient ...). :class:`RegularizerFunction` keeps only ``G``-sized tensors:

- forward: the group norms ``||theta_g||^2`` in one reduction pass over the weight (a C++ loop on CPU
  float32, ``l0kernels._cpu.sq_norms``), then ``G``-sized arithmetic;
- backward: ``dtheta = (wd / N) * p_g * theta`` written in one pass (the gradient itself is the only
  full-size tensor), ``dlog_alpha = (1/N) * p (1 - p) * (lamba |g| + 0.5 wd ||theta_g||^2)``.

Layout: the weight is viewed as ``(rows, features)`` -- ``(N, K)`` for a linear layer, ``(C_out, rest)``
for a convolution -- and ``axis`` says where the gated features are: ``1`` the columns (input gates),
``0`` the rows (output gates, conv channels; a gated bias joins its row), ``None`` every weight (weight
gates). ``G`` gates over ``F`` features: gate ``j`` covers features ``j*F/G ... (j+1)*F/G - 1``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._gates import GateConfig, compute_dtype
from ._philox import _cpu

_CPU_NORMS = _cpu is not None and hasattr(_cpu, "sq_norms")


def _sq_norms(w2: torch.Tensor, axis: int, cd: torch.dtype) -> torch.Tensor:
    """Squared norms of the columns (``axis=1``) or rows (``axis=0``) of the 2-D ``w2``, in ``cd``."""
    n, k = w2.shape
    if _CPU_NORMS and w2.is_cpu and w2.dtype is torch.float32 and w2.is_contiguous() and cd is torch.float32:
        out = torch.empty(k if axis == 1 else n, dtype=torch.float32)
        _cpu.sq_norms(axis, w2.data_ptr(), n, k, out.data_ptr())
        return out
    w = w2 if w2.dtype == cd else w2.to(cd)
    return w.pow(2).sum(0 if axis == 1 else 1)


class RegularizerFunction(torch.autograd.Function):
    """``apply(log_alpha, weight, bias, axis, bias_gated, lamba_size, weight_decay, n, cfg)`` -> 0-d tensor
    in the compute dtype (float32 for half types, else the parameters' dtype). ``lamba_size`` is
    ``lamba * |g|`` (parameters per gate); ``n`` the training-set size."""

    @staticmethod
    def forward(ctx, log_alpha, weight, bias, axis: Optional[int], bias_gated: bool, lamba_size: float,
                weight_decay: float, n: int, cfg: GateConfig):
        cd = compute_dtype(weight.dtype)
        la = log_alpha.detach().to(cd)
        p = torch.sigmoid(la - cfg.beta * math.log(-cfg.gamma / cfg.zeta))
        wd = float(weight_decay)
        w2 = weight.detach().reshape(weight.shape[0], -1)
        b = bias.detach() if bias is not None else None
        sq = None
        if wd:
            if axis is None:  # one gate per weight: its "group norm" is the weight's square
                sq = w2.to(cd).square().reshape(la.shape)
            else:
                sq = _sq_norms(w2, axis, cd)
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
        ctx.save_for_backward(weight, bias, p, sq)
        ctx.conf = (axis, bias_gated, lamba_size, wd, n, log_alpha.dtype)
        return term / n

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        weight, bias, p, sq = ctx.saved_tensors
        axis, bias_gated, lamba_size, wd, n, la_dtype = ctx.conf
        need_la, need_w, need_b = ctx.needs_input_grad[:3]
        c = g.to(p.dtype) / n
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
                return dla, dw, db, None, None, None, None, None, None
            rows = weight.shape[0]
            feats = weight.numel() // rows if axis == 1 else rows
            sf = s.repeat_interleave(feats // s.numel()) if s.numel() != feats else s  # per feature
            sf = sf.to(weight.dtype)
            if need_w:
                w2 = weight.reshape(rows, -1)
                dw = (w2 * (sf if axis == 1 else sf[:, None])).reshape(weight.shape)
            if need_b and bias is not None:
                db = bias * (sf if bias_gated else (c * wd).to(bias.dtype))
        return dla, dw, db, None, None, None, None, None, None


def layer_regularizer(log_alpha, weight, bias, axis, bias_gated, lamba_size, weight_decay, n, cfg) -> torch.Tensor:
    """:class:`RegularizerFunction` applied (arguments checked by the caller)."""
    return RegularizerFunction.apply(log_alpha, weight, bias, axis, bias_gated, lamba_size, weight_decay, n, cfg)
