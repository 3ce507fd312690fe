"""Gates folded into plain layers, and the plain layers compact() builds (docs/compact.md, "Folding").

``fold(m)`` turns an L0 layer into the ``nn.Linear`` / ``nn.Conv2d`` its eval forward computes: ``w * z`` in
the gate compute dtype, rounded to the weight dtype, as the eval path folds it (``backends._plans``).
:class:`Dense` is a plain layer as the analysis sees it: which inputs each row reads (a nonzero weight) and
what constant inputs add to each row, computed from the layer's own weight when asked (nothing the size of
the model is kept: at a billion parameters a float64 copy of every weight would be four times the model).
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn

from ..backends import _plans


def l0_types():
    from ..modules import L0Conv2d, L0Linear
    return L0Linear, L0Conv2d


def is_weight_layer(m) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d) + l0_types())


def work_dtype(device: torch.device) -> torch.dtype:
    """The analysis dtype on ``device``: float64, or float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def z_eval(m) -> torch.Tensor:
    """``z_eval`` per gated feature of an L0 layer as its eval forward computes it (``backends._plans``), with
    the layer's device as the default device so that nothing comes from the caller's default device."""
    with torch.device(m.log_alpha.device):
        return _plans._z_eval(m)


def folded_tensors(m):
    """(weight, bias or None) of layer ``m`` with its eval gates folded in, as the eval path folds them."""
    if not isinstance(m, l0_types()):
        return m.weight.detach(), m.bias.detach() if m.bias is not None else None
    with torch.device(m.log_alpha.device):
        return _plans.fold_gates(m)[:2]


def _skip_init(cls, *args, **kwargs):
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op" for emptied layers
        warnings.simplefilter("ignore", UserWarning)
        return torch.nn.utils.skip_init(cls, *args, **kwargs)


def plain_layer(src, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: Optional[int] = None) -> nn.Module:
    """An ``nn.Linear`` / ``nn.Conv2d`` shaped like ``src`` (an L0 or plain layer) with these tensors."""
    is_conv = weight.dim() == 4
    dev, dt = src.weight.device, src.weight.dtype
    if is_conv:
        g = getattr(src, "groups", 1) if groups is None else groups
        m = _skip_init(nn.Conv2d, weight.shape[1] * g, weight.shape[0], tuple(weight.shape[2:]), stride=src.stride,
                       padding=src.padding, dilation=src.dilation, groups=g, bias=bias is not None,
                       padding_mode=getattr(src, "padding_mode", "zeros"), device=dev, dtype=dt)
    else:
        m = _skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, device=dev, dtype=dt)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    m.train(src.training)
    return m


def fold(m) -> nn.Module:
    """The plain layer the eval forward of L0 layer ``m`` computes (its gates folded into the weights)."""
    w, b = folded_tensors(m)
    return plain_layer(m, w, b)


CHUNK = 1 << 20  # weight elements per step of the analysis' per-row masks


class Dense:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` (gates already folded) as the analysis reads it."""

    def __init__(self, m: nn.Module):
        self.src = m
        self.kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        self.groups = getattr(m, "groups", 1)
        self.n_out = m.weight.shape[0]
        self.n_in = m.weight.shape[1] * self.groups
        self.has_bias = m.bias is not None
        self.work = work_dtype(m.weight.device)

    def pads_with_zeros(self) -> bool:
        if self.kind != "conv":
            return False
        pad = self.src.padding
        padded = pad != "valid" if isinstance(pad, str) else any(int(p) != 0 for p in pad)
        return padded and getattr(self.src, "padding_mode", "zeros") == "zeros"

    def bias64(self) -> torch.Tensor:
        b = self.src.bias
        return b.detach().to(self.work) if b is not None else torch.zeros(self.n_out, dtype=self.work,
                                                                            device=self.src.weight.device)

    def _per_input(self, m: torch.Tensor) -> torch.Tensor:
        """``m`` (one value per weight row and input of its group) as (rows, n_in): zero outside the group."""
        if self.groups == 1:
            return m
        return torch.block_diag(*m.view(self.groups, -1, m.shape[1]))

    def reads(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(rows, inputs) on the CPU: which inputs each weight row (of ``rows``, a bool mask) reads."""
        w = self.src.weight.detach()
        if rows is not None and self.groups == 1:
            w = w[rows.to(w.device)]
        nz = w != 0
        r = self._per_input(nz.any(3).any(2) if self.kind == "conv" else nz)
        if rows is not None and self.groups != 1:
            r = r[rows.to(r.device)]
        return r.cpu()

    def _row_chunks(self):
        """``(start, rows of the weight)`` in chunks of about :data:`CHUNK` elements: the masks the analysis
        builds per weight stay small (whole-weight temporaries fragment the heap of a large model)."""
        w = self.src.weight.detach()
        step = max(1, CHUNK // max(w[0].numel(), 1))
        for i in range(0, w.shape[0], step):
            yield i, w[i:i + step]

    def needed(self, rows: torch.Tensor) -> torch.Tensor:
        """(inputs,) on the CPU: the inputs some row of ``rows`` reads."""
        if self.kind == "linear":
            rows = rows.to(self.src.weight.device)
            out = torch.zeros(self.n_in, dtype=torch.bool, device=rows.device)
            for i, w in self._row_chunks():
                out |= (w[rows[i:i + w.shape[0]]] != 0).any(0)
            return out.cpu()
        return self.reads(rows).any(0)

    def reads_none(self, inputs: torch.Tensor) -> torch.Tensor:
        """(rows,) on the CPU: the rows that read none of ``inputs`` (a bool mask over the inputs)."""
        if self.groups != 1:
            return ~(self.reads() & inputs[None, :]).any(1)
        inputs = inputs.to(self.src.weight.device)
        parts = []
        for _, w in self._row_chunks():
            nz = w != 0
            nz = nz.any(3).any(2) if self.kind == "conv" else nz
            parts.append(~(nz & inputs[None, :]).any(1))
        return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.bool)

    def through(self, c: torch.Tensor) -> torch.Tensor:
        """Per weight row, what inputs that are the constants ``c`` everywhere add to its output (no bias)."""
        w = self.src.weight.detach().to(self.work)
        w = w.sum((2, 3)) if self.kind == "conv" else w
        return self._per_input(w) @ c.to(device=w.device, dtype=w.dtype)

    def shrink(self, out_keep: torch.Tensor, in_keep: torch.Tensor, fold_c: torch.Tensor) -> nn.Module:
        """The layer with rows ``out_keep`` and inputs ``in_keep``; ``fold_c`` (per kept row) joins the bias."""
        src = self.src
        dev = src.weight.device
        out_keep, in_keep = out_keep.to(dev), in_keep.to(dev)
        w = src.weight.detach()[out_keep]
        groups = None
        if self.kind == "linear" or self.groups == 1:
            w = w[:, in_keep]
        else:
            kept = out_keep.view(self.groups, -1).any(1)
            if not (torch.equal(kept, out_keep.view(self.groups, -1).all(1)) and
                    torch.equal(kept.repeat_interleave(self.n_in // self.groups), in_keep)):
                raise RuntimeError(f"compact: internal error: grouped conv {type(src).__name__} would lose part "
                                   f"of a group")
            groups = int(kept.sum())  # weight columns are per group: nothing to slice
        has_bias = self.has_bias or bool((fold_c != 0).any())
        b = None
        if has_bias:
            b = (self.bias64()[out_keep] + fold_c.to(dev)).to(w.dtype)
        return plain_layer(src, w, b, groups)


def slice_bn(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    """BatchNorm ``m`` with the entries ``keep`` (a copy; the same object when every entry stays)."""
    if bool(keep.all()):
        return m
    new = copy.deepcopy(m)
    idx = keep.nonzero().flatten()
    new.num_features = int(idx.numel())
    with torch.no_grad():
        for pname in ("weight", "bias"):
            p = getattr(m, pname)
            if p is not None:
                setattr(new, pname, nn.Parameter(p.detach().index_select(0, idx.to(p.device)), p.requires_grad))
        for bname in ("running_mean", "running_var"):
            t = getattr(m, bname)
            setattr(new, bname, t.index_select(0, idx.to(t.device)))
    return new
