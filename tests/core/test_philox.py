"""``philox_uniform`` against Triton's ``tl.rand`` (docs/design.md §2), bit for bit.

The Triton kernel runs under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py sets it before any
kernel is defined) and compiled on a GPU when one is present.
"""
import inspect
import random

import numpy as np
import pytest
import torch

from l0kernels import philox_uniform

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

DEV = "cuda" if torch.cuda.is_available() else "cpu"

FIXED_SEEDS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**62 + 12345, 2**63 - 1]
_rng = random.Random(20240611)
RANDOM_SEEDS = [_rng.randrange(0, 2**63) for _ in range(6)] + [_rng.randrange(0, 2**32) for _ in range(3)]


@triton.jit
def _tl_rand_kernel(out_ptr, off_ptr, seed, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = idx < n
    off = tl.load(off_ptr + idx, mask=m, other=0)
    tl.store(out_ptr + idx, tl.rand(seed, off), mask=m)


def tl_rand(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` computed by Triton, same shape as ``offsets``."""
    flat = offsets.reshape(-1).contiguous().to(DEV)
    out = torch.empty(flat.shape, dtype=torch.float32, device=DEV)
    n = flat.numel()
    if n:
        _tl_rand_kernel[(triton.cdiv(n, 64),)](out, flat, seed, n, BLOCK=64)
    return out.cpu().reshape(offsets.shape)


# every CPU implementation of the stream: the default (the compiled shim when built), numpy, torch ops
_PARAMS = inspect.signature(philox_uniform).parameters
PATHS = [{}, {"_force_torch": True}] + ([{"_force_numpy": True}] if "_force_numpy" in _PARAMS else [])
PATH_IDS = ["default", "torch", "numpy"][:len(PATHS)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _offsets(gen: torch.Generator, dtype: torch.dtype, n: int = 53) -> torch.Tensor:
    """Small offsets, offsets around 2**31 / 2**32 boundaries, and (int64) huge ones up to 2**62."""
    small = torch.arange(0, 11, dtype=torch.int64)
    if dtype == torch.int32:
        rnd = torch.randint(0, 2**31 - 1, (n,), generator=gen, dtype=torch.int64)
        edge = torch.tensor([2**31 - 1, 2**31 - 2, 2**30, 2**16 + 1], dtype=torch.int64)
    else:
        rnd = torch.cat([torch.randint(0, 2**62, (n,), generator=gen, dtype=torch.int64),
                         torch.randint(2**32, 2**34, (7,), generator=gen, dtype=torch.int64)])
        edge = torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 5, 2**40 + 3,
                             2**62 - 1, 2**62], dtype=torch.int64)
    return torch.cat([small, edge, rnd]).to(dtype)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("seed", FIXED_SEEDS + RANDOM_SEEDS)
def test_matches_tl_rand(seed, dtype, path):
    gen = torch.Generator().manual_seed(seed % (2**32) + (dtype == torch.int32))
    off = _offsets(gen, dtype)
    ref = tl_rand(seed, off)
    got = philox_uniform(seed, off, **path)
    assert got.dtype == torch.float32 and got.shape == off.shape
    assert torch.equal(bits(got), bits(ref)), f"seed={seed}: {int((bits(got) != bits(ref)).sum())} mismatches"


@pytest.mark.parametrize("seed", [3, 2**32 + 7, 2**63 - 1])
def test_all_cpu_paths_agree_bit_for_bit(seed):
    gen = torch.Generator().manual_seed(seed % 1000)
    for dtype in (torch.int64, torch.int32):
        off = _offsets(gen, dtype, n=500)
        outs = [philox_uniform(seed, off, **p) for p in PATHS]
        for o in outs[1:]:
            assert torch.equal(bits(o), bits(outs[0]))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(), (1,), (2, 1), (5, 7), (2, 3, 4), (3, 0, 2), (0,)])
def test_arbitrary_offset_shapes(shape, path):
    gen = torch.Generator().manual_seed(7)
    off = torch.randint(0, 2**40, shape, generator=gen, dtype=torch.int64)
    seed = 987654321987
    got = philox_uniform(seed, off, **path)
    assert got.shape == off.shape and got.dtype == torch.float32
    assert torch.equal(bits(got), bits(tl_rand(seed, off)))


def test_non_contiguous_and_other_integer_dtypes():
    seed = 424242
    base = torch.randint(0, 2**20, (6, 9), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    view = base.t()[::2]  # non-contiguous
    assert not view.is_contiguous()
    ref = tl_rand(seed, view.contiguous())
    for p in PATHS:
        assert torch.equal(bits(philox_uniform(seed, view, **p)), bits(ref))
    for dt in (torch.int16, torch.uint8, torch.int32):
        small = (base % 200).to(dt)
        assert torch.equal(bits(philox_uniform(seed, small)), bits(philox_uniform(seed, small.to(torch.int64))))


def test_int_count_is_arange():
    seed = 2**40 + 3
    assert torch.equal(bits(philox_uniform(seed, 37)), bits(philox_uniform(seed, torch.arange(37))))
    assert philox_uniform(seed, 0).shape == (0,)


def test_range_and_spread():
    u = philox_uniform(12345, torch.arange(2**40, 2**40 + 100_000))
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # a uniform: mean 1/2 (sd of the mean ~ 9e-4), each decile ~ 10%
    assert abs(float(u.mean()) - 0.5) < 5e-3
    hist = torch.histc(u, bins=10, min=0.0, max=1.0) / u.numel()
    assert torch.all((hist - 0.1).abs() < 5e-3), hist
    # distinct seeds give different streams; the two 32-bit halves of the seed both matter
    off = torch.arange(64)
    a = philox_uniform(5, off)
    assert not torch.equal(a, philox_uniform(6, off))
    assert not torch.equal(a, philox_uniform(5 + 2**32, off))
    # and the two halves of the offset both matter
    assert not torch.equal(a, philox_uniform(5, off + 2**32))


def test_seed_accepts_numpy_and_tensor_ints():
    off = torch.arange(17)
    ref = philox_uniform(99, off)
    assert torch.equal(philox_uniform(np.int64(99), off), ref)
    assert torch.equal(philox_uniform(torch.tensor(99), off), ref)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("seed", [0, 5, 2**32 + 7, 2**62 + 12345, 2**63 - 1])
def test_tensor_seed_same_stream(path, seed):
    """A 0-d int64 tensor seed gives the int seed's draws bit for bit on every path (docs/design.md §10)."""
    gen = torch.Generator().manual_seed(seed % 1000)
    off = torch.randint(0, 2**40, (29,), generator=gen)
    ref = philox_uniform(seed, off, **path)
    assert torch.equal(bits(philox_uniform(torch.tensor(seed), off, **path)), bits(ref))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("v", [-1, -3, -(2**63), -(2**40) - 11])
def test_negative_tensor_seed_is_masked(path, v):
    """A tensor seed's value is not range-checked (that would read it on the host); every backend keys
    the stream with its low 63 bits, so a negative value v acts as the int seed v + 2**63."""
    off = torch.arange(37)
    got = philox_uniform(torch.tensor(v, dtype=torch.int64), off, **path)
    assert torch.equal(bits(got), bits(philox_uniform(v + 2**63, off)))


@pytest.mark.parametrize("seed,exc", [
    (-1, ValueError), (2**63, ValueError), (2**64 + 1, ValueError), (-(2**63), ValueError),
    (1.0, TypeError), (0.5, TypeError), (True, TypeError), (False, TypeError), ("3", TypeError), (None, TypeError),
    (torch.tensor(1.5), TypeError), (torch.tensor(3, dtype=torch.int32), TypeError),
    (torch.tensor([1, 2]), ValueError), (torch.tensor([7]), ValueError),
])
def test_seed_validation(seed, exc):
    """Ints out of [0, 2**63), non-int types, tensors other than 0-d int64 (docs/design.md §10)."""
    with pytest.raises(exc, match="seed"):
        philox_uniform(seed, torch.arange(4))


@pytest.mark.parametrize("offsets,exc", [
    (torch.tensor([0.0, 1.0]), TypeError), (torch.tensor([True]), TypeError), ([0, 1], TypeError),
    (torch.tensor([0, -1]), ValueError), (-3, ValueError),
])
def test_offset_validation(offsets, exc):
    with pytest.raises(exc, match="offsets"):
        philox_uniform(1, offsets)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 2**32 + 7, 2**63 - 1])
def test_cuda_tensors_match_cpu_and_tl_rand(seed):
    off = _offsets(torch.Generator().manual_seed(3), torch.int64, n=1000).reshape(2, -1)
    got = philox_uniform(seed, off.cuda())
    assert got.device.type == "cuda" and got.shape == off.shape
    assert torch.equal(bits(got.cpu()), bits(philox_uniform(seed, off)))
    assert torch.equal(bits(got.cpu()), bits(tl_rand(seed, off)))
