"""The torch backend of structure-gated linear layers (docs/design.md §11): the rows and columns a structure
gate closes are skipped, not computed and masked.

``y = (x * s) @ W.T + b`` with the rows where ``rows`` is False exactly 0 (neither computed nor given their
bias) and the columns where ``s == 0`` never read. With ``o`` the open rows and ``c`` the open columns:

- forward: ``y[..., o] = (x[..., c] * s[c]) @ W[o][:, c].T + b[o]``, the other outputs 0;
- backward (autograd through the same gathers): ``dW[o][:, c]``, ``db[o]``, ``dx[..., c]`` and ``ds[c]`` only;
  every other entry of the gradients is an exact 0.

Whether to gather is decided per call as for the per-layer gates (:func:`l0kernels._active.skip_reasons`:
``L0K_SKIP_DENSE_ABOVE``, ``L0K_SKIP_MIN_MACS``, ``L0K_SKIP_CLOSED``): with most rows (columns) open, the
dense product runs and the closed rows are set to 0 (the closed columns multiplied by their gate, 0), which
is cheaper than gathering. The open sets are read on the host (``nonzero``): on the CPU that costs nothing; on a
GPU it is one synchronisation per layer and call (the device kernels that keep the open set on the device are
not written yet, docs/design.md §11). When every row and column is open the call is one ``F.linear`` (and no
multiply where ``s`` is all ones), so open gates compute exactly what the layer computed before ``convert``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import _active


def _gather(n_gates: int, n_open: int, macs_per_group: int) -> bool:
    return _active.ENABLED and not _active.skip_reasons(n_gates, macs_per_group, n_open)


def structure_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     rows: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                     cols: Optional[torch.Tensor] = None, open_out: bool = False, host: bool = True) -> torch.Tensor:
    n, k = weight.shape
    if not host:  # the device form: fixed shapes, no host reads
        y = F.linear(x if scale is None else x * scale.to(x.dtype), weight, bias)
        return y if rows is None else y * rows.to(y.dtype)
    m = x.numel() // max(x.shape[-1], 1)
    w, b = weight, bias
    if cols is not None:  # x holds only these input columns
        c = cols.nonzero().squeeze(1)
        w = w.index_select(1, c)
        if scale is not None:
            x = x * scale.index_select(0, c).to(x.dtype)
    elif scale is not None:
        open_cols = scale != 0
        n_open = int(open_cols.sum())
        if n_open == k:
            if not bool((scale == 1).all()):
                x = x * scale.to(x.dtype)
        elif _gather(k, n_open, m * n):
            c = open_cols.nonzero().squeeze(1)
            x = x.index_select(-1, c) * scale.index_select(0, c).to(x.dtype)
            w = w.index_select(1, c)
        else:
            x = x * scale.to(x.dtype)
    if rows is None:
        return F.linear(x, w, b)
    if open_out:  # the output holds only the open rows
        o = rows.nonzero().squeeze(1)
        return F.linear(x, w.index_select(0, o), b.index_select(0, o) if b is not None else None)
    n_open = int(rows.sum())
    if n_open == n:
        return F.linear(x, w, b)
    if not _gather(n, n_open, m * w.shape[1]):  # few closed rows: the dense product, those rows set to 0
        y = F.linear(x, w, b)
        return y.index_fill_(y.dim() - 1, (~rows).nonzero().squeeze(1), 0)
    o = rows.nonzero().squeeze(1)
    y_open = F.linear(x, w.index_select(0, o), b.index_select(0, o) if b is not None else None)
    y = y_open.new_zeros(*y_open.shape[:-1], n)
    return y.index_copy(y.dim() - 1, o, y_open)


def rows_grads_replayed(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        index: torch.Tensor, count: torch.Tensor, needs) -> tuple:
    """``(dx, dweight, dbias)`` (None where ``needs`` says no) of a producer over the open rows of the device open set
    ``(index, count)`` (the device backends' ``rows_linear``), through autograd of its definition
    ``F.linear(x, W, b) * open``: the device backends' backward when a graph of the gradients is asked for
    (``create_graph=True``)."""
    keep = _active.open_mask(_active.OpenSet(index, count), x.dtype)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if (t is not None and m) else t
                  for t, m in zip((x, weight, bias), needs)]
        y = F.linear(*leaves) * keep
        want = [t for t, m in zip(leaves, needs) if m and t is not None]
        gs = iter(torch.autograd.grad(y, want, dy, create_graph=True))
    return tuple(next(gs) if (m and t is not None) else None for t, m in zip(leaves, needs))
