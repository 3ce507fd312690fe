"""``l0_linear`` on Triton: three tiled GEMM kernels, their launchers and the autograd Function.

Shapes: ``x2 = x.reshape(-1, K)`` is ``(M, K)``, ``W`` is ``(N, K)``, ``y`` is ``(M, N)``. Gates are
drawn inside the kernels from ``(seed, offset)`` with the offsets of docs/design.md §2 (in/out batch:
``g``; sample: ``m*G + g``; weight: ``n*K + k``), so they equal the torch backend's bit for bit in
``u``. Nothing gate-shaped is stored: backward draws the gates again.

Forward, ``_fwd_kernel`` (grid over (M, N) tiles, loop over K, float32 accumulation):
  in-gates scale the x tile as it is loaded, weight gates scale the W tile as it is loaded,
  bias and out-gates are applied in the epilogue.
Backward:
  ``_dx_kernel`` (tiles of (M, K), loop over N): ``dX = dY' @ W'`` with out-gates applied to the
  dY tile and weight gates to the W tile on load; in-gates in the epilogue, where
  ``dlog_alpha_in = sum_m (dY @ W) * x * dz`` is reduced over the tile's rows and added atomically.
  ``_dw_kernel`` (tiles of (N, K), loop over M): ``dW = dY'^T @ x'`` with in-gates applied to x and
  per-example out-gates to dY on load, ``db`` = the column sums of the loaded dY tiles. Epilogue:
  batch/eval out-gates scale the rows and add ``dz[n] * (rowsum(W * dY^T x) + b[n] colsum(dY)[n])``
  to ``dlog_alpha`` (the torch backend's identity); weight gates give ``dW = P * Z`` and
  ``dlog_alpha = P * W * dZ`` element-wise.
  Per-example out-gates need the un-gated output ``h``: ``_fwd_kernel`` runs once more with an
  epilogue that reduces ``sum_m dY * h * dz`` into ``dlog_alpha`` instead of storing ``h``.
Gating on load repeats the draws once per tile of the other GEMM dimension; where that dimension is
large (see ``PREGATE_MIN_TILES``), per-example in-gates (x), weight gates (W) and per-example out-gates
(dY, backward) are instead applied once by ``_pregate_kernel`` into a temporary operand that lives for
the one call. Autograd keeps x, weight, log_alpha, bias and the seed only.

A structure gate's producer (``TritonRowsLinearFunction``, docs/design.md §11) runs the same kernels with
``GATE_ROWS``: the output features of a given open set computed, the others exact zeros, no gate values.

On a GPU the kernels are autotuned (key: M, N, K, the gate mode and the dtypes;
``L0K_TRITON_AUTOTUNE=0`` uses one fixed configuration instead). Under ``TRITON_INTERPRET=1`` one
fixed small configuration is used and half-precision tiles are upcast to float32 before ``tl.dot``
(the interpreter's half-precision dot is not reliable). ``dlog_alpha`` reductions use float32
atomics, so their last bits can differ from run to run on a GPU.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ... import config
from ... import _active
from ..._gates import GateConfig
from ..torch import linear_grads_replayed
from ..torch.structure import rows_grads_replayed
from ._gate_math import gate, seed_tensor, taken_open_set

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

GATE_IN, GATE_OUT, GATE_WEIGHT, GATE_ROWS = 1, 2, 3, 4
_GATE_CODE = {"in": GATE_IN, "out": GATE_OUT, "weight": GATE_WEIGHT, "rows": GATE_ROWS}
EPI_STORE, EPI_DLA_OUT = 0, 1

# Under the interpreter: one small configuration (no autotuning: its timer needs a GPU).
INTERPRET_META = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
# On a GPU with L0K_TRITON_AUTOTUNE=0: one fixed configuration (fast start, no tuning runs).
GPU_DEFAULT_META = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
AUTOTUNE = not INTERPRET and config.TRITON_AUTOTUNE


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group), num_warps=warps,
                         num_stages=stages)


# H100/H200 (sm_90) and A100 (sm_80) friendly tiles; the autotuner keeps the fastest per key. Kept
# short on purpose: every (kernel, gate mode, dtype) compiles each config once (cached on disk after).
GEMM_CONFIGS = [_cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 32, 4, 4)]


def tuned(reset_to_zero=None):
    """``triton.autotune`` on a GPU; the bare kernel under the interpreter or with L0K_TRITON_AUTOTUNE=0
    (the launchers then pass ``launch_meta()``)."""
    def wrap(fn):
        if not AUTOTUNE:
            return fn
        key = [a for a in ("M", "N", "K", "GATE", "SAMPLE", "TRAINING", "OPEN") if a in fn.arg_names]
        return triton.autotune(GEMM_CONFIGS, key=key, reset_to_zero=reset_to_zero)(fn)
    return wrap


def launch_meta():
    if AUTOTUNE:
        return {}
    return dict(INTERPRET_META) if INTERPRET else dict(GPU_DEFAULT_META)


def dot_flags(dtype: torch.dtype, tf32_allowed: Optional[bool] = None):
    """``(DOT_F32, PRECISION)``: upcast tiles to float32 before ``tl.dot`` under the interpreter or for
    float32 inputs; float32 uses TF32 only when PyTorch allows it (``torch.backends.cuda.matmul.allow_tf32``
    for linear, ``torch.backends.cudnn.allow_tf32`` for conv, passed as ``tf32_allowed``)."""
    if tf32_allowed is None:
        tf32_allowed = torch.backends.cuda.matmul.allow_tf32
    if INTERPRET or dtype == torch.float32:
        tf32 = (not INTERPRET) and dtype == torch.float32 and tf32_allowed
        return True, ("tf32" if tf32 else "ieee")
    return False, "ieee"


@triton.jit
def _swizzle(pid, grid_a, grid_b, GROUP: tl.constexpr):
    """Grouped ordering of a 1-D program id over a (grid_a, grid_b) tile grid (L2 reuse)."""
    width = GROUP * grid_b
    group_id = pid // width
    first = group_id * GROUP
    size = tl.minimum(grid_a - first, GROUP)
    pid_a = first + (pid % width) % size
    pid_b = (pid % width) // size
    return pid_a, pid_b


@triton.jit
def _open_tile(idx_ptr, cnt_ptr, pos, L, start, ACTIVE: tl.constexpr):
    """One tile of a gated dimension of length ``L`` at positions ``pos`` (``start`` its first).

    ``ACTIVE`` (the call skips closed groups): positions index the open-set permutation (``idx_ptr``: the
    open features ascending, then the closed ones; ``cnt_ptr``: the open count, read from device memory),
    so the features are ``idx[pos]``. Returns ``(features, valid, open, any_open)``: ``valid`` for stores
    (closed features get their exact zeros there), ``open`` for loads (a closed feature's data is never
    read), ``any_open`` whether the tile holds an open feature. Else the identity: every valid position
    is open."""
    valid = pos < L
    if ACTIVE:
        cnt = tl.load(cnt_ptr)
        feat = tl.load(idx_ptr + pos, mask=valid, other=0)
        return feat, valid, pos < cnt, start < cnt
    else:
        return pos, valid, valid, start < L


@triton.jit
def _load_gate_vec(la_ptr, s_la0, idx, mask, seed, beta, gamma, zeta, eps, TRAINING: tl.constexpr,
                   GSIZE: tl.constexpr):
    """Gates of one vector (``log_alpha`` of shape (G,)) for features ``idx``: gate and noise offset
    ``idx // GSIZE`` (GSIZE features per gate)."""
    gi = idx // GSIZE
    la = tl.load(la_ptr + gi * s_la0, mask=mask, other=0.0)
    return gate(la, seed, gi, beta, gamma, zeta, eps, TRAINING)


@tuned(reset_to_zero=["dla_ptr"])
@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(x_ptr, w_ptr, la_ptr, b_ptr, y_ptr, dy_ptr, dla_ptr, idx_ptr, cnt_ptr,
                M, N, K, seed,
                s_xm, s_xk, s_wn, s_wk, s_la0, s_la1, s_ym, s_yn, s_dym, s_dyn,
                beta, gamma, zeta, eps,
                GATE: tl.constexpr, SAMPLE: tl.constexpr, TRAINING: tl.constexpr, GSIZE: tl.constexpr,
                HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                OPEN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pos_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    k_end = K
    if OPEN and GATE == 1:  # the K loop runs over the open input features only
        k_end = tl.load(cnt_ptr)
    offs_n, mask_n, n_open, n_any = _open_tile(idx_ptr, cnt_ptr, pos_n, N, pid_n * BLOCK_N,
                                               OPEN and (GATE == 2 or GATE == 4))
    if OPEN and (GATE == 2 or GATE == 4):  # a tile of closed output features skips its K loop (and stores zeros)
        k_end = tl.where(n_any, K, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        pos_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        offs_k, _, mask_k, _ = _open_tile(idx_ptr, cnt_ptr, pos_k, K, k0, OPEN and GATE == 1)
        a = tl.load(x_ptr + offs_m[:, None] * s_xm + offs_k[None, :] * s_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * s_wn + offs_k[:, None] * s_wk,
                    mask=n_open[None, :] & mask_k[:, None], other=0.0)  # (BLOCK_K, BLOCK_N) = W^T tile
        if GATE == 1:  # input gates scale the x tile
            la = tl.load(la_ptr + (offs_k // GSIZE) * s_la0, mask=mask_k, other=0.0)
            if SAMPLE:
                z, _ = gate(la[None, :], seed, offs_m[:, None] * (K // GSIZE) + offs_k[None, :] // GSIZE, beta, gamma, zeta, eps,
                            TRAINING)
            else:
                zv, _ = gate(la, seed, offs_k // GSIZE, beta, gamma, zeta, eps, TRAINING)
                z = zv[None, :]
            a = (a.to(tl.float32) * z).to(x_ptr.dtype.element_ty)
        if GATE == 3:  # weight gates scale the W tile
            la = tl.load(la_ptr + offs_n[None, :] * s_la0 + offs_k[:, None] * s_la1,
                         mask=mask_n[None, :] & mask_k[:, None], other=0.0)
            z, _ = gate(la, seed, offs_n[None, :] * K + offs_k[:, None], beta, gamma, zeta, eps, TRAINING)
            b = (b.to(tl.float32) * z).to(w_ptr.dtype.element_ty)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_open, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == 0:
        if GATE == 2:  # output gates scale the result
            la = tl.load(la_ptr + (offs_n // GSIZE) * s_la0, mask=mask_n, other=0.0)
            if SAMPLE:
                z, _ = gate(la[None, :], seed, offs_m[:, None] * (N // GSIZE) + offs_n[None, :] // GSIZE, beta, gamma, zeta, eps,
                            TRAINING)
            else:
                zv, _ = gate(la, seed, offs_n // GSIZE, beta, gamma, zeta, eps, TRAINING)
                z = zv[None, :]
            acc = acc * z
        tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=mask)
    else:  # per-example out-gates, backward: dlog_alpha[n] += sum_m dY * h * dz (h = this tile, un-gated)
        la = tl.load(la_ptr + (offs_n // GSIZE) * s_la0, mask=mask_n, other=0.0)
        _, dz = gate(la[None, :], seed, offs_m[:, None] * (N // GSIZE) + offs_n[None, :] // GSIZE, beta, gamma, zeta, eps, TRAINING)
        dy = tl.load(dy_ptr + offs_m[:, None] * s_dym + offs_n[None, :] * s_dyn, mask=mask, other=0.0)
        h = acc.to(y_ptr.dtype.element_ty).to(tl.float32)  # h rounded as the forward's output dtype
        part = tl.sum(tl.where(mask, dy.to(tl.float32) * h * dz, 0.0), axis=0)
        tl.atomic_add(dla_ptr + offs_n, part, mask=mask_n)


@tuned(reset_to_zero=["dla_ptr"])
@triton.jit(do_not_specialize=["seed"])
def _dx_kernel(dy_ptr, w_ptr, la_ptr, x_ptr, dx_ptr, dla_ptr, idx_ptr, cnt_ptr,
               M, N, K, seed,
               s_dym, s_dyn, s_wn, s_wk, s_la0, s_la1, s_xm, s_xk, s_dxm, s_dxk,
               beta, gamma, zeta, eps,
               GATE: tl.constexpr, SAMPLE: tl.constexpr, TRAINING: tl.constexpr, GSIZE: tl.constexpr,
               STORE_DX: tl.constexpr, NEED_DLA: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
               OPEN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Tiles of dX (M, K); the reduction runs over N. BLOCK_N is the reduction block here.
    pid_m, pid_k = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pos_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_m = offs_m < M
    offs_k, mask_k, k_open, k_any = _open_tile(idx_ptr, cnt_ptr, pos_k, K, pid_k * BLOCK_K, OPEN and GATE == 1)
    n_end = N
    if OPEN and GATE == 1:  # a tile of closed input features skips its N loop (and stores zeros)
        n_end = tl.where(k_any, N, 0)
    if OPEN and (GATE == 2 or GATE == 4):  # the N loop runs over the open output features only
        n_end = tl.load(cnt_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        pos_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        offs_n, _, mask_n, _ = _open_tile(idx_ptr, cnt_ptr, pos_n, N, n0, OPEN and (GATE == 2 or GATE == 4))
        g = tl.load(dy_ptr + offs_m[:, None] * s_dym + offs_n[None, :] * s_dyn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk,
                    mask=mask_n[:, None] & k_open[None, :], other=0.0)
        if GATE == 2:  # output gates scale dY
            la = tl.load(la_ptr + (offs_n // GSIZE) * s_la0, mask=mask_n, other=0.0)
            if SAMPLE:
                z, _ = gate(la[None, :], seed, offs_m[:, None] * (N // GSIZE) + offs_n[None, :] // GSIZE, beta, gamma, zeta, eps,
                            TRAINING)
            else:
                zv, _ = gate(la, seed, offs_n // GSIZE, beta, gamma, zeta, eps, TRAINING)
                z = zv[None, :]
            g = (g.to(tl.float32) * z).to(dy_ptr.dtype.element_ty)
        if GATE == 3:  # weight gates scale W
            la = tl.load(la_ptr + offs_n[:, None] * s_la0 + offs_k[None, :] * s_la1,
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            z, _ = gate(la, seed, offs_n[:, None] * K + offs_k[None, :], beta, gamma, zeta, eps, TRAINING)
            w = (w.to(tl.float32) * z).to(w_ptr.dtype.element_ty)
        if DOT_F32:
            acc += tl.dot(g.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(g, w)
    mask = mask_m[:, None] & mask_k[None, :]
    if GATE == 1:  # input gates: dX = (dY @ W) * z, dlog_alpha = sum_m (dY @ W) * x * dz
        la = tl.load(la_ptr + (offs_k // GSIZE) * s_la0, mask=mask_k, other=0.0)
        if SAMPLE:
            z, dz = gate(la[None, :], seed, offs_m[:, None] * (K // GSIZE) + offs_k[None, :] // GSIZE, beta, gamma, zeta, eps,
                         TRAINING)
        else:
            zv, dzv = gate(la, seed, offs_k // GSIZE, beta, gamma, zeta, eps, TRAINING)
            z = zv[None, :]
            dz = dzv[None, :]
        if NEED_DLA:
            gq = acc.to(dx_ptr.dtype.element_ty).to(tl.float32)  # dY @ W rounded as the torch backend's
            x = tl.load(x_ptr + offs_m[:, None] * s_xm + offs_k[None, :] * s_xk,
                        mask=mask_m[:, None] & k_open[None, :], other=0.0)
            part = tl.sum(tl.where(mask, gq * x.to(tl.float32) * dz, 0.0), axis=0)
            tl.atomic_add(dla_ptr + offs_k, part, mask=mask_k)
        acc = acc * z
    if STORE_DX:
        tl.store(dx_ptr + offs_m[:, None] * s_dxm + offs_k[None, :] * s_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=mask)


@tuned(reset_to_zero=["dla_ptr"])
@triton.jit(do_not_specialize=["seed"])
def _dw_kernel(dy_ptr, x_ptr, la_ptr, w_ptr, b_ptr, dw_ptr, db_ptr, dla_ptr, idx_ptr, cnt_ptr,
               M, N, K, seed,
               s_dym, s_dyn, s_xm, s_xk, s_la0, s_la1, s_wn, s_wk, s_dwn, s_dwk, s_dla0, s_dla1,
               beta, gamma, zeta, eps,
               GATE: tl.constexpr, SAMPLE: tl.constexpr, TRAINING: tl.constexpr, GSIZE: tl.constexpr,
               HAS_BIAS: tl.constexpr, STORE_DW: tl.constexpr, STORE_DB: tl.constexpr, NEED_DLA: tl.constexpr,
               DOT_F32: tl.constexpr, PRECISION: tl.constexpr, OPEN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Tiles of dW (N, K); the reduction runs over M. BLOCK_M is the reduction block here.
    pid_n, pid_k = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.maximum(tl.cdiv(K, BLOCK_K), 1), GROUP_M)
    pos_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    pos_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_n, mask_n, n_open, n_any = _open_tile(idx_ptr, cnt_ptr, pos_n, N, pid_n * BLOCK_N,
                                               OPEN and (GATE == 2 or GATE == 4))
    offs_k, mask_k, k_open, k_any = _open_tile(idx_ptr, cnt_ptr, pos_k, K, pid_k * BLOCK_K, OPEN and GATE == 1)
    first = (pos_n * 0 + pid_k) == 0  # the programs of the first K tile also write db and the bias term
    m_end = M
    if OPEN and GATE == 1:  # closed input features: no M loop, except in the first K tile (db)
        m_end = tl.where(k_any | (pid_k == 0), M, 0)
    if OPEN and (GATE == 2 or GATE == 4):  # closed output features: no M loop (dW, db, dlog_alpha are zero)
        m_end = tl.where(n_any, M, 0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        g = tl.load(dy_ptr + offs_m[None, :] * s_dym + offs_n[:, None] * s_dyn,
                    mask=mask_m[None, :] & n_open[:, None], other=0.0)  # (BLOCK_N, BLOCK_M) = dY^T tile
        a = tl.load(x_ptr + offs_m[:, None] * s_xm + offs_k[None, :] * s_xk,
                    mask=mask_m[:, None] & k_open[None, :], other=0.0)
        if GATE == 1:  # input gates scale x
            la = tl.load(la_ptr + (offs_k // GSIZE) * s_la0, mask=mask_k, other=0.0)
            if SAMPLE:
                z, _ = gate(la[None, :], seed, offs_m[:, None] * (K // GSIZE) + offs_k[None, :] // GSIZE, beta, gamma, zeta, eps,
                            TRAINING)
            else:
                zv, _ = gate(la, seed, offs_k // GSIZE, beta, gamma, zeta, eps, TRAINING)
                z = zv[None, :]
            a = (a.to(tl.float32) * z).to(x_ptr.dtype.element_ty)
        if GATE == 2:
            if SAMPLE:  # per-example output gates scale dY
                la = tl.load(la_ptr + (offs_n // GSIZE) * s_la0, mask=mask_n, other=0.0)
                z, _ = gate(la[:, None], seed, offs_m[None, :] * (N // GSIZE) + offs_n[:, None] // GSIZE, beta, gamma, zeta, eps,
                            TRAINING)
                g = (g.to(tl.float32) * z).to(dy_ptr.dtype.element_ty)
        colsum += tl.sum(g.to(tl.float32), axis=1)
        if DOT_F32:
            acc += tl.dot(g.to(tl.float32), a.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(g, a)
    mask = mask_n[:, None] & mask_k[None, :]
    db = colsum
    if GATE == 2:
        if not SAMPLE:  # batch/eval output gates: dW = P * z[n]; the rowsum identity for dlog_alpha
            zv, dzv = _load_gate_vec(la_ptr, s_la0, offs_n, mask_n, seed, beta, gamma, zeta, eps, TRAINING, GSIZE)
            if NEED_DLA:
                p = acc.to(dw_ptr.dtype.element_ty).to(tl.float32)
                w = tl.load(w_ptr + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk,
                            mask=n_open[:, None] & mask_k[None, :], other=0.0)
                hdy = tl.sum(tl.where(mask, w.to(tl.float32) * p, 0.0), axis=1)
                if HAS_BIAS:
                    bias = tl.load(b_ptr + offs_n, mask=n_open, other=0.0).to(tl.float32)
                    hdy += tl.where(first, bias * colsum, 0.0)
                tl.atomic_add(dla_ptr + offs_n * s_dla0, hdy * dzv, mask=mask_n)
            acc = acc * zv[:, None]
            db = colsum * zv
    if GATE == 3:  # weight gates: dW = P * Z, dlog_alpha = P * W * dZ
        la = tl.load(la_ptr + offs_n[:, None] * s_la0 + offs_k[None, :] * s_la1, mask=mask, other=0.0)
        z, dz = gate(la, seed, offs_n[:, None] * K + offs_k[None, :], beta, gamma, zeta, eps, TRAINING)
        if NEED_DLA:
            p = acc.to(dw_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk, mask=mask, other=0.0)
            tl.store(dla_ptr + offs_n[:, None] * s_dla0 + offs_k[None, :] * s_dla1, p * w.to(tl.float32) * dz,
                     mask=mask)
        acc = acc * z
    if STORE_DW:
        tl.store(dw_ptr + offs_n[:, None] * s_dwn + offs_k[None, :] * s_dwk, acc.to(dw_ptr.dtype.element_ty),
                 mask=mask)
    if STORE_DB:
        tl.store(db_ptr + offs_n, db.to(db_ptr.dtype.element_ty), mask=mask_n & first)


@triton.jit(do_not_specialize=["seed"])
def _pregate_kernel(a_ptr, la_ptr, out_ptr, R, C, seed, s_ar, s_ac, s_la0, s_la1, s_or, s_oc,
                    beta, gamma, zeta, eps, PER_ELEMENT: tl.constexpr, TRAINING: tl.constexpr, GSIZE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out[r, c] = a[r, c] * z`` with the gate at offset ``r*C + c``: per-example gates (``log_alpha[c]``)
    or weight gates (``log_alpha[r, c]``, PER_ELEMENT). One Philox draw per element. With ``GSIZE`` columns
    per gate (per-example gates only): ``log_alpha[c // GSIZE]`` at offset ``r*(C/GSIZE) + c // GSIZE``."""
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_c = offs_c < C
    mask = (offs_r < R)[:, None] & mask_c[None, :]
    a = tl.load(a_ptr + offs_r[:, None] * s_ar + offs_c[None, :] * s_ac, mask=mask, other=0.0)
    if PER_ELEMENT:
        la = tl.load(la_ptr + offs_r[:, None] * s_la0 + offs_c[None, :] * s_la1, mask=mask, other=0.0)
    else:
        la = tl.load(la_ptr + (offs_c // GSIZE) * s_la0, mask=mask_c, other=0.0)[None, :]
    z, _ = gate(la, seed, offs_r[:, None] * (C // GSIZE) + offs_c[None, :] // GSIZE, beta, gamma, zeta, eps, TRAINING)
    out = (a.to(tl.float32) * z).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_r[:, None] * s_or + offs_c[None, :] * s_oc, out, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def rows(x: torch.Tensor) -> int:
    """Rows of ``x.reshape(-1, K)`` (also when K == 0)."""
    r = 1
    for d in x.shape[:-1]:
        r *= d
    return r


def _la_strides(la: torch.Tensor):
    return (la.stride(0), la.stride(1)) if la.dim() == 2 else (la.stride(0), 0)


def _gemm_grid(a: int, b: int, block_a: str, block_b: str):
    return lambda meta: (triton.cdiv(a, meta[block_a]) * max(triton.cdiv(b, meta[block_b]), 1),)


# Gating an operand as it is loaded repeats the Philox draws once per tile of the other GEMM dimension
# (per-example in-gates: once per N tile; weight gates: once per M tile; per-example out-gates on dY in
# backward: once per K tile). Where that dimension spans more than PREGATE_MIN_TILES tiles of 64, the
# operand is gated once by ``_pregate_kernel`` into a temporary (freed after the call, never saved for
# backward) and the GEMM runs without gates. -1 turns this off (always gate on load).
PREGATE_MIN_TILES = config.TRITON_PREGATE_TILES


def _pregate_pays(other_dim: int) -> bool:
    return PREGATE_MIN_TILES >= 0 and triton.cdiv(other_dim, 64) > PREGATE_MIN_TILES


def pregate(a, log_alpha, seed, training, cfg, per_element, group_size=1):
    """``a * z`` for a 2-D operand (rows = examples or output features), in ``a``'s dtype."""
    r, c = a.shape
    out = torch.empty((r, c), dtype=a.dtype, device=a.device)
    if r and c:
        br, bc = (16, 16) if INTERPRET else (32, 128)
        _pregate_kernel[(triton.cdiv(r, br), triton.cdiv(c, bc))](
            a, log_alpha, out, r, c, seed_tensor(seed, a), a.stride(0), a.stride(1), *_la_strides(log_alpha),
            out.stride(0), out.stride(1), cfg.beta, cfg.gamma, cfg.zeta, cfg.eps, PER_ELEMENT=per_element,
            TRAINING=bool(training), GSIZE=group_size, BLOCK_R=br, BLOCK_C=bc)
    return out


def open_set_reasons(gate_name: str, sample: bool, training: bool) -> List[str]:
    """Why a call may not run over the open set of its gates (``_active``'s device route); empty where it may:
    training with one gate vector (``noise="batch"``) and input or output gates, ``L0K_SKIP_CLOSED`` on. It
    does once the layer's open fraction is at most ``_gate_math.SKIP_BELOW`` (:func:`_open_args`)."""
    out = _active.call_reasons(training, sample)
    if gate_name not in ("in", "out"):
        out.append("gate='weight': every weight has its own gate, no group to skip")
    return out


def skips_closed(gate_name: str, sample: bool, training: bool) -> bool:
    """True where the call may run over the open set of its gates (:func:`open_set_reasons` gives none)."""
    return not open_set_reasons(gate_name, sample, training)


def _open_args(log_alpha, seed, cfg, group_size, dummy, direction, gate_name, sample, training):
    """``(open, idx_ptr, cnt_ptr)``: whether the kernels run over the open set (:func:`skips_closed` and the
    open-fraction rule, ``_gate_math.taken_open_set``; counted in ``_active.PATHS``) and its index and count
    drawn from ``seed``, else unused pointers."""
    os_ = taken_open_set(log_alpha, seed, cfg, group_size, direction == "fwd") \
        if skips_closed(gate_name, sample, training) else None
    if training and not sample and gate_name in ("in", "out"):
        _active.count_path("linear-" + gate_name, direction, "skip" if os_ is not None else "dense")
    return (False, dummy, dummy) if os_ is None else (True, os_.index, os_.count)


def linear_forward(x2, weight, log_alpha, bias, seed, gate_name, sample, training, cfg, group_size=1,
                   row_set=None):
    """``y`` (M, N) for ``x2`` (M, K). ``sample`` means per-example gates (training only); ``group_size``
    input/output features per gate (the kernels read gate ``k // group_size`` for feature ``k``). With
    :func:`skips_closed` the GEMM runs over the open features only and closed ones get exact zeros.
    ``gate_name="rows"`` (a structure gate's producer): no gates, the rows of ``row_set`` (an
    :class:`l0kernels._active.OpenSet`) computed, the others exact zeros; ``log_alpha`` is not read."""
    m, k = x2.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    dot_f32, prec = dot_flags(x2.dtype)
    seed = seed_tensor(seed if training else None, x2)
    b = bias if bias is not None else y
    code = _GATE_CODE[gate_name]
    if code == GATE_ROWS:
        open_, idx, cnt = True, row_set.index, row_set.count
    else:
        open_, idx, cnt = _open_args(log_alpha, seed, cfg, group_size, y, "fwd", gate_name, sample, training) \
            if code != GATE_WEIGHT else (False, y, y)
    if code == GATE_IN and sample and _pregate_pays(n):
        x2, code = pregate(x2, log_alpha, seed, training, cfg, False, group_size), 0
    elif code == GATE_WEIGHT and _pregate_pays(m):
        weight, code = pregate(weight, log_alpha, seed, training, cfg, True), 0
    _fwd_kernel[_gemm_grid(m, n, "BLOCK_M", "BLOCK_N")](
        x2, weight, log_alpha, b, y, y, y, idx, cnt, m, n, k, seed,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), *_la_strides(log_alpha),
        y.stride(0), y.stride(1), 0, 0, cfg.beta, cfg.gamma, cfg.zeta, cfg.eps,
        GATE=code, SAMPLE=bool(sample), TRAINING=bool(training), GSIZE=group_size, HAS_BIAS=bias is not None,
        EPILOGUE=EPI_STORE, DOT_F32=dot_f32, PRECISION=prec, OPEN=open_, **launch_meta())
    return y


def linear_backward(dy, x2, weight, log_alpha, bias, seed, gate_name, sample, training, cfg,
                    need_x=True, need_w=True, need_la=True, need_b=True, group_size=1, row_set=None):
    """``(dx2, dW, dlog_alpha, db)``; entries not asked for are None. ``dy`` is (M, N), any strides.
    With ``group_size > 1`` the kernels reduce ``dlog_alpha`` per feature and it is summed per gate here.
    ``gate_name="rows"``: the backward of :func:`linear_forward`'s rows form (``need_la`` must be False)."""
    m, k = x2.shape
    n = weight.shape[0]
    dev = x2.device
    code = _GATE_CODE[gate_name]
    need_b = need_b and bias is not None
    dot_f32, prec = dot_flags(x2.dtype)
    seed = seed_tensor(seed if training else None, x2)
    consts = (cfg.beta, cfg.gamma, cfg.zeta, cfg.eps)
    las = _la_strides(log_alpha)
    dx = torch.empty((m, k), dtype=x2.dtype, device=dev) if need_x else None
    dw = torch.empty((n, k), dtype=weight.dtype, device=dev) if need_w else None
    db = torch.empty((n,), dtype=bias.dtype, device=dev) if need_b else None
    dla32 = None
    if need_la:
        # per feature (k or n entries) when grouped: summed per gate at the end
        dla_shape = log_alpha.shape if group_size == 1 else (log_alpha.shape[0] * group_size,)
        dla32 = torch.zeros(dla_shape, dtype=torch.float32, device=dev)
    if m == 0 or n == 0:  # empty reductions: the gradients that exist are zeros
        for t in (dx, dw, db):
            if t is not None:
                t.zero_()
        return dx, dw, (torch.zeros_like(log_alpha) if need_la else None), db
    dummy = x2  # pointer for arguments a kernel does not touch
    # the open set drawn again from the seed (as the gates are): nothing gate-shaped is kept from forward
    if code == GATE_ROWS:
        open_, idx, cnt = True, row_set.index, row_set.count
    else:
        open_, idx, cnt = _open_args(log_alpha, seed, cfg, group_size, dummy, "bwd", gate_name, sample, training) \
            if code != GATE_WEIGHT else (False, dummy, dummy)
    flags = dict(GATE=code, SAMPLE=bool(sample), TRAINING=bool(training), GSIZE=group_size, DOT_F32=dot_f32,
                 PRECISION=prec, OPEN=open_)
    unused_dla = torch.empty((1,), dtype=torch.float32, device=dev)  # the autotuner zeroes dla_ptr: never x2
    # dX, and dlog_alpha of input gates
    in_dla = need_la and code == GATE_IN
    # per-example out-gates: gate dY once if its K tiles would repeat the draws too often
    dy_g, gate_dy = dy, code
    if code == GATE_OUT and sample and _pregate_pays(k) and (need_x or need_w or need_b):
        dy_g, gate_dy = pregate(dy, log_alpha, seed, training, cfg, False, group_size), 0
    if (need_x or in_dla) and k > 0:
        out = dx if need_x else dummy
        dla = dla32 if in_dla else unused_dla
        w_g, gate_dx = weight, gate_dy
        if code == GATE_WEIGHT and _pregate_pays(m):
            w_g, gate_dx = pregate(weight, log_alpha, seed, training, cfg, True), 0
        _dx_kernel[_gemm_grid(m, k, "BLOCK_M", "BLOCK_K")](
            dy_g, w_g, log_alpha, x2, out, dla, idx, cnt, m, n, k, seed,
            dy_g.stride(0), dy_g.stride(1), w_g.stride(0), w_g.stride(1), *las, x2.stride(0), x2.stride(1),
            out.stride(0), out.stride(1), *consts, STORE_DX=need_x, NEED_DLA=in_dla, **dict(flags, GATE=gate_dx),
            **launch_meta())
    # dW, db, and dlog_alpha of batch/eval output gates and weight gates
    w_dla = need_la and (code == GATE_WEIGHT or (code == GATE_OUT and not sample))
    if need_w or need_b or w_dla:
        out = dw if need_w else dummy
        dla = dla32 if w_dla else unused_dla
        dla_s = las if dla32 is None else _la_strides(dla32)
        x_g, gate_dw = x2, gate_dy
        if code == GATE_IN and sample and _pregate_pays(n):
            x_g, gate_dw = pregate(x2, log_alpha, seed, training, cfg, False, group_size), 0
        _dw_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * max(triton.cdiv(k, meta["BLOCK_K"]), 1),)](
            dy_g, x_g, log_alpha, weight, bias if bias is not None else dummy, out, db if need_b else dummy, dla,
            idx, cnt, m, n, k, seed, dy_g.stride(0), dy_g.stride(1), x_g.stride(0), x_g.stride(1), *las,
            weight.stride(0), weight.stride(1), out.stride(0), out.stride(1), *dla_s, *consts,
            HAS_BIAS=bias is not None, STORE_DW=need_w, STORE_DB=need_b, NEED_DLA=w_dla, **dict(flags, GATE=gate_dw),
            **launch_meta())
    # dlog_alpha of per-example output gates: recompute h tile by tile, reduce dY * h * dz
    if need_la and code == GATE_OUT and sample:
        _fwd_kernel[_gemm_grid(m, n, "BLOCK_M", "BLOCK_N")](
            x2, weight, log_alpha, bias if bias is not None else dummy, dummy, dy, dla32, idx, cnt, m, n, k, seed,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), *las, 0, 0,
            dy.stride(0), dy.stride(1), *consts, HAS_BIAS=bias is not None, EPILOGUE=EPI_DLA_OUT,
            **flags, **launch_meta())
    if need_la and group_size != 1:
        dla32 = dla32.view(-1, group_size).sum(1)
    return dx, dw, (dla32.to(log_alpha.dtype) if need_la else None), db


class TritonL0LinearFunction(torch.autograd.Function):
    """``l0_linear`` on the Triton backend: ``apply(x, weight, log_alpha, bias, seed, gate, noise, training, cfg[,
    group_size])``.

    Saves x, weight, log_alpha, bias (and the seed); backward regenerates the gates.
    """

    @staticmethod
    def forward(ctx, x, weight, log_alpha, bias, seed, gate_name, noise, training, cfg, group_size=1):
        n, k = weight.shape
        x2 = x.reshape(rows(x), k)
        sample = training and noise == "sample"
        y = linear_forward(x2, weight, log_alpha, bias, seed, gate_name, sample, training, cfg, group_size)
        ctx.save_for_backward(x, weight, log_alpha, bias)
        ctx.conf = (seed, gate_name, sample, training, cfg, group_size)
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x, weight, log_alpha, bias = ctx.saved_tensors
        seed, gate_name, sample, training, cfg, group_size = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True: the reference formula through autograd
            return linear_grads_replayed(dy, x, weight, log_alpha, bias, seed, gate_name,
                                         "sample" if sample else "batch", training, cfg, group_size,
                                         ctx.needs_input_grad) + (None,) * 6
        n, k = weight.shape
        x2 = x.reshape(rows(x), k)
        need_x, need_w, need_la, need_b = ctx.needs_input_grad[:4]
        dy2 = dy.reshape(x2.shape[0], n)
        dx, dw, dla, db = linear_backward(dy2, x2, weight, log_alpha, bias, seed, gate_name, sample,
                                          training, cfg, need_x, need_w, need_la, need_b, group_size)
        if dx is not None:
            dx = dx.reshape(x.shape)
        return dx, dw, dla, db, None, None, None, None, None, None


class TritonRowsLinearFunction(torch.autograd.Function):
    """A structure gate's producer over its open rows (docs/design.md §11): ``apply(x, weight, bias, index,
    count)`` with ``(index, count)`` the open set of rows (:class:`l0kernels._active.OpenSet`). ``y[..., n] =
    x @ W[n] + b[n]`` for the open rows, exact zeros for the others; the kernels of ``l0_linear``'s output gates
    over the open set (``GATE_ROWS``: no gate values, the block's consumer applies ``z``). Backward over the
    same rows: ``dx`` reads the open rows of ``W`` only, ``dW`` and ``db`` are zeros in the closed rows. Nothing
    is read on the host."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, count):
        n, k = weight.shape
        x2 = x.reshape(rows(x), k)
        y = linear_forward(x2, weight, weight, bias, None, "rows", False, False, GateConfig(), 1,
                           _active.OpenSet(index, count))
        ctx.save_for_backward(x, weight, bias, index, count)
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, index, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the definition through autograd
            return rows_grads_replayed(dy, x, weight, bias, index, count, (need_x, need_w, need_b)) + (None, None)
        n, k = weight.shape
        x2 = x.reshape(rows(x), k)
        dx, dw, _, db = linear_backward(dy.reshape(x2.shape[0], n), x2, weight, weight, bias, None, "rows", False,
                                        False, GateConfig(), need_x, need_w, False, need_b, 1,
                                        _active.OpenSet(index, count))
        return (dx.reshape(x.shape) if dx is not None else None), dw, db, None, None


def triton_linear(x, weight, log_alpha, bias: Optional[torch.Tensor], seed, gate_name, noise, training, cfg,
                  group_size=1):
    return TritonL0LinearFunction.apply(x, weight, log_alpha, bias, seed, gate_name, noise, training, cfg, group_size)
