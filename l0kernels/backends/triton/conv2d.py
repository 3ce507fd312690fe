"""``l0_conv2d`` on Triton (output-channel gates): implicit-GEMM forward and, where closed channels are
skipped, implicit-GEMM backward; the other backward calls use cuDNN for the convolutions.

Forward, ``_conv_fwd_kernel``: implicit GEMM over ``M = B*OH*OW`` output pixels, ``N = C_out/groups``
channels of a group and ``K = (C_in/groups)*KH*KW`` with ``k = (r*KW + s)*C_in_g + c`` (channel
fastest, so channels_last inputs are read contiguously; NCHW works through its strides). Bias and
the gate ``z`` (one per channel for batch/eval noise, ``(b, c)`` with offset ``b*C_out + c`` for
per-example noise) are applied in the epilogue; the output is channels_last when ``x`` is.

Skipping closed channels (training, one gate vector, ``groups == 1``; ``_active.ENABLED``): forward and
backward draw the device open set from the seed (``_gate_math.open_set``: the open channels ascending in
``index[:count]``, ``count`` a 0-d tensor; no host sync, CUDA-graph safe) and every kernel reads it in
device memory. The forward's channel tiles follow the permutation: the GEMM runs over the open channels,
closed ones get exact zeros and their weights are never read. The backward runs in Triton only, no cuDNN:
  ``_gate_dy_kernel`` forms ``dY * z`` and the per-channel sums of ``dY`` and ``dY * z`` (``db`` and the
  bias part of ``dlog_alpha``) for the open channels only;
  ``_conv_dgrad_kernel`` (tiles of ``B*H*W`` input pixels x ``C_in``): ``dX = conv_transpose(dY*z, W)``
  with its reduction over ``(r, s)`` and the gathered open channels ``index[j]``, ``j < count``;
  ``_conv_wgrad_kernel`` (tiles of ``C_out`` channel positions x ``K``, the ``B*OH*OW`` reduction split
  over a second grid axis, float32 atomics): the un-gated weight gradient ``P`` of the open channels;
  tiles past ``count`` exit at once;
  ``_wgrad_epilogue_kernel``: ``dW = P * z[c]``, ``dlog_alpha = dz * (rowsum(W * P) + b * colsum)``, exact
  zeros for the closed channels (whose ``P`` and ``W`` it does not read).
A closed channel's ``dY``, ``W`` and bias are never loaded, so non-finite values there do not reach the
other gradients.

Every other call (per-example noise, eval, ``groups > 1``, ``L0K_SKIP_CLOSED=0``): the data and weight
gradients come from ``torch.ops.aten.convolution_backward`` (cuDNN on a GPU) over every channel, around
the same gate kernels: ``_gate_dy_kernel`` over all channels; ``_wgrad_epilogue_kernel`` (batch/eval
noise) on cuDNN's ``P``; per-example noise reruns ``_conv_fwd_kernel`` with an epilogue that reduces
``sum dY * h * dz`` into ``dlog_alpha`` instead of storing ``h``.
Autograd keeps x, weight, log_alpha, bias and the seed only. On a GPU the GEMM kernels are autotuned
(``linear.tuned``); the weight gradient's atomics (and the per-example ``dlog_alpha``'s) can change the
last bits from run to run.
"""
from __future__ import annotations

import functools
from typing import List

import torch
import triton
import triton.language as tl

from ... import _active
from ..torch import conv2d_grads_replayed
from ._gate_math import gate, seed_tensor, taken_open_set
from .linear import INTERPRET, _open_tile, _swizzle, dot_flags, launch_meta, tuned

EPI_STORE, EPI_DLA = 0, 1


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@tuned(reset_to_zero=["dla_ptr"])
@triton.jit(do_not_specialize=["seed"])
def _conv_fwd_kernel(x_ptr, w_ptr, la_ptr, b_ptr, y_ptr, dy_ptr, dla_ptr, idx_ptr, cnt_ptr,
                     M, N, K, seed,
                     C_OUT, CIN_G, H, W, OH, OW, KW,
                     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                     s_xb, s_xc, s_xh, s_xw, s_wo, s_wc, s_wh, s_ww, s_la0,
                     s_yb, s_yc, s_yh, s_yw, s_dyb, s_dyc, s_dyh, s_dyw,
                     beta, gamma, zeta, eps,
                     GATE: tl.constexpr, SAMPLE: tl.constexpr, TRAINING: tl.constexpr, GSIZE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                     OPEN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # GATE is unused (always output channels); it is in the signature for the shared autotune key.
    # GSIZE output channels share a gate: channel co reads gate co // GSIZE (noise offset likewise).
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    width = GROUP_M * grid_n
    first = (pid // width) * GROUP_M
    size = tl.minimum(grid_m - first, GROUP_M)
    pid_m = first + (pid % width) % size
    pid_n = (pid % width) // size
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pos_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    # OPEN (training, one gate vector, groups == 1): the tile's channels come from the open-set permutation;
    # a tile of closed channels skips its K loop and stores zeros, a closed channel's weights are never read
    offs_n, mask_n, n_open, n_any = _open_tile(idx_ptr, cnt_ptr, pos_n, N, pid_n * BLOCK_N, OPEN)
    k_end = K
    if OPEN:
        k_end = tl.where(n_any, K, 0)
    ohw = OH * OW
    bb = offs_m // ohw
    rem = offs_m % ohw
    oh = rem // OW
    ow = rem % OW
    co = grp * N + offs_n  # global output channel
    x_base = x_ptr + bb * s_xb + (grp * CIN_G) * s_xc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        c = offs_k % CIN_G
        rs = offs_k // CIN_G
        r = rs // KW
        s = rs % KW
        ih = oh[:, None] * stride_h - pad_h + r[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + s[None, :] * dil_w
        ok = (mask_m[:, None] & mask_k[None, :]) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_base[:, None] + c[None, :] * s_xc + ih * s_xh + iw * s_xw, mask=ok, other=0.0)
        b = tl.load(w_ptr + co[None, :] * s_wo + c[:, None] * s_wc + r[:, None] * s_wh + s[:, None] * s_ww,
                    mask=n_open[None, :] & mask_k[:, None], other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=n_open, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    la = tl.load(la_ptr + (co // GSIZE) * s_la0, mask=mask_n, other=0.0)
    if SAMPLE:
        z, dz = gate(la[None, :], seed, bb[:, None] * (C_OUT // GSIZE) + co[None, :] // GSIZE, beta, gamma, zeta, eps, TRAINING)
    else:
        zv, dzv = gate(la, seed, co // GSIZE, beta, gamma, zeta, eps, TRAINING)
        z = zv[None, :]
        dz = dzv[None, :]
    if EPILOGUE == 0:
        y_off = bb[:, None] * s_yb + co[None, :] * s_yc + oh[:, None] * s_yh + ow[:, None] * s_yw
        tl.store(y_ptr + y_off, (acc * z).to(y_ptr.dtype.element_ty), mask=mask)
    else:  # backward of per-example gates: dlog_alpha[c] += sum dY * h * dz (h un-gated, not stored)
        dy_off = bb[:, None] * s_dyb + co[None, :] * s_dyc + oh[:, None] * s_dyh + ow[:, None] * s_dyw
        dy = tl.load(dy_ptr + dy_off, mask=mask, other=0.0).to(tl.float32)
        h = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        part = tl.sum(tl.where(mask, dy * h * dz, 0.0), axis=0)
        tl.atomic_add(dla_ptr + co, part, mask=mask_n)


@triton.jit(do_not_specialize=["seed"])
def _gate_dy_kernel(dy_ptr, la_ptr, dyz_ptr, colsum_ptr, zsum_ptr, idx_ptr, cnt_ptr,
                    M, C, OHW, OW, seed,
                    s_b, s_c, s_h, s_w, t_b, t_c, t_h, t_w, s_la0,
                    beta, gamma, zeta, eps,
                    SAMPLE: tl.constexpr, TRAINING: tl.constexpr, GSIZE: tl.constexpr, STORE: tl.constexpr,
                    OPEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dY * z`` (stored when STORE) and the per-channel sums of ``dY`` and ``dY * z`` (atomics into zeros).
    OPEN: the channel tiles follow the open-set permutation and only open channels are read and written
    (``dY * z`` of a closed channel is left unset: the dgrad kernel never reads it)."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pos_c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    offs_c, _, mask_c, _ = _open_tile(idx_ptr, cnt_ptr, pos_c, C, tl.program_id(1) * BLOCK_C, OPEN)
    mask_m = offs_m < M
    mask = mask_m[:, None] & mask_c[None, :]
    bb = offs_m // OHW
    rem = offs_m % OHW
    oh = rem // OW
    ow = rem % OW
    dy = tl.load(dy_ptr + bb[:, None] * s_b + offs_c[None, :] * s_c + (oh * s_h + ow * s_w)[:, None], mask=mask,
                 other=0.0).to(tl.float32)
    la = tl.load(la_ptr + (offs_c // GSIZE) * s_la0, mask=mask_c, other=0.0)
    if SAMPLE:
        z, _ = gate(la[None, :], seed, bb[:, None] * (C // GSIZE) + offs_c[None, :] // GSIZE, beta, gamma, zeta, eps, TRAINING)
    else:
        zv, _ = gate(la, seed, offs_c // GSIZE, beta, gamma, zeta, eps, TRAINING)
        z = zv[None, :]
    g = dy * z
    if STORE:
        tl.store(dyz_ptr + bb[:, None] * t_b + offs_c[None, :] * t_c + (oh * t_h + ow * t_w)[:, None],
                 g.to(dyz_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(colsum_ptr + offs_c, tl.sum(tl.where(mask, dy, 0.0), axis=0), mask=mask_c)
    tl.atomic_add(zsum_ptr + offs_c, tl.sum(tl.where(mask, g, 0.0), axis=0), mask=mask_c)


@triton.jit(do_not_specialize=["seed"])
def _wgrad_epilogue_kernel(p_ptr, w_ptr, la_ptr, b_ptr, colsum_ptr, dw_ptr, dla_ptr, idx_ptr, cnt_ptr,
                           C, KC, seed, s_la0, beta, gamma, zeta, eps,
                           TRAINING: tl.constexpr, GSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_DW: tl.constexpr,
                           NEED_DLA: tl.constexpr, OPEN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Batch/eval channel gates: ``dW = P * z[c]``, ``dlog_alpha = dz * (rowsum(W * P) + b * colsum)``.
    ``P``, ``W`` and ``dW`` hold each channel's ``KC`` entries at ``c * KC`` in one layout. ``dla`` gets one
    entry per channel (the caller sums them per gate when ``GSIZE > 1``). OPEN: the channel tiles follow the
    open-set permutation; a closed channel gets exact zeros and its ``P``, ``W`` and bias are not read."""
    pos_c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    offs_c, mask_c, c_open, _ = _open_tile(idx_ptr, cnt_ptr, pos_c, C, tl.program_id(0) * BLOCK_C, OPEN)
    la = tl.load(la_ptr + (offs_c // GSIZE) * s_la0, mask=c_open, other=0.0)
    z, dz = gate(la, seed, offs_c // GSIZE, beta, gamma, zeta, eps, TRAINING)
    hdy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for k0 in range(0, KC, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = (offs_k < KC)[None, :]
        idx = offs_c[:, None] * KC + offs_k[None, :]
        p = tl.load(p_ptr + idx, mask=c_open[:, None] & mask_k, other=0.0).to(tl.float32)
        if NEED_DLA:
            w = tl.load(w_ptr + idx, mask=c_open[:, None] & mask_k, other=0.0).to(tl.float32)
            hdy += tl.sum(w * p, axis=1)
        if STORE_DW:
            tl.store(dw_ptr + idx, (p * z[:, None]).to(dw_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_k)
    if NEED_DLA:
        if HAS_BIAS:
            hdy += tl.load(b_ptr + offs_c, mask=c_open, other=0.0).to(tl.float32) * \
                tl.load(colsum_ptr + offs_c, mask=c_open, other=0.0)
        tl.store(dla_ptr + offs_c, hdy * dz, mask=mask_c)  # a closed channel: 0 * dz (nothing loaded)


@tuned()
@triton.jit
def _conv_dgrad_kernel(g_ptr, w_ptr, dx_ptr, idx_ptr, cnt_ptr,
                       M, N, K, H, W, OH, OW, KH, KW,
                       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                       s_gb, s_gc, s_gh, s_gw, s_wo, s_wc, s_wh, s_ww, s_xb, s_xc, s_xh, s_xw,
                       DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Skipping backward (groups == 1): ``dX = conv_transpose(dY*z, W)`` over the open output channels.

    Tiles of ``M = B*H*W`` input pixels x ``N = C_in`` channels; the reduction runs over the ``KH*KW``
    taps and, for each, the ``count`` open channels ``index[j]`` of the ``K = C_out`` (gathered rows of
    ``g = dY*z`` and of ``W``). The output pixel of tap ``(r, s)`` is ``oh = (ih + pad_h - r*dil_h) /
    stride_h`` where that divides, else the tap contributes nothing to the pixel."""
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    hw = H * W
    bb = offs_m // hw
    rem = offs_m % hw
    ih = rem // W
    iw = rem % W
    n_open = tl.load(cnt_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rs in range(0, KH * KW):
        r = rs // KW
        s = rs % KW
        th = ih + pad_h - r * dil_h
        tw = iw + pad_w - s * dil_w
        oh = tl.maximum(th, 0) // stride_h  # th < 0 (no output pixel) fails the test below
        ow = tl.maximum(tw, 0) // stride_w
        ok = mask_m & (oh * stride_h == th) & (ow * stride_w == tw) & (oh < OH) & (ow < OW)
        g_row = g_ptr + bb * s_gb + oh * s_gh + ow * s_gw
        w_col = w_ptr + offs_n * s_wc + r * s_wh + s * s_ww
        for j0 in range(0, n_open, BLOCK_K):
            pos = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
            co, _, open_j, _ = _open_tile(idx_ptr, cnt_ptr, pos, K, j0, True)
            g = tl.load(g_row[:, None] + co[None, :] * s_gc, mask=ok[:, None] & open_j[None, :], other=0.0)
            w = tl.load(w_col[None, :] + co[:, None] * s_wo, mask=open_j[:, None] & mask_n[None, :], other=0.0)
            if DOT_F32:
                acc += tl.dot(g.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
            else:
                acc += tl.dot(g, w)
    tl.store(dx_ptr + (bb * s_xb + ih * s_xh + iw * s_xw)[:, None] + offs_n[None, :] * s_xc,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@tuned(reset_to_zero=["p_ptr"])
@triton.jit
def _conv_wgrad_kernel(dy_ptr, x_ptr, p_ptr, idx_ptr, cnt_ptr,
                       M, N, K, CIN, H, W, OH, OW, KW,
                       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                       s_dyb, s_dyc, s_dyh, s_dyw, s_xb, s_xc, s_xh, s_xw, s_po, s_pc, s_ph, s_pw,
                       DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Skipping backward (groups == 1): the un-gated weight gradient ``P = dY^T @ im2col(x)`` of the open
    output channels, added atomically into a zeroed float32 ``P``.

    Tiles of ``N = C_out`` channel positions of the open-set permutation x ``K = C_in*KH*KW`` (``k`` as in
    the forward); ``program_id(1)`` takes one share of the ``M = B*OH*OW`` reduction. A tile past ``count``
    (closed channels only) exits without reading or writing; ``P`` of a closed channel stays unwritten
    (the epilogue does not read it)."""
    pid_n, pid_k = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M)
    pos_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_n, _, n_open, n_any = _open_tile(idx_ptr, cnt_ptr, pos_n, N, pid_n * BLOCK_N, True)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_k = offs_k < K
    c = offs_k % CIN
    rs = offs_k // CIN
    r = rs // KW
    s = rs % KW
    share = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(1)) * BLOCK_M
    m_start = tl.program_id(1).to(tl.int64) * share
    m_stop = tl.where(n_any, tl.minimum(m_start + share, M), m_start)
    ohw = OH * OW
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        bb = offs_m // ohw
        rem = offs_m % ohw
        oh = rem // OW
        ow = rem % OW
        g = tl.load(dy_ptr + (bb * s_dyb + oh * s_dyh + ow * s_dyw)[None, :] + offs_n[:, None] * s_dyc,
                    mask=n_open[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_N, BLOCK_M) = dY^T tile
        ih = oh[:, None] * stride_h - pad_h + r[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + s[None, :] * dil_w
        ok = (mask_m[:, None] & mask_k[None, :]) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + bb[:, None] * s_xb + c[None, :] * s_xc + ih * s_xh + iw * s_xw, mask=ok, other=0.0)
        if DOT_F32:
            acc += tl.dot(g.to(tl.float32), a.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(g, a)
    live = n_open & (pos_n * 0 + m_start < m_stop)  # open channels of a program with a share to reduce
    tl.atomic_add(p_ptr + offs_n[:, None] * s_po + (c * s_pc + r * s_ph + s * s_pw)[None, :], acc,
                  mask=live[:, None] & mask_k[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _geometry(x, weight, stride, padding, dilation):
    b, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    return b, h, w, _out_size(h, kh, stride[0], padding[0], dilation[0]), _out_size(w, kw, stride[1], padding[1],
                                                                                    dilation[1])


def open_set_reasons(sample: bool, training: bool, groups: int) -> List[str]:
    """Why forward and backward may not run over the open channels (the device open set); empty where they
    may: training with one gate vector (``noise="batch"``) and ``groups == 1``, ``L0K_SKIP_CLOSED`` on. They do
    once the layer's open fraction is at most ``_gate_math.SKIP_BELOW`` (``taken_open_set``)."""
    out = _active.call_reasons(training, sample)
    if groups != 1:
        out.append(f"groups={groups}: the open-set kernels need groups == 1")
    return out


def skips_closed(sample: bool, training: bool, groups: int) -> bool:
    """True where forward and backward may run over the open channels (:func:`open_set_reasons` gives none)."""
    return not open_set_reasons(sample, training, groups)


def _count_path(direction, sample, training, open_):
    if training and not sample:
        _active.count_path("conv2d", direction, "skip" if open_ else "dense")


def _launch_fwd(x, weight, log_alpha, bias, y, dy, dla, stride, padding, dilation, groups, seed, sample, training,
                cfg, epilogue, group_size=1):
    b, h, w, oh, ow = _geometry(x, weight, stride, padding, dilation)
    c_out, cin_g, kh, kw = weight.shape
    m, n, k = b * oh * ow, c_out // groups, cin_g * kh * kw
    dot_f32, prec = dot_flags(x.dtype, torch.backends.cudnn.allow_tf32)
    ys = y.stride() if epilogue == EPI_STORE else (0, 0, 0, 0)
    dys = dy.stride() if epilogue == EPI_DLA else (0, 0, 0, 0)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), groups)  # noqa: E731
    seed = seed_tensor(seed if training else None, x)
    os_ = taken_open_set(log_alpha, seed, cfg, group_size, True) \
        if epilogue == EPI_STORE and skips_closed(sample, training, groups) else None
    open_ = os_ is not None
    if epilogue == EPI_STORE:
        _count_path("fwd", sample, training, open_)
    idx, cnt = tuple(os_) if open_ else (x, x)
    _conv_fwd_kernel[grid](
        x, weight, log_alpha, bias if bias is not None else x, y, dy, dla, idx, cnt, m, n, k, seed,
        c_out, cin_g, h, w, oh, ow, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *weight.stride(), log_alpha.stride(0), *ys, *dys, cfg.beta, cfg.gamma, cfg.zeta, cfg.eps,
        GATE=2, SAMPLE=bool(sample), TRAINING=bool(training), GSIZE=group_size, HAS_BIAS=bias is not None,
        EPILOGUE=epilogue, DOT_F32=dot_f32, PRECISION=prec, OPEN=open_, **launch_meta())


def _launch_dgrad(dyz, weight, x, stride, padding, dilation, idx, cnt):
    """``dX`` of the skipping backward (``_conv_dgrad_kernel``), in ``x``'s memory format."""
    b, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    dx = torch.empty_like(x, memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
    m = b * h * w
    if dx.numel() == 0:
        return dx
    dot_f32, prec = dot_flags(x.dtype, torch.backends.cudnn.allow_tf32)
    _conv_dgrad_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_in, meta["BLOCK_N"]),)](
        dyz, weight, dx, idx, cnt, m, c_in, c_out, h, w, dyz.shape[2], dyz.shape[3], kh, kw,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *dyz.stride(), *weight.stride(), *dx.stride(), DOT_F32=dot_f32, PRECISION=prec, **launch_meta())
    return dx


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_wgrad(dy, x, wc, stride, padding, dilation, idx, cnt):
    """Float32 ``P`` (``wc``'s layout) of the skipping backward (``_conv_wgrad_kernel``); closed channels'
    entries are left at zero. The ``C_out x K`` tile grid is small, so the ``M`` reduction is split to give
    the GPU about two programs per multiprocessor (four programs under the interpreter, so that the tests
    run the split)."""
    b, _, h, w = x.shape
    c_out, cin, kh, kw = wc.shape
    p = torch.zeros_like(wc, dtype=torch.float32)
    m, k = dy.shape[0] * dy.shape[2] * dy.shape[3], cin * kh * kw
    if m == 0 or p.numel() == 0:
        return p
    target = 4 if INTERPRET else 2 * _sm_count(x.device)

    def grid(meta):
        tiles = triton.cdiv(c_out, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"])
        return tiles, max(1, min(triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(target, tiles)))

    dot_f32, prec = dot_flags(x.dtype, torch.backends.cudnn.allow_tf32)
    _conv_wgrad_kernel[grid](
        dy, x, p, idx, cnt, m, c_out, k, cin, h, w, dy.shape[2], dy.shape[3], kw,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *dy.stride(), *x.stride(), *p.stride(), DOT_F32=dot_f32, PRECISION=prec, **launch_meta())
    return p


def _channel_rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with each channel's ``C_in*KH*KW`` entries in one block at ``c * KC`` (contiguous or
    channels_last, as it is; else a contiguous copy), the layout ``_wgrad_epilogue_kernel`` reads."""
    if weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last):
        return weight
    return weight.contiguous()


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def conv2d_forward(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training, cfg,
                   group_size=1):
    b, h, w, oh, ow = _geometry(x, weight, stride, padding, dilation)
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    y = torch.empty((b, weight.shape[0], oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    _launch_fwd(x, weight, log_alpha, bias, y, y, y, stride, padding, dilation, groups, seed, sample, training, cfg,
                EPI_STORE, group_size)
    return y


def conv2d_backward(dy, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training, cfg,
                    need_x=True, need_w=True, need_la=True, need_b=True, group_size=1):
    """``(dx, dW, dlog_alpha, db)``; entries not asked for are None. ``dlog_alpha`` is reduced per channel
    and summed per gate (``group_size`` channels) at the end. With :func:`skips_closed` the Triton kernels
    run over the open channels only (the open set drawn again from the seed); else cuDNN computes dX and P."""
    need_b = need_b and bias is not None
    c_out = weight.shape[0]
    dev = x.device
    bsz, oh, ow = dy.shape[0], dy.shape[2], dy.shape[3]
    m = bsz * oh * ow
    consts = (cfg.beta, cfg.gamma, cfg.zeta, cfg.eps)
    seed = seed_tensor(seed if training else None, x)
    os_ = taken_open_set(log_alpha, seed, cfg, group_size, False) if skips_closed(sample, training, groups) else None
    open_ = os_ is not None  # the forward's decision (the layer's open fraction, only read here)
    _count_path("bwd", sample, training, open_)
    idx, cnt = tuple(os_) if open_ else (x, x)
    colsum = torch.zeros((c_out,), dtype=torch.float32, device=dev)
    zsum = torch.zeros((c_out,), dtype=torch.float32, device=dev)
    dyz = torch.empty_like(dy, memory_format=torch.channels_last if _channels_last(dy) else torch.contiguous_format)
    if m and c_out:
        bm, bc = (16, 16) if not dy.is_cuda else (64, 32)
        _gate_dy_kernel[(triton.cdiv(m, bm), triton.cdiv(c_out, bc))](
            dy, log_alpha, dyz, colsum, zsum, idx, cnt, m, c_out, oh * ow, ow, seed, *dy.stride(), *dyz.stride(),
            log_alpha.stride(0), *consts, SAMPLE=bool(sample), TRAINING=bool(training), GSIZE=group_size,
            STORE=need_x or sample, OPEN=open_, BLOCK_M=bm, BLOCK_C=bc)
    else:
        dyz.zero_()
    args = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
    dx = dw = dla = db = None
    if sample:  # per-example gates: dX, dW from dY*z; dlog_alpha reruns the forward GEMM
        if need_x or need_w:
            dx, dw, _ = torch.ops.aten.convolution_backward(dyz, x, weight, None, *args, [need_x, need_w, False])
        if need_b:
            db = zsum.to(bias.dtype)
        if need_la:
            dla32 = torch.zeros((c_out,), dtype=torch.float32, device=dev)
            if m and c_out:
                _launch_fwd(x, weight, log_alpha, bias, dy, dy, dla32, stride, padding, dilation, groups, seed, True,
                            training, cfg, EPI_DLA, group_size)
            dla = _per_gate(dla32, group_size).to(log_alpha.dtype)
        return dx, dw, dla, db
    if need_x:
        if open_:
            dx = _launch_dgrad(dyz, weight, x, stride, padding, dilation, idx, cnt)
        else:
            dx = torch.ops.aten.convolution_backward(dyz, x, weight, None, *args, [True, False, False])[0]
    if need_b:
        db = zsum.to(bias.dtype)
    if need_w or need_la:
        wc = _channel_rows(weight)
        if open_:
            p = _launch_wgrad(dy, x, wc, stride, padding, dilation, idx, cnt)
        else:
            p = torch.ops.aten.convolution_backward(dy, x, weight, None, *args, [False, True, False])[1]
            p = p.contiguous(memory_format=torch.channels_last if _channels_last(wc) else torch.contiguous_format)
        dwc = torch.empty_like(wc) if need_w else p
        dla32 = torch.empty((c_out,), dtype=torch.float32, device=dev)
        kc = wc[0].numel() if c_out else 0
        if c_out:
            bc, bk = (16, 16) if not dev.type == "cuda" else (32, 128)
            _wgrad_epilogue_kernel[(triton.cdiv(c_out, bc),)](
                p, wc, log_alpha, bias if bias is not None else p, colsum, dwc, dla32, idx, cnt, c_out, kc, seed,
                log_alpha.stride(0), *consts, TRAINING=bool(training), GSIZE=group_size, HAS_BIAS=bias is not None,
                STORE_DW=need_w, NEED_DLA=need_la, OPEN=open_, BLOCK_C=bc, BLOCK_K=bk)
        if need_w:
            dw = dwc
        if need_la:
            dla = _per_gate(dla32, group_size).to(log_alpha.dtype)
    return dx, dw, dla, db


def _per_gate(dla32: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-channel ``dlog_alpha`` shares summed over each gate's ``group_size`` channels."""
    return dla32 if group_size == 1 else dla32.view(-1, group_size).sum(1)


class TritonL0Conv2dFunction(torch.autograd.Function):
    """``l0_conv2d`` on the Triton backend: ``apply(x, weight, log_alpha, bias, stride, padding, dilation, groups,
    seed, noise, training, cfg[, group_size])``. Saves x, weight, log_alpha, bias (and the seed)."""

    @staticmethod
    def forward(ctx, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, noise, training, cfg,
                group_size=1):
        sample = training and noise == "sample"
        y = conv2d_forward(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, sample, training, cfg,
                           group_size)
        ctx.save_for_backward(x, weight, log_alpha, bias)
        ctx.conf = (stride, padding, dilation, groups, seed, sample, training, cfg, group_size)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, log_alpha, bias = ctx.saved_tensors
        stride, padding, dilation, groups, seed, sample, training, cfg, group_size = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True: the reference formula through autograd
            return conv2d_grads_replayed(dy, x, weight, log_alpha, bias, (stride, padding, dilation, groups), seed,
                                         "sample" if sample else "batch", training, cfg, group_size,
                                         ctx.needs_input_grad) + (None,) * 9
        need_x, need_w, need_la, need_b = ctx.needs_input_grad[:4]
        dx, dw, dla, db = conv2d_backward(dy, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed,
                                          sample, training, cfg, need_x, need_w, need_la, need_b, group_size)
        return dx, dw, dla, db, None, None, None, None, None, None, None, None, None
