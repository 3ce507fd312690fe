"""Triton eval-mode kernels for gated linear layers with the zero-gated groups skipped.

They run a :class:`l0kernels.backends._plans.LinearPlan` (compact, gate-prescaled weight; optional
active-column list ``in_idx`` and active-row list ``out_idx``):

* ``_sparse_gemm_kernel``: tiles of ``y[:, out_idx] = x[:, in_idx] @ Wc.T + bc`` with ``tl.dot``; the
  gather of ``x``'s active columns happens in the K-loop loads (``x`` is never copied) and the tile is
  stored straight into the scattered output columns.
* ``_sparse_gemv_kernel``: the same for 1-16 rows, without ``tl.dot`` (its 16-row minimum would waste
  most of the tile): each program keeps all rows and a block of output features, so every weight element
  is read once per call.

On a GPU both kernels' tiles are autotuned once per shape (``L0K_TRITON_AUTOTUNE=0``: fixed tiles), the
GEMV's among configurations pruned to what its row count fits in registers.
Outputs that are not computed (zeros for closed output gates, the ungated bias for all-zero rows of
weight gates) are written by extra programs of the same launch, from the plan's ``idle_idx``
(:func:`sparse_linear` pre-fills instead for a plan without it). Accumulation is in float32; float32 inputs use
``input_precision="ieee"`` (docs/design.md §6 asks 1e-5 against float64). Under ``TRITON_INTERPRET=1``
the dot inputs are upcast to float32 (the interpreter's bfloat16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from ... import config

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_ROWS = 16
# the kernels below are interpreted when TRITON_INTERPRET=1 was set before this module was imported
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# On a GPU the tiles are autotuned once per shape (L0K_TRITON_AUTOTUNE=0: the fixed tiles below).
AUTOTUNE = not INTERPRET and config.TRITON_AUTOTUNE


def _gemv_cfg(bn, bk, warps):
    return triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=warps)


# GEMV tiles (BLOCK_N outputs x BLOCK_K of K per step): wider K steps keep more of W in flight per
# program, narrower N gives more programs for small N. Pruned per call so that the (rows, BLOCK_N,
# BLOCK_K) product tile stays within about 128 floats per thread.
GEMV_CONFIGS = [_gemv_cfg(32, 32, 4), _gemv_cfg(16, 32, 4), _gemv_cfg(16, 64, 4), _gemv_cfg(32, 64, 4),
                _gemv_cfg(8, 128, 4), _gemv_cfg(16, 128, 8), _gemv_cfg(32, 128, 8), _gemv_cfg(8, 256, 8)]
GEMM_CONFIGS = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
                for bm, bn, bk, w, st in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                          (64, 64, 32, 4, 4)]]


def _gemv_tile_fits(cfg, block_m) -> bool:
    return block_m * cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"] <= 128 * 32 * cfg.num_warps


def _prune_gemv(configs, named_args, **kwargs):
    fits = [c for c in configs if _gemv_tile_fits(c, kwargs["BLOCK_M"])]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def _tuned(configs, key, prune=None):
    def wrap(fn):
        if not AUTOTUNE:
            return fn
        return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune} if prune else None)(fn)
    return wrap


@triton.jit
def _idle_program(y_ptr, idle_ptr, fill_ptr, rm, m_ok, pid_n, N, N_IDLE, stride_ym, stride_yn,
                  HAS_FILL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether program column ``pid_n`` is past the computed outputs; such a program writes the idle
    outputs ``idle_ptr[(pid_n - cdiv(N, BLOCK_N)) * BLOCK_N + i]`` of rows ``rm`` (the fill value, or zero)."""
    nb = tl.cdiv(N, BLOCK_N)
    if pid_n >= nb:
        _store_idle(y_ptr, idle_ptr, fill_ptr, rm, m_ok, pid_n - nb, N_IDLE, stride_ym, stride_yn, HAS_FILL,
                    BLOCK_N)
    return pid_n >= nb


@triton.jit
def _store_idle(y_ptr, idle_ptr, fill_ptr, rm, m_ok, blk, N_IDLE, stride_ym, stride_yn,
                HAS_FILL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Idle outputs ``idle_ptr[blk * BLOCK_N + i]`` of rows ``rm``: the fill value, or zero."""
    ri = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = ri < N_IDLE
    col = tl.load(idle_ptr + ri, mask=i_ok, other=0)
    if HAS_FILL:
        v = tl.load(fill_ptr + col, mask=i_ok, other=0.0)
    else:
        v = tl.zeros((BLOCK_N,), dtype=y_ptr.dtype.element_ty)
    tile = tl.zeros((rm.shape[0], BLOCK_N), dtype=y_ptr.dtype.element_ty) + v[None, :].to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + col[None, :].to(tl.int64) * stride_yn, tile,
             mask=m_ok[:, None] & i_ok[None, :])


@triton.jit
def _load_x_tile(x_ptr, in_idx_ptr, rm, m_ok, rk, k_ok, stride_xm, stride_xk, GATHER_IN: tl.constexpr):
    """Rows ``rm`` of x at GEMM columns ``rk``: x's columns ``in_idx[rk]`` with the gather, else ``rk``."""
    if GATHER_IN:
        xcol = tl.load(in_idx_ptr + rk, mask=k_ok, other=0)
    else:
        xcol = rk
    return tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + xcol[None, :].to(tl.int64) * stride_xk,
                   mask=m_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _store_out(y_ptr, b_ptr, out_idx_ptr, acc, rm, m_ok, rn, n_ok, stride_ym, stride_yn, HAS_BIAS: tl.constexpr,
               SCATTER_OUT: tl.constexpr):
    """``acc`` (+ bias) into rows ``rm`` of y at columns ``out_idx[rn]`` with the scatter, else ``rn``."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SCATTER_OUT:
        ycol = tl.load(out_idx_ptr + rn, mask=n_ok, other=0)
    else:
        ycol = rn
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + ycol[None, :].to(tl.int64) * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@_tuned(GEMM_CONFIGS, key=["M", "N", "K", "N_IDLE"])
@triton.jit
def _sparse_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, in_idx_ptr, out_idx_ptr, idle_ptr, fill_ptr, M, N, K, N_IDLE,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                        HAS_BIAS: tl.constexpr, GATHER_IN: tl.constexpr, SCATTER_OUT: tl.constexpr,
                        HAS_IDLE: tl.constexpr, HAS_FILL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    if HAS_IDLE:  # programs after the computed columns write the idle outputs
        if _idle_program(y_ptr, idle_ptr, fill_ptr, rm, m_ok, pid_n, N, N_IDLE, stride_ym, stride_yn, HAS_FILL,
                         BLOCK_N):
            return
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = _load_x_tile(x_ptr, in_idx_ptr, rm, m_ok, rk, k_ok, stride_xm, stride_xk, GATHER_IN)
        b = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None].to(tl.int64) * stride_wk,
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    _store_out(y_ptr, b_ptr, out_idx_ptr, acc, rm, m_ok, rn, n_ok, stride_ym, stride_yn, HAS_BIAS, SCATTER_OUT)


@_tuned(GEMV_CONFIGS, key=["N", "K", "N_IDLE", "BLOCK_M"], prune=_prune_gemv)
@triton.jit
def _sparse_gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, in_idx_ptr, out_idx_ptr, idle_ptr, fill_ptr, M, N, K, N_IDLE,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                        HAS_BIAS: tl.constexpr, GATHER_IN: tl.constexpr, SCATTER_OUT: tl.constexpr,
                        HAS_IDLE: tl.constexpr, HAS_FILL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    if HAS_IDLE:  # programs after the computed columns write the idle outputs
        if _idle_program(y_ptr, idle_ptr, fill_ptr, rm, m_ok, pid_n, N, N_IDLE, stride_ym, stride_yn, HAS_FILL,
                         BLOCK_N):
            return
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = _load_x_tile(x_ptr, in_idx_ptr, rm, m_ok, rk, k_ok, stride_xm, stride_xk, GATHER_IN).to(tl.float32)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :].to(tl.int64) * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
    _store_out(y_ptr, b_ptr, out_idx_ptr, acc, rm, m_ok, rn, n_ok, stride_ym, stride_yn, HAS_BIAS, SCATTER_OUT)


def sparse_linear(x2: torch.Tensor, plan, force: str = "auto") -> torch.Tensor:
    """Run a ``LinearPlan`` on ``x2`` ``(M, K)`` (any strides); returns ``(M, N)`` in ``x2``'s dtype.

    ``force`` picks the kernel: ``"auto"`` (GEMV for M <= 16, else GEMM), ``"gemv"`` or ``"gemm"``.
    """
    if x2.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32 for the Triton eval kernels, got {x2.dtype}")
    if force not in ("auto", "gemv", "gemm"):
        raise ValueError(f"force must be 'auto', 'gemv' or 'gemm', got {force!r}")
    m = x2.shape[0]
    n_out = plan.out_features
    wc = plan.weight
    nc, kc = wc.shape
    scatter = plan.out_idx is not None
    idle = getattr(plan, "idle_idx", None) if scatter else None
    in_launch = idle is not None and m > 0 and nc > 0 and kc > 0  # the kernel writes the idle outputs
    if scatter and not in_launch:
        y = x2.new_zeros(m, n_out) if plan.fill is None else x2.new_empty(m, n_out).copy_(plan.fill)
    else:
        y = x2.new_empty(m, n_out)
    if m == 0 or nc == 0:
        return y
    if kc == 0:  # nothing to multiply: the computed rows are their bias
        y[:, plan.out_idx if scatter else slice(None)] = (
            plan.bias.to(x2.dtype).expand(m, nc) if plan.bias is not None else 0)
        return y
    gather = plan.in_idx is not None
    has_bias = plan.bias is not None
    has_fill = in_launch and plan.fill is not None
    n_idle = idle.numel() if in_launch else 0
    dummy = wc  # never read when the matching flag is off
    args = (x2, wc, plan.bias if has_bias else dummy, y, plan.in_idx if gather else dummy,
            plan.out_idx if scatter else dummy, idle if in_launch else dummy, plan.fill if has_fill else dummy,
            m, nc, kc, n_idle, x2.stride(0), x2.stride(1), wc.stride(0), wc.stride(1), y.stride(0), y.stride(1))
    flags = dict(HAS_BIAS=has_bias, GATHER_IN=gather, SCATTER_OUT=scatter, HAS_IDLE=in_launch, HAS_FILL=has_fill)
    kind = force if force != "auto" else ("gemv" if m <= GEMV_MAX_ROWS else "gemm")
    if kind == "gemv" and m > GEMV_MAX_ROWS:
        raise ValueError(f"the GEMV kernel takes at most {GEMV_MAX_ROWS} rows, got {m}")
    if kind == "gemv":
        bm = max(1, triton.next_power_of_2(m))
        meta = {} if AUTOTUNE else dict(BLOCK_N=32, BLOCK_K=32) if bm <= 4 else dict(BLOCK_N=16, BLOCK_K=32)
        grid = lambda META: (triton.cdiv(nc, META["BLOCK_N"]) + triton.cdiv(n_idle, META["BLOCK_N"]),)  # noqa: E731
        _sparse_gemv_kernel[grid](*args, **flags, BLOCK_M=bm, **meta)
    else:
        interp = INTERPRET
        meta = {} if AUTOTUNE else dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16) if interp else dict(
            BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
        grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]),  # noqa: E731
                             triton.cdiv(nc, META["BLOCK_N"]) + triton.cdiv(n_idle, META["BLOCK_N"]))
        _sparse_gemm_kernel[grid](*args, **flags, UPCAST=interp, IEEE=(x2.dtype == torch.float32), **meta)
    return y


__all__ = ["sparse_linear", "SUPPORTED_DTYPES", "GEMV_MAX_ROWS", "INTERPRET"]
