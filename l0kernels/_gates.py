"""Hard-concrete gate math of docs/design.md §1, in PyTorch. The one Python copy of the formulas.

Every torch-side computation of a gate, its derivative, the test-time gate or P(open) goes
through these functions; the Triton and CUDA backends have their own single copies
(``l0kernels/backends/triton/_gate_math.py`` and ``csrc/l0_gate.cuh``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from . import config
from ._philox import _compiling, _cpu, check_seed, philox_range, seed_int

NOISE_KINDS = ("batch", "sample")
LINEAR_GATES = ("in", "out", "weight")


@dataclass(frozen=True)
class GateConfig:
    """Hard-concrete constants: temperature ``beta``, stretch interval ``(gamma, zeta)``, clamp ``eps``."""

    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    eps: float = 1e-6

    def __post_init__(self):
        for name in ("beta", "gamma", "zeta", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
            object.__setattr__(self, name, float(v))
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.gamma >= 0:
            raise ValueError(f"gamma must be < 0, got {self.gamma}")
        if self.zeta <= 1:
            raise ValueError(f"zeta must be > 1, got {self.zeta}")
        if not 0 < self.eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {self.eps}")
        object.__setattr__(self, "as_tuple", (self.beta, self.gamma, self.zeta, self.eps))

    @property
    def closed_threshold(self) -> float:
        """``z_eval`` is exactly 0 for ``log_alpha <=`` this: ``log(-gamma/zeta)``."""
        return math.log(-self.gamma / self.zeta)

    @property
    def open_threshold(self) -> float:
        """``z_eval`` is exactly 1 for ``log_alpha >=`` this: ``log((1-gamma)/(zeta-1))``."""
        return math.log((1.0 - self.gamma) / (self.zeta - 1.0))


DEFAULT_CONFIG = GateConfig()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gate math runs in float32 for half types and float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _clamp01(s_bar: torch.Tensor) -> torch.Tensor:
    """``min(1, max(0, s_bar))``. ``hardtanh``, not ``clamp``: the same values, and where autograd records
    (the second-order backward replays the gates through autograd) its derivative is 0 on the boundaries,
    as docs/design.md §1 has it."""
    return torch.nn.functional.hardtanh(s_bar, 0.0, 1.0)


def gates_from_uniform(log_alpha: torch.Tensor, u: torch.Tensor, cfg: GateConfig = DEFAULT_CONFIG,
                       need_grad: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Training gate ``z`` and ``dz/dlog_alpha`` from raw uniforms ``u`` (broadcast with ``log_alpha``).

    Both are returned in the compute dtype of ``log_alpha``. The derivative is 0 where
    ``s_bar`` is clamped, boundaries included. Non-finite ``log_alpha``: NaN gives ``z = dz = NaN``
    (``sigmoid`` and ``clamp`` keep NaN), +inf ``z = 1`` and -inf ``z = 0``, both with ``dz = 0``.
    """
    la = log_alpha.to(compute_dtype(log_alpha.dtype))
    u = u.to(la.dtype).clamp(cfg.eps, 1.0 - cfg.eps)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / cfg.beta)
    s_bar = s * (cfg.zeta - cfg.gamma) + cfg.gamma
    z = _clamp01(s_bar)
    if not need_grad:
        return z, None
    inside = ((s_bar > 0) & (s_bar < 1)) | s_bar.isnan()  # a NaN gate has a NaN derivative
    dz = torch.where(inside, s * (1 - s) * ((cfg.zeta - cfg.gamma) / cfg.beta), torch.zeros_like(s))
    return z, dz


def eval_gates_and_grad(log_alpha: torch.Tensor, cfg: GateConfig = DEFAULT_CONFIG,
                        need_grad: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Deterministic gate ``z_eval`` and its derivative (0 where clamped, boundaries included)."""
    if _use_cpu_kernel(log_alpha):
        return _cpu_gates(log_alpha, 0, tuple(log_alpha.shape), False, cfg, need_grad)
    la = log_alpha.to(compute_dtype(log_alpha.dtype))
    s = torch.sigmoid(la)
    s_bar = s * (cfg.zeta - cfg.gamma) + cfg.gamma
    z = _clamp01(s_bar)
    if not need_grad:
        return z, None
    inside = ((s_bar > 0) & (s_bar < 1)) | s_bar.isnan()  # a NaN gate has a NaN derivative
    dz = torch.where(inside, s * (1 - s) * (cfg.zeta - cfg.gamma), torch.zeros_like(s))
    return z, dz


def noise_uniform(seed, shape: Sequence[int], device) -> torch.Tensor:
    """``u_raw`` for a noise tensor of ``shape``: offset = row-major flat index (docs/design.md §2)."""
    n = 1
    for d in shape:
        n *= int(d)
    return philox_range(seed, n, device).reshape(tuple(shape))


def sample_gate_tensor(log_alpha: torch.Tensor, seed, shape: Sequence[int], cfg: GateConfig,
                       need_grad: bool = True):
    """Gates ``(z, dz)`` for the noise tensor ``shape`` (trailing dims broadcast with ``log_alpha``)."""
    if _use_cpu_kernel(log_alpha):
        return _cpu_gates(log_alpha, seed, tuple(shape), True, cfg, need_grad)
    u = noise_uniform(seed, shape, log_alpha.device)
    return gates_from_uniform(log_alpha, u, cfg, need_grad)


# The CPU kernel: on CPU tensors whose gate math runs in float32, the backends' gates come from one
# C++ loop (l0kernels._cpu.gates: Philox and the formulas of csrc/l0_gate.cuh) instead of
# about ten whole-tensor torch ops; the same values within float32 rounding of the transcendental
# functions (tests/backends/torch/test_cpu_paths.py compares the two). L0K_CPU_KERNELS=0 turns it off. float64
# always takes the torch ops: that path is the reference that gradcheck checks.
_CPU_GATE_KERNEL = _cpu is not None and hasattr(_cpu, "gates") and config.CPU_KERNELS


def _use_cpu_kernel(log_alpha: torch.Tensor) -> bool:
    return (_CPU_GATE_KERNEL and log_alpha.device.type == "cpu" and log_alpha.dtype != torch.float64
            and not _compiling()  # torch.compile traces the torch ops instead
            and not (log_alpha.requires_grad and torch.is_grad_enabled()))  # the kernel's z is not differentiable


def _cpu_gates(log_alpha: torch.Tensor, seed, shape: Tuple[int, ...], training: bool, cfg: GateConfig,
               need_grad: bool):
    la = log_alpha
    if la.dtype != torch.float32 or not la.is_contiguous():
        la = la.detach().to(torch.float32).contiguous()
    n = math.prod(shape)
    zz = torch.empty((2 if need_grad else 1,) + shape, dtype=torch.float32, device="cpu")  # z and dz in one allocation
    z, dz = zz[0], (zz[1] if need_grad else None)
    if n:
        _cpu.gates(seed_int(seed), training, la.data_ptr(), max(la.numel(), 1), n, z.data_ptr(),
                   dz.data_ptr() if dz is not None else 0, cfg.beta, cfg.gamma, cfg.zeta, cfg.eps)
    return z, dz


def prob_open_t(log_alpha: torch.Tensor, cfg: GateConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """P(z != 0) = sigmoid(log_alpha - beta * log(-gamma/zeta)); differentiable."""
    return torch.sigmoid(log_alpha - cfg.beta * math.log(-cfg.gamma / cfg.zeta))


__all__ = ["GateConfig", "DEFAULT_CONFIG", "gates_from_uniform", "eval_gates_and_grad", "noise_uniform",
           "sample_gate_tensor", "prob_open_t", "check_seed", "compute_dtype", "NOISE_KINDS", "LINEAR_GATES"]
