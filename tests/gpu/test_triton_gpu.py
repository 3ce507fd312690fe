"""Triton backend on a real GPU (marked ``gpu``; skipped without CUDA): compiled kernels, autotuning,
realistic shapes, half precision through tensor cores, and ``torch.compile(fullgraph=True)``.

The interpreter tests (test_triton_linear.py / test_triton_conv2d.py) also run on the GPU with CUDA
tensors; these add what only a GPU exercises.
"""
import itertools

import pytest
import torch

pytest.importorskip("triton")

import l0kernels as l0k  # noqa: E402

from conftest import TOL  # noqa: E402

pytestmark = pytest.mark.gpu


def rel(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert not torch.isnan(out).any()
    den = ref.norm()
    return float((out - ref).norm() / den) if den > 0 else float((out - ref).norm())


def both(fn, tensors, dy=None, **kw):
    ps = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*ps, backend="triton", **kw)
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    qs = [t.detach().double().clone().requires_grad_() if t is not None else None for t in tensors]
    yr = fn(*qs, backend="torch", **kw)
    yr.backward(dy.double())
    return y, yr, ps, qs


def assert_close_all(y, yr, ps, qs, tol):
    assert rel(y, yr) < tol, rel(y, yr)
    for name, p, q in zip(("dx", "dW", "dlog_alpha", "db"), ps, qs):
        if p is not None:
            assert rel(p.grad, q.grad) < tol, (name, rel(p.grad, q.grad))


MODES = [(g, n) for g, n in itertools.product(("in", "out", "weight"), ("batch", "sample"))
         if not (g == "weight" and n == "sample")]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate,noise", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_linear_gpu_shapes(gate, noise, training, dtype):
    m, k, n = 301, 517, 263  # no multiple of any tile
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    la = (torch.randn({"in": (k,), "out": (n,), "weight": (n, k)}[gate], device="cuda") * 2).to(dtype)
    out = both(l0k.l0_linear, (x, w, la, b), seed=2**41 + 5, gate=gate, noise=noise, training=training)
    assert_close_all(*out, TOL[dtype])


def test_linear_tf32_tolerance():
    torch.backends.cuda.matmul.allow_tf32 = True
    x = torch.randn(1000, 784, device="cuda")
    w = torch.randn(300, 784, device="cuda") / 28
    la = torch.randn(784, device="cuda")
    assert_close_all(*both(l0k.l0_linear, (x, w, la, None), seed=3), 1e-3)


@pytest.mark.parametrize("noise", ["batch", "sample"])
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True),
                                                 (torch.float16, True)])
def test_conv2d_gpu_shapes(noise, dtype, channels_last):
    x = torch.randn(8, 48, 17, 15, device="cuda", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(40, 24, 3, 3, device="cuda") / 15).to(dtype)
    b = torch.randn(40, device="cuda", dtype=dtype)
    la = (torch.randn(40, device="cuda") * 2).to(dtype)
    y, yr, ps, qs = both(l0k.l0_conv2d, (x, w, la, b), stride=(2, 1), padding=1, dilation=(1, 2), groups=2,
                         seed=77, noise=noise)
    assert_close_all(y, yr, ps, qs, TOL[dtype])
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_auto_picks_a_backend_on_gpu():
    x = torch.randn(64, 128, device="cuda")
    w = torch.randn(96, 128, device="cuda")
    la = torch.randn(128, device="cuda")
    call = l0k._checks.linear_call(x, w, la, None, seed=1, gate="in", noise="batch", training=True, backend="auto",
                                   beta=2 / 3, gamma=-0.1, zeta=1.1)
    assert "triton" in l0k.available_backends(call)
    assert l0k.get_backend("triton").auto_eligible(call)
    y = l0k.l0_linear(x, w, la, seed=1)
    torch.testing.assert_close(y, l0k.l0_linear(x, w, la, seed=1, backend="torch"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_torch_compile_fullgraph(op):
    l0k.available_backends()  # import the lazy backends outside the compiled region
    torch._dynamo.reset()
    if op == "linear":
        t = (torch.randn(64, 96, device="cuda"), torch.randn(80, 96, device="cuda"), torch.randn(80, device="cuda"),
             torch.randn(80, device="cuda"))

        def f(x, w, la, b):
            y = l0k.l0_linear(x, w, la, b, seed=11, gate="out", noise="sample", backend="triton")
            return torch.relu(y).square().sum()
    else:
        t = (torch.randn(4, 8, 12, 12, device="cuda").to(memory_format=torch.channels_last),
             torch.randn(16, 8, 3, 3, device="cuda"), torch.randn(16, device="cuda"), torch.randn(16, device="cuda"))

        def f(x, w, la, b):
            y = l0k.l0_conv2d(x, w, la, b, padding=1, seed=11, noise="batch", backend="triton")
            return torch.relu(y).square().sum()
    ps = [a.clone().requires_grad_() for a in t]
    qs = [a.clone().requires_grad_() for a in t]
    out = torch.compile(f, fullgraph=True)(*ps)
    out.backward()
    ref = f(*qs)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_over_open_heads_compiled(dtype):
    """The open-heads attention kernels compiled (head size 128, grouped-query, causal) against PyTorch's
    scaled_dot_product_attention in float32, forward and the gradients of q, k, v; closed heads exactly zero."""
    from l0kernels.backends.triton.attention import attention
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, hkv, s, d = 2, 8, 2, 300, 128
    q, k, v = (torch.randn(b, n, s, d, device="cuda", generator=g).to(dtype).requires_grad_() for n in (h, hkv, hkv))
    open_ = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool, device="cuda")
    out = attention(q, k, v, open_, None, True, d ** -0.5)
    qs, ks, vs = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qs, ks.repeat_interleave(h // hkv, 1),
                                                           vs.repeat_interleave(h // hkv, 1), is_causal=True)
    ref = ref * open_[None, :, None, None]
    dy = torch.randn(out.shape, device="cuda", generator=g)
    got = torch.autograd.grad(out, (q, k, v), dy.to(dtype))
    want = torch.autograd.grad(ref, (qs, ks, vs), dy)
    assert rel(out, ref) < 2e-2 and bool((out[:, ~open_] == 0).all())
    for a, c in zip(got, want):
        assert rel(a, c) < 5e-2
    assert bool((got[0][:, ~open_] == 0).all())
