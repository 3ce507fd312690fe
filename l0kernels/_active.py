"""Open sets: the groups (input columns, output rows, output channels) whose gate is not exactly 0.

A sampled hard-concrete gate is exactly 0 with probability ``1 - p_open`` (SPEC section 1), and then its
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
between the gathered and the dense GEMM is :func:`skip_closed`. The Triton backend takes the device route
on every training call with one gate vector and input or output gates (``backends/triton/linear.py``):
its kernels read ``index`` and ``count`` in device memory, so it needs no decision on the host.
:data:`PATHS` counts which path ran.
"""
from __future__ import annotations

import collections
import os
from typing import NamedTuple

import torch

# Gathering the open columns/rows costs one copy of the open part of x and W, the scatter of dW and a few
# calls; above this open fraction the dense GEMM (with the closed groups multiplied by their zero gate) is
# faster on the CPU: measured on LeNet-300-100's 784->300 layer (batch 100, fwd+bwd, 2026-12-02), the
# gathered path costs 1.16x the dense one at 90% open, 1.04x at 80%, 0.95x at 70%, 0.84x at 60%. A
# convolution gains already at 90% open (oneDNN pads the channel count: 0.82x on LeNet-5's conv2), so it has
# its own threshold. Below MIN_SKIPPED_MACS multiply-adds skipped the dense path runs too (small layers: the
# calls cost more than they save; LeNet-300-100's 300->100 layer at 75% open skips 0.75M).
DENSE_ABOVE = float(os.environ.get("L0K_SKIP_DENSE_ABOVE", "0.7"))
CONV_DENSE_ABOVE = float(os.environ.get("L0K_SKIP_CONV_DENSE_ABOVE", "0.9"))
MIN_SKIPPED_MACS = int(os.environ.get("L0K_SKIP_MIN_MACS", str(1 << 20)))
ENABLED = os.environ.get("L0K_SKIP_CLOSED", "1") != "0"

# ("linear-in" | "linear-out" | "conv2d", "fwd" | "bwd", "skip" | "dense") -> number of calls; tests and
# benchmarks read it to see which path ran.
PATHS: "collections.Counter" = collections.Counter()


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


def open_index(z: torch.Tensor) -> torch.Tensor:
    """The open gate indices of ``z`` (``(G,)``), ascending, sized by the open count (host route)."""
    return torch.nonzero(z).reshape(-1)


def may_skip(n_gates: int, macs_per_group: int) -> bool:
    """Whether :func:`skip_closed` can be true for some open set of ``n_gates`` groups (with all of them
    closed): False lets a small layer decide without drawing its gates."""
    return ENABLED and n_gates * macs_per_group >= MIN_SKIPPED_MACS


def skip_closed(n_open: int, n_gates: int, macs_per_group: int, conv: bool = False) -> bool:
    """True where the gathered GEMM (or convolution, ``conv``) over ``n_open`` of ``n_gates`` groups should run
    instead of the dense one (``macs_per_group``: the forward multiply-adds of one group, e.g. ``M * N`` for an
    input column)."""
    above = CONV_DENSE_ABOVE if conv else DENSE_ABOVE
    return (ENABLED and n_open < n_gates and n_open <= above * n_gates
            and (n_gates - n_open) * macs_per_group >= MIN_SKIPPED_MACS)
