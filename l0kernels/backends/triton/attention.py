"""Attention over the open heads (docs/design.md §11, the device form of head gates): a flash-attention forward
and backward whose programs for a closed query head compute nothing.

``attention(q, k, v, head_open, mask=None, causal=False, scale=None)``: ``q`` ``(B, H, S, D)``, ``k``/``v``
``(B, Hkv, Sk, D)`` (grouped-query attention: query head ``h`` reads key/value head ``h // (H // Hkv)``),
``head_open`` ``(H,)`` bool on the device, ``mask`` an additive float or a bool (True: attend) mask broadcastable
to ``(B, H, S, Sk)``, ``causal`` the lower-triangular mask aligned to the bottom right (query ``i`` sees keys up
to ``i + Sk - S``). Returns ``softmax(q k^T * scale + mask) v`` for the open heads and exact zeros for the closed
ones, with the gradients of ``q``, ``k``, ``v``: a closed head's ``dq`` is zero and it adds nothing to its
key/value head's ``dk``/``dv``. Nothing is read on the host (the open flags are loaded in the kernels), so a CUDA
graph can capture it.

Kernels (one program per block of queries and head; float32 softmax statistics):
  ``_fwd_kernel``: online softmax over the key blocks; a closed head runs no key block and stores zeros;
  stores ``lse`` (per query row) for the backward.
  ``_dq_kernel``: ``dq = scale * sum_n (p * (dp - delta)) k`` over the key blocks (``delta = rowsum(do * o)``).
  ``_dkdv_kernel``: one program per key block and key/value head, over the open query heads of its group:
  ``dv = p^T do``, ``dk = scale * (p * (dp - delta))^T q``.
Under ``TRITON_INTERPRET=1`` the tiles are upcast to float32 before ``tl.dot`` (as in ``linear.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .linear import INTERPRET, dot_flags


@triton.jit
def _scores(q, k, offs_m, mask_m, offs_n, mask_n, m_ptr, s_mq, s_mk, scale, causal_off,
            HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr):
    """``q k^T * scale`` (+ mask, causal, key bounds) for a (BLOCK_M, BLOCK_N) tile, float32."""
    s = _mm(q, tl.trans(k), DOT_F32) * scale
    if HAS_MASK:
        s += tl.load(m_ptr + offs_m[:, None] * s_mq + offs_n[None, :] * s_mk,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    keep = mask_n[None, :]
    if CAUSAL:
        keep = keep & (offs_m[:, None] + causal_off >= offs_n[None, :])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _query_block(open_ptr, H, R, SQ, SK, D, causal_off, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """This program's batch, query head, key/value head, query rows and the end of its key loop (0 for a closed
    head: it runs no key block)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    end = SK
    if CAUSAL:
        end = tl.minimum(SK, (pid_m + 1) * BLOCK_M + causal_off)
    end = tl.where(tl.load(open_ptr + h) != 0, end, 0)
    return bh, b, h, h // R, offs_m, offs_d, offs_m < SQ, offs_d < D, end


@triton.jit
def _kv_tile(k_ptr, v_ptr, b, hk, offs_n, offs_d, mask_d, SK, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs):
    """Keys and values of rows ``offs_n`` of one key/value head (zeros past ``SK``)."""
    mask_n = offs_n < SK
    m = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + b * s_kb + hk * s_kh + offs_n[:, None] * s_ks + offs_d[None, :], mask=m, other=0.0)
    v = tl.load(v_ptr + b * s_vb + hk * s_vh + offs_n[:, None] * s_vs + offs_d[None, :], mask=m, other=0.0)
    return k, v, mask_n


@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr):
    """``a @ b`` accumulated in float32; ``DOT_F32`` (``linear.dot_flags``): the tiles upcast first, IEEE."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, l_ptr, open_ptr, scale,
                s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb, s_mh, s_mq, s_mk, s_ob, s_oh, s_os,
                H, R, SQ, SK, D, causal_off,
                HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, h, hk, offs_m, offs_d, mask_m, mask_d, end = _query_block(open_ptr, H, R, SQ, SK, D, causal_off, CAUSAL,
                                                                      BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    mp = m_ptr + b * s_mb + h * s_mh
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v, mask_n = _kv_tile(k_ptr, v_ptr, b, hk, offs_n, offs_d, mask_d, SK, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs)
        s = _scores(q, k, offs_m, mask_m, offs_n, mask_n, mp, s_mq, s_mk, scale, causal_off, HAS_MASK, CAUSAL, DOT_F32)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing to attend to yet
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_F32)
        m_i = m_new
    safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / safe[:, None]
    lse = tl.where(l_i == 0.0, float("inf"), tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(safe))
    tl.store(o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(l_ptr + bh * SQ + offs_m, lse, mask=mask_m)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, m_ptr, do_ptr, l_ptr, dl_ptr, dq_ptr, open_ptr, scale,
               s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb, s_mh, s_mq, s_mk,
               H, R, SQ, SK, D, causal_off,
               HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # q, do and dq share one layout (contiguous (B, H, S, D) copies made by the launcher)
    bh, b, h, hk, offs_m, offs_d, mask_m, mask_d, end = _query_block(open_ptr, H, R, SQ, SK, D, causal_off, CAUSAL,
                                                                      BLOCK_M, BLOCK_D)
    qo = b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :]
    mq = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + qo, mask=mq, other=0.0)
    do = tl.load(do_ptr + qo, mask=mq, other=0.0)
    lse = tl.load(l_ptr + bh * SQ + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.load(dl_ptr + bh * SQ + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    mp = m_ptr + b * s_mb + h * s_mh
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v, mask_n = _kv_tile(k_ptr, v_ptr, b, hk, offs_n, offs_d, mask_d, SK, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs)
        s = _scores(q, k, offs_m, mask_m, offs_n, mask_n, mp, s_mq, s_mk, scale, causal_off, HAS_MASK, CAUSAL, DOT_F32)
        p = tl.exp(s - lse[:, None])
        dp = _mm(do, tl.trans(v), DOT_F32)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, DOT_F32)
    tl.store(dq_ptr + qo, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mq)


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, m_ptr, do_ptr, l_ptr, dl_ptr, dk_ptr, dv_ptr, open_ptr, scale,
                 s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb, s_mh, s_mq, s_mk,
                 H, HKV, R, SQ, SK, D, causal_off,
                 HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # k, dk share one layout; v, dv another (contiguous copies of the launcher)
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    k, v, mask_n = _kv_tile(k_ptr, v_ptr, b, hk, offs_n, offs_d, mask_d, SK, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs)
    mk = mask_n[:, None] & mask_d[None, :]
    ko = b * s_kb + hk * s_kh + offs_n[:, None] * s_ks + offs_d[None, :]
    vo = b * s_vb + hk * s_vh + offs_n[:, None] * s_vs + offs_d[None, :]
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    start = 0
    if CAUSAL:  # query blocks before the first that sees this key block add nothing
        start = tl.maximum(pid_n * BLOCK_N - causal_off, 0) // BLOCK_M * BLOCK_M
    for j in range(0, R):
        h = hk * R + j
        end = tl.where(tl.load(open_ptr + h) != 0, SQ, 0)  # a closed query head adds nothing
        mp = m_ptr + b * s_mb + h * s_mh
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < SQ
            qo = b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :]
            mq = mask_m[:, None] & mask_d[None, :]
            q = tl.load(q_ptr + qo, mask=mq, other=0.0)
            do = tl.load(do_ptr + qo, mask=mq, other=0.0)
            lse = tl.load(l_ptr + (b * H + h) * SQ + offs_m, mask=mask_m, other=float("inf"))
            delta = tl.load(dl_ptr + (b * H + h) * SQ + offs_m, mask=mask_m, other=0.0)
            s = _scores(q, k, offs_m, mask_m, offs_n, mask_n, mp, s_mq, s_mk, scale, causal_off, HAS_MASK, CAUSAL,
                        DOT_F32)
            p = tl.exp(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
            dv += _mm(tl.trans(p.to(do.dtype)), do, DOT_F32)
            dp = _mm(do, tl.trans(v), DOT_F32)
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds.to(q.dtype)), q, DOT_F32)
    tl.store(dk_ptr + ko, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mk)
    tl.store(dv_ptr + vo, dv.to(dv_ptr.dtype.element_ty), mask=mk)


def _blocks(d: int):
    bd = max(16, triton.next_power_of_2(d))
    if INTERPRET:
        return 16, 16, bd
    return (64, 64, bd) if bd <= 64 else (32, 32, bd)


def _mask_args(mask: Optional[torch.Tensor], b: int, h: int, sq: int, sk: int, like: torch.Tensor):
    """``(tensor, strides (b, h, q, k), HAS_MASK)``: an additive float32 mask broadcast by strides (0 where a dim
    is broadcast); a bool mask becomes 0 / -inf."""
    if mask is None:
        return like, (0, 0, 0, 0), False
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(b, h, sq, sk)
    return mask, tuple(mask.stride()), True


def _prep(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class TritonHeadsAttention(torch.autograd.Function):
    """``apply(q, k, v, head_open, mask, causal, scale)`` (module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, head_open, mask, causal, scale):
        b, h, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        q, k, v = _prep(q), _prep(k), _prep(v)
        o = torch.empty((b, h, sq, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
        mt, ms, has_mask = _mask_args(mask, b, h, sq, sk, q)
        bm, bn, bd = _blocks(d)
        dot_f32 = dot_flags(q.dtype, tf32_allowed=False)[0]
        opn = head_open.to(torch.int32)
        if b * h and sq:
            _fwd_kernel[(triton.cdiv(sq, bm), b * h)](
                q, k, v, mt, o, lse, opn, float(scale), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                k.stride(2), v.stride(0), v.stride(1), v.stride(2), *ms, o.stride(0), o.stride(1), o.stride(2),
                h, h // hkv, sq, sk, d, sk - sq, HAS_MASK=has_mask, CAUSAL=bool(causal), DOT_F32=dot_f32,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        ctx.save_for_backward(q, k, v, o, lse, opn, mt if has_mask else None)
        ctx.conf = (bool(causal), float(scale), has_mask)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, opn, mt = ctx.saved_tensors
        causal, scale, has_mask = ctx.conf
        b, h, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        if mt is None:
            mt, ms = q, (0, 0, 0, 0)
        else:
            ms = tuple(mt.stride())
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bm, bn, bd = _blocks(d)
        dot_f32 = dot_flags(q.dtype, tf32_allowed=False)[0]
        common = (float(scale), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), *ms)
        flags = dict(HAS_MASK=has_mask, CAUSAL=causal, DOT_F32=dot_f32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        if b * h and sq:
            _dq_kernel[(triton.cdiv(sq, bm), b * h)](q, k, v, mt, do, lse, delta, dq, opn, *common, h, h // hkv, sq,
                                                     sk, d, sk - sq, **flags)
        else:
            dq.zero_()
        if b * hkv and sk:
            _dkdv_kernel[(triton.cdiv(sk, bn), b * hkv)](q, k, v, mt, do, lse, delta, dk, dv, opn, *common, h, hkv,
                                                         h // hkv, sq, sk, d, sk - sq, **flags)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, head_open, mask=None, causal=False, scale=None) -> torch.Tensor:
    """Attention over the open heads (module doc)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return TritonHeadsAttention.apply(q, k, v, head_open, mask, causal, scale)


__all__ = ["attention", "TritonHeadsAttention"]
