"""Philox4x32-10 exactly as Triton's ``tl.rand`` (docs/design.md §2), in Python.

This is the only Python implementation of the stream. The same rounds run on numpy ``uint64``
arrays (CPU tensors) and, one word per tensor, on torch ``int64`` tensors (any other device, and
under ``torch.compile``).
Values are kept in ``[0, 2**32)`` throughout; products of two 32-bit words are exact in 64 bits
(numpy: unsigned wrap-around is defined; torch: the product's low 64 bits are all we read).

On CPU tensors the compiled shim ``l0kernels._cpu`` is used when it was built (it runs
``csrc/l0_philox.cuh``, the C++ copy of the stream, about 20x faster than numpy for a gate
vector, which lets the CPU backend regenerate gates in backward for free); the numpy path is
the fallback and both are tested bit for bit against ``tl.rand``.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    from . import _cpu  # optional C++ extension built by setup.py
except ImportError:  # pragma: no cover - depends on the build
    _cpu = None

_M32 = 0xFFFFFFFF
_PHILOX_A = 0xD2511F53
_PHILOX_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_INT_TO_UNIFORM = 4.6566127342e-10  # float32(x) * this, as tl.rand
SEED_MAX = 2**63  # seeds live in [0, SEED_MAX)


class _NumpyOps:
    """numpy uint64: products wrap mod 2**64 by definition, shifts are logical, reversal is a view."""

    @staticmethod
    def pair(a, b):
        return np.stack([a, b])

    @staticmethod
    def const(vals):
        return np.array(vals, dtype=np.uint64).reshape(2, 1)

    @staticmethod
    def hi(p):
        return p >> np.uint64(32)

    @staticmethod
    def rev(a):
        return a[::-1]


def _philox_c0(seed: int, off, ops):
    """First output word of Philox4x32-10 for counters ``(off_lo, off_hi, 0, 0)`` and key ``seed``.

    The state is kept as two stacked pairs ``X = (c0, c2)`` and ``Y = (c1, c3)`` so one round is
    a handful of whole-array ops: ``p = X * (A, B)``; ``X' = rev(hi(p)) ^ Y ^ (k0, k1)``;
    ``Y' = rev(lo(p))`` -- exactly docs/design.md §2's ``c0' = mulhi(B, c2) ^ c1 ^ k0``,
    ``c2' = mulhi(A, c0) ^ c3 ^ k1``, ``c1' = lo(B c2)``, ``c3' = lo(A c0)``.
    """
    off = off.reshape(-1)  # a 0-d offsets array would broadcast against the (2, 1) round constants
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    zero = off & 0
    x = ops.pair(off & _M32, zero)
    y = ops.pair((off >> 32) & _M32, zero)
    mult = ops.const([_PHILOX_A, _PHILOX_B])
    for _ in range(10):
        key = ops.const([k0, k1])
        p = x * mult
        x, y = ops.rev(ops.hi(p)) ^ y ^ key, ops.rev(p & _M32)
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return x[0]


def _philox_c0_torch(seed, off: torch.Tensor) -> torch.Tensor:
    """:func:`_philox_c0` in torch int64 ops, one word per tensor and the round constants as Python
    scalars (no host tensor is copied to the device: the stream traces under ``torch.compile`` and is
    captured by a CUDA graph). ``seed`` is an int or a 0-d int64 tensor on ``off``'s device (its words
    are then tensor ops: the value is read on the device, never on the host). int64 products of two
    32-bit words wrap mod 2**64, and their low 64 bits are all that is read; shifts are masked."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = off & _M32, (off >> 32) & _M32
    c2 = c3 = torch.zeros_like(off)
    for _ in range(10):
        pa, pb = c0 * _PHILOX_A, c2 * _PHILOX_B
        c0, c1, c2, c3 = ((pb >> 32) & _M32) ^ c1 ^ k0, pb & _M32, ((pa >> 32) & _M32) ^ c3 ^ k1, pa & _M32
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def _to_uniform_np(c0: np.ndarray) -> np.ndarray:
    x = c0.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(_INT_TO_UNIFORM)


def _to_uniform_torch(c0: torch.Tensor) -> torch.Tensor:
    x = c0.to(torch.int32)  # wraps to the int32 bit pattern
    x = torch.where(x < 0, ~x, x)
    return x.to(torch.float32) * _INT_TO_UNIFORM


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_seed(seed, name: str = "seed"):
    """A valid seed (docs/design.md §10): an int in ``[0, 2**63)`` is returned as an int, a 0-d
    ``torch.int64`` tensor (any device) as itself. A tensor's value is not range-checked (that would
    read it on the host: a sync for a device tensor); every backend takes its low 63 bits
    (``seed & (2**63 - 1)``, :func:`seed_bits`), so a negative value ``v`` acts as ``v + 2**63``."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"{name} must be an int in [0, 2**63) or a 0-d torch.int64 tensor, got a tensor of "
                            f"dtype {seed.dtype}")
        if seed.dim() != 0:
            raise ValueError(f"{name} as a tensor must be 0-d (one int64 value), got shape {tuple(seed.shape)}")
        if seed.is_meta:
            raise ValueError(f"{name} must hold a value: a tensor on the meta device has none")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int in [0, 2**63) or a 0-d torch.int64 tensor, got "
                        f"{type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < SEED_MAX:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return seed


def seed_bits(seed, device=None):
    """The key of a checked seed: an int stays an int; a tensor becomes its low 63 bits, on ``device``
    (default: its own), by tensor ops (no host read)."""
    if isinstance(seed, torch.Tensor):
        if device is not None and seed.device != torch.device(device):
            seed = seed.to(device, non_blocking=True)
        return seed & (SEED_MAX - 1)
    return seed


def seed_on(seed, device) -> torch.Tensor:
    """A checked seed as the 0-d int64 tensor on ``device`` that the Triton and CUDA kernels read: a tensor
    as it is (moved if on another device), an int filled in on the device (a fill kernel, no host-to-device
    copy, so it also works while a CUDA graph is captured, where the int is a constant)."""
    if isinstance(seed, torch.Tensor):
        return seed if seed.device == torch.device(device) else seed.to(device, non_blocking=True)
    return torch.full((), seed, dtype=torch.int64, device=device)


def seed_int(seed) -> int:
    """A checked seed's value as an int, for host code (the C++ CPU kernels): reads a tensor seed
    (free for a CPU tensor; a sync for a device tensor). Never under ``torch.compile``."""
    if isinstance(seed, torch.Tensor):
        return int(seed.item()) & (SEED_MAX - 1)
    return seed


def philox_range(seed, n: int, device=None) -> torch.Tensor:
    """``u_raw(seed, i)`` for ``i = 0..n-1`` (a noise tensor's offsets); no offsets tensor is built on CPU.
    ``seed``: a checked seed (int or 0-d int64 tensor)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cpu" and _cpu is not None and not _compiling():
        out = torch.empty(n, dtype=torch.float32, device="cpu")
        if n:
            _cpu.uniform_range(seed_int(seed), 0, out.data_ptr(), n)
        return out
    return _to_uniform_torch(_philox_c0_torch(seed_bits(seed, dev), torch.arange(n, device=dev)))


def philox_uniform(seed, offsets, *, device=None, _force_torch: bool = False,
                   _force_numpy: bool = False) -> torch.Tensor:
    """Uniform float32 draws ``u_raw(seed, i)`` for every offset ``i``, bit-exact with ``tl.rand``.

    ``seed`` is an int in ``[0, 2**63)`` or a 0-d int64 tensor (docs/design.md §10). ``offsets`` is an
    integer tensor (any shape, any device, values in ``[0, 2**63)``) or an int (returns ``arange(offsets)``).
    The result has the offsets' shape and device.
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
    if off.numel() and not _compiling() and bool((off < 0).any()):
        raise ValueError("offsets must be >= 0")
    host = off.device.type == "cpu" and not _compiling()
    if host and _cpu is not None and not (_force_torch or _force_numpy):
        off = off.contiguous()
        out = torch.empty(off.shape, dtype=torch.float32, device="cpu")
        if off.numel():
            _cpu.uniform(seed_int(seed), off.data_ptr(), out.data_ptr(), off.numel())
        return out
    if host and not _force_torch:
        arr = off.contiguous().numpy().astype(np.uint64, copy=False)
        out = _to_uniform_np(_philox_c0(seed_int(seed), arr, _NumpyOps))
        return torch.from_numpy(out).reshape(off.shape)
    out = _to_uniform_torch(_philox_c0_torch(seed_bits(seed, off.device), off.reshape(-1)))
    return out.reshape(off.shape)
