"""Open sets: the groups (input columns, output rows, output channels) whose gate is not exactly 0.

A sampled hard-concrete gate is exactly 0 with probability ``1 - p_open`` (docs/design.md §1), and then its
whole group contributes nothing to the output and gets exactly zero gradients (``dz/dlog_alpha = 0`` on
the clamped region). A training call with one gate vector (``noise="batch"``) can therefore run its GEMM
or convolution over the open groups only; the open set is recomputed on every call from the gates drawn
for that call.

Two representations of one open set of ``G`` gates:

* **host** (:func:`open_index`): an int64 tensor of the open indices, ascending, sized by the open
  count. Finding it reads the count on the host (``nonzero``): free on the CPU, a synchronisation on a GPU.
* **device** (:class:`OpenSet`, :func:`open_set`): a static-size permutation ``index`` (``(G,)`` int64,
  the open indices ascending in ``index[:count]``, then the closed ones ascending) and ``count``, a 0-d
  int64 tensor, both on the gates' device, from a stable sort of the closed flags: no host sync, fixed
  shapes, so it can be captured in a CUDA graph. A kernel reads ``count`` from device memory and runs
  its grid over the full ``G`` with the programs past ``count`` exiting early (or the K loop stopping
  at ``count``); the gathered columns/rows are ``index[j]`` for ``j < count``.

The torch backend on the CPU takes the host route (the GEMM needs the size on the host); the decision
between the gathered and the dense GEMM is :func:`skip_reasons` (none: gather). The Triton and CUDA
backends take the device route on training calls with one gate vector (input or output gates, conv
channels) once the layer's last known open fraction is at most their threshold (:func:`takes_open_set`,
:func:`fraction_reasons`; the fraction is read without a sync): their kernels read ``index`` and ``count``
in device memory. The CUDA backward takes its forward's decision (kept in the autograd context); the
Triton backward reads the layer's fraction again, which is its forward's unless another forward of the
same layer refreshed it in between (both paths give the same gradients; only non-finite values in closed
groups and the counts in :data:`PATHS` can differ). :data:`PATHS` counts which path ran. Every backend
shares :func:`call_reasons` (why a call cannot skip at all).
"""
from __future__ import annotations

import collections
from typing import List, NamedTuple, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary
from . import config

# Gathering the open columns/rows costs one copy of the open part of x and W, the scatter of dW and a few
# calls; above this open fraction the dense GEMM (with the closed groups multiplied by their zero gate) is
# faster on the CPU: measured on LeNet-300-100's 784->300 layer (batch 100, fwd+bwd, 2026-12-02), the
# gathered path costs 1.16x the dense one at 90% open, 1.04x at 80%, 0.95x at 70%, 0.84x at 60%. A
# convolution gains already at 90% open (oneDNN pads the channel count: 0.82x on LeNet-5's conv2), so it has
# its own threshold. Below MIN_SKIPPED_MACS multiply-adds skipped the dense path runs too (small layers: the
# calls cost more than they save; LeNet-300-100's 300->100 layer at 75% open skips 0.75M).
DENSE_ABOVE = config.SKIP_DENSE_ABOVE
CONV_DENSE_ABOVE = config.SKIP_CONV_DENSE_ABOVE
MIN_SKIPPED_MACS = config.SKIP_MIN_MACS
ENABLED = config.SKIP_CLOSED

# ("linear-in" | "linear-out" | "conv2d", "fwd" | "bwd", "skip" | "dense") -> number of calls; tests and
# benchmarks read it to see which path ran.
PATHS: "collections.Counter" = collections.Counter()


def count_path(op: str, direction: str, path: str) -> None:
    """Count one eager call in :data:`PATHS`. Not inside a ``torch.compile`` trace: a compiled graph keeps no
    Python side effects, and a counter read while tracing becomes a guard that fails on the next call (the
    model recompiled on every call until dynamo's recompile limit, then ran eagerly)."""
    if not torch.compiler.is_compiling():
        PATHS[op, direction, path] += 1


class OpenSet(NamedTuple):
    """Device form of an open set: ``index[:count]`` are the open gates (ascending), the rest closed."""

    index: torch.Tensor  # (G,) int64
    count: torch.Tensor  # () int64


def open_set(z: torch.Tensor) -> OpenSet:
    """The open set of a gate vector ``z`` (``(G,)``) without a host-device synchronisation."""
    return open_set_of_closed((z == 0).to(torch.uint8))


def open_set_of_closed(closed: torch.Tensor) -> OpenSet:
    """The open set from the closed flags (``(G,)`` uint8, 1 = closed); the Triton backend computes the
    flags in a kernel from the seed (``backends/triton/_gate_math.open_set``)."""
    index = torch.sort(closed, stable=True).indices
    count = closed.numel() - closed.sum(dtype=torch.int64)
    return OpenSet(index, count)


def open_mask(os_: OpenSet, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """``(G,)``: 1 where the device open set ``os_`` holds the feature, else 0 (no host sync)."""
    pos = torch.arange(os_.index.numel(), device=os_.index.device)
    return torch.zeros(os_.index.numel(), dtype=dtype, device=os_.index.device).scatter_(
        0, os_.index, (pos < os_.count).to(dtype))


def open_index(z: torch.Tensor) -> torch.Tensor:
    """The open gate indices of ``z`` (``(G,)``), ascending, sized by the open count (host route)."""
    return torch.nonzero(z).reshape(-1)


def call_reasons(training: bool, sample: bool) -> List[str]:
    """Why a call cannot skip closed groups on any backend (empty: it may): ``L0K_SKIP_CLOSED=0``
    (:data:`ENABLED`), an eval call, per-example gates (``sample``)."""
    out = [] if ENABLED else ["skipping closed groups is off (L0K_SKIP_CLOSED=0)"]
    if not training:
        out.append("an eval call (eval plans skip closed groups instead)")
    if sample:
        out.append("noise='sample': one gate vector per example, no one open set")
    return out


def skip_reasons(n_gates: int, macs_per_group: int, n_open: Optional[int] = None, conv: bool = False) -> List[str]:
    """For a call that may skip (:func:`call_reasons`), why the host route's gathered GEMM (or convolution,
    ``conv``) over the ``n_open`` open groups of ``n_gates`` should not run instead of the dense one
    (``macs_per_group``: the forward multiply-adds of one group, e.g. ``M * N`` for an input column); empty
    where it should. ``n_open=None``: before the gates are drawn, whether any open set could (with every group
    closed), so that a layer too small to gain decides without drawing them."""
    if n_open is None:
        if n_gates * macs_per_group < MIN_SKIPPED_MACS:
            return [f"too small: with every group closed it would skip {n_gates * macs_per_group} multiply-adds, "
                    f"fewer than L0K_SKIP_MIN_MACS={MIN_SKIPPED_MACS}"]
        return []
    above, switch = (CONV_DENSE_ABOVE, "L0K_SKIP_CONV_DENSE_ABOVE") if conv else (DENSE_ABOVE, "L0K_SKIP_DENSE_ABOVE")
    out = []
    if n_open >= n_gates:
        out.append("every group of this call is open")
    elif n_open > above * n_gates:
        out.append(f"{n_open} of {n_gates} groups of this call are open, more than {switch}={above:g}")
    if n_open < n_gates and (n_gates - n_open) * macs_per_group < MIN_SKIPPED_MACS:
        out.append(f"its {n_gates - n_open} closed groups would skip {(n_gates - n_open) * macs_per_group} "
                   f"multiply-adds, fewer than L0K_SKIP_MIN_MACS={MIN_SKIPPED_MACS}")
    return out


# -- the open fraction of a layer's gates, known on the host without a sync --------------------------------
# The CUDA backend takes its open-set kernels below a fraction (backends/cuda/), and ``auto`` re-tunes its
# backend choice as a layer's fraction falls (l0kernels._dispatch: the fraction's tenth is part of the key),
# so training that sparsifies moves to the kernels that skip. Read every REFRESH_EVERY calls of a layer.
REFRESH_EVERY = 16


class _OpenFraction:
    """The last known open fraction of a layer's training gates, kept on the host without a sync: every
    ``REFRESH_EVERY`` calls the open count of that call's gates is copied to pinned memory behind a CUDA
    event, and a later call reads it once the event has completed. None until the first read lands; not
    refreshed while a CUDA graph is captured or under ``torch.compile`` (the last value decides)."""

    __slots__ = ("value", "host", "event", "calls")

    def __init__(self):
        self.value: Optional[float] = None
        self.host = self.event = None
        self.calls = 0

    def update(self, features: int, make_count) -> Optional[float]:
        """The fraction known now; starts a read of ``make_count()`` (this call's open count) when one is due."""
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return self.value  # no event queried and no copy inside a trace or a capture
        if self.host is not None and (self.event is None or self.event.query()):
            self.value = float(self.host) / max(features, 1)
            self.host = self.event = None
        if self.host is None and self.calls % REFRESH_EVERY == 0:
            count = make_count()
            if count.is_cuda:
                self.host = torch.empty((), dtype=torch.int64, pin_memory=True)
                self.host.copy_(count, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record()
            else:  # a CPU tensor (a stand-in extension in the tests): nothing to wait for
                self.host = count.detach().clone()
        self.calls += 1
        return self.value


_FRACTIONS = WeakIdKeyDictionary()  # log_alpha -> _OpenFraction (by identity: tensors compare elementwise)


def open_fraction(log_alpha: torch.Tensor, features: int, make_count) -> Optional[float]:
    """The last known open fraction of ``log_alpha``'s training gates (None until one is known);
    ``make_count()`` gives this call's open count as a 0-d tensor (called only when a read is due)."""
    st = _FRACTIONS.get(log_alpha)
    if st is None:
        st = _FRACTIONS[log_alpha] = _OpenFraction()
    return st.update(features, make_count)


def taken_open_set(draw, log_alpha: torch.Tensor, features: int, below: float, forward: bool = True):
    """The device backends' open set of a call that may skip closed groups, where :func:`takes_open_set` says it
    takes the open-set kernels, else None. ``draw()`` gives this call's :class:`OpenSet` (called at most once:
    the open-fraction read and the kernels share it). The forward reads the layer's fraction and now and then
    starts a copy of this call's count; the backward (``forward=False``) only reads it, so it takes its
    forward's decision."""
    drawn = []

    def this():
        if not drawn:
            drawn.append(draw())
        return drawn[0]
    take = takes_open_set(log_alpha, features, below, (lambda: this().count) if forward else None)
    return this() if take else None


def takes_open_set(log_alpha: torch.Tensor, features: int, below: float, make_count=None) -> bool:
    """The device backends' rule (CUDA: ``L0K_CUDA_SKIP_BELOW``, Triton: ``L0K_TRITON_SKIP_BELOW``): whether a
    training call that may skip closed groups runs the open-set kernels, i.e. :func:`fraction_reasons` gives
    none once the layer's fraction is refreshed (:func:`open_fraction`, ``make_count()`` this call's open
    count). ``make_count=None`` only reads the fraction (a backward taking the decision its forward took,
    without counting a call)."""
    if make_count is not None and below < 1.0 and not torch.compiler.is_compiling():
        open_fraction(log_alpha, features, make_count)
    return not fraction_reasons(log_alpha, below)


def known_fraction(log_alpha: torch.Tensor) -> Optional[float]:
    """The last known open fraction of ``log_alpha``'s training gates, None until one is known (read only: no
    call counted, no read started)."""
    st = _FRACTIONS.get(log_alpha)
    return None if st is None else st.value


def fraction_reasons(log_alpha: torch.Tensor, below: float, switch: str = "the threshold") -> List[str]:
    """Why a training call of the layer whose gates are ``log_alpha`` does not take the open-set kernels at
    threshold ``below`` (``switch``: its name) now; empty where it does. Always where ``below >= 1``; else once
    the layer's last known open fraction (:func:`known_fraction`) is at most ``below`` (unknown: the dense
    kernels). Inside a ``torch.compile`` trace the dense kernels (below 1): a trace bakes the decision in, and
    the fraction is mutable state that a guard would watch."""
    if below >= 1.0:
        return []
    if torch.compiler.is_compiling():
        return [f"inside a torch.compile trace the dense kernels run ({switch}={below:g} is below 1)"]
    frac = known_fraction(log_alpha)
    if frac is None:
        return [f"the layer's open fraction is not known yet (read every {REFRESH_EVERY} training calls; "
                f"{switch}={below:g})"]
    if frac > below:
        return [f"the layer's last known open fraction {frac:.3g} is above {switch}={below:g}"]
    return []


def density_tenth(call) -> Optional[int]:
    """For a training call with one gate vector (batch noise; input/output gates or conv channels): the tenth
    of the layer's last known open fraction (0-9), None when unknown or for other calls. Part of ``auto``'s
    autotuner key, so that a sparsifying layer is timed again as its gates close."""
    if not call.training or call.noise != "batch" or getattr(call, "gate", "out") == "weight":
        return None

    def count():
        from ._gates import sample_gate_tensor
        z = sample_gate_tensor(call.log_alpha.detach(), call.seed, tuple(call.log_alpha.shape), call.cfg, False)[0]
        return torch.count_nonzero(z) * call.group_size

    frac = open_fraction(call.log_alpha, call.log_alpha.shape[0] * call.group_size, count)
    return None if frac is None else min(int(frac * 10), 9)
