"""The fused regularizer (``l0kernels/_regularizer.py``: one pass per layer, one autograd node per model) against
the paper's formula written with autograd ops, value and gradients, in float64 and float32 (the C++ group
norms), every layer kind."""
import math

import pytest
import torch

import l0kernels as l0k
from l0kernels import L0Conv2d, L0Linear
from l0kernels._gates import DEFAULT_CONFIG as CFG
from l0kernels._regularizer import LayerSpec, regularizer


def layer_regularizer(la, w, b, axis, bias_gated, lam_size, wd, n, cfg):
    return regularizer((LayerSpec(axis, bias_gated, lam_size, cfg),), (la, w, b), wd, n, w.dtype)


def _reference(la, w, b, axis, bias_gated, lam_size, wd, n):
    """The autograd formula: (1/N) [sum_g p_g (lam |g| + 0.5 wd ||theta_g||^2) + 0.5 wd ||ungated||^2]."""
    p = torch.sigmoid(la - CFG.beta * math.log(-CFG.gamma / CFG.zeta))
    w2 = w.reshape(w.shape[0], -1)
    if axis is None:
        sq = w2.pow(2).reshape(la.shape)
    else:
        sq = w2.pow(2).sum(0 if axis == 1 else 1)
        if b is not None and bias_gated:
            sq = sq + b.pow(2)
        sq = sq.reshape(la.numel(), -1).sum(1)
    term = (p * (lam_size + 0.5 * wd * sq)).sum()
    if b is not None and not bias_gated:
        term = term + 0.5 * wd * b.pow(2).sum()
    return term / n


def _layers(gen):
    return [L0Linear(13, 7, gate="in"), L0Linear(13, 7, gate="in", bias=False), L0Linear(9, 11, gate="out"),
            L0Linear(9, 11, gate="out", bias=False), L0Linear(6, 5, gate="weight"),
            L0Conv2d(4, 6, (3, 2)), L0Conv2d(4, 6, 3, groups=2, bias=False)]


def _grads(t, params):
    return torch.autograd.grad(t, [p for p in params if p is not None and p.requires_grad], allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wd", [0.0, 5e-4, 0.3])
def test_layer_regularizer_matches_autograd_formula(dtype, wd):
    torch.manual_seed(3)
    for m in _layers(None):
        m = m.to(dtype)
        with torch.no_grad():
            m.log_alpha.normal_(0.0, 2.0)
        lam, n = 0.7, 17
        params = [m.log_alpha, m.weight, m.bias]
        got = m.regularizer(lam, wd, n)
        g_got = _grads(got * 3.0, params)
        axis, bias_gated = m._reg_layout
        p64 = [p.detach().double().requires_grad_() if p is not None else None for p in params]
        ref = _reference(p64[0], p64[1], p64[2], axis, bias_gated, lam * m.params_per_gate, wd, n)
        g_ref = _grads(ref * 3.0, p64)
        assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype) and got.dim() == 0
        # bfloat16: the torch ops with float32 math on the bfloat16 values (the reference uses the same values),
        # only the result and the gradients rounded to bfloat16
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
        assert abs(float(got.detach()) - float(ref.detach())) <= tol * abs(float(ref))
        for a, r in zip(g_got, g_ref):
            if r is None or not wd and a is None:
                assert a is None or a.abs().max() == 0
                continue
            assert a.dtype == dtype
            assert float((a.double() - r).norm()) <= tol * float(r.norm()) + 1e-300


def test_grouped_gates():
    """G gates over F = G * g features: gate j covers features j*g ... j*g+g-1 (columns or rows)."""
    gen = torch.Generator().manual_seed(1)
    for axis, shape, bias_gated in ((1, (5, 12), False), (0, (12, 5), True), (0, (8, 3, 2, 2), True)):
        w = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(shape[0], generator=gen, dtype=torch.float64, requires_grad=True)
        feats = shape[1] if axis == 1 else shape[0]
        la = torch.randn(feats // 4 if feats % 4 == 0 else feats // 2, generator=gen, dtype=torch.float64,
                         requires_grad=True)
        got = layer_regularizer(la, w, b, axis, bias_gated, 0.3, 0.2, 5, CFG)
        ref = _reference(la, w, b, axis, bias_gated, 0.3, 0.2, 5)
        assert float(got) == pytest.approx(float(ref), rel=1e-12)
        for a, r in zip(_grads(got, [la, w, b]), _grads(ref, [la, w, b])):
            assert torch.allclose(a, r, rtol=1e-12, atol=1e-15)


def test_no_weight_decay_leaves_weights_without_gradient():
    m = L0Linear(5, 3)
    m.regularizer(0.1, 0.0, 10).backward()
    assert m.weight.grad is None and m.bias.grad is None and m.log_alpha.grad.abs().sum() > 0


def test_model_regularizer_sums_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(L0Linear(8, 6), torch.nn.ReLU(), L0Linear(6, 4, gate="out"))
    got = l0k.l0_regularizer(model, [0.1, 0.5], 5e-4, 100)
    ref = model[0].regularizer(0.1, 5e-4, 100) + model[2].regularizer(0.5, 5e-4, 100)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)


def test_model_regularizer_is_one_node_with_the_layers_gradients():
    """A whole model's regularizer is one autograd node over every layer's tensors, the C++ (float32) and
    torch (float64, weight gates, conv) layers mixed, with each layer's gradients as its own term gives."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(L0Linear(8, 6), L0Linear(6, 5, gate="out").double(), L0Linear(5, 4, gate="weight"),
                                L0Conv2d(2, 3, 3, bias=False), L0Linear(4, 3, bias=False))
    for m in model:
        with torch.no_grad():
            m.log_alpha.normal_(0.0, 2.0)
    lams = [0.1, 0.5, 1.0, 0.2, 3.0]
    params = [p for p in model.parameters()]
    got = l0k.l0_regularizer(model, lams, 0.3, 7)
    assert got.dtype == torch.float32 and type(got.grad_fn).__name__ == "RegularizerFunctionBackward"
    g_got = torch.autograd.grad(got * 2.0, params)
    ref = sum(m.regularizer(lam, 0.3, 7).double() for m, lam in zip(model, lams))
    g_ref = torch.autograd.grad(ref * 2.0, params)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
    for a, r in zip(g_got, g_ref):
        assert a.dtype == r.dtype and torch.allclose(a, r, rtol=1e-6, atol=1e-12)


def test_model_regularizer_keeps_a_subclass_term():
    class Doubled(L0Linear):
        def regularizer(self, lamba, weight_decay=0.0, N=1):
            return 2 * super().regularizer(lamba, weight_decay, N)

    model = torch.nn.Sequential(L0Linear(5, 4), Doubled(4, 3))
    got = l0k.l0_regularizer(model, 0.1, 0.2, 3)
    ref = model[0].regularizer(0.1, 0.2, 3) + 2 * L0Linear.regularizer(model[1], 0.1, 0.2, 3)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("wd", [0.0, 0.2])
def test_cpp_path_grouped_and_zero_size(wd, monkeypatch):
    """float32 (the C++ passes where built) against the float64 torch reference, grouped gates included."""
    from l0kernels import _regularizer
    gen = torch.Generator().manual_seed(2)
    for axis, shape, bias_gated, g in ((1, (5, 12), False, 4), (0, (12, 5), True, 3), (0, (8, 3, 2, 2), True, 8),
                                       (1, (7, 9), False, 9)):
        w = torch.randn(shape, generator=gen)
        b = torch.randn(shape[0], generator=gen)
        la = torch.randn(g, generator=gen)
        ts = [t.clone().requires_grad_() for t in (la, w, b)]
        got = layer_regularizer(*ts, axis, bias_gated, 0.3, wd, 5, CFG)
        got_g = torch.autograd.grad(got, ts, allow_unused=True)
        t64 = [t.double().requires_grad_() for t in (la, w, b)]
        ref = _reference(*t64, axis, bias_gated, 0.3, wd, 5)
        ref_g = torch.autograd.grad(ref, t64, allow_unused=True)
        assert got.dtype == torch.float32 and float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
        for a, r in zip(got_g, ref_g):
            if r is None or a is None:  # no weight decay: no weight gradient (autograd's is all zeros)
                assert (a is None or a.abs().max() == 0) and (r is None or r.abs().max() == 0)
            else:
                assert torch.allclose(a.double(), r, rtol=1e-5, atol=1e-7)
    assert _regularizer._in_cpp(la, w, b, 1) == _regularizer._CPU_REG
    m = L0Linear(0, 3)  # zero-size weight: the torch path
    m.regularizer(0.1, 0.1, 2).backward()
    assert m.log_alpha.grad.shape == (0,)
