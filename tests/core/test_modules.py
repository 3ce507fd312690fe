"""``L0Linear`` / ``L0Conv2d`` and the model-level penalties (docs/design.md §1, 3, 4)."""
import copy
import inspect
import io
import math

import pytest
import torch
from torch import nn

import l0kernels as l0k
from l0kernels import L0Conv2d, L0Linear

LINEAR_KINDS = [("in", "batch"), ("in", "sample"), ("out", "batch"), ("out", "sample"), ("weight", "batch")]


def p_open(la, beta=2 / 3, gamma=-0.1, zeta=1.1):
    return torch.sigmoid(la.detach().double() - beta * math.log(-gamma / zeta))


# ---- construction ------------------------------------------------------------------------------------
def test_signatures_follow_torch_nn():
    for ours, theirs in ((L0Linear, nn.Linear), (L0Conv2d, nn.Conv2d)):
        sig, ref = inspect.signature(ours), inspect.signature(theirs)
        pos = [n for n, p in sig.parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
        # torch.nn's positional parameters in torch.nn's order; device/dtype are keyword-only here
        ref_pos = [n for n, p in ref.parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD
                   and n not in ("padding_mode", "device", "dtype")]
        assert pos == ref_pos
        for name in pos:
            if name in ref.parameters:
                assert sig.parameters[name].default == ref.parameters[name].default, name
        for name in ("device", "dtype"):
            assert sig.parameters[name].default is None
    # positional calls as for torch.nn
    lin = L0Linear(5, 3, False)
    assert lin.bias is None and lin.weight.shape == (3, 5)
    conv = L0Conv2d(4, 6, 3, 2, 1, 1, 2, False)
    assert conv.stride == (2, 2) and conv.padding == (1, 1) and conv.groups == 2 and conv.bias is None
    assert conv.weight.shape == (6, 2, 3, 3)


@pytest.mark.parametrize("gate", ["in", "out", "weight"])
def test_linear_parameters_shapes_device_dtype(gate):
    m = L0Linear(7, 4, gate=gate, dtype=torch.float64, device="cpu")
    assert {n for n, _ in m.named_parameters()} == {"weight", "bias", "log_alpha"}
    assert m.weight.shape == (4, 7) and m.bias.shape == (4,)
    assert m.log_alpha.shape == {"in": (7,), "out": (4,), "weight": (4, 7)}[gate]
    assert all(p.dtype == torch.float64 for p in m.parameters())
    meta = L0Linear(7, 4, gate=gate, device="meta", dtype=torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in meta.parameters())
    c = L0Conv2d(4, 6, (3, 2), groups=2, device="meta", dtype=torch.float16)
    assert c.weight.shape == (6, 2, 3, 2) and c.log_alpha.shape == (6,)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in c.parameters())


@pytest.mark.parametrize("droprate", [0.5, 0.2, 0.9])
@torch.no_grad()
def test_reset_parameters(droprate):
    torch.manual_seed(0)
    m = L0Linear(300, 200, gate="in", droprate_init=droprate)
    mu = math.log(1 - droprate) - math.log(droprate)
    assert abs(float(m.log_alpha.detach().mean()) - mu) < 4e-3
    assert 0.006 < float(m.log_alpha.detach().std()) < 0.014
    bound = 1 / math.sqrt(300)
    assert float(m.weight.abs().max()) <= bound and float(m.bias.abs().max()) <= bound
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(7.0)
    m.reset_parameters()
    assert abs(float(m.log_alpha.detach().mean()) - mu) < 4e-3 and float(m.weight.abs().max()) <= bound
    c = L0Conv2d(8, 5, 3, droprate_init=droprate)
    with torch.no_grad():
        c.log_alpha.fill_(9.0)
        c.weight.fill_(9.0)
    c.reset_parameters()
    assert float((c.log_alpha - mu).abs().max()) < 0.06
    assert float(c.weight.abs().max()) <= 1 / math.sqrt(8 * 9)


def test_extra_repr():
    r = repr(L0Linear(5, 3, gate="out", noise="sample", droprate_init=0.3))
    for part in ("in_features=5", "out_features=3", "bias=True", "gate='out'", "noise='sample'", "droprate_init=0.3"):
        assert part in r, (part, r)
    r = repr(L0Linear(5, 3, gamma=-0.2, backend="torch"))
    assert "gamma=-0.2" in r and "backend='torch'" in r
    r = repr(L0Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=False))
    for part in ("4, 6", "kernel_size=(3, 3)", "stride=(2, 2)", "padding=(1, 1)", "dilation=(2, 2)", "groups=2",
                 "bias=False", "noise='batch'"):
        assert part in r, (part, r)


# ---- forward semantics -------------------------------------------------------------------------------
def _x_for(m, gen, batch=6):
    if isinstance(m, L0Conv2d):
        return torch.randn(batch, m.in_channels, 9, 8, generator=gen)
    return torch.randn(batch, 2, m.in_features, generator=gen)


MODULE_FACTORIES = [lambda g=g, n=n: L0Linear(9, 5, gate=g, noise=n) for g, n in LINEAR_KINDS] + [
    lambda: L0Conv2d(4, 6, 3, padding=1, noise="batch"),
    lambda: L0Conv2d(4, 6, (3, 2), stride=2, groups=2, noise="sample"),
]
MODULE_IDS = [f"lin-{g}-{n}" for g, n in LINEAR_KINDS] + ["conv-batch", "conv-sample-grouped"]


def _spread_gates(m, gen):
    """log_alpha with some gates closed, some open and some in between (so eval-time sparsity matters)."""
    with torch.no_grad():
        m.log_alpha.copy_(torch.randn(m.log_alpha.shape, generator=gen) * 3)
        flat = m.log_alpha.view(-1)
        flat[0], flat[-1] = -5.0, 5.0  # at least one closed and one fully open gate


@pytest.mark.parametrize("make", MODULE_FACTORIES, ids=MODULE_IDS)
def test_training_repeatable_fresh_per_call_and_eval_deterministic(make):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    m = make()
    _spread_gates(m, gen)
    x = _x_for(m, gen)
    torch.manual_seed(123)
    a1, a2 = m(x), m(x)
    torch.manual_seed(123)
    b1, b2 = m(x), m(x)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # a fresh seed per call
    m.eval()
    e1 = m(x)
    torch.manual_seed(999)
    assert torch.equal(e1, m(x))
    with torch.no_grad():  # the cached sparse eval path agrees with the differentiable one
        e2 = m(x)
    assert torch.allclose(e1, e2, rtol=1e-5, atol=1e-6)
    # eval output is the contract's formula with z_eval
    z = l0k.deterministic_gates(m.log_alpha.detach())
    if isinstance(m, L0Conv2d):
        ref = nn.functional.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups) * z[:, None, None]
    elif m.gate == "in":
        ref = nn.functional.linear(x * z, m.weight, m.bias)
    elif m.gate == "out":
        ref = nn.functional.linear(x, m.weight, m.bias) * z
    else:
        ref = nn.functional.linear(x, m.weight * z, m.bias)
    assert torch.allclose(e1, ref, rtol=1e-5, atol=1e-6)
    assert (z == 0).any(), "the test should exercise closed gates"


@pytest.mark.parametrize("make", MODULE_FACTORIES, ids=MODULE_IDS)
def test_state_dict_round_trip(make):
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    src = make()
    _spread_gates(src, gen)
    x = _x_for(src, gen)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    assert set(src.state_dict()) == {"weight", "bias", "log_alpha"}
    torch.manual_seed(77)
    dst = make()  # fresh, different parameters
    assert not torch.equal(dst.log_alpha, src.log_alpha)
    dst.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    torch.manual_seed(5)
    ys = src(x)
    torch.manual_seed(5)
    assert torch.equal(ys, dst(x))
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # loading into an eval module that already built its eval cache invalidates the cache
    gen2 = torch.Generator().manual_seed(3)
    other = copy.deepcopy(src)
    _spread_gates(other, gen2)
    with torch.no_grad():
        before = dst(x)
        dst.load_state_dict(other.state_dict())
        after = dst(x)
        assert torch.equal(after, other(x)) and not torch.equal(after, before)


def test_gate_helpers():
    m = L0Linear(6, 4, gate="in")
    with torch.no_grad():
        m.log_alpha.copy_(torch.tensor([-5.0, -2.5, -2.0, 0.0, 2.5, 5.0]))
    z = m.deterministic_gates()
    assert z[0] == 0 and z[1] == 0 and 0 < z[2] < 1 and z[4] == 1 and z[5] == 1 and not z.requires_grad
    assert m.active_mask().tolist() == [False, False, True, True, True, True]
    assert m.num_active() == 4
    assert torch.allclose(m.prob_open().double(), p_open(m.log_alpha), rtol=1e-6)


# ---- constraints and penalties -------------------------------------------------------------------------
def test_constrain_clamps_log_alpha():
    model = nn.Sequential(L0Linear(4, 3), nn.ReLU(), L0Conv2d(2, 3, 1))
    with torch.no_grad():
        model[0].log_alpha.copy_(torch.tensor([-10.0, 0.5, 4.0, 10.0]))
        model[2].log_alpha.copy_(torch.tensor([-4.7, -4.5, 4.7]))
    v0 = model[0].log_alpha._version
    l0k.constrain_(model)
    lo, hi = math.log(0.01), math.log(100.0)
    assert torch.allclose(model[0].log_alpha, torch.tensor([lo, 0.5, 4.0, hi]))
    assert torch.allclose(model[2].log_alpha, torch.tensor([lo, -4.5, hi]))
    assert model[0].log_alpha._version > v0  # in place (so optimizers and eval caches see it)
    model[0].constrain_()  # the per-layer method too
    assert float(model[0].log_alpha.detach().min()) == pytest.approx(lo)


def _model(gen):
    model = nn.Sequential(
        L0Conv2d(3, 4, 3, stride=2, padding=1, groups=1), nn.ReLU(),
        L0Conv2d(4, 6, (3, 2), groups=2, bias=False), nn.Flatten(),
        L0Linear(6 * 2 * 2, 7, gate="in"), nn.ReLU(),
        L0Linear(7, 5, gate="out"), nn.Tanh(),
        L0Linear(5, 4, gate="weight", bias=True),
        L0Linear(4, 3, gate="out", bias=False),
        nn.Linear(3, 2),
    )
    for m in model:
        if isinstance(m, (L0Linear, L0Conv2d)):
            _spread_gates(m, gen)
    return model


def test_l0_penalty_is_sum_of_expected_l0_and_differentiable():
    gen = torch.Generator().manual_seed(4)
    model = _model(gen)
    layers = [m for m in model if isinstance(m, (L0Linear, L0Conv2d))]
    pen = l0k.l0_penalty(model)
    ref = sum(float(p_open(m.log_alpha).sum()) for m in layers)
    assert pen.item() == pytest.approx(ref, rel=1e-6)
    assert sum(m.expected_l0().item() for m in layers) == pytest.approx(ref, rel=1e-6)
    pen.backward()
    for m in layers:
        p = p_open(m.log_alpha)
        assert torch.allclose(m.log_alpha.grad.double(), p * (1 - p), rtol=1e-5, atol=1e-7)
        assert m.weight.grad is None


def _hand_regularizer(m, lam, wd, N):
    """docs/design.md §1: (1/N) sum_g p_g (lam |g| + 0.5 wd ||theta_g||^2), plus the ungated bias decay."""
    p = p_open(m.log_alpha)
    w = m.weight.detach().double()
    b = m.bias.detach().double() if m.bias is not None else None
    ungated = 0.0
    if isinstance(m, L0Conv2d):
        size = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] + (b is not None)
        sq = (w**2).sum((1, 2, 3)) + (b**2 if b is not None else 0)
    elif m.gate == "in":
        size = m.out_features
        sq = (w**2).sum(0)
        ungated = float((b**2).sum()) if b is not None else 0.0
    elif m.gate == "out":
        size = m.in_features + (b is not None)
        sq = (w**2).sum(1) + (b**2 if b is not None else 0)
    else:
        size = 1
        sq = w**2
        ungated = float((b**2).sum()) if b is not None else 0.0
    return (float((p * (lam * size + 0.5 * wd * sq)).sum()) + 0.5 * wd * ungated) / N, float((p * size).sum())


@pytest.mark.parametrize("lam,wd,N", [(0.1, 0.0, 1), (1.0, 5e-4, 60000), ([10, 0.5, 0.1, 0.1, 2.0, 3.0], 0.1, 7)])
def test_l0_regularizer_matches_hand_formula(lam, wd, N):
    gen = torch.Generator().manual_seed(5)
    model = _model(gen)
    layers = [m for m in model if isinstance(m, (L0Linear, L0Conv2d))]
    lams = lam if isinstance(lam, list) else [lam] * len(layers)
    ref = sum(_hand_regularizer(m, l, wd, N)[0] for m, l in zip(layers, lams))
    reg = l0k.l0_regularizer(model, lam, weight_decay=wd, N=N)
    assert reg.item() == pytest.approx(ref, rel=1e-5)
    reg.backward()
    assert all(m.log_alpha.grad is not None and m.log_alpha.grad.abs().sum() > 0 for m in layers)
    if wd:
        assert all(m.weight.grad is not None for m in layers)
    # group sizes as docs/design.md: in -> out_features; out -> in_features + 1 with bias; conv -> in/groups*kh*kw (+1)
    assert [m.params_per_gate for m in layers] == [3 * 9 + 1, 2 * 3 * 2, 7, 7 + 1, 1, 4]
    assert [m.group_size for m in layers] == [1] * 6


def test_expected_params():
    gen = torch.Generator().manual_seed(6)
    model = _model(gen)
    layers = [m for m in model if isinstance(m, (L0Linear, L0Conv2d))]
    for m in layers:
        size = _hand_regularizer(m, 1.0, 0.0, 1)[1]
        ungated = m.out_features if isinstance(m, L0Linear) and m.gate != "out" and m.bias is not None else 0
        assert m.expected_params().item() == pytest.approx(size + ungated, rel=1e-5)
    dense_rest = sum(p.numel() for p in model[-1].parameters())
    total = sum(m.expected_params().item() for m in layers) + dense_rest
    assert l0k.expected_params(model).item() == pytest.approx(total, rel=1e-5)
    # all gates wide open: every parameter counts
    for m in layers:
        with torch.no_grad():
            m.log_alpha.fill_(40.0)
    assert l0k.expected_params(model).item() == pytest.approx(sum(p.numel() for n, p in model.named_parameters()
                                                                  if not n.endswith("log_alpha")), rel=1e-6)


@pytest.mark.parametrize("cfg", [
    dict(kernel_size=3, stride=1, padding=0, dilation=1, groups=1, bias=True, hw=(11, 9)),
    dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 2), dilation=(2, 1), groups=2, bias=False, hw=(13, 10)),
    dict(kernel_size=5, stride=2, padding=2, dilation=1, groups=4, bias=True, hw=(8, 8)),
])
def test_conv_expected_flops_uses_real_output_size(cfg):
    hw = cfg.pop("hw")
    m = L0Conv2d(8, 12, **cfg)
    gen = torch.Generator().manual_seed(7)
    _spread_gates(m, gen)
    x = torch.randn(2, 8, *hw, generator=gen)
    y = m(x)  # records the input size
    ho, wo = y.shape[2:]
    kh, kw = m.kernel_size
    fan_in = 8 // m.groups * kh * kw
    per_channel = ho * wo * (2 * fan_in - 1 + (m.bias is not None))
    ref = float(p_open(m.log_alpha).sum()) * per_channel * 3
    assert m.expected_flops(batch=3).item() == pytest.approx(ref, rel=1e-5)
    assert m.expected_flops(batch=3, input_hw=hw).item() == pytest.approx(ref, rel=1e-5)
    assert m.dense_flops(batch=3, input_hw=hw) == 12 * per_channel * 3
    # the size formula is conv2d's own
    ho2, wo2 = [(hw[d] + 2 * m.padding[d] - m.dilation[d] * (m.kernel_size[d] - 1) - 1) // m.stride[d] + 1
                for d in range(2)]
    assert (ho, wo) == (ho2, wo2)


@pytest.mark.parametrize("gate", ["in", "out", "weight"])
def test_linear_expected_flops(gate):
    m = L0Linear(10, 6, gate=gate)
    gen = torch.Generator().manual_seed(8)
    _spread_gates(m, gen)
    e = float(p_open(m.log_alpha).sum())
    ref = {"in": 6 * (2 * e - 1 + 1), "out": e * (2 * 10 - 1 + 1), "weight": 2 * e - 6 + 6}[gate]
    assert m.expected_flops(batch=4).item() == pytest.approx(4 * ref, rel=1e-5)
    assert m.dense_flops(batch=4) == 4 * 6 * (2 * 10)


# ---- training end to end ------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["batch", "sample"])
def test_sequential_trains_with_adam(noise):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=gen)
    target = (x.mean((1, 2, 3)) > 0).long()
    model = nn.Sequential(
        L0Conv2d(1, 4, 3, padding=1, noise=noise, droprate_init=0.2), nn.ReLU(), nn.Flatten(),
        L0Linear(4 * 8 * 8, 16, gate="in", noise=noise, droprate_init=0.2), nn.ReLU(),
        L0Linear(16, 2, gate="out", noise=noise, droprate_init=0.2),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target) + l0k.l0_regularizer(model, 0.1, 5e-4, N=60000)
        loss.backward()
        opt.step()
        l0k.constrain_(model)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == target).float().mean()
    assert acc > 0.75
