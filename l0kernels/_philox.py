"""Philox4x32-10 exactly as Triton's ``tl.rand`` (SPEC section 2), in Python.

This is the only Python implementation of the stream. The same round function runs on
numpy ``uint64`` arrays (CPU tensors: fewer, cheaper ops, so the CPU backend can afford to
regenerate gates in backward) and on torch ``int64`` tensors (any other device). Values are
kept in ``[0, 2**32)`` throughout; products of two 32-bit words are exact in 64 bits
(numpy: unsigned wrap-around is defined; torch: the product's low 64 bits are all we read).
"""
from __future__ import annotations

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_PHILOX_A = 0xD2511F53
_PHILOX_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_INT_TO_UNIFORM = 4.6566127342e-10  # float32(x) * this, as tl.rand
SEED_MAX = 2**63  # seeds live in [0, SEED_MAX)


def _philox_c0(seed: int, off, lit):
    """First output word of Philox4x32-10 for counter ``(off_lo, off_hi, 0, 0)``.

    ``off`` is an array of non-negative offsets (numpy uint64 or torch int64); ``lit``
    turns a Python int into a scalar of the array's kind.
    """
    m32 = lit(_M32)
    s32 = lit(32)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = off & m32
    c1 = (off >> s32) & m32
    # Round 1 with c2 = c3 = 0: the B products vanish.
    p_a = c0 * lit(_PHILOX_A)
    c0, c1, c2, c3 = c1 ^ lit(k0), None, ((p_a >> s32) & m32) ^ lit(k1), p_a & m32
    c1 = c0 * 0  # lo(B * 0)
    for _ in range(9):
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
        p_b = c2 * lit(_PHILOX_B)
        p_a = c0 * lit(_PHILOX_A)
        c0, c1, c2, c3 = (
            ((p_b >> s32) & m32) ^ c1 ^ lit(k0),
            p_b & m32,
            ((p_a >> s32) & m32) ^ c3 ^ lit(k1),
            p_a & m32,
        )
    return c0


def _to_uniform_np(c0: np.ndarray) -> np.ndarray:
    x = c0.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(_INT_TO_UNIFORM)


def _to_uniform_torch(c0: torch.Tensor) -> torch.Tensor:
    x = c0.to(torch.int32)  # wraps to the int32 bit pattern
    x = torch.where(x < 0, ~x, x)
    return x.to(torch.float32) * _INT_TO_UNIFORM


def check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex:
            raise TypeError(f"{name} must be an int in [0, 2**63), got a tensor of dtype "
                            f"{seed.dtype} and shape {tuple(seed.shape)}")
        seed = int(seed.item())
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int in [0, 2**63), got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < SEED_MAX:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return seed


def philox_uniform(seed: int, offsets, *, device=None, _force_torch: bool = False) -> torch.Tensor:
    """Uniform float32 draws ``u_raw(seed, i)`` for every offset ``i``, bit-exact with ``tl.rand``.

    ``offsets`` is an integer tensor (any shape, any device, values in ``[0, 2**63)``) or an
    int (returns ``arange(offsets)``). The result has the offsets' shape and device.
    """
    seed = check_seed(seed)
    if isinstance(offsets, int) and not isinstance(offsets, bool):
        if offsets < 0:
            raise ValueError(f"offsets as an int is a count and must be >= 0, got {offsets}")
        offsets = torch.arange(offsets, device=device)
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets must be an integer tensor or an int, got {type(offsets).__name__}")
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise TypeError(f"offsets must have an integer dtype, got {offsets.dtype}")
    off = offsets.to(torch.int64)
    if off.numel() and bool((off < 0).any()):
        raise ValueError("offsets must be >= 0")
    if off.device.type == "cpu" and not _force_torch:
        arr = off.contiguous().numpy().astype(np.uint64, copy=False)
        out = _to_uniform_np(_philox_c0(seed, arr, np.uint64))
        return torch.from_numpy(out).reshape(off.shape)
    out = _to_uniform_torch(_philox_c0(seed, off, int))
    return out.reshape(off.shape)
