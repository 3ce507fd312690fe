"""The torch backend (the reference) against autograd through the docs/design.md §3 formulas.

``formula_linear`` / ``formula_conv2d`` below are docs/design.md §3 written with plain differentiable
ops, gates from ``sample_gates`` (training) or ``deterministic_gates`` (eval); autograd
differentiates them. The backend's hand-written backward must agree with it, and pass
``gradcheck`` in float64, in every mode.
"""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import l0kernels as l0k
from conftest import TOL, TOL_TF32

LINEAR_MODES = [("in", "batch"), ("in", "sample"), ("out", "batch"), ("out", "sample"), ("weight", "batch")]
GRAD_SETS = {"all": (1, 1, 1, 1), "x": (1, 0, 0, 0), "w_b": (0, 1, 0, 1), "la": (0, 0, 1, 0), "x_la": (1, 0, 1, 0)}


# ---- docs/design.md §3 as plain autograd -------------------------------------------------------------------
def formula_gates(log_alpha, seed, noise_shape, training):
    if training:
        return l0k.sample_gates(log_alpha, seed, noise_shape)
    return l0k.deterministic_gates(log_alpha)


def formula_linear(x, w, la, b, seed, gate, noise, training):
    n, k = w.shape
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    m = x2.shape[0]
    if gate == "weight":
        shape = (n, k)
    else:
        g = k if gate == "in" else n
        shape = (m, g) if noise == "sample" else (g,)
    z = formula_gates(la, seed, shape, training)
    if gate == "in":
        y = (x2 * z) @ w.t()
        y = y + b if b is not None else y
    elif gate == "out":
        y = x2 @ w.t()
        y = (y + b if b is not None else y) * z
    else:
        y = x2 @ (w * z).t()
        y = y + b if b is not None else y
    return y.reshape(*x.shape[:-1], n)


def formula_conv2d(x, w, la, b, stride, padding, dilation, groups, seed, noise, training):
    c = w.shape[0]
    shape = (x.shape[0], c) if noise == "sample" else (c,)
    z = formula_gates(la, seed, shape, training)
    h = F.conv2d(x, w, b, stride, padding, dilation, groups)
    return h * (z[:, :, None, None] if z.dim() == 2 else z[:, None, None])


# ---- helpers -------------------------------------------------------------------------------------------
def linear_inputs(gen, m_shape, n, k, gate, bias, dtype=torch.float64):
    x = torch.randn(*m_shape, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5
    la_shape = {"in": (k,), "out": (n,), "weight": (n, k)}[gate]
    la = torch.randn(la_shape, generator=gen, dtype=torch.float64) * 1.5
    b = torch.randn(n, generator=gen, dtype=torch.float64) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, w, la, b)]


def conv_inputs(gen, bsz, cin, cout, hw, kk, groups, bias, dtype=torch.float64):
    x = torch.randn(bsz, cin, *hw, generator=gen, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, *kk, generator=gen, dtype=torch.float64) / (cin * kk[0] * kk[1]) ** 0.5
    la = torch.randn(cout, generator=gen, dtype=torch.float64) * 1.5
    b = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, w, la, b)]


def with_grad(tensors, flags):
    return [t.detach().clone().requires_grad_(bool(f)) if t is not None else None for t, f in zip(tensors, flags)]


def run_and_grads(fn, tensors, gen_seed):
    """Output and gradients of ``sum(out * R)`` for a fixed random ``R``."""
    out = fn(*tensors)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64).to(out.dtype)
    req = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad((out * r).sum(), req, allow_unused=False) if req and out.numel() else []
    return out, list(grads)


# ---- gradcheck, float64, every mode --------------------------------------------------------------------
@pytest.mark.parametrize("grads", list(GRAD_SETS), ids=list(GRAD_SETS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
def test_linear_gradcheck(gate, noise, training, bias, grads):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{gate}{noise}{training}{bias}{grads}".encode()))
    flags = GRAD_SETS[grads]
    if not bias:
        flags = flags[:3] + (0,)
    if not any(flags):
        pytest.skip("nothing requires grad")
    x, w, la, b = with_grad(linear_inputs(gen, (5,), 4, 6, gate, bias), flags)
    seed = 1234 + len(grads)

    def f(x, w, la, b):
        return l0k.l0_linear(x, w, la, b, seed=seed, gate=gate, noise=noise, training=training, backend="torch")

    assert torch.autograd.gradcheck(f, (x, w, la, b), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=False)


CONV_GEOMS = [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=2),
    dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1), groups=1),
    dict(stride=(2, 1), padding=1, dilation=2, groups=4),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("geom", range(len(CONV_GEOMS)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("noise", ["batch", "sample"])
def test_conv2d_gradcheck(noise, training, geom, bias):
    g = CONV_GEOMS[geom]
    gen = torch.Generator().manual_seed(100 + geom + 10 * bias + 20 * training)
    x, w, la, b = with_grad(conv_inputs(gen, 2, 4, 4, (5, 4), (2, 2), g["groups"], bias), (1, 1, 1, 1))

    def f(x, w, la, b):
        return l0k.l0_conv2d(x, w, la, b, g["stride"], g["padding"], g["dilation"], g["groups"], seed=77,
                             noise=noise, training=training, backend="torch")

    assert torch.autograd.gradcheck(f, (x, w, la, b), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("grads", ["x", "la", "w_b"])
def test_conv2d_gradcheck_partial_grads(grads):
    gen = torch.Generator().manual_seed(5)
    for noise in ("batch", "sample"):
        x, w, la, b = with_grad(conv_inputs(gen, 2, 2, 3, (4, 4), (2, 2), 1, True), GRAD_SETS[grads])

        def f(x, w, la, b):
            return l0k.l0_conv2d(x, w, la, b, 1, 1, seed=9, noise=noise, backend="torch")

        assert torch.autograd.gradcheck(f, (x, w, la, b), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ---- backend vs formula autograd, every dtype -------------------------------------------------------------
def _compare(backend_fn, formula_fn, base, dtype, rel_err, flags=(1, 1, 1, 1), gen_seed=0, tol=None):
    """Run the backend in ``dtype`` and the formula in float64 on the same (``dtype``-rounded) values."""
    low = with_grad([t.to(dtype) if t is not None else None for t in base], flags)
    ref = with_grad([t.to(dtype).double() if t is not None else None for t in base], flags)
    out, grads = run_and_grads(backend_fn, low, gen_seed)
    out_ref, grads_ref = run_and_grads(formula_fn, ref, gen_seed)
    assert out.dtype == dtype and out.shape == out_ref.shape
    tol = tol or TOL[dtype]
    assert rel_err(out, out_ref) < tol, "output"
    assert len(grads) == len(grads_ref)
    names = [n for n, t in zip("x w log_alpha bias".split(), low) if t is not None and t.requires_grad]
    for name, g, gr in zip(names, grads, grads_ref):
        assert g.dtype == dtype, name
        assert g.shape == gr.shape, name
        assert rel_err(g, gr) < tol, name


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
def test_linear_matches_formula(gate, noise, training, dtype, rel_err):
    gen = torch.Generator().manual_seed(31 + DTYPES.index(dtype))
    for bias, m_shape, n, k in [(True, (33,), 19, 27), (False, (2, 3), 8, 13)]:  # (2, 3, K): leading dims
        base = linear_inputs(gen, m_shape, n, k, gate, bias)
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        kw = dict(seed=seed, gate=gate, noise=noise, training=training)
        _compare(lambda x, w, la, b: l0k.l0_linear(x, w, la, b, backend="torch", **kw),
                 lambda x, w, la, b: formula_linear(x, w, la, b, seed, gate, noise, training),
                 base, dtype, rel_err, gen_seed=seed % 1000)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("noise", ["batch", "sample"])
def test_conv2d_matches_formula(noise, training, dtype, rel_err):
    gen = torch.Generator().manual_seed(61 + DTYPES.index(dtype))
    for bias, geom in [(True, CONV_GEOMS[1]), (False, CONV_GEOMS[2]), (True, CONV_GEOMS[3])]:
        base = conv_inputs(gen, 3, 8, 12, (9, 7), (3, 3), geom["groups"], bias)
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        args = (geom["stride"], geom["padding"], geom["dilation"], geom["groups"])
        _compare(lambda x, w, la, b: l0k.l0_conv2d(x, w, la, b, *args, seed=seed, noise=noise, training=training,
                                                    backend="torch"),
                 lambda x, w, la, b: formula_conv2d(x, w, la, b, *args, seed, noise, training),
                 base, dtype, rel_err, gen_seed=seed % 1000)


@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
def test_linear_partial_grads_match_formula(gate, noise, rel_err):
    gen = torch.Generator().manual_seed(3)
    base = linear_inputs(gen, (17,), 9, 11, gate, True)
    for flags in GRAD_SETS.values():
        _compare(lambda x, w, la, b: l0k.l0_linear(x, w, la, b, seed=5, gate=gate, noise=noise, backend="torch"),
                 lambda x, w, la, b: formula_linear(x, w, la, b, 5, gate, noise, True),
                 base, torch.float32, rel_err, flags=flags)


# ---- layouts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
def test_linear_non_contiguous_inputs(gate, noise, rel_err):
    gen = torch.Generator().manual_seed(8)
    n, k, m = 10, 14, 12
    xt = torch.randn(k, m, generator=gen).t()                # transposed view (m, k)
    xs = torch.randn(m, 2 * k, generator=gen)[:, ::2]         # strided slice (m, k)
    wt = torch.randn(k, n, generator=gen).t()                 # transposed weight (n, k)
    la_full = torch.randn(2 * n, 2 * k, generator=gen)
    la = {"in": la_full[0, ::2], "out": la_full[::2, 0], "weight": la_full[::2, ::2]}[gate]
    b = torch.randn(2 * n, generator=gen)[::2]
    for x in (xt, xs):
        assert not x.is_contiguous()
        leaves = with_grad([x, wt, la, b], (1, 1, 1, 1))
        cont = with_grad([t.contiguous() for t in (x, wt, la, b)], (1, 1, 1, 1))
        f = lambda x, w, la, b: l0k.l0_linear(x, w, la, b, seed=99, gate=gate, noise=noise, backend="torch")
        out, grads = run_and_grads(f, leaves, 1)
        out_c, grads_c = run_and_grads(f, cont, 1)
        assert rel_err(out, out_c) < 1e-6
        for g, gc in zip(grads, grads_c):
            assert rel_err(g, gc) < 1e-6


@pytest.mark.parametrize("noise", ["batch", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv2d_channels_last_and_non_contiguous(noise, dtype, rel_err):
    gen = torch.Generator().manual_seed(12)
    base = conv_inputs(gen, 2, 6, 9, (8, 7), (3, 3), 3, True)
    kw = dict(seed=2024, noise=noise, backend="torch")
    args = (2, 1, 1, 3)
    ref_fn = lambda x, w, la, b: formula_conv2d(x, w, la, b, *args, 2024, noise, True)

    def cl_fn(x, w, la, b):
        return l0k.l0_conv2d(x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last),
                             la, b, *args, **kw)

    def sliced_fn(x, w, la, b):  # a non-contiguous spatial crop of a bigger input
        big = F.pad(x, (1, 2, 0, 3))
        return l0k.l0_conv2d(big[:, :, :-3, 1:-2], w, la, b, *args, **kw)

    for fn in (cl_fn, sliced_fn):
        _compare(fn, ref_fn, base, dtype, rel_err)
    out = cl_fn(*[t.to(dtype) for t in base])
    assert out.shape == (2, 9, 4, 4)


# ---- zero-size inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
def test_linear_zero_rows(gate, noise, training):
    gen = torch.Generator().manual_seed(4)
    for m_shape in [(0,), (3, 0)]:
        x, w, la, b = with_grad(linear_inputs(gen, m_shape, 5, 7, gate, True, torch.float32), (1, 1, 1, 1))
        y = l0k.l0_linear(x, w, la, b, seed=1, gate=gate, noise=noise, training=training, backend="torch")
        assert y.shape == (*m_shape, 5)
        y.sum().backward()
        assert x.grad.shape == x.shape
        for t in (w, la, b):
            assert t.grad is None or (t.grad.shape == t.shape and not t.grad.any())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("noise", ["batch", "sample"])
def test_conv2d_zero_batch(noise, training):
    gen = torch.Generator().manual_seed(4)
    x, w, la, b = with_grad(conv_inputs(gen, 0, 4, 6, (5, 5), (3, 3), 2, True, torch.float32), (1, 1, 1, 1))
    y = l0k.l0_conv2d(x, w, la, b, 1, 1, 1, 2, seed=3, noise=noise, training=training, backend="torch")
    assert y.shape == (0, 6, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (w, la, b):
        assert t.grad is None or (t.grad.shape == t.shape and not t.grad.any())


# ---- what autograd keeps -------------------------------------------------------------------------------
def _saved_by(fn, tensors):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*tensors)
    return out, saved


@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
def test_linear_saves_no_mask(gate, noise):
    gen = torch.Generator().manual_seed(2)
    m, n, k = 23, 6, 5
    inputs = with_grad(linear_inputs(gen, (m,), n, k, gate, True, torch.float32), (1, 1, 1, 1))
    out, saved = _saved_by(lambda x, w, la, b: l0k.l0_linear(x, w, la, b, seed=1, gate=gate, noise=noise,
                                                             backend="torch"), inputs)
    assert len(saved) == 4
    for s, t in zip(saved, inputs):
        assert s is t or (s.data_ptr() == t.data_ptr() and s.shape == t.shape)
    out.sum().backward()  # and backward still works from those alone
    assert all(t.grad is not None for t in inputs)


@pytest.mark.parametrize("noise", ["batch", "sample"])
def test_conv2d_saves_no_mask(noise):
    gen = torch.Generator().manual_seed(2)
    inputs = with_grad(conv_inputs(gen, 3, 4, 5, (6, 6), (3, 3), 1, True, torch.float32), (1, 1, 1, 1))
    out, saved = _saved_by(lambda x, w, la, b: l0k.l0_conv2d(x, w, la, b, seed=1, noise=noise, backend="torch"),
                           inputs)
    assert len(saved) == 4
    for s, t in zip(saved, inputs):
        assert s is t or (s.data_ptr() == t.data_ptr() and s.shape == t.shape)
    assert not any(tuple(s.shape) in {(3, 5), (3, 5, 4, 4)} for s in saved)


def test_same_seed_same_output_training_and_eval_ignores_seed():
    gen = torch.Generator().manual_seed(0)
    x, w, la, b = linear_inputs(gen, (7,), 4, 6, "in", True, torch.float32)
    a = l0k.l0_linear(x, w, la, b, seed=3, backend="torch")
    assert torch.equal(a, l0k.l0_linear(x, w, la, b, seed=3, backend="torch"))
    assert not torch.equal(a, l0k.l0_linear(x, w, la, b, seed=4, backend="torch"))
    e1 = l0k.l0_linear(x, w, la, b, seed=3, training=False, backend="torch")
    assert torch.equal(e1, l0k.l0_linear(x, w, la, b, seed=4, training=False, backend="torch"))
    assert torch.equal(e1, l0k.l0_linear(x, w, la, b, training=False, backend="torch"))
    # with seed=None in training, a seed is drawn from PyTorch's generator: manual_seed repeats it
    torch.manual_seed(5)
    r1 = l0k.l0_linear(x, w, la, b, backend="torch")
    r2 = l0k.l0_linear(x, w, la, b, backend="torch")
    torch.manual_seed(5)
    assert torch.equal(r1, l0k.l0_linear(x, w, la, b, backend="torch"))
    assert not torch.equal(r1, r2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
def test_linear_zero_features(gate, noise, training):
    """in_features = 0 gives the (gated, for gate='out') bias; out_features = 0 gives an empty output."""
    gen = torch.Generator().manual_seed(6)
    for n, k in [(4, 0), (0, 5)]:
        x, w, la, b = with_grad(linear_inputs(gen, (2, 3), n, k, gate, True, torch.float32), (1, 1, 1, 1))
        y = l0k.l0_linear(x, w, la, b, seed=8, gate=gate, noise=noise, training=training, backend="torch")
        assert y.shape == (2, 3, n)
        ref = formula_linear(x, w, la, b, 8, gate, noise, training)
        assert torch.allclose(y, ref, rtol=1e-6, atol=1e-7)
        (y * torch.randn(y.shape, generator=gen)).sum().backward()
        for t in (x, w, la, b):
            assert t.grad is not None and t.grad.shape == t.shape


def _cuda(*ts):
    return [t.cuda() if t is not None else None for t in ts]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
def test_linear_on_cuda_matches_formula(gate, noise, dtype, rel_err):
    gen = torch.Generator().manual_seed(41)
    base = linear_inputs(gen, (4, 33), 65, 47, gate, True)
    for training in (True, False):
        _compare(lambda x, w, la, b: l0k.l0_linear(*_cuda(x, w, la, b), seed=11, gate=gate, noise=noise,
                                                   training=training, backend="torch").cpu(),
                 lambda x, w, la, b: formula_linear(x, w, la, b, 11, gate, noise, training),
                 base, dtype, rel_err, tol=TOL_TF32 if dtype == torch.float32 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("noise", ["batch", "sample"])
def test_conv2d_on_cuda_matches_formula(noise, dtype, rel_err):
    gen = torch.Generator().manual_seed(42)
    base = conv_inputs(gen, 3, 8, 12, (9, 7), (3, 3), 2, True)
    args = (2, 1, 1, 2)
    for training in (True, False):
        _compare(lambda x, w, la, b: l0k.l0_conv2d(*_cuda(x, w, la, b), *args, seed=12, noise=noise,
                                                   training=training, backend="torch").cpu(),
                 lambda x, w, la, b: formula_conv2d(x, w, la, b, *args, 12, noise, training),
                 base, dtype, rel_err, tol=TOL_TF32 if dtype == torch.float32 else None)
