"""Hard-concrete gate math of docs/design.md §1 as ``@triton.jit`` helpers: the one Triton copy.

Every Triton kernel of l0kernels draws its gates through :func:`gate`. The uniform draw is
``tl.rand(seed, offset)`` (Philox4x32-10, docs/design.md §2); ``offset`` must be an int64 tensor so
that offsets >= 2**32 reach the counter's high word. All math runs in float32.

The seed reaches the kernels as a pointer to a 0-d int64 tensor on the device (docs/design.md §10), loaded
in the kernel (its low 63 bits are the key): a seed drawn on the device by a tensor op is read there,
with no host sync, and a CUDA graph replays the load, not a value captured at launch. Host code turns
a seed into that tensor with :func:`seed_tensor`; in eval the kernels never read it.

Non-finite ``log_alpha`` (docs/design.md §6): the clamps keep a NaN (``tl.maximum`` alone would return 0
for it on a GPU), so a NaN gives ``z = dz = NaN``, +inf ``z = 1`` and -inf ``z = 0``.

:func:`open_set` finds the open features of one training gate vector on the device (see
:mod:`l0kernels._active`). :func:`triton_gates` launches a tiny kernel that evaluates the helpers for given offsets; the
tests compare it with ``l0kernels._gates.gates_from_uniform(log_alpha, philox_uniform(seed, offsets))``.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ... import config
from ... import _active
from ..._philox import seed_on


def seed_tensor(seed, ref: torch.Tensor) -> torch.Tensor:
    """The seed argument of a kernel: a 0-d int64 tensor on ``ref``'s device (a tensor seed as it is, moved
    if on another device; an int filled in on the device, no host-to-device copy). ``None`` (eval) gives
    ``ref`` itself: the kernels do not read the seed in eval."""
    return ref if seed is None else seed_on(seed, ref.device)


@triton.jit
def uniform(seed_ptr, offset):
    """``u_raw(seed, offset)`` of docs/design.md §2 (``offset`` int64) for the seed at ``seed_ptr``."""
    return tl.rand(tl.load(seed_ptr) & 0x7FFFFFFFFFFFFFFF, offset)


@triton.jit
def _clamp01(v):
    """``clamp(v, 0, 1)`` keeping a NaN, as ``torch.clamp`` (the reference)."""
    return tl.where(v != v, v, tl.minimum(tl.maximum(v, 0.0), 1.0))


@triton.jit
def hard_concrete(log_alpha, u, beta, gamma, zeta, eps):
    """Training gate ``z`` and ``dz/dlog_alpha`` from a raw uniform ``u`` (0 where clamped)."""
    u = tl.minimum(tl.maximum(u, eps), 1.0 - eps)
    t = (tl.log(u) - tl.log(1.0 - u) + log_alpha) / beta
    s = 1.0 / (1.0 + tl.exp(-t))
    s_bar = s * (zeta - gamma) + gamma
    z = _clamp01(s_bar)
    dz = tl.where(((s_bar > 0.0) & (s_bar < 1.0)) | (s_bar != s_bar), s * (1.0 - s) * ((zeta - gamma) / beta), 0.0)
    return z, dz


@triton.jit
def eval_gate(log_alpha, gamma, zeta):
    """Deterministic test-time gate ``z_eval`` and its derivative (0 where clamped)."""
    s = 1.0 / (1.0 + tl.exp(-log_alpha))
    s_bar = s * (zeta - gamma) + gamma
    z = _clamp01(s_bar)
    dz = tl.where(((s_bar > 0.0) & (s_bar < 1.0)) | (s_bar != s_bar), s * (1.0 - s) * (zeta - gamma), 0.0)
    return z, dz


@triton.jit
def gate(log_alpha, seed, offset, beta, gamma, zeta, eps, TRAINING: tl.constexpr):
    """``(z, dz)`` for a block of gates: sampled at ``(seed, offset)`` in training (``seed``: the pointer of
    :func:`seed_tensor`), ``z_eval`` else."""
    la = log_alpha.to(tl.float32)
    if TRAINING:
        z, dz = hard_concrete(la, uniform(seed, offset), beta, gamma, zeta, eps)
    else:
        z, dz = eval_gate(la, gamma, zeta)
    return z, dz


@triton.jit(do_not_specialize=["seed"])
def _gates_kernel(la_ptr, off_ptr, z_ptr, dz_ptr, n, seed, beta, gamma, zeta, eps,
                  TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    la = tl.load(la_ptr + i, mask=mask, other=0.0)
    off = tl.load(off_ptr + i, mask=mask, other=0)
    z, dz = gate(la, seed, off, beta, gamma, zeta, eps, TRAINING)
    tl.store(z_ptr + i, z, mask=mask)
    tl.store(dz_ptr + i, dz, mask=mask)


def triton_gates(log_alpha: torch.Tensor, seed, offsets: torch.Tensor, cfg, training: bool = True):
    """``(z, dz)`` in float32 from the Triton helpers, one per element of ``log_alpha``/``offsets``
    (same shape). ``seed``: an int or a 0-d int64 tensor. In eval (``training=False``) ``seed``/``offsets``
    are unused."""
    la = log_alpha.contiguous().reshape(-1)
    off = offsets.to(device=la.device, dtype=torch.int64).contiguous().reshape(-1)
    if la.numel() != off.numel():
        raise ValueError(f"log_alpha and offsets must have the same number of elements, got "
                         f"{la.numel()} and {off.numel()}")
    z = torch.empty(la.shape, dtype=torch.float32, device=la.device)
    dz = torch.empty_like(z)
    n = la.numel()
    if n:
        block = 128
        _gates_kernel[(triton.cdiv(n, block),)](la, off, z, dz, n, seed_tensor(seed, la), cfg.beta, cfg.gamma, cfg.zeta,
                                                 cfg.eps, TRAINING=training, BLOCK=block)
    return z.reshape(log_alpha.shape), dz.reshape(log_alpha.shape)


@triton.jit(do_not_specialize=["seed"])
def _closed_kernel(la_ptr, s_la0, out_ptr, F, seed, beta, gamma, zeta, eps, GSIZE: tl.constexpr,
                   BLOCK: tl.constexpr):
    """``out[f] = (z == 0)`` for the training gate of feature ``f`` (gate and offset ``f // GSIZE``)."""
    f = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = f < F
    la = tl.load(la_ptr + (f // GSIZE) * s_la0, mask=mask, other=0.0)
    z, _ = gate(la, seed, f // GSIZE, beta, gamma, zeta, eps, True)
    tl.store(out_ptr + f, (z == 0.0).to(tl.uint8), mask=mask)


def open_set(log_alpha: torch.Tensor, seed: torch.Tensor, cfg, group_size: int = 1) -> "_active.OpenSet":
    """The device open set (:class:`l0kernels._active.OpenSet`) of the training gates drawn from ``seed``
    (the kernels' seed tensor) for a gate vector ``log_alpha`` (``(G,)``), per feature (``G * group_size``):
    one gate kernel and a stable sort, no host-device synchronisation, fixed shapes (CUDA-graph safe)."""
    f = log_alpha.shape[0] * group_size
    closed = torch.empty((f,), dtype=torch.uint8, device=log_alpha.device)
    if f:
        block = 128
        _closed_kernel[(triton.cdiv(f, block),)](log_alpha, log_alpha.stride(0), closed, f, seed, cfg.beta, cfg.gamma,
                                                 cfg.zeta, cfg.eps, GSIZE=group_size, BLOCK=block)
    return _active.open_set_of_closed(closed)


# The open-set kernels gather their operands through the index (no contiguous tile loads), which the dense
# kernels do not: a layer takes them once its open fraction is at most SKIP_BELOW (1.0: always; the rule is
# l0kernels._active.takes_open_set, shared with the CUDA backend). 0.5 is a guess until measured on a GPU
# (bench/train_step.py --gpu runs the "triton" rows with SKIP_BELOW = 1.0 beside "triton-noskip").
SKIP_BELOW = config.TRITON_SKIP_BELOW


def fraction_reasons(log_alpha: torch.Tensor):
    """Why a training call of this layer does not take the open-set kernels now, as far as its open fraction
    and :data:`SKIP_BELOW` go (:func:`l0kernels._active.fraction_reasons`); empty where it does."""
    return _active.fraction_reasons(log_alpha, SKIP_BELOW, "L0K_TRITON_SKIP_BELOW")


def taken_open_set(log_alpha: torch.Tensor, seed: torch.Tensor, cfg, group_size: int, forward: bool):
    """For a call that may skip closed groups: its device open set where it takes the open-set kernels
    (:data:`SKIP_BELOW`, :func:`l0kernels._active.taken_open_set`), else None; the backward (``forward=False``)
    takes the forward's decision."""
    return _active.taken_open_set(lambda: open_set(log_alpha, seed, cfg, group_size), log_alpha,
                                  log_alpha.shape[0] * group_size, SKIP_BELOW, forward)
