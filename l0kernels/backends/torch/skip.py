"""The torch backend's training path that skips closed groups (host route of :mod:`l0kernels._active`).

For one gate vector per call, with ``o`` the open indices of the drawn gates ``z``:

- linear ``gate="in"``:  ``y = (x[:, o] * z[o]) @ W[:, o].T + b``; backward
  ``dW[:, o] = dY^T (x[:, o] * z[o])``, ``dx[:, o] = (dY W[:, o]) * z[o]``,
  ``dlog_alpha[o] = dz[o] * sum_n W[n, o] (dY^T x)[n, o] = (dz/z)[o] * sum_n W[n, o] dW[n, o]``;
- linear ``gate="out"``: ``y[:, o] = (x W[o].T + b[o]) * z[o]``; backward with ``dY[:, o]`` only;
- conv2d (``groups == 1``): the convolution over the open output channels, scattered into a zero output.

Closed groups get exact zeros (the zero-filled gradient tensors), never computed. Everything here is
plain PyTorch and works in every dtype (float64 is the reference the tests compare with); the caller
(``reference.py``) takes it on the CPU only, where reading the open count costs nothing: where
:func:`reasons` gives none and then, with the call's gates drawn, :func:`l0kernels._active.skip_reasons`
neither.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ... import _active
from ..._checks import conv_out_size
from ..._gates import compute_dtype
from ..._philox import _cpu
from . import cpu_paths


def reasons(x: torch.Tensor, training: bool, noise: str, features: int, macs_per_group: int,
            structure: Optional[str] = None) -> List[str]:
    """Why a call does not take this path, as far as can be told without drawing its gates (empty: draw them
    and ask :func:`l0kernels._active.skip_reasons` with their open count). ``features``: gated features
    (or channels), ``macs_per_group``: the forward multiply-adds of one; ``structure``: a reason the op's
    form gives (weight gates, a grouped convolution), else None."""
    if torch.compiler.is_compiling():  # the open set's size is data-dependent
        return ["inside a torch.compile trace the open set's size cannot be data-dependent"]
    out = ([structure] if structure else []) + _active.call_reasons(training, noise != "batch")
    if x.device.type != "cpu":
        out.append(f"x is on {x.device.type}: this path reads the open count on the host, for CPU tensors")
    return out + _active.skip_reasons(features, macs_per_group)


def _scatter_in_cpp(dwo: torch.Tensor, wo: torch.Tensor) -> bool:
    return (cpu_paths.ENABLED and hasattr(_cpu, "scatter_cols") and dwo.is_cpu and dwo.dtype is torch.float32
            and wo.dtype is torch.float32 and dwo.is_contiguous() and wo.is_contiguous())


def _scatter_cols(dwo, idx, wo, ratio, n, k):
    """C++: ``dW`` (``(n, k)``, zero outside the columns ``idx``, ``dwo`` in them) in one pass, and with
    ``wo`` (``W[:, idx]``) also ``ratio * sum_n wo * dwo`` (the open gates' dlog_alpha) in the same pass."""
    idx = idx.contiguous()
    ko = idx.numel()
    dw = torch.empty((n, k), dtype=torch.float32)
    dlo = torch.empty(ko, dtype=torch.float32) if wo is not None else None
    if wo is not None:
        ratio = ratio.to(torch.float32).contiguous()
    _cpu.scatter_cols(dwo.data_ptr(), idx.data_ptr(), ko, wo.data_ptr() if wo is not None else 0,
                      ratio.data_ptr() if wo is not None else 0, dw.data_ptr(),
                      dlo.data_ptr() if dlo is not None else 0, n, k)
    return dw, dlo


def linear_forward(gate: str, x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   z: torch.Tensor, idx: torch.Tensor):
    """``(y, wo)``: the forward of a gated linear layer over the open groups ``idx`` of ``z`` (``gate``
    "in" or "out"), and the gathered weight ``wo`` (its open columns or rows) for the backward."""
    zo = z.index_select(0, idx).to(x2.dtype)
    if gate == "in":
        wo = weight.index_select(1, idx)
        return F.linear(x2.index_select(1, idx).mul_(zo), wo, bias), wo
    m, n = x2.shape[0], weight.shape[0]
    wo = weight.index_select(0, idx)
    bo = bias.index_select(0, idx) if bias is not None else None
    yo = F.linear(x2, wo, bo).mul_(zo)
    return x2.new_zeros((m, n)).index_copy_(1, idx, yo), wo


def linear_backward(gate: str, dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, wo: torch.Tensor,
                    bias: Optional[torch.Tensor], z: torch.Tensor, dz: Optional[torch.Tensor], idx: torch.Tensor,
                    need_x: bool, need_w: bool, need_la: bool, need_b: bool):
    """``(dx2, dW, dlog_alpha, db)`` over the open groups ``idx`` (``wo`` from :func:`linear_forward`);
    zeros elsewhere (None where not needed)."""
    n, k = weight.shape
    m = x2.shape[0]
    cd = compute_dtype(x2.dtype)
    zo = z.index_select(0, idx)
    zx = zo.to(x2.dtype)
    dx = dw = dla = db = None
    if gate == "in":
        if need_x:
            dx = x2.new_zeros((m, k)).index_copy_(1, idx, (dy @ wo).mul_(zx))
        if need_w or need_la:
            dwo = dy.t() @ x2.index_select(1, idx).mul_(zx)
            ratio = dz.index_select(0, idx) / zo if need_la else None  # z > 0 on open gates
            if need_w and _scatter_in_cpp(dwo, wo):
                dw, dlo = _scatter_cols(dwo, idx, wo if need_la else None, ratio, n, k)
            else:
                if need_la:
                    dlo = (wo.to(cd) * dwo.to(cd)).sum(0) * ratio
                if need_w:
                    dw = weight.new_zeros((n, k)).index_copy_(1, idx, dwo)
            if need_la:
                dla = dlo.new_zeros(k).index_copy_(0, idx, dlo)
        if need_b and bias is not None:
            db = dy.sum(0)
        return dx, dw, dla, db
    dyo = dy.index_select(1, idx)
    if need_x:
        dx = (dyo * zx) @ wo
    po = dyo.t() @ x2 if (need_w or need_la) else None
    if need_w:
        dw = weight.new_zeros((n, k)).index_copy_(0, idx, po * zx[:, None])
    colsum = dyo.sum(0, dtype=cd) if (need_b or need_la) else None
    if need_b and bias is not None:
        db = bias.new_zeros(n).index_copy_(0, idx, (colsum * zo).to(bias.dtype))
    if need_la:
        hdy = (wo.to(cd) * po.to(cd)).sum(1)
        if bias is not None:
            hdy = hdy + bias.index_select(0, idx).to(cd) * colsum
        dlo = hdy * dz.index_select(0, idx)
        dla = dlo.new_zeros(n).index_copy_(0, idx, dlo)
    return dx, dw, dla, db


def _conv_backward(grad, x, weight, conv_args, mask):
    stride, padding, dilation, groups = conv_args
    return torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride), list(padding),
                                               list(dilation), False, [0, 0], groups, mask)


def conv2d_forward(x, weight, bias, conv_args, z, idx):
    """``(y, wo)``: the convolution over the open output channels ``idx`` scattered into a zero output,
    and the gathered weight ``wo`` for the backward."""
    stride, padding, dilation, groups = conv_args
    wo = weight.index_select(0, idx)
    if idx.numel() == 0:  # every channel closed (a convolution needs at least one output channel)
        hw = [conv_out_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in (0, 1)]
        return torch.empty((x.shape[0], weight.shape[0], *hw), dtype=x.dtype, device=x.device,
                           memory_format=_fmt(x)).zero_(), wo
    zo = z.index_select(0, idx).to(x.dtype)
    bo = bias.index_select(0, idx) if bias is not None else None
    ho = F.conv2d(x, wo, bo, stride, padding, dilation, groups)
    ho.mul_(zo[:, None, None])
    shape = (x.shape[0], weight.shape[0]) + tuple(ho.shape[2:])
    y = torch.empty(shape, dtype=ho.dtype, device=ho.device, memory_format=_fmt(x)).zero_()
    return y.index_copy_(1, idx, ho), wo


def _fmt(x):
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def conv2d_backward(dy, x, weight, wo, bias, conv_args, z, dz, idx, need_x, need_w, need_la, need_b):
    cd = compute_dtype(x.dtype)
    c = weight.shape[0]
    if idx.numel() == 0:
        zeros = lambda t, need: torch.zeros_like(t) if need and t is not None else None  # noqa: E731
        return (zeros(x, need_x), zeros(weight, need_w), z.new_zeros(c) if need_la else None,
                zeros(bias, need_b))
    zo = z.index_select(0, idx)
    zx = zo.to(x.dtype)
    dyo = dy.index_select(1, idx)
    dx = dw = dla = db = None
    if need_x:
        dx = _conv_backward(dyo * zx[:, None, None], x, wo, conv_args, [True, False, False])[0]
    po = _conv_backward(dyo, x, wo, conv_args, [False, True, False])[1] if (need_w or need_la) else None
    if need_w:
        dw = weight.new_zeros(weight.shape).index_copy_(0, idx, po * zx[:, None, None, None])
    colsum = dyo.sum((0, 2, 3), dtype=cd) if (need_b or need_la) else None
    if need_b and bias is not None:
        db = bias.new_zeros(c).index_copy_(0, idx, (colsum * zo).to(bias.dtype))
    if need_la:
        hdy = (wo.to(cd) * po.to(cd)).sum((1, 2, 3))
        if bias is not None:
            hdy = hdy + bias.index_select(0, idx).to(cd) * colsum
        dlo = hdy * dz.index_select(0, idx)
        dla = dlo.new_zeros(c).index_copy_(0, idx, dlo)
    return dx, dw, dla, db
