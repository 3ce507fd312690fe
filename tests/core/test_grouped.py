"""Grouped gates (docs/design.md §8, ``group_size=g``): one gate per g consecutive features / channels.

Every backend that runs on the CPU (torch plain, torch's C++ CPU paths, the Triton interpreter on tiny
shapes) against an explicit float64 reference: gates of the noise tensor over the *gates* (offsets
``g`` / ``m*G + g``), ``repeat_interleave``'d to the features, and autograd through the contract's formulas.
"""
import pytest
import torch
import torch.nn.functional as F

import l0kernels as l0k
from l0kernels import _gates
from l0kernels._philox import _cpu
from l0kernels.backends.torch import cpu_paths
from conftest import TOL, TOL_TF32

SEED = 2**40 + 123


def _gates64(la64, seed, rows, training, sample):
    """Reference gates per gate, float64 and differentiable: (G,) or (rows, G)."""
    if not training:
        return l0k.deterministic_gates(la64)
    shape = (rows, la64.shape[0]) if sample else None
    return l0k.sample_gates(la64, seed, shape)


def _ref_linear(x, w, la, b, seed, gate, noise, training, g):
    x64, w64, la64 = (t.detach().cpu().double().requires_grad_() for t in (x, w, la))
    b64 = b.detach().cpu().double().requires_grad_() if b is not None else None
    k = w.shape[1]
    x2 = x64.reshape(-1, k)
    z = _gates64(la64, seed, x2.shape[0], training, noise == "sample").repeat_interleave(g, dim=-1)
    if gate == "in":
        y = F.linear(x2 * z, w64, b64)
    else:
        y = F.linear(x2, w64, b64) * z
    return y.reshape(*x.shape[:-1], w.shape[0]), (x64, w64, la64, b64)


def _ref_conv(x, w, la, b, seed, noise, training, g, stride, padding):
    x64, w64, la64 = (t.detach().cpu().double().requires_grad_() for t in (x, w, la))
    b64 = b.detach().cpu().double().requires_grad_() if b is not None else None
    z = _gates64(la64, seed, x.shape[0], training, noise == "sample").repeat_interleave(g, dim=-1)
    h = F.conv2d(x64, w64, b64, stride, padding)
    y = h * (z[:, :, None, None] if z.dim() == 2 else z[:, None, None])
    return y, (x64, w64, la64, b64)


@pytest.fixture(params=["torch", "torch_cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request, monkeypatch):
    """``torch`` with the C++ paths off, ``torch_cpp`` with them on, ``triton`` under the interpreter (or on
    a GPU), ``cuda`` (the extension; GPU only)."""
    name = request.param
    if name == "cuda":
        if not torch.cuda.is_available() or "cuda" not in l0k.available_backends():
            pytest.skip("needs a GPU and the CUDA extension")
        return "cuda"
    if name == "torch":
        monkeypatch.setattr(cpu_paths, "ENABLED", False)
        monkeypatch.setattr(_gates, "_CPU_GATE_KERNEL", False)
        return "torch"
    if name == "torch_cpp":
        if _cpu is None or not cpu_paths.ENABLED:
            pytest.skip("l0kernels._cpu was not built")
        return "torch"
    pytest.importorskip("triton")
    if "triton" not in l0k.available_backends():
        pytest.skip("Triton backend unavailable")
    from l0kernels.backends import triton as tb
    if not tb.INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    return "triton"


def _device(backend):
    """GPU backends run on CUDA tensors (Triton on the CPU only under the interpreter)."""
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def _to(dev, *ts):
    return [t.detach().to(dev).requires_grad_() for t in ts]


def _check(out, ref, refs, grads_of, rel_err, dtype):
    tol = TOL[dtype] if dtype != torch.float32 else (2e-5 if out.device.type == "cpu" else TOL_TF32)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert rel_err(out.cpu(), ref) < tol
    ref.backward(gy)
    out.backward(gy.to(out.device, out.dtype))
    for (name, t), r in zip(grads_of, refs):
        if t is None:
            continue
        assert t.grad is not None, name
        # a gradient that is a sum with cancellation (one gate's dlog_alpha, say -1e-3 from terms of ~0.5)
        # carries float32 rounding of its terms: its error is measured against at least 0.1
        assert not torch.isnan(t.grad).any(), name
        err = float((t.grad.cpu().double() - r.grad).norm() / max(float(r.grad.norm()), 0.1))
        assert err < tol * 10, name


# (K, N, group_size, gate): odd shapes; g == features (one gate) and g == 1 included
LINEAR_CASES = [(12, 5, 3, "in"), (7, 9, 7, "in"), (6, 10, 5, "out"), (9, 8, 1, "in"), (5, 6, 6, "out"),
                (10, 7, 1, "out")]


@pytest.mark.parametrize("k,n,g,gate", LINEAR_CASES)
@pytest.mark.parametrize("noise,training", [("batch", True), ("sample", True), ("batch", False)])
def test_linear_grouped_matches_reference(backend, k, n, g, gate, noise, training, rel_err):
    dtype = torch.float64 if backend == "torch" else torch.float32
    gen = torch.Generator().manual_seed(k * 100 + n * 10 + g)
    x = torch.randn(3, 13, k, generator=gen, dtype=dtype)[:, ::3]  # non-contiguous, 3 x 5 rows
    feats = k if gate == "in" else n
    w = torch.randn(n, k, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(n, generator=gen, dtype=dtype).requires_grad_()
    la = (torch.randn(feats // g, generator=gen, dtype=dtype) * 2).requires_grad_()
    x.requires_grad_()
    dev = _device(backend)
    if dev != "cpu":
        x, w, la, b = _to(dev, x, w, la, b)
    y = l0k.l0_linear(x, w, la, b, seed=SEED, gate=gate, noise=noise, training=training, backend=backend,
                      group_size=g)
    ref, refs = _ref_linear(x, w, la, b, SEED, gate, noise, training, g)
    assert y.shape == ref.shape
    _check(y, ref, refs, [("x", x), ("w", w), ("la", la), ("b", b)], rel_err, dtype)


@pytest.mark.parametrize("g", [1, 2, 6])
@pytest.mark.parametrize("noise,training", [("batch", True), ("sample", True), ("batch", False)])
def test_conv2d_grouped_matches_reference(backend, g, noise, training, rel_err):
    dtype = torch.float64 if backend == "torch" else torch.float32
    gen = torch.Generator().manual_seed(10 + g)
    x = torch.randn(2, 3, 7, 6, generator=gen, dtype=dtype)
    if backend != "triton":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(6, 3, 3, 2, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(6, generator=gen, dtype=dtype).requires_grad_()
    la = (torch.randn(6 // g, generator=gen, dtype=dtype) * 2).requires_grad_()
    x.requires_grad_()
    dev = _device(backend)
    if dev != "cpu":
        x, w, la, b = _to(dev, x, w, la, b)
    y = l0k.l0_conv2d(x, w, la, b, (2, 1), (1, 0), seed=SEED, noise=noise, training=training, backend=backend,
                      group_size=g)
    ref, refs = _ref_conv(x, w, la, b, SEED, noise, training, g, (2, 1), (1, 0))
    _check(y, ref, refs, [("x", x), ("w", w), ("la", la), ("b", b)], rel_err, dtype)


def test_group_size_one_is_bit_identical_to_default():
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(5, 8, generator=gen), torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen)
    la = torch.randn(8, generator=gen)
    for noise in ("batch", "sample"):
        a = l0k.l0_linear(x, w, la, b, seed=5, noise=noise, backend="torch")
        c = l0k.l0_linear(x, w, la, b, seed=5, noise=noise, backend="torch", group_size=1)
        assert torch.equal(a, c)


def test_one_gate_for_all_features_matches_scalar_gate():
    """g == K: one gate; batch noise at offset 0 scales every input by the same z."""
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(6, 10, generator=gen, dtype=torch.float64), torch.randn(3, 10, generator=gen, dtype=torch.float64)
    la = torch.tensor([0.3], dtype=torch.float64)
    y = l0k.l0_linear(x, w, la, seed=9, group_size=10, backend="torch")
    z = l0k.sample_gates(la, 9)
    torch.testing.assert_close(y, (x @ w.T) * z)


def test_grouped_modules_eval_plans_and_accounting():
    torch.manual_seed(5)
    lin = l0k.L0Linear(12, 5, gate="in", group_size=4)
    lin_out = l0k.L0Linear(5, 6, gate="out", group_size=3)
    conv = l0k.L0Conv2d(3, 6, 3, padding=1, group_size=2)
    assert lin.log_alpha.shape == (3,) and lin_out.log_alpha.shape == (2,) and conv.log_alpha.shape == (3,)
    with torch.no_grad():
        lin.log_alpha.copy_(torch.tensor([5.0, -5.0, 0.5]))
        lin_out.log_alpha.copy_(torch.tensor([-5.0, 1.0]))
        conv.log_alpha.copy_(torch.tensor([5.0, -5.0, 5.0]))
    for m in (lin, lin_out, conv):
        m.eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        y = lin(x)
        plan = l0k.backends._plans.cached_plan(lin)
        assert plan.in_idx.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]  # group 1 (features 4..7) closed
        z = lin.feature_gates()
        torch.testing.assert_close(y, F.linear(x * z, lin.weight, lin.bias))
        h = torch.randn(4, 5)
        y2 = lin_out(h)
        assert l0k.backends._plans.cached_plan(lin_out).out_idx.tolist() == [3, 4, 5]
        torch.testing.assert_close(y2, F.linear(h, lin_out.weight, lin_out.bias) * lin_out.feature_gates())
        xc = torch.randn(2, 3, 5, 5)
        yc = conv(xc)
        assert l0k.backends._plans.cached_plan(conv).out_idx.tolist() == [0, 1, 4, 5]
        torch.testing.assert_close(yc, F.conv2d(xc, conv.weight, conv.bias, padding=1)
                                   * conv.feature_gates()[:, None, None])
    # a gate of an input group controls g * out_features weights; of an output group g * (K + 1)
    assert lin.params_per_gate == 4 * 5 and lin_out.params_per_gate == 3 * 6 and conv.params_per_gate == 2 * 28
    p = lin.prob_open()
    torch.testing.assert_close(lin.expected_params(), (p * 20).sum() + 5)
    # regularizer: ||theta_g||^2 over the whole group
    reg = lin.regularizer(0.0, weight_decay=2.0)
    sq = lin.weight.pow(2).sum(0).reshape(3, 4).sum(1)
    torch.testing.assert_close(reg, (p * sq).sum() + lin.bias.pow(2).sum())
    assert l0k.l0_penalty(torch.nn.Sequential(lin, lin_out)).item() == pytest.approx(
        float((lin.prob_open().sum() + lin_out.prob_open().sum()).detach()))
    lin.log_alpha.data.fill_(50.0)
    l0k.constrain_(lin)
    assert float(lin.log_alpha.max()) == pytest.approx(4.60517, rel=1e-5)
    # expected FLOPs count g features per gate
    torch.testing.assert_close(lin_out.expected_flops(), lin_out.prob_open().sum() * 3 * (2 * 5 - 1 + 1))
    s = l0k.summary(torch.nn.Sequential(conv), input_shape=(1, 3, 5, 5))
    assert (s.layers[0].gates_active, s.layers[0].gates_total) == (2, 3)
    assert "group_size=2" in repr(conv)


def test_grouped_autocast_bf16():
    torch.manual_seed(6)
    lin = l0k.L0Linear(8, 4, gate="in", group_size=2, backend="torch")
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    lin.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ye = lin(x)
    ref = F.linear(x * lin.feature_gates(), lin.weight, lin.bias)
    assert ye.dtype == torch.bfloat16 and float((ye.float() - ref).norm() / ref.norm()) < 1e-2


def test_grouped_bad_input():
    x, w = torch.randn(2, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="group_size .4. must divide in_features .6."):
        l0k.l0_linear(x, w, torch.randn(1), group_size=4)
    with pytest.raises(ValueError, match=r"log_alpha must have shape \(3,\).*group_size=2"):
        l0k.l0_linear(x, w, torch.randn(6), group_size=2)
    with pytest.raises(ValueError, match="group_size must be 1 for gate='weight'"):
        l0k.l0_linear(x, w, torch.randn(4, 6), gate="weight", group_size=2)
    with pytest.raises(TypeError, match="group_size must be an int"):
        l0k.l0_linear(x, w, torch.randn(6), group_size=1.0)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        l0k.l0_linear(x, w, torch.randn(6), group_size=0)
    with pytest.raises(ValueError, match=r"log_alpha must have shape \(2,\)"):
        l0k.l0_conv2d(torch.randn(1, 2, 4, 4), torch.randn(4, 2, 3, 3), torch.randn(4), group_size=2)
    with pytest.raises(ValueError, match="out_channels"):
        l0k.L0Conv2d(2, 5, 3, group_size=2)
    with pytest.raises(ValueError, match="group_size must be 1"):
        l0k.L0Linear(4, 4, gate="weight", group_size=2)
    with pytest.raises(ValueError, match="out_features"):
        l0k.L0Linear(4, 5, gate="out", group_size=2)


def test_compact_of_grouped_chain_equals_eval():
    torch.manual_seed(8)
    model = torch.nn.Sequential(l0k.L0Conv2d(3, 8, 3, padding=1, group_size=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                l0k.L0Linear(8 * 4 * 4, 6, gate="in", group_size=16), torch.nn.ReLU(),
                                l0k.L0Linear(6, 4, gate="out", group_size=2))
    with torch.no_grad():
        model[0].log_alpha.copy_(torch.tensor([4.0, -4.0, 1.0, 4.0]))
        model[3].log_alpha.copy_(torch.tensor([4.0, 4.0, -4.0, 0.5, 4.0, 4.0, 4.0, -4.0]))
        model[5].log_alpha.copy_(torch.tensor([-4.0, 4.0]))
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    small = l0k.compact(model)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    convs = [m for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 5  # gate 1 (channels 2, 3) closed; channel 7 unread (next layer's gate 7)
