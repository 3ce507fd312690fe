"""CPU fast paths of the torch backend (float32, one gate vector per call).

On the CPU a gated layer's extra cost over ``F.linear`` is not arithmetic but traffic and dispatch:
every whole-tensor torch op is a pass over memory, a fresh temporary and, above torch's grain size,
a wake-up of the thread pool between two GEMMs. These paths do the gate work of a call in one C++
pass each (``l0kernels._cpu``, built from ``csrc/host/cpu_kernels.cpp`` on the shared headers
``csrc/l0_philox.cuh`` / ``csrc/l0_gate.cuh``):

- forward, input gates: ``x * z`` with ``z`` drawn in the same call, written into a per-thread
  workspace that stays in cache from one step to the next (the GEMM reads it and it is dead after);
- backward, input or output gates: ``P = dY^T x`` comes from the GEMM a dense layer runs too; one
  pass then gives ``dlog_alpha = dz * sum(W * P)`` and scales ``P`` into ``dW`` in place.

The plain torch code beside them in ``reference.py`` is the reference (and the only path in
float64, which gradcheck checks); ``tests/backends/torch/test_cpu_paths.py`` compares the two.
``L0K_CPU_KERNELS=0`` turns these paths (and the C++ gate kernel of ``_gates.py``) off.
"""
from __future__ import annotations

import threading
from typing import List, Optional

import torch

from ... import config
from ..._gates import GateConfig
from ..._philox import _compiling, _cpu, seed_int

ENABLED = _cpu is not None and hasattr(_cpu, "gate_backward") and config.CPU_KERNELS
_WORKSPACE_MAX = 1 << 20  # floats (4 MiB): larger inputs get a fresh tensor, their GEMM dwarfs the pass


def reasons(x: torch.Tensor, weight: torch.Tensor, log_alpha: torch.Tensor, per_call_gates: bool) -> List[str]:
    """Why the C++ paths do not take a call (empty: they do). They take CPU float32 with contiguous weight and
    log_alpha and one gate vector for the call (batch noise in training, or eval gates); never under
    ``torch.compile``: the traced plain path (which inductor fuses) takes the call there."""
    if _compiling():
        return ["inside a torch.compile trace the plain ops run (inductor fuses them)"]
    out = []
    if not ENABLED:
        out.append("the C++ CPU kernels are off (L0K_CPU_KERNELS=0, or l0kernels._cpu is not built)")
    if not per_call_gates:
        out.append("noise='sample': the C++ paths take one gate vector per call")
    if not x.is_cpu:
        out.append(f"x is on {x.device.type}, not the CPU")
    if x.dtype is not torch.float32:
        out.append(f"x is {str(x.dtype).replace('torch.', '')}: the C++ paths run float32")
    if not weight.is_contiguous():
        out.append("the weight is not contiguous")
    if not log_alpha.is_contiguous():
        out.append("log_alpha is not contiguous")
    return out


def applies(x: torch.Tensor, weight: torch.Tensor, log_alpha: torch.Tensor, per_call_gates: bool) -> bool:
    """True where the C++ paths take the call (:func:`reasons` gives none)."""
    return not reasons(x, weight, log_alpha, per_call_gates)


class _Workspace(threading.local):
    def __init__(self):
        self.bufs = {}  # (m, k) -> float32 tensor; a few shapes per thread (one per layer width)


_WS = _Workspace()


def _scratch(m: int, k: int) -> torch.Tensor:
    if m * k > _WORKSPACE_MAX:
        return torch.empty((m, k), dtype=torch.float32, device="cpu")
    bufs = _WS.bufs
    buf = bufs.get((m, k))
    if buf is None:
        if len(bufs) >= 8:
            bufs.clear()
        buf = bufs[(m, k)] = torch.empty((m, k), dtype=torch.float32, device="cpu")
    return buf


def in_gate_input(x2: torch.Tensor, log_alpha: torch.Tensor, seed, training: bool,
                  cfg: GateConfig, group_size: int = 1) -> torch.Tensor:
    """``x2 * z`` for input gates, ``z`` drawn in the same C++ call (``group_size`` columns per gate). The
    result lives in a per-thread workspace for inputs up to 4 MiB: use it before the next call on this
    thread, never keep it."""
    m, k = x2.shape
    if x2.stride(-1) != 1 or m == 0 or k == 0:
        x2 = x2.contiguous()
    out = _scratch(m, k)
    if m and k:
        _cpu.in_gate_forward(0 if seed is None else seed_int(seed), training, log_alpha.data_ptr(), k,
                             x2.data_ptr(), x2.stride(0), m, out.data_ptr(), cfg.as_tuple, group_size)
    return out


def gate_backward(axis: int, p: torch.Tensor, weight: torch.Tensor, log_alpha: torch.Tensor, seed,
                  training: bool, cfg: GateConfig, extra: Optional[torch.Tensor] = None, group_size: int = 1):
    """``(dW, dlog_alpha, z)`` from ``P = dY^T x`` (``(N, K)``, scaled into ``dW`` in place): gates on the
    columns (``axis=1``, input gates) or rows (``axis=0``, output gates, ``extra = b * colsum(dY)``),
    ``group_size`` columns/rows per gate. ``z`` is the gate vector the pass drew, one value per column/row
    (repeated over a gate's group), for the caller's dx and db (no second draw)."""
    p = p.contiguous()
    n, k = p.shape
    g = k if axis == 1 else n
    out = torch.empty(g, dtype=torch.float32, device="cpu")  # every element is written
    z = torch.empty(g, dtype=torch.float32, device="cpu")
    extra = extra.contiguous() if extra is not None else None
    _cpu.gate_backward(axis, 0 if seed is None else seed_int(seed), training, log_alpha.data_ptr(), p.data_ptr(), weight.data_ptr(),
                       extra.data_ptr() if extra is not None else 0, out.data_ptr(), z.data_ptr(), n, k,
                       cfg.as_tuple, group_size)
    if group_size != 1:
        out = out.view(g // group_size, group_size).sum(1)
    return p, out, z
