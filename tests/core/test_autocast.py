"""``torch.autocast``: the L0 ops and layers cast like ``F.linear`` / ``F.conv2d`` (CPU autocast, bfloat16 and float16).

Under autocast, float16/bfloat16/float32 ``x``, ``weight``, ``bias`` and ``log_alpha`` run in the autocast dtype
(float64 is not cast) and the output has that dtype; the gradients reach float32 parameters in float32.
Every check compares the autocast call with the same op run on tensors cast by hand (bit for bit where both
run the same kernels) and with the float64 reference of the float32 tensors (docs/design.md §6 tolerances).
The eval-mode layers build their compact plans in the autocast dtype from the float32 parameters and keep
them cached beside the float32 plans.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import l0kernels as l0k
from l0kernels.backends import _plans

from conftest import TOL

AC_DTYPES = [torch.bfloat16, torch.float16]
LINEAR_MODES = [("in", "batch"), ("in", "sample"), ("out", "batch"), ("out", "sample"), ("weight", "batch")]
M_SHAPE, K, N = (2, 3), 13, 7  # x is (2, 3, 13): leading dims flattened to M = 6
SEED = 2**40 + 977
CLOSED_T = -2.3978952727983707  # log(-gamma/zeta): z_eval == 0 at or below


def _ac(dtype):
    return torch.autocast("cpu", dtype=dtype)


def rel(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert not torch.isnan(out).any(), "NaN in output"
    den = ref.norm()
    return float((out - ref).norm() / den) if den > 0 else float((out - ref).norm())


def leaf(t, dtype=None):
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def linear_tensors(gate, bias=True, dtype=torch.float32, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(*M_SHAPE, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    la = torch.randn({"in": (K,), "out": (N,), "weight": (N, K)}[gate], generator=g) * 2.5  # closed, open, between
    b = torch.randn(N, generator=g) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, w, la, b)]


def conv_tensors(groups=1, bias=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(3, 4, 7, 9, generator=g)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g) / (9 * 4 // groups) ** 0.5
    la = torch.randn(6, generator=g) * 2.5
    b = torch.randn(6, generator=g) if bias else None
    return x, w, la, b


def grads(ts):
    return [t.grad if t is not None else None for t in ts]


# ---- functional ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", AC_DTYPES)
@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
@pytest.mark.parametrize("training", [True, False])
def test_linear_casts_like_hand_cast(dtype, gate, noise, training):
    x, w, la, b = linear_tensors(gate, gen_seed=hash((gate, noise, training)) % 1000)
    ps = [leaf(t) for t in (x, w, la, b)]
    with _ac(dtype):
        y = l0k.l0_linear(*ps, seed=SEED, gate=gate, noise=noise, training=training, backend="torch")
        assert y.dtype == F.linear(ps[0], ps[1], ps[3]).dtype == dtype  # the dtype F.linear gives
    hs = [leaf(t, dtype) for t in (x, w, la, b)]  # cast by hand, outside autocast
    yh = l0k.l0_linear(*hs, seed=SEED, gate=gate, noise=noise, training=training, backend="torch")
    assert yh.dtype == dtype and torch.equal(y, yh)  # the same kernels on the same values
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    yh.backward(dy)
    for p, h, name in zip(ps, hs, ("x", "weight", "log_alpha", "bias")):
        assert p.grad is not None and p.grad.dtype == torch.float32, name  # back in the parameter's dtype
        assert torch.equal(p.grad, h.grad.float()), name


def check_near_float64(run, tensors, dtype, gen_seed):
    """``run`` under autocast against the float64 reference, on the float32 values (output and the gradients of x,
    weight and bias within twice the the contract's tolerance (docs/design.md §6): the inputs' rounding to ``dtype`` counts too) and on the values
    rounded to ``dtype`` (docs/design.md §6 tolerance). The log_alpha gradient sums products over the other dimension
    of small odd shapes and is compared on the rounded values only, within three times the tolerance (measured
    worst case over 400 draws: 2.0e-2 bfloat16, 2.5e-3 float16)."""
    ps = [leaf(t) for t in tensors]
    with _ac(dtype):
        y = run(*ps)
    qs = [leaf(t, torch.float64) for t in tensors]
    rs = [leaf(t.to(dtype), torch.float64) if t is not None else None for t in tensors]
    yq, yr = run(*qs), run(*rs)
    tol = TOL[dtype]
    assert rel(y, yq) < 2 * tol and rel(y, yr) < tol
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gen_seed)).to(dtype)
    for out, d in ((y, dy), (yq, dy.double()), (yr, dy.double())):
        out.backward(d)
    for p, q, r, name in zip(ps, qs, rs, ("x", "weight", "log_alpha", "bias")):
        assert p.grad.dtype == torch.float32, name
        if name == "log_alpha":
            assert rel(p.grad, r.grad) < 3 * tol, name
        else:
            assert rel(p.grad, q.grad) < 2 * tol and rel(p.grad, r.grad) < tol, name


@pytest.mark.parametrize("dtype", AC_DTYPES)
@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
@pytest.mark.parametrize("training", [True, False])
def test_linear_autocast_near_float64(dtype, gate, noise, training):
    gen_seed = LINEAR_MODES.index((gate, noise)) * 2 + training
    check_near_float64(lambda *t: l0k.l0_linear(*t, seed=SEED, gate=gate, noise=noise, training=training,
                                                backend="torch"),
                       linear_tensors(gate, gen_seed=100 + gen_seed), dtype, gen_seed)


@pytest.mark.parametrize("dtype", AC_DTYPES)
@pytest.mark.parametrize("noise,training", [("batch", True), ("sample", True), ("batch", False)])
@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, (0, 2), (2, 1))])
def test_conv2d_casts_like_hand_cast(dtype, noise, training, groups, stride, padding, dilation):
    x, w, la, b = conv_tensors(groups, gen_seed=groups + 3 * training)
    geo = (stride, padding, dilation, groups)
    kw = dict(seed=SEED, noise=noise, training=training, backend="torch")
    ps = [leaf(t) for t in (x, w, la, b)]
    with _ac(dtype):
        y = l0k.l0_conv2d(*ps, *geo, **kw)
        assert y.dtype == F.conv2d(ps[0], ps[1], ps[3], *geo).dtype == dtype
    hs = [leaf(t, dtype) for t in (x, w, la, b)]
    yh = l0k.l0_conv2d(*hs, *geo, **kw)
    assert torch.equal(y, yh)
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    yh.backward(dy)
    for p, h, name in zip(ps, hs, ("x", "weight", "log_alpha", "bias")):
        assert p.grad.dtype == torch.float32, name
        assert torch.equal(p.grad, h.grad.float()), name
    check_near_float64(lambda *t: l0k.l0_conv2d(*t, *geo, **kw), (x, w, la, b), dtype, groups + 3 * training)


def test_conv2d_channels_last_under_autocast():
    x, w, la, b = conv_tensors()
    x = x.contiguous(memory_format=torch.channels_last)
    with _ac(torch.bfloat16):
        y = l0k.l0_conv2d(x, w, la, b, 1, 1, seed=SEED, backend="torch")
    yh = l0k.l0_conv2d(*(t.to(torch.bfloat16) for t in (x, w, la, b)), 1, 1, seed=SEED, backend="torch")
    assert y.dtype == torch.bfloat16 and torch.equal(y, yh)


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_half_and_float32_input_runs_in_the_autocast_dtype(xdtype):
    """As autocast's lower-precision ops: float16 inputs under bfloat16 autocast run in bfloat16 too."""
    x, w, la, b = linear_tensors("in")
    x = x.to(xdtype)
    with _ac(torch.bfloat16):
        y = l0k.l0_linear(x, w, la, b, seed=SEED, backend="torch")
        assert y.dtype == F.linear(x, w, b).dtype == torch.bfloat16
    yh = l0k.l0_linear(*(t.to(torch.bfloat16) for t in (x, w, la, b)), seed=SEED, backend="torch")
    assert torch.equal(y, yh)


def test_parameters_already_in_the_autocast_dtype_are_not_copied():
    x, w, la, b = linear_tensors("out", dtype=torch.bfloat16)
    out = l0k.l0_linear(x, w, la, b, seed=SEED, gate="out", backend="torch")
    ps = [leaf(t) for t in (x, w, la, b)]
    with _ac(torch.bfloat16):
        y = l0k.l0_linear(*ps, seed=SEED, gate="out", backend="torch")
    assert torch.equal(y, out)
    y.sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in ps)


def test_float64_is_not_cast():
    for gate in ("in", "weight"):
        x, w, la, b = linear_tensors(gate, dtype=torch.float64)
        ref = l0k.l0_linear(x, w, la, b, seed=SEED, gate=gate, backend="torch")
        with _ac(torch.bfloat16):
            y = l0k.l0_linear(x, w, la, b, seed=SEED, gate=gate, backend="torch")
            assert F.linear(x, w, b).dtype == torch.float64  # as torch does
        assert y.dtype == torch.float64 and torch.equal(y, ref)
    x, w, la, b = (t.double() for t in conv_tensors())
    ref = l0k.l0_conv2d(x, w, la, b, 1, 1, seed=SEED, backend="torch")
    with _ac(torch.float16):
        y = l0k.l0_conv2d(x, w, la, b, 1, 1, seed=SEED, backend="torch")
    assert y.dtype == torch.float64 and torch.equal(y, ref)


def test_float64_mixed_with_cast_tensors_raises_naming_the_argument():
    x, w, la, b = linear_tensors("in")
    cases = [((x.double(), w, la, b), "weight"), ((x, w.double(), la, b), "weight"),
             ((x, w, la.double(), b), "log_alpha"), ((x, w, la, b.double()), "bias")]
    for args, name in cases:
        with _ac(torch.bfloat16):
            with pytest.raises(TypeError, match=rf"^{name} must have the dtype of x once torch.autocast casts") as e:
                l0k.l0_linear(*args, seed=SEED, backend="torch")
        assert "float64" in str(e.value) and "bfloat16" in str(e.value)
    cx, cw, cla, cb = conv_tensors()
    with _ac(torch.bfloat16), pytest.raises(TypeError, match=r"^log_alpha must have the dtype of x"):
        l0k.l0_conv2d(cx, cw, cla.double(), cb, seed=SEED)


def test_other_checks_unchanged_under_autocast():
    x, w, la, b = linear_tensors("in")
    with _ac(torch.bfloat16):
        with pytest.raises(TypeError, match=r"^x must be a torch.Tensor"):
            l0k.l0_linear(x.tolist(), w, la, b)
        with pytest.raises(TypeError, match=r"^x must have a floating dtype"):
            l0k.l0_linear(x.long(), w, la, b)
        with pytest.raises(ValueError, match=r"^log_alpha must have shape"):
            l0k.l0_linear(x, w, la[:-1], b)
        with pytest.raises(ValueError, match=r"^gate must be one of"):
            l0k.l0_linear(x, w, la, b, gate="rows")


def test_mismatch_still_raises_outside_autocast():
    """docs/design.md §5: without autocast, no argument is cast."""
    x, w, la, b = linear_tensors("in")
    xb = x.to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"^weight must have the dtype of x \(torch.bfloat16\), got torch.float32$"):
        l0k.l0_linear(xb, w, la, b)
    with _ac(torch.bfloat16), torch.autocast("cpu", enabled=False):
        with pytest.raises(TypeError, match=r"^weight must have the dtype of x \(torch.bfloat16\)"):
            l0k.l0_linear(xb, w, la, b)
    lin = l0k.L0Linear(K, N)
    for mode in (lin.train, lin.eval):
        mode()
        with pytest.raises(TypeError, match=r"^weight must have the dtype of x"), torch.no_grad():
            lin(xb)
    conv = l0k.L0Conv2d(4, 6, 3).eval()
    with pytest.raises(TypeError, match=r"^weight must have the dtype of x"), torch.no_grad():
        conv(conv_tensors()[0].half())


@pytest.mark.gpu
def test_cuda_autocast_does_not_cast_cpu_tensors():
    """autocast casts the tensors of its own device type only (as torch does)."""
    x, w, la, b = linear_tensors("in")
    with torch.autocast("cuda", dtype=torch.float16):
        assert torch.is_autocast_enabled("cuda")
        y = l0k.l0_linear(x, w, la, b, seed=SEED, backend="torch")
        assert F.linear(x, w, b).dtype == torch.float32
    assert y.dtype == torch.float32


def test_the_op_runs_with_autocast_off(monkeypatch):
    seen = []
    real = F.linear

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "linear", spy)
    x, w, la, b = linear_tensors("out")
    with _ac(torch.bfloat16):
        l0k.l0_linear(x, w, la, b, seed=SEED, gate="out", noise="sample", backend="torch")
        assert torch.is_autocast_enabled("cpu")  # restored
    assert seen and not any(seen)


# ---- modules ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", AC_DTYPES)
@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
def test_l0linear_training_mode(dtype, gate, noise):
    torch.manual_seed(11)
    m = l0k.L0Linear(K, N, gate=gate, noise=noise, backend="torch")
    with torch.no_grad():
        m.log_alpha.normal_(0, 2.5)
    h = copy.deepcopy(m).to(dtype)  # cast by hand
    x = torch.randn(*M_SHAPE, K)
    torch.manual_seed(5)
    with _ac(dtype):
        y = m(x)
    torch.manual_seed(5)  # the same seed drawn: the same gates
    yh = h(x.to(dtype))
    assert y.dtype == dtype and torch.equal(y, yh)
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    yh.backward(dy)
    for (name, p), ph in zip(m.named_parameters(), h.parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert torch.equal(p.grad, ph.grad.float()), name


def _closed_by_a_hair(m):
    """Put one gate just below the closed threshold, where its bfloat16 rounding (-2.390625) would open it."""
    with torch.no_grad():
        m.log_alpha.view(-1)[1] = -2.398
    assert -2.398 <= CLOSED_T and float(torch.tensor(-2.398).bfloat16()) > CLOSED_T


@pytest.mark.parametrize("dtype", AC_DTYPES)
@pytest.mark.parametrize("gate", ["in", "out", "weight"])
def test_l0linear_eval_mode_plan(dtype, gate, monkeypatch):
    torch.manual_seed(12)
    m = l0k.L0Linear(K, N, gate=gate, backend="torch").eval()
    with torch.no_grad():
        m.log_alpha.normal_(0, 2.5)
    _closed_by_a_hair(m)
    builds = []
    real = _plans.build_linear_plan
    monkeypatch.setattr(_plans, "build_linear_plan", lambda mod, *a: builds.append(a) or real(mod, *a))
    x = torch.randn(*M_SHAPE, K)
    with torch.no_grad():
        with _ac(dtype):
            y = m(x)
            y2 = m(x)
        y32 = m(x)
        with _ac(dtype):
            y3 = m(x)
        y32b = m(x)
    assert y.dtype == dtype and y32.dtype == torch.float32
    assert torch.equal(y, y2) and torch.equal(y, y3) and torch.equal(y32, y32b)
    assert len(builds) == 2  # one plan per dtype, each built once, both kept
    plan, plan32 = _plans.cached_plan(m, dtype), _plans.cached_plan(m, torch.float32)
    assert plan.weight.dtype == dtype and plan32.weight.dtype == torch.float32
    assert (plan.bias is None or plan.bias.dtype == dtype) and (plan.fill is None or plan.fill.dtype == dtype)
    # the gates come from the float32 log_alpha: the same groups are skipped as in float32
    for a, b in ((plan.in_idx, plan32.in_idx), (plan.out_idx, plan32.out_idx)):
        assert (a is None and b is None) or torch.equal(a, b)
    z = m.deterministic_gates()
    assert float(z.view(-1)[1]) == 0.0
    # the plan is the float32 plan rounded once
    assert torch.equal(plan.weight, plan32.weight.to(dtype))
    ref = l0k.l0_linear(x.double(), m.weight.double(), m.log_alpha.double(), m.bias.double(), gate=gate,
                        training=False, backend="torch")
    assert rel(y, ref) < 2 * TOL[dtype]  # x and the plan rounded to dtype
    hand = l0k.l0_linear(*(t.detach().to(dtype) for t in (x, m.weight, m.log_alpha, m.bias)), gate=gate,
                         training=False, backend="torch")
    assert rel(y, hand) < 2 * TOL[dtype]
    # parameters change: both plans are rebuilt when next used, the stale one dropped
    with torch.no_grad():
        m.weight.mul_(-1.5)
        with _ac(dtype):
            y4 = m(x)
    assert len(builds) == 3 and _plans.cached_plan(m, torch.float32) is None
    ref4 = l0k.l0_linear(x.double(), m.weight.double(), m.log_alpha.double(), m.bias.double(), gate=gate,
                         training=False, backend="torch")
    assert rel(y4, ref4) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", AC_DTYPES)
def test_l0linear_eval_mode_with_grad_uses_the_differentiable_path(dtype):
    torch.manual_seed(13)
    m = l0k.L0Linear(K, N, gate="out", backend="torch").eval()
    x = torch.randn(*M_SHAPE, K)
    with _ac(dtype):
        y = m(x)
    assert y.dtype == dtype and _plans.cached_plan(m) is None
    hand = l0k.l0_linear(*(t.detach().to(dtype) for t in (x, m.weight, m.log_alpha, m.bias)), gate="out",
                         training=False, backend="torch")
    assert torch.equal(y, hand)
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("dtype", AC_DTYPES)
@pytest.mark.parametrize("noise", ["batch", "sample"])
@pytest.mark.parametrize("groups", [1, 2])
def test_l0conv2d_train_and_eval(dtype, noise, groups, monkeypatch):
    torch.manual_seed(14)
    m = l0k.L0Conv2d(4, 6, 3, stride=(2, 1), padding=1, groups=groups, noise=noise, backend="torch")
    with torch.no_grad():
        m.log_alpha.normal_(0, 2.5)
    _closed_by_a_hair(m)
    h = copy.deepcopy(m).to(dtype)
    x = torch.randn(3, 4, 7, 9)
    torch.manual_seed(6)
    with _ac(dtype):
        y = m(x)
    torch.manual_seed(6)
    yh = h(x.to(dtype))
    assert y.dtype == dtype and torch.equal(y, yh) and m.input_hw == (7, 9)
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    yh.backward(dy)
    for (name, p), ph in zip(m.named_parameters(), h.parameters()):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, ph.grad.float()), name

    m.eval()
    builds = []
    real = _plans.build_conv_plan
    monkeypatch.setattr(_plans, "build_conv_plan", lambda mod, *a: builds.append(a) or real(mod, *a))
    with torch.no_grad():
        with _ac(dtype):
            ye = m(x)
            ye2 = m(x.contiguous(memory_format=torch.channels_last))
        ye32 = m(x)
        with _ac(dtype):
            ye3 = m(x)
    assert ye.dtype == dtype and torch.equal(ye, ye2) and torch.equal(ye, ye3)
    assert len(builds) == 2
    plan, plan32 = _plans.cached_plan(m, dtype), _plans.cached_plan(m, torch.float32)
    assert plan.weight.dtype == dtype and torch.equal(plan.weight, plan32.weight.to(dtype))
    assert (plan.out_idx is None and plan32.out_idx is None) or torch.equal(plan.out_idx, plan32.out_idx)
    ref = l0k.l0_conv2d(x.double(), m.weight.double(), m.log_alpha.double(), m.bias.double(), m.stride, m.padding,
                        m.dilation, m.groups, training=False, backend="torch")
    assert rel(ye, ref) < 2 * TOL[dtype] and rel(ye32, ref) < TOL[torch.float32]


def test_eval_plan_under_autocast_with_float64_layer():
    m = l0k.L0Linear(K, N, gate="in", dtype=torch.float64).eval()
    x = torch.randn(*M_SHAPE, K, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        with _ac(torch.bfloat16):
            y = m(x)
        with _ac(torch.bfloat16), pytest.raises(TypeError, match=r"^weight must have the dtype of x once"):
            m(x.float())
    assert y.dtype == torch.float64 and torch.equal(y, ref)
    assert list(_plans._CACHES[m]) == [torch.float64]  # one plan: nothing was cast


def test_module_dtype_mismatch_under_autocast_names_the_parameter():
    m = l0k.L0Linear(K, N, gate="in").eval()
    with torch.no_grad():
        m.log_alpha.data = m.log_alpha.data.double()
    with _ac(torch.bfloat16), torch.no_grad(), pytest.raises(TypeError, match=r"^log_alpha must have the dtype"):
        m(torch.randn(3, K))
    c = l0k.L0Conv2d(4, 6, 3).eval()
    with torch.no_grad():
        c.bias.data = c.bias.data.double()
    with _ac(torch.bfloat16), torch.no_grad(), pytest.raises(TypeError, match=r"^bias must have the dtype"):
        c(torch.randn(2, 4, 5, 5))


# ---- training under autocast -----------------------------------------------------------------------------
@pytest.mark.parametrize("backward_inside", [False, True])
def test_training_steps_in_bfloat16_autocast(backward_inside):
    """A LeNet-like model trained with bf16 autocast (no GradScaler): float32 parameters and grads, loss drops,
    and the eval model under autocast agrees with the float32 eval model."""
    torch.manual_seed(21)
    kw = dict(backend="torch", droprate_init=0.2)
    model = torch.nn.Sequential(
        l0k.L0Conv2d(1, 5, 3, padding=1, **kw), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), l0k.L0Linear(5 * 4 * 4, 11, gate="in", **kw), torch.nn.ReLU(),
        l0k.L0Linear(11, 3, gate="out", noise="sample", **kw))
    x = torch.randn(17, 1, 9, 9)
    target = torch.randint(0, 3, (17,))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        with _ac(torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            loss = F.cross_entropy(logits.float(), target) + 1e-3 * l0k.l0_penalty(model)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name
        assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n.endswith("log_alpha"))
        opt.step()
        l0k.constrain_(model)
        losses.append(loss.item())
    assert all(v == v for v in losses)
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0]  # fits the batch (about 0.02 of the first loss)
    model.eval()
    with torch.no_grad():
        with _ac(torch.bfloat16):
            ye = model(x)
        ye32 = model(x)
    assert ye.dtype == torch.bfloat16 and rel(ye, ye32) < 3 * TOL[torch.bfloat16]
    assert F.cross_entropy(ye.float(), target).item() < 0.3 * losses[0]


# ---- triton (interpreter on the CPU) ---------------------------------------------------------------------
def _triton_or_skip():
    pytest.importorskip("triton")
    x, w, la, b = linear_tensors("in", dtype=torch.bfloat16)
    call = l0k._checks.linear_call(x, w, la, b, seed=1, gate="in", noise="batch", training=True, backend="triton",
                                   beta=2 / 3, gamma=-0.1, zeta=1.1)
    why = l0k.get_backend("triton").why_not(call)
    if why is not None:
        pytest.skip(f"triton backend cannot run here: {why}")


@pytest.mark.interpret
@pytest.mark.parametrize("gate,noise,training", [("in", "batch", True), ("out", "sample", True),
                                                 ("weight", "batch", False)])
def test_triton_linear_under_autocast(gate, noise, training):
    _triton_or_skip()
    x, w, la, b = linear_tensors(gate, gen_seed=7)
    kw = dict(seed=SEED, gate=gate, noise=noise, training=training, backend="triton")
    ps = [leaf(t) for t in (x, w, la, b)]
    with _ac(torch.bfloat16):
        y = l0k.l0_linear(*ps, **kw)
    hs = [leaf(t, torch.bfloat16) for t in (x, w, la, b)]
    yh = l0k.l0_linear(*hs, **kw)
    assert y.dtype == torch.bfloat16 and torch.equal(y, yh)
    dy = torch.randn(y.shape).to(torch.bfloat16)
    y.backward(dy)
    yh.backward(dy)
    for p, h in zip(ps, hs):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, h.grad.float())


@pytest.mark.interpret
def test_triton_conv2d_and_eval_plan_under_autocast():
    _triton_or_skip()
    x, w, la, b = conv_tensors(gen_seed=8)
    with _ac(torch.bfloat16):
        y = l0k.l0_conv2d(x, w, la, b, 1, 1, seed=SEED, noise="sample", backend="triton")
    yh = l0k.l0_conv2d(*(t.to(torch.bfloat16) for t in (x, w, la, b)), 1, 1, seed=SEED, noise="sample",
                       backend="triton")
    assert y.dtype == torch.bfloat16 and torch.equal(y, yh)
    # eval plan on the Triton eval kernels (sparse_eval) in the autocast dtype
    torch.manual_seed(15)
    m = l0k.L0Linear(K, N, gate="in", backend="triton").eval()
    with torch.no_grad():
        m.log_alpha.normal_(0, 2.5)
        xi = torch.randn(5, K)
        with _ac(torch.bfloat16):
            yt = m(xi)
        m.backend = "torch"
        with _ac(torch.bfloat16):
            yr = m(xi)
    assert yt.dtype == torch.bfloat16 and rel(yt, yr) < TOL[torch.bfloat16]


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_autocast(backend):
    x, w, la, b = (t.cuda() for t in linear_tensors("in"))
    ps = [leaf(t) for t in (x, w, la, b)]
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            y = l0k.l0_linear(*ps, seed=SEED, backend=backend)
        yh = l0k.l0_linear(*(t.detach().to(dtype) for t in ps), seed=SEED, backend=backend)
        assert y.dtype == dtype and rel(y, yh) < TOL[dtype]
        y.float().sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in ps)
    m = l0k.L0Linear(K, N, backend=backend).cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert m(x).dtype == torch.bfloat16
