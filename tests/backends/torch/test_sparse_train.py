"""Training that skips closed groups (``l0kernels._active``, ``backends/torch/skip.py``): the gathered path of
the torch backend against its dense path in float64, exact zero gradients for closed groups, the open
set recomputed per call, and a check that the skipping path actually ran (``_active.PATHS``)."""
import pytest
import torch

import l0kernels as l0k
from l0kernels import _active
from l0kernels.backends.torch import gates_for
from l0kernels._gates import DEFAULT_CONFIG as CFG
from conftest import TOL

DENSITIES = ["all_open", "half", "all_closed", "one_open"]


def _log_alpha(g, density, gen):
    """log_alpha whose drawn gates are all open (+10), all closed (-30), one open, or a mix around half."""
    if density == "all_open":
        return torch.full((g,), 10.0, dtype=torch.float64)
    if density == "all_closed":
        return torch.full((g,), -30.0, dtype=torch.float64)
    if density == "one_open":
        la = torch.full((g,), -30.0, dtype=torch.float64)
        la[g // 2] = 10.0
        return la
    return torch.randn(g, generator=gen, dtype=torch.float64) * 3.0 - 1.0  # z in {0}, (0, 1) and {1}


@pytest.fixture
def force_skip(monkeypatch):
    """Skip closed groups whenever any gate is closed (not only below the CPU's density threshold)."""
    monkeypatch.setattr(_active, "DENSE_ABOVE", 1.0)
    monkeypatch.setattr(_active, "CONV_DENSE_ABOVE", 1.0)
    monkeypatch.setattr(_active, "MIN_SKIPPED_MACS", 0)
    monkeypatch.setattr(_active, "ENABLED", True)
    _active.PATHS.clear()


def _run(fn, args, dy, enabled, monkeypatch):
    monkeypatch.setattr(_active, "ENABLED", enabled)
    args = [a.detach().clone().requires_grad_(True) if a is not None else None for a in args]
    y = fn(*args)
    grads = torch.autograd.grad(y, [a for a in args if a is not None], dy.to(y.dtype))
    monkeypatch.setattr(_active, "ENABLED", True)
    return y.detach(), grads


def _gates(la, seed):
    return gates_for(la, seed, (la.shape[0],), True, CFG, need_grad=False)[0]


def _linear_case(gate, density, seed, lead=(7,), k=13, n=11, noncontig=False, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k * 2 if noncontig else k, generator=gen, dtype=torch.float64)
    if noncontig:
        x = x[..., ::2]
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64) if bias else None
    la = _log_alpha(k if gate == "in" else n, density, gen)
    dy = torch.randn(*lead, n, generator=gen, dtype=torch.float64)
    return x, w, la, b, dy


@pytest.mark.parametrize("gate", ["in", "out"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_skip_equals_dense(gate, density, dtype, force_skip, monkeypatch, rel_err):
    seed = 1234 + DENSITIES.index(density)
    x, w, la, b, dy = _linear_case(gate, density, seed, lead=(3, 5), noncontig=(gate == "in"))
    z = _gates(la, seed)
    n_open, g = int((z != 0).sum()), z.numel()
    assert {"all_open": n_open == g, "all_closed": n_open == 0, "one_open": n_open == 1,
            "half": 0 < n_open < g}[density]

    def f(x_, w_, la_, b_):
        return l0k.l0_linear(x_, w_, la_, b_, seed=seed, gate=gate, backend="torch")

    y_ref, g_ref = _run(f, [x, w, la, b], dy, False, monkeypatch)  # dense path, float64
    args = [t.to(dtype) for t in (x, w, la, b)]
    _active.PATHS.clear()
    y, grads = _run(f, args, dy, True, monkeypatch)
    path = "skip" if n_open < g else "dense"
    assert _active.PATHS["linear-" + gate, "fwd", path] == 1
    assert _active.PATHS["linear-" + gate, "bwd", "skip"] == (path == "skip")
    tol = TOL[dtype]
    assert rel_err(y, y_ref) <= tol
    for gr, ref in zip(grads, g_ref):
        assert gr.dtype == dtype and rel_err(gr, ref) <= tol
    closed = z == 0
    dx, dw, dla, db = grads
    assert dla[closed].eq(0).all()
    if gate == "in":
        assert dw[:, closed].eq(0).all() and dx[..., closed].eq(0).all()
    else:
        assert dw[closed].eq(0).all() and db[closed].eq(0).all() and y[..., closed].eq(0).all()
    if dtype == torch.float64:  # the same arithmetic on the open groups, and exact zeros elsewhere
        assert rel_err(y, y_ref) <= 1e-12


@pytest.mark.parametrize("gate", ["in", "out"])
def test_linear_skip_partial_grads_and_no_bias(gate, force_skip, monkeypatch, rel_err):
    seed = 77
    x, w, la, _, dy = _linear_case(gate, "half", seed, lead=(9,), k=17, n=6, bias=False)
    for need in ([True, False, False], [False, True, False], [False, False, True]):
        outs = []
        for enabled in (False, True):
            monkeypatch.setattr(_active, "ENABLED", enabled)
            xs = [t.detach().clone().requires_grad_(r) for t, r in zip((x, w, la), need)]
            y = l0k.l0_linear(*xs, None, seed=seed, gate=gate, backend="torch")
            outs.append(torch.autograd.grad(y, [t for t in xs if t.requires_grad], dy)[0])
        assert rel_err(outs[1], outs[0]) <= 1e-12
    assert _active.PATHS["linear-" + gate, "bwd", "skip"] == 3


def test_open_set_recomputed_per_call(force_skip, monkeypatch, rel_err):
    """Each call draws its own gates; the skipped groups follow them (output gates: the zero columns)."""
    x, w, la, b, dy = _linear_case("out", "half", 5, lead=(4,), k=9, n=40)
    layer_out = []
    for seed in (11, 12):
        z = _gates(la, seed)
        y = l0k.l0_linear(x, w, la, b, seed=seed, gate="out", backend="torch")
        assert torch.equal(y.eq(0).all(0), z == 0)
        monkeypatch.setattr(_active, "ENABLED", False)
        assert rel_err(y, l0k.l0_linear(x, w, la, b, seed=seed, gate="out", backend="torch")) <= 1e-12
        monkeypatch.setattr(_active, "ENABLED", True)
        layer_out.append(z == 0)
    assert not torch.equal(*layer_out)
    # a module draws a fresh seed per call: two calls skip different groups
    torch.manual_seed(0)
    m = l0k.L0Linear(9, 40, gate="out", backend="torch").double()
    with torch.no_grad():
        m.log_alpha.copy_(la)
    masks = [m(x).detach().eq(0).all(0) for _ in range(2)]
    assert _active.PATHS["linear-out", "fwd", "skip"] == 4
    assert not torch.equal(*masks)


def test_dense_above_threshold_takes_dense_path(monkeypatch):
    monkeypatch.setattr(_active, "DENSE_ABOVE", 0.5)
    monkeypatch.setattr(_active, "MIN_SKIPPED_MACS", 0)
    _active.PATHS.clear()
    x, w, la, b, dy = _linear_case("in", "one_open", 3)
    la[:] = 10.0
    la[0] = -30.0  # 12 of 13 open: above the threshold
    l0k.l0_linear(x, w, la.requires_grad_(), b, seed=1, gate="in", backend="torch").sum().backward()
    assert _active.PATHS["linear-in", "fwd", "dense"] == 1 and not _active.PATHS["linear-in", "fwd", "skip"]


def test_linear_and_conv_thresholds(monkeypatch):
    """With 8 of 10 groups open the linear layer keeps the dense GEMM (its gathers cost more than they save
    above 70% open on the CPU) and the convolution takes the gathered one (its threshold is 90%)."""
    monkeypatch.setattr(_active, "MIN_SKIPPED_MACS", 0)
    _active.PATHS.clear()
    gen = torch.Generator().manual_seed(5)
    la = torch.full((10,), 30.0, dtype=torch.float64)
    la[[2, 7]] = -30.0  # exactly 8 of 10 gates open, whatever the noise
    x = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    l0k.l0_linear(x, torch.randn(6, 10, generator=gen, dtype=torch.float64), la, seed=1, gate="in", backend="torch")
    xc = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    l0k.l0_conv2d(xc, torch.randn(10, 3, 3, 3, generator=gen, dtype=torch.float64), la, seed=1, backend="torch")
    assert _active.PATHS["linear-in", "fwd", "dense"] == 1 and _active.PATHS["conv2d", "fwd", "skip"] == 1


def test_small_skipped_work_takes_dense_path(monkeypatch):
    """Too few multiply-adds skipped to pay for the gathers: the dense path (7 rows x 11 outputs x 12 closed)."""
    monkeypatch.setattr(_active, "MIN_SKIPPED_MACS", 7 * 11 * 12 + 1)
    _active.PATHS.clear()
    x, w, la, b, dy = _linear_case("in", "one_open", 3)
    l0k.l0_linear(x, w, la, b, seed=1, gate="in", backend="torch")
    assert _active.PATHS["linear-in", "fwd", "dense"] == 1
    monkeypatch.setattr(_active, "MIN_SKIPPED_MACS", 7 * 11 * 12)
    l0k.l0_linear(x, w, la, b, seed=1, gate="in", backend="torch")
    assert _active.PATHS["linear-in", "fwd", "skip"] == 1


@pytest.mark.parametrize("gate", ["in", "out", "weight"])
def test_per_example_and_weight_gates_never_skip(gate, force_skip):
    x, w, la, b, dy = _linear_case("in" if gate == "in" else "out", "half", 4)
    if gate == "weight":
        la = torch.full(w.shape, -30.0, dtype=torch.float64)
    noise = "batch" if gate == "weight" else "sample"
    l0k.l0_linear(x, w, la.requires_grad_(), b, seed=2, gate=gate, noise=noise, backend="torch").sum().backward()
    assert not any(k[2] == "skip" for k in _active.PATHS)


def test_eval_never_skips_through_training_path(force_skip):
    x, w, la, b, _ = _linear_case("in", "half", 6)
    l0k.l0_linear(x, w, la, b, gate="in", training=False, backend="torch")
    assert not _active.PATHS


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_skip_equals_dense(density, channels_last, force_skip, monkeypatch, rel_err):
    seed = 99 + DENSITIES.index(density)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 7, 6, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(9, 4, 3, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(9, generator=gen, dtype=torch.float64)
    la = _log_alpha(9, density, gen)
    z = _gates(la, seed)

    def f(x_, w_, la_, b_):
        return l0k.l0_conv2d(x_, w_, la_, b_, stride=(2, 1), padding=1, seed=seed, backend="torch")

    dy = torch.randn(f(x, w, la, b).shape, generator=gen, dtype=torch.float64)
    y_ref, g_ref = _run(f, [x, w, la, b], dy, False, monkeypatch)
    _active.PATHS.clear()
    for dtype in (torch.float64, torch.float32):
        y, grads = _run(f, [t.to(dtype) for t in (x, w, la, b)], dy, True, monkeypatch)
        assert rel_err(y, y_ref) <= TOL[dtype]
        for gr, ref in zip(grads, g_ref):
            assert rel_err(gr, ref) <= TOL[dtype]
        closed = z == 0
        assert grads[1][closed].eq(0).all() and grads[2][closed].eq(0).all() and grads[3][closed].eq(0).all()
        assert y[:, closed].eq(0).all()
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)
    skipped = int((z != 0).sum()) < 9
    assert _active.PATHS["conv2d", "fwd", "skip"] == 2 * skipped
    assert _active.PATHS["conv2d", "bwd", "skip"] == 2 * skipped


def test_grouped_conv_takes_dense_path(force_skip):
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 2, 3, 3)
    la = torch.full((6,), -30.0)
    y = l0k.l0_conv2d(x, w, la, None, groups=2, seed=3, backend="torch")
    assert y.eq(0).all() and _active.PATHS["conv2d", "fwd", "dense"] == 1


@pytest.mark.parametrize("density", DENSITIES)
def test_device_open_set(density):
    gen = torch.Generator().manual_seed(8)
    la = _log_alpha(37, density, gen)
    z = _gates(la, 21)
    s = _active.open_set(z)
    idx = _active.open_index(z)
    count = int(s.count)
    assert s.index.shape == (37,) and s.count.dim() == 0 and s.count.dtype == torch.int64
    assert count == idx.numel() and torch.equal(s.index[:count], idx)
    assert torch.equal(s.index[count:], torch.nonzero(z == 0).reshape(-1))


@pytest.mark.skipif(not hasattr(getattr(l0k._philox, "_cpu", None), "scatter_cols"), reason="l0kernels._cpu not built")
def test_scatter_cols_kernel():
    from l0kernels.backends.torch import skip
    gen = torch.Generator().manual_seed(4)
    n, k = 7, 19
    idx = torch.tensor([0, 3, 4, 11, 18])
    src = torch.randn(n, 5, generator=gen)
    wo = torch.randn(n, 5, generator=gen)
    ratio = torch.rand(5, generator=gen)
    dw, dlo = skip._scatter_cols(src, idx, wo, ratio, n, k)
    assert torch.equal(dw, torch.zeros(n, k).index_copy_(1, idx, src))
    assert torch.allclose(dlo, (wo * src).sum(0) * ratio, rtol=1e-6, atol=1e-6)
    dw2, none = skip._scatter_cols(src, idx, None, None, n, k)
    assert none is None and torch.equal(dw2, dw)
    with pytest.raises(ValueError, match="ko <= k"):
        l0k._philox._cpu.scatter_cols(src.data_ptr(), idx.data_ptr(), 30, 0, 0, dw.data_ptr(), 0, n, k)


# ---------------------------------------------------------------------------------------------- Triton
# The Triton backend's device route: the kernels read the open set (permutation + count) in device memory
# (``backends/triton/_gate_math.open_set``) on every training call with one gate vector. Under
# TRITON_INTERPRET=1 on the CPU (the same tests run natively on a GPU).

TDEV = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_or_skip():
    pytest.importorskip("triton")
    from l0kernels.backends.triton.linear import INTERPRET
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")


@pytest.mark.interpret
@pytest.mark.parametrize("gate", ["in", "out"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("group_size", [1, 3])
def test_triton_skip_equals_dense_reference(gate, density, group_size, rel_err):
    """The open-set kernels against the torch backend's dense path in float64 (odd shapes, non-contiguous
    x, leading dims), exact zeros for the closed groups, and the skipping kernels counted as run."""
    _triton_or_skip()
    seed = 4321 + DENSITIES.index(density) + 10 * group_size
    gen = torch.Generator().manual_seed(seed)
    k, n = 3 * 7, 3 * 6  # multiples of the group sizes; no multiple of the interpreter's 16-blocks
    x = torch.randn(3, 5, 2 * k, generator=gen, dtype=torch.float64)[..., ::2]
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    la = _log_alpha((k if gate == "in" else n) // group_size, density, gen)
    dy = torch.randn(3, 5, n, generator=gen, dtype=torch.float64)
    z = gates_for(la, seed, (la.shape[0],), True, CFG, need_grad=False, group_size=group_size)[0]

    def run(backend, dtype, dev):
        ts = [t.to(dtype).to(dev).requires_grad_() for t in (x, w, la, b)]
        y = l0k.l0_linear(*ts, seed=seed, gate=gate, group_size=group_size, backend=backend)
        grads = torch.autograd.grad(y, ts, dy.to(dtype).to(dev))
        return [t.cpu() for t in (y, *grads)]

    ref = run("torch", torch.float64, "cpu")  # dense: far below the CPU's skipping threshold
    _active.PATHS.clear()
    out = run("triton", torch.float32, TDEV)
    assert _active.PATHS["linear-" + gate, "fwd", "skip"] == 1 and _active.PATHS["linear-" + gate, "bwd", "skip"] == 1
    assert not any(key[2] == "dense" for key in _active.PATHS)
    for o, r in zip(out, ref):
        assert rel_err(o, r) <= 1e-5
    y, dx, dw, dla, db = out
    closed = z == 0
    assert dla.repeat_interleave(group_size)[closed].eq(0).all()
    if gate == "in":
        assert dx[..., closed].eq(0).all() and dw[:, closed].eq(0).all()
    else:
        assert y[..., closed].eq(0).all() and dw[closed].eq(0).all() and db[closed].eq(0).all()


@pytest.mark.interpret
@pytest.mark.parametrize("gate", ["in", "out"])
def test_triton_closed_groups_are_never_read(gate):
    """A closed group's data is never loaded: an infinite input column (``gate="in"``) or weight row
    (``gate="out"``) behind a closed gate leaves the output and the other gradients finite, as on the torch
    backend's skipping path (the dense formula would give ``0 * inf = NaN``)."""
    _triton_or_skip()
    gen = torch.Generator().manual_seed(3)
    k, n = 19, 17
    x = torch.randn(6, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    la = torch.randn(k if gate == "in" else n, generator=gen) * 3
    la[4] = -30.0  # closed in every draw
    if gate == "in":
        x[:, 4] = float("inf")
    else:
        w[4] = float("inf")
    ts = [t.to(TDEV).requires_grad_() for t in (x, w, la)]
    y = l0k.l0_linear(*ts, None, seed=12, gate=gate, backend="triton")
    y.backward(torch.randn(y.shape, generator=gen).to(TDEV))
    assert torch.isfinite(y).all() and torch.isfinite(ts[2].grad).all()
    if gate == "in":
        assert torch.isfinite(ts[1].grad).all() and ts[0].grad[:, 4].eq(0).all()
    else:
        assert torch.isfinite(ts[0].grad).all() and y[:, 4].eq(0).all() and ts[1].grad[4].eq(0).all()


@pytest.mark.interpret
@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_triton_open_fraction_rule(op, monkeypatch):
    """Below 1, ``_gate_math.SKIP_BELOW`` decides: a layer's first call knows no open fraction (the dense
    kernels, forward and backward), later ones take the open-set kernels where the last read fraction is at most
    SKIP_BELOW (25% open) and the dense ones above it (80%); the backward takes its forward's decision."""
    _triton_or_skip()
    from l0kernels.backends.triton import _gate_math
    monkeypatch.setattr(_gate_math, "SKIP_BELOW", 0.5)
    gen = torch.Generator().manual_seed(8)
    for frac, want in ((0.25, "skip"), (0.8, "dense")):
        la = torch.where(torch.arange(16) < 16 * frac, torch.tensor(6.0), torch.tensor(-9.0)).to(TDEV)
        la = la.requires_grad_()
        if op == "linear":
            x = torch.randn(5, 16, generator=gen).to(TDEV)
            w = torch.randn(7, 16, generator=gen).to(TDEV).requires_grad_()
            run = lambda s: l0k.l0_linear(x, w, la, seed=s, backend="triton")  # noqa: E731
            key = "linear-in"
        else:
            x = torch.randn(2, 3, 5, 4, generator=gen).to(TDEV)
            w = torch.randn(16, 3, 3, 3, generator=gen).to(TDEV).requires_grad_()
            run = lambda s: l0k.l0_conv2d(x, w, la, seed=s, padding=1, backend="triton")  # noqa: E731
            key = "conv2d"
        seen = []
        for i in range(3):
            _active.PATHS.clear()
            run(30 + i).sum().backward()
            paths = {d: p for (k, d, p), c in _active.PATHS.items() if k == key and c}
            assert paths["fwd"] == paths["bwd"], _active.PATHS
            seen.append(paths["fwd"])
        assert seen == ["dense", want, want], (frac, seen)


@pytest.mark.interpret
def test_triton_open_set_recomputed_per_call_and_switch(monkeypatch, rel_err):
    """Each seed gives its own open set (the zero output columns follow the drawn gates); with
    ``_active.ENABLED`` off (``L0K_SKIP_CLOSED=0``) the dense kernels run and give the same result."""
    _triton_or_skip()
    x, w, la, b, _ = _linear_case("out", "half", 5, lead=(4,), k=9, n=40)
    args = [t.float().to(TDEV) for t in (x, w, la, b)]
    masks = []
    for seed in (11, 12):
        z = _gates(la, seed)
        _active.PATHS.clear()
        y = l0k.l0_linear(*args, seed=seed, gate="out", backend="triton").cpu()
        assert _active.PATHS["linear-out", "fwd", "skip"] == 1
        assert torch.equal(y.eq(0).all(0), z == 0)
        monkeypatch.setattr(_active, "ENABLED", False)
        y_dense = l0k.l0_linear(*args, seed=seed, gate="out", backend="triton").cpu()
        monkeypatch.setattr(_active, "ENABLED", True)
        assert _active.PATHS["linear-out", "fwd", "dense"] == 1
        assert rel_err(y, y_dense) <= 1e-6
        masks.append(z == 0)
    assert not torch.equal(*masks)


@pytest.mark.interpret
def test_triton_device_open_set_matches_host_route():
    """``open_set`` of the Triton backend (closed flags from the in-kernel gates + a stable sort) equals
    the host route's open index of the torch backend's gates, grouped or not, and a tensor seed works."""
    _triton_or_skip()
    from l0kernels.backends.triton._gate_math import open_set, seed_tensor
    gen = torch.Generator().manual_seed(9)
    for gs in (1, 4):
        la = torch.randn(23, generator=gen) * 3 - 1
        for seed in (5, torch.tensor(2**62 + 7)):
            s = open_set(la.to(TDEV), seed_tensor(seed, la.to(TDEV)), CFG, gs)
            z = gates_for(la.double(), seed, (23,), True, CFG, need_grad=False, group_size=gs)[0]
            idx = _active.open_index(z)
            count = int(s.count)
            assert s.index.shape == (23 * gs,) and count == idx.numel()
            assert torch.equal(s.index[:count].cpu(), idx)
            assert torch.equal(s.index[count:].cpu(), torch.nonzero(z == 0).reshape(-1))


CONV_GEOMS = {"plain": dict(stride=(1, 2), padding=1), "strided": dict(stride=2, padding=(2, 1), dilation=(1, 2))}


def _conv_case(density, group_size, seed, channels_last=False, n_gates=9):
    """Float64 inputs of a small odd convolution (``n_gates * group_size`` output channels: two channel tiles
    of the interpreter's 16-blocks at group size 2) and the channel gates drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    c_out = n_gates * group_size
    x = torch.randn(2, 3, 7, 6, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(c_out, 3, 3, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64)
    la = _log_alpha(n_gates, density, gen)
    z = gates_for(la, seed, (n_gates,), True, CFG, need_grad=False, group_size=group_size)[0]
    return x, w, la, b, z


def _conv_run(backend, dtype, dev, x, w, la, b, dy_seed=1, **kw):
    """``(y, dx, dW, dlog_alpha, db)`` on the CPU; x keeps its memory format."""
    ts = [t.to(dtype).to(dev).requires_grad_() for t in (x, w, la, b)]
    y = l0k.l0_conv2d(*ts, backend=backend, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=torch.float64)
    return [t.cpu() for t in (y, *torch.autograd.grad(y, ts, dy.to(dtype).to(dev)))]


@pytest.mark.interpret
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geom", list(CONV_GEOMS))
def test_triton_conv2d_skips_closed_channels(density, group_size, channels_last, geom, rel_err):
    """The Triton convolution over the open channels (device open set), forward and backward (implicit-GEMM
    dgrad/wgrad kernels, no cuDNN), against the torch backend in float64; exact zeros for closed channels."""
    _triton_or_skip()
    seed = 606 + DENSITIES.index(density) + group_size
    x, w, la, b, z = _conv_case(density, group_size, seed, channels_last)
    kw = dict(seed=seed, group_size=group_size, **CONV_GEOMS[geom])
    ref = _conv_run("torch", torch.float64, "cpu", x, w, la, b, **kw)
    _active.PATHS.clear()
    out = _conv_run("triton", torch.float32, TDEV, x, w, la, b, **kw)
    assert _active.PATHS["conv2d", "fwd", "skip"] == 1 and _active.PATHS["conv2d", "bwd", "skip"] == 1
    assert not any(key[2] == "dense" for key in _active.PATHS)
    for name, o, r in zip(("y", "dx", "dW", "dlog_alpha", "db"), out, ref):
        assert rel_err(o, r) <= 1e-5, name
    y, dx, dw, dla, db = out
    closed = z == 0
    assert y[:, closed].eq(0).all() and dw[closed].eq(0).all() and db[closed].eq(0).all()
    assert dla.repeat_interleave(group_size)[closed].eq(0).all()
    if closed.all():
        assert dx.eq(0).all()


@pytest.mark.interpret
@pytest.mark.parametrize("group_size", [1, 2])
def test_triton_conv2d_closed_channels_are_never_read(group_size, rel_err):
    """The skipping backward never loads a closed channel's weights, bias or ``dY``: with inf/NaN there, the
    output, ``dX`` and the open channels' gradients equal the reference on finite data, and the closed
    channels' gradients are exact zeros (the dense formula gives ``0 * inf = NaN``)."""
    _triton_or_skip()
    seed = 31 + group_size
    x, w, la, b, z = _conv_case("half", group_size, seed)
    closed = z == 0
    assert closed.any() and not closed.all()
    kw = dict(seed=seed, group_size=group_size, padding=1)
    ref = _conv_run("torch", torch.float64, "cpu", x, w, la, b, **kw)
    w_bad, b_bad = w.clone(), b.clone()
    w_bad[closed] = float("inf")
    w_bad[closed.nonzero()[0], 0, 0, 0] = float("nan")
    b_bad[closed] = float("nan")
    ts = [t.float().to(TDEV).requires_grad_() for t in (x, w_bad, la, b_bad)]
    y = l0k.l0_conv2d(*ts, backend="triton", **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dy[:, closed] = float("nan")
    grads = torch.autograd.grad(y, ts, dy.float().to(TDEV))
    out = [t.cpu() for t in (y, *grads)]
    for name, o, r in zip(("y", "dx", "dW", "dlog_alpha", "db"), out, ref):
        assert torch.isfinite(o).all(), name
        assert rel_err(o, r) <= 1e-5, name
    assert out[2][closed].eq(0).all() and out[4][closed].eq(0).all()
    assert out[3].repeat_interleave(group_size)[closed].eq(0).all()


@pytest.mark.interpret
def test_triton_conv2d_skip_switch_and_dense_calls(monkeypatch, rel_err):
    """``_active.ENABLED`` off (``L0K_SKIP_CLOSED=0``): forward and backward count "dense" (cuDNN's backward)
    and agree with the skipping path; per-example noise, eval and ``groups > 1`` never take the skipping
    backward (only batch-noise training counts a path)."""
    _triton_or_skip()
    x, w, la, b, z = _conv_case("half", 1, 8, channels_last=True)
    kw = dict(seed=8, stride=2, padding=1)
    _active.PATHS.clear()
    skip = _conv_run("triton", torch.float32, TDEV, x, w, la, b, **kw)
    assert _active.PATHS["conv2d", "bwd", "skip"] == 1
    monkeypatch.setattr(_active, "ENABLED", False)
    _active.PATHS.clear()
    dense = _conv_run("triton", torch.float32, TDEV, x, w, la, b, **kw)
    assert dict(_active.PATHS) == {("conv2d", "fwd", "dense"): 1, ("conv2d", "bwd", "dense"): 1}
    for o, r in zip(skip, dense):
        assert rel_err(o, r) <= 1e-5
    monkeypatch.setattr(_active, "ENABLED", True)
    _active.PATHS.clear()
    _conv_run("triton", torch.float32, TDEV, x, w, la, b, noise="sample", **kw)
    _conv_run("triton", torch.float32, TDEV, x, w, la, b, training=False, **kw)
    assert not _active.PATHS
    xg = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    wg = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    _conv_run("triton", torch.float32, TDEV, xg, wg, la[:6], b[:6], seed=8, groups=2)
    assert dict(_active.PATHS) == {("conv2d", "fwd", "dense"): 1, ("conv2d", "bwd", "dense"): 1}


@pytest.mark.interpret
@pytest.mark.parametrize("weight_layout", ["channels_last", "sliced"])
def test_triton_conv2d_skip_weight_layouts_expanded_dy(weight_layout, rel_err):
    """The skipping backward with a channels_last or non-contiguous weight, a non-contiguous ``x`` and the
    stride-0 ``dY`` of ``y.sum()``."""
    _triton_or_skip()
    x, w, la, b, z = _conv_case("half", 1, 21)
    kw = dict(seed=21, padding=(0, 1), dilation=2)

    def every_other(t, dim):  # a non-contiguous view of t (its leaf keeps the strides)
        return torch.cat([t, t], dim).narrow(dim, 0, 2 * t.shape[dim])[(slice(None),) * dim + (slice(None, None, 2),)]

    def run(backend, dtype):
        ts = [t.to(dtype).to(TDEV if backend == "triton" else "cpu") for t in (x, w, la, b)]
        ts[0] = every_other(ts[0], 3)
        ts[1] = ts[1].to(memory_format=torch.channels_last) if weight_layout == "channels_last" \
            else every_other(ts[1], 1)
        ts = [t.detach().requires_grad_() for t in ts]
        assert not ts[0].is_contiguous() and not ts[1].is_contiguous()
        y = l0k.l0_conv2d(*ts, backend=backend, **kw)
        return [t.cpu() for t in (y, *torch.autograd.grad(y.sum(), ts))]

    ref = run("torch", torch.float64)
    _active.PATHS.clear()
    out = run("triton", torch.float32)
    assert _active.PATHS["conv2d", "bwd", "skip"] == 1
    for name, o, r in zip(("y", "dx", "dW", "dlog_alpha", "db"), out, ref):
        assert rel_err(o, r) <= 1e-5, name
    assert out[2][z == 0].eq(0).all()
