"""Regression tests of defects an adversarial probe of the public API found: stale eval plans, gradients of
gradients, zero-size and odd arguments, failed calls that changed state, nested inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import l0kernels as l0k
from conftest import TOL

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- 1. eval plans never serve parameters an optimizer has changed ------------------------------------------

def _layer(kind: str, g: torch.Generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    if kind == "linear":
        m, x = l0k.L0Linear(9, 6, backend="torch"), torch.randn(5, 9, generator=g)
    else:
        m, x = l0k.L0Conv2d(3, 4, 3, padding=1, backend="torch"), torch.randn(2, 3, 6, 5, generator=g)
    with torch.no_grad():  # gates spread over closed, open and in between, so both weights and gates matter
        m.log_alpha.copy_(torch.randn(m.log_alpha.shape, generator=g) * 3)
    return m, x


def _eval_reference(m, x):
    """The eval output computed from the parameters as they are now (the op itself, no layer, no plan)."""
    with torch.no_grad():
        if isinstance(m, l0k.L0Linear):
            return l0k.l0_linear(x, m.weight, m.log_alpha, m.bias, gate=m.gate, training=False, backend="torch")
        return l0k.l0_conv2d(x, m.weight, m.log_alpha, m.bias, m.stride, m.padding, training=False,
                             backend="torch")


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("opt", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad])
def test_eval_after_a_fused_optimizer_step(kind, opt):
    g = torch.Generator().manual_seed(11)
    m, x = _layer(kind, g)
    o = opt(m.parameters(), lr=0.3, fused=True)
    m.eval()
    with torch.no_grad():
        before = m(x)
    m.train()
    m(x).square().sum().backward()
    o.step()  # fused kernels leave the parameters' version counters unchanged
    m.eval()
    with torch.no_grad():
        after = m(x)
    ref = _eval_reference(m, x)
    assert _rel(before, ref) > 1e-2  # the step changed the output ...
    assert _rel(after, ref) < TOL[torch.float32]  # ... and eval sees it


def test_eval_after_an_optimizer_writing_through_data():
    class DataSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, dict(lr=lr))

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.data.add_(p.grad, alpha=-group["lr"])  # invisible to the version counter

    g = torch.Generator().manual_seed(12)
    m, x = _layer("linear", g)
    o = DataSGD(m.parameters(), lr=0.3)
    m.eval()
    with torch.no_grad():
        m(x)
    m.train()
    m(x).square().sum().backward()
    o.step()
    m.eval()
    with torch.no_grad():
        assert _rel(m(x), _eval_reference(m, x)) < TOL[torch.float32]


# -- 3. gradients of gradients --------------------------------------------------------------------------

def _gates64(la, seed, shape, training):
    """The contract's gates in float64 autograd ops (docs/design.md §1), per gate."""
    la = la.double()
    if not training:
        return F.hardtanh(torch.sigmoid(la) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    n = math.prod(shape)
    u = l0k.philox_uniform(seed, torch.arange(n)).double().reshape(shape).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / BETA)
    return F.hardtanh(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _linear64(x, w, la, b, seed, gate, noise, training):
    n, k = w.shape
    m = x.reshape(-1, k).shape[0]
    shape = {"in": (k,), "out": (n,), "weight": (n, k)}[gate]
    if noise == "sample":
        shape = (m,) + shape
    z = _gates64(la, seed, shape, training)
    x2 = x.reshape(-1, k)
    if gate == "in":
        y = F.linear(x2 * z, w, b)
    elif gate == "out":
        y = F.linear(x2, w, b) * z
    else:
        y = F.linear(x2, w * z, b)
    return y.reshape(*x.shape[:-1], n)


def _penalty_grads(f, x, w, la, b):
    """Gradient penalty: ``loss = f(...).square().mean() + |d f.sum() / dx|^2``, its gradients to every input."""
    out = f(x, w, la, b)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    loss = out.square().mean() + gx.square().sum()
    return torch.autograd.grad(loss, (x, w, la, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gate,noise", [("in", "batch"), ("in", "sample"), ("out", "batch"), ("out", "sample"),
                                        ("weight", "batch")])
@pytest.mark.parametrize("training", [True, False])
def test_gradient_penalty_through_l0_linear(dtype, gate, noise, training):
    g = torch.Generator().manual_seed(3)
    n, k = 5, 7
    shape = {"in": (k,), "out": (n,), "weight": (n, k)}[gate]
    leaves = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(2, 3, k), (n, k), shape, (n,)]]
    leaves[2] = leaves[2] * 2
    seed = 1234

    def ours(*a):
        return l0k.l0_linear(*a, seed=seed, gate=gate, noise=noise, training=training, backend="torch")

    def ref(*a):
        return _linear64(*a, seed, gate, noise, training)

    got = _penalty_grads(ours, *[t.to(dtype).requires_grad_() for t in leaves])
    want = _penalty_grads(ref, *[t.clone().requires_grad_() for t in leaves])
    for name, a, b in zip(["x", "weight", "log_alpha", "bias"], got, want):
        assert _rel(a, b) < (1e-5 if dtype == torch.float32 else 1e-10), name


def test_gradient_penalty_through_a_layer_matches_the_issue():
    """The probe's case: an L0Linear in training, a gradient penalty; dW and dlog_alpha carry the penalty."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = l0k.L0Linear(6, 4)
    x = torch.randn(8, 6, generator=g, requires_grad=True)
    seed = torch.tensor(99)
    out = l0k.l0_linear(x, m.weight, m.log_alpha, m.bias, seed=seed)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (out.square().mean() + gx.square().sum()).backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, m.weight, m.log_alpha, m.bias)]
    want = _penalty_grads(lambda *a: _linear64(*a, 99, "in", "batch", True), *leaves)
    assert _rel(m.weight.grad, want[1]) < 1e-5
    assert _rel(m.log_alpha.grad, want[2]) < 1e-5


def test_gradient_penalty_through_l0_conv2d():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 3, 6, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    la, b = torch.randn(4, generator=g) * 2, torch.randn(4, generator=g)

    def ours(*a):
        return l0k.l0_conv2d(*a, padding=1, seed=77, backend="torch")

    def ref(x, w, la, b):
        return F.conv2d(x, w, b, padding=1) * _gates64(la, 77, (4,), True)[:, None, None]

    got = _penalty_grads(ours, *[t.clone().requires_grad_() for t in (x, w, la, b)])
    want = _penalty_grads(ref, *[t.double().requires_grad_() for t in (x, w, la, b)])
    for a, b_ in zip(got, want):
        assert _rel(a, b_) < 1e-5


def test_second_order_regularizer_and_sample_gates():
    torch.manual_seed(5)
    model = torch.nn.Sequential(l0k.L0Linear(5, 4), l0k.L0Conv2d(2, 3, 3)).double()
    params = [p for m in model for p in (m.log_alpha, m.weight, m.bias)]
    reg = l0k.l0_regularizer(model, lamba=0.3, weight_decay=0.2, N=7)
    grads = torch.autograd.grad(reg, params, create_graph=True)
    hvp = torch.autograd.grad(sum(g_.square().sum() for g_ in grads), params)
    # the same with the regularizer written out in float64 autograd ops
    shift = BETA * math.log(-GAMMA / ZETA)

    def ref():
        total = 0
        for m, axis in zip(model, [1, 0]):
            p = torch.sigmoid(m.log_alpha - shift)
            w2 = m.weight.reshape(m.weight.shape[0], -1)
            if axis == 1:  # input gates: column norms; the bias is not gated
                sq = w2.square().sum(0)
                total = total + (p * (0.3 * m.params_per_gate + 0.5 * 0.2 * sq)).sum() + 0.5 * 0.2 * m.bias.square().sum()
            else:  # output channels: row norms with the gated bias
                sq = w2.square().sum(1) + m.bias.square()
                total = total + (p * (0.3 * m.params_per_gate + 0.5 * 0.2 * sq)).sum()
        return total / 7

    r = ref()
    assert _rel(reg, r) < 1e-6  # the model-level regularizer is a float32 scalar
    rgrads = torch.autograd.grad(r, params, create_graph=True)
    rhvp = torch.autograd.grad(sum(g_.square().sum() for g_ in rgrads), params)
    for a, b in zip(hvp, rhvp):
        assert _rel(a, b) < 1e-6
    la = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: l0k.sample_gates(t, 7, (3, 6)), (la,))


@pytest.mark.interpret
def test_gradient_penalty_on_the_triton_backend():
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(6)
    leaves = [torch.randn(s, generator=g) for s in [(5, 7), (4, 7), (7,), (4,)]]

    def ours(*a):
        return l0k.l0_linear(*a, seed=5, backend="triton")

    if l0k.get_backend("triton").why_not(
            l0k._checks.linear_call(*leaves, seed=5, gate="in", noise="batch", training=True, backend="triton",
                                    beta=BETA, gamma=GAMMA, zeta=ZETA)):
        pytest.skip("the triton backend cannot run here")
    got = _penalty_grads(ours, *[t.clone().requires_grad_() for t in leaves])
    want = _penalty_grads(lambda *a: _linear64(*a, 5, "in", "batch", True),
                          *[t.double().requires_grad_() for t in leaves])
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-4


def test_first_order_backward_keeps_its_fast_path():
    """Without create_graph the backward computes what it computed before (no graph on the gradients)."""
    torch.manual_seed(7)
    m = l0k.L0Linear(6, 4)
    x = torch.randn(3, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).sum(), x)
    assert gx.grad_fn is None and not gx.requires_grad


# -- 6. nested inputs ------------------------------------------------------------------------------------

def test_converted_transformer_encoder_with_a_padding_mask():
    torch.manual_seed(8)
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()
    x = torch.randn(3, 5, 16)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    mask[2, 1:] = True
    with torch.no_grad():
        before = enc(x, src_key_padding_mask=mask)  # eval fast path: nested tensors inside
        l0k.convert(enc)
        after = enc(x, src_key_padding_mask=mask)
    assert _rel(after, before) < TOL[torch.float32]


@pytest.mark.parametrize("training", [True, False])
def test_nested_input_to_an_l0_linear(training):
    torch.manual_seed(9)
    m = l0k.L0Linear(6, 4, gate="in", droprate_init=0.5).train(training)
    parts = [torch.randn(2, 6), torch.randn(3, 6)]
    nt = torch.nested.nested_tensor(parts)
    torch.manual_seed(10)
    y = m(nt)
    torch.manual_seed(10)
    flat = m(torch.cat(parts))  # one gate draw for all rows, as for a padded batch
    assert y.is_nested
    assert torch.equal(torch.cat(list(y.unbind())), flat)


# -- 7-9, 12: clear errors, numpy integers ---------------------------------------------------------------

def test_seed_on_the_meta_device():
    x, w, la = torch.randn(3, 4), torch.randn(2, 4), torch.randn(4)
    with pytest.raises(ValueError, match="seed"):
        l0k.l0_linear(x, w, la, seed=torch.tensor(3, device="meta"))


def test_conv_without_output_channels():
    with pytest.raises(ValueError, match="out_channels"):
        l0k.L0Conv2d(3, 0, 3)
    with pytest.raises(ValueError, match="weight"):
        l0k.l0_conv2d(torch.randn(1, 3, 5, 5), torch.randn(0, 3, 3, 3), torch.randn(0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_layer_dtype_must_be_floating(dtype):
    with pytest.raises(TypeError, match="dtype"):
        l0k.L0Linear(4, 5, dtype=dtype)
    with pytest.raises(TypeError, match="dtype"):
        l0k.L0Conv2d(2, 3, 3, dtype=dtype)


def test_numpy_integers_are_integers():
    i = np.int64
    m = l0k.L0Linear(i(4), i(6), gate="out", group_size=i(2))
    assert m.group_size == 2 and type(m.group_size) is int and m.log_alpha.shape == (3,)
    c = l0k.L0Conv2d(i(2), i(4), i(3), padding=i(1), groups=i(2), group_size=np.int32(2))
    assert c(torch.randn(1, 2, 5, 5)).shape == (1, 4, 5, 5)
    y = l0k.l0_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4), padding=i(1),
                      stride=(i(1), i(2)), training=False)
    assert y.shape == (1, 4, 5, 3)
    reg = l0k.l0_regularizer(torch.nn.Sequential(m), N=np.int32(100))
    assert torch.allclose(reg, l0k.l0_regularizer(torch.nn.Sequential(m), N=100))
    m32 = l0k.L0Linear(4, 6, droprate_init=np.float32(0.3), beta=np.float32(0.5), gamma=np.float64(-0.2))
    assert m32.droprate_init == pytest.approx(0.3) and m32.cfg.beta == 0.5
    l0k.convert(torch.nn.Sequential(torch.nn.Linear(3, 2)), droprate_init=np.float32(0.4))
    with pytest.raises(TypeError, match="group_size"):
        l0k.L0Linear(4, 6, group_size=np.float64(2.0))
    with pytest.raises(TypeError, match="group_size"):
        l0k.L0Linear(4, 6, group_size=True)


# -- 10, 11: a failed call changes nothing ---------------------------------------------------------------

def test_failed_convert_leaves_the_random_stream_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="group_size"):
        # the first layer is built (its gates drawn) before the second fails: 3 outputs in groups of 2
        l0k.convert(model, gate="out", group_size=2, droprate_init=0.3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(type(m) is torch.nn.Linear for m in model)


def test_failed_target_load_state_dict_loads_nothing():
    model = torch.nn.Sequential(l0k.L0Linear(4, 5))
    ctl = l0k.SparsityTarget(model, 0.3, warmup_steps=10)
    for _ in range(5):
        ctl.step()
    good = ctl.state_dict()
    fresh = l0k.SparsityTarget(model, 0.3, warmup_steps=10)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    bad = dict(good)
    bad["lambda_1"] = torch.zeros(7)
    with pytest.raises(RuntimeError, match="lambda_1"):
        fresh.load_state_dict(bad)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert fresh.current_target() == 1.0  # still at the start of its warm-up
    missing = {k: v for k, v in good.items() if k != "rate"}
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(missing)
    assert int(fresh.steps_done) == 0
    fresh.load_state_dict(good)
    assert int(fresh.steps_done) == 5


# -- 4. compare() reports what it cannot measure -----------------------------------------------------------

class _Emit(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x + self.value


@pytest.mark.parametrize("a,b,expect", [
    (float("nan"), 0.0, "nan"), (0.0, float("nan"), "nan"), (float("nan"), float("nan"), "nan"),
    (float("inf"), 0.0, "inf"), (0.0, float("-inf"), "inf"), (float("inf"), float("inf"), "zero"),
    (float("inf"), float("-inf"), "inf")])
def test_compare_reports_nonfinite_outputs(a, b, expect):
    x = torch.zeros(2, 3)
    x[0, 1] = 1.0
    ma, mb = _Emit(torch.tensor([0.0, a, 0.0])), _Emit(torch.tensor([0.0, b, 0.0]))
    res = l0k.compare(ma, mb, x)
    for key in ("max_abs", "max_rel", "norm_rel"):
        v = res[key]
        if expect == "nan":
            assert math.isnan(v), (key, v)
        elif expect == "inf":
            assert math.isinf(v) or math.isnan(v), (key, v)
            assert key != "max_abs" or math.isinf(v)
        else:
            assert v == 0.0, (key, v)
