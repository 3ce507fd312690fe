"""Triton attention over the open heads (``l0kernels/backends/triton/attention.py``; CPU under TRITON_INTERPRET=1, the
same tests natively on a GPU) against softmax attention written out in float64: outputs and the gradients of q, k
and v, grouped-query attention, causal (bottom-right aligned) and float / bool masks, odd sizes, strided inputs,
every head open or closed; a closed head's output and dq exactly zero and nothing of it in dk/dv."""
import pytest
import torch

pytest.importorskip("triton")

from l0kernels.backends.triton.attention import attention  # noqa: E402

from conftest import rel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(q, k, v, open_, mask, causal, scale):
    r = q.shape[1] // k.shape[1]
    k2, v2 = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    s = q @ k2.transpose(-1, -2) * scale
    if mask is not None:
        s = s + (torch.zeros(mask.shape, dtype=s.dtype).masked_fill(~mask, float("-inf"))
                 if mask.dtype == torch.bool else mask.double())
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        s = s.masked_fill(~(torch.arange(sq)[:, None] + sk - sq >= torch.arange(sk)[None]), float("-inf"))
    return (torch.softmax(s, -1) @ v2) * open_.double()[None, :, None, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b, h, hkv, sq, sk, d, causal, mask, p_open", [
    (2, 4, 2, 5, 5, 8, True, None, 0.5), (1, 6, 3, 19, 23, 16, False, "float", 0.6),
    (2, 4, 4, 17, 17, 24, True, "bool", 0.7), (1, 2, 1, 1, 9, 8, False, None, 1.0),
    (1, 3, 1, 7, 12, 40, True, "float", 0.0), (2, 2, 2, 33, 33, 16, True, None, 1.0)])
def test_attention_over_open_heads(b, h, hkv, sq, sk, d, causal, mask, p_open, dtype):
    g = torch.Generator().manual_seed(sq * 100 + d)
    q64 = torch.randn(b, sq, h, d, dtype=torch.float64, generator=g).transpose(1, 2)  # strided, as models make it
    k64 = torch.randn(b, hkv, sk, d, dtype=torch.float64, generator=g)
    v64 = torch.randn(b, sk, hkv, d, dtype=torch.float64, generator=g).transpose(1, 2)
    open_ = torch.rand(h, generator=g) < p_open
    m = None
    if mask == "float":
        m = torch.randn(b, 1, sq, sk, dtype=torch.float64, generator=g)
    elif mask == "bool":
        m = torch.rand(1, 1, sq, sk, generator=g) < 0.8
        m[..., 0] = True
    scale = d ** -0.5
    leaves = [t.to(DEV, dtype).requires_grad_(True) for t in (q64, k64, v64)]
    refs = [t.to(dtype).double().requires_grad_(True) for t in (q64, k64, v64)]
    mk = None if m is None else (m.to(DEV) if m.dtype == torch.bool else m.to(DEV, dtype))
    out = attention(*leaves, open_.to(DEV), mk, causal, scale)
    ref = _reference(*refs, open_, None if m is None else (m if m.dtype == torch.bool else m.to(dtype).double()),
                     causal, scale)
    tol = 2e-5 if dtype == torch.float32 else 5e-3
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel(out.cpu(), ref) < tol or (ref == 0).all() and (out == 0).all()
    assert bool((out[:, ~open_.to(DEV)] == 0).all())
    gy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(out, leaves, gy.to(DEV, dtype))
    want = torch.autograd.grad(ref, refs, gy)
    for name, a, c in zip("qkv", got, want):
        assert torch.isfinite(a).all(), name
        assert rel(a.cpu(), c) < tol * 10 or (c == 0).all() and (a == 0).all(), (name, rel(a.cpu(), c))
    assert bool((got[0][:, ~open_.to(DEV)] == 0).all())
    groups = open_.view(hkv, h // hkv).any(1)  # a key/value head no open query head reads: zero dk, dv
    assert bool((got[1][:, ~groups.to(DEV)] == 0).all()) and bool((got[2][:, ~groups.to(DEV)] == 0).all())
