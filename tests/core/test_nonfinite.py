"""NaN and +-inf in ``x``, ``weight``, ``bias`` and ``log_alpha`` (docs/design.md §6, README "Numerics").

The reference is the torch backend in float64. Its gates: a NaN ``log_alpha`` gives a NaN gate (sigmoid
and clamp keep NaN) and a NaN derivative; +inf gives gate 1, -inf gate 0, both with derivative 0. The rest is
IEEE arithmetic of the formulas (``0 * inf = NaN``: a closed gate does not hide an infinite input). Every
path must be non-finite exactly where the reference is: NaN where it is NaN, the same infinity or NaN where
it is infinite (a sum of infinities of both signs is NaN, and the paths order and group their sums
differently), and equal elsewhere.
"""
import math

import pytest
import torch

import l0kernels as l0k
import l0kernels._gates as gates_mod
from l0kernels.backends.torch import cpu_paths
from l0kernels._gates import DEFAULT_CONFIG, eval_gates_and_grad, sample_gate_tensor

VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
LINEAR_MODES = [("in", "batch"), ("in", "sample"), ("out", "batch"), ("out", "sample"), ("weight", "batch")]


@pytest.fixture(params=["cpp", "plain"])
def cpu_path(request, monkeypatch):
    """The torch backend's two float32 CPU paths: the C++ kernels (default) and the plain torch ops."""
    if request.param == "plain":
        monkeypatch.setattr(cpu_paths, "ENABLED", False)
        monkeypatch.setattr(gates_mod, "_CPU_GATE_KERNEL", False)
    elif not (cpu_paths.ENABLED and gates_mod._CPU_GATE_KERNEL):
        pytest.skip("the C++ CPU kernels are not built")
    return request.param


def assert_like_ref(out, ref, what, rtol=1e-4, atol=1e-5, nan_inputs=True):
    """Non-finite exactly where ``ref`` is. With NaN inputs (``nan_inputs``) the NaNs are the same and an
    infinity is the same or NaN; with infinite inputs only, a NaN of a sum of infinities of both signs may
    be an infinity on another path (its summation order and formula differ), so either is accepted."""
    out, ref = out.detach().double(), ref.detach().double()
    nan_r, inf_r = ref.isnan(), ref.isinf()
    bad_r, bad_o = nan_r | inf_r, out.isnan() | out.isinf()
    assert torch.equal(bad_o, bad_r), f"{what}: non-finite at {bad_o.nonzero().tolist()}, reference at {bad_r.nonzero().tolist()}"
    if nan_inputs:
        assert out[nan_r].isnan().all(), f"{what}: a NaN of the reference came out as a number"
    o, r = out[inf_r], ref[inf_r]
    assert (o.isnan() | (o == r)).all(), f"{what}: an infinity of the reference came out with the other sign"
    torch.testing.assert_close(out[~bad_r], ref[~bad_r], rtol=rtol, atol=atol, msg=what)


def _poison(t, value, gen, count=2):
    t = t.clone()
    flat = t.view(-1)
    idx = torch.randperm(flat.numel(), generator=gen)[:count]
    flat[idx] = value
    return t


def _grads(fn, tensors, gen):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad((y * g).sum(), [t for t in leaves if t is not None])
    return y, grads


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", ["x", "weight", "bias", "log_alpha"])
@pytest.mark.parametrize("gate,noise", LINEAR_MODES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_linear_nonfinite_like_float64(cpu_path, gate, noise, where, value, training):
    gen = torch.Generator().manual_seed(hash((gate, noise, where, value, training)) % 2**31)
    m, n, k = 5, 6, 7
    t = {"x": torch.randn(m, k, generator=gen), "weight": torch.randn(n, k, generator=gen),
         "bias": torch.randn(n, generator=gen),
         "log_alpha": torch.randn({"in": (k,), "out": (n,), "weight": (n, k)}[gate], generator=gen) * 2}
    t[where] = _poison(t[where], VALUES[value], gen)
    args = [t["x"], t["weight"], t["log_alpha"], t["bias"]]

    def run(dtype):
        def f(x, w, la, b):
            return l0k.l0_linear(x, w, la, b, seed=1234, gate=gate, noise=noise, training=training, backend="torch")
        return _grads(f, [a.to(dtype) for a in args], torch.Generator().manual_seed(9))

    ref_y, ref_g = run(torch.float64)
    y, g = run(torch.float32)
    assert_like_ref(y, ref_y, "y", nan_inputs=value == "nan")
    for name, a, b in zip(("dx", "dweight", "dlog_alpha", "dbias"), g, ref_g):
        assert_like_ref(a, b, name, nan_inputs=value == "nan")


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", ["x", "weight", "bias", "log_alpha"])
@pytest.mark.parametrize("noise", ["batch", "sample"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv2d_nonfinite_like_float64(cpu_path, noise, where, value, training):
    gen = torch.Generator().manual_seed(hash((noise, where, value, training)) % 2**31)
    t = {"x": torch.randn(2, 3, 5, 6, generator=gen), "weight": torch.randn(4, 3, 3, 3, generator=gen),
         "bias": torch.randn(4, generator=gen), "log_alpha": torch.randn(4, generator=gen) * 2}
    t[where] = _poison(t[where], VALUES[value], gen, count=1)
    args = [t["x"], t["weight"], t["log_alpha"], t["bias"]]
    # with padding, whether a padded zero times an infinite weight is NaN depends on PyTorch's conv
    # algorithm (the float32 and float64 CPU convolutions differ), not on the gates: no padding there
    pad = 0 if where == "weight" else 1

    def run(dtype):
        def f(x, w, la, b):
            return l0k.l0_conv2d(x, w, la, b, padding=pad, seed=77, noise=noise, training=training, backend="torch")
        return _grads(f, [a.to(dtype) for a in args], torch.Generator().manual_seed(3))

    ref_y, ref_g = run(torch.float64)
    y, g = run(torch.float32)
    assert_like_ref(y, ref_y, "y", nan_inputs=value == "nan")
    for name, a, b in zip(("dx", "dweight", "dlog_alpha", "dbias"), g, ref_g):
        assert_like_ref(a, b, name, nan_inputs=value == "nan")


LA = torch.tensor([math.nan, math.inf, -math.inf, 0.3, -1.2, 40.0, -40.0])
Z_TRAIN = [math.nan, 1.0, 0.0]  # the first three: NaN, +inf, -inf


def test_gate_values_of_nonfinite_log_alpha(cpu_path):
    """The gates themselves, training and eval, both CPU paths and float64: NaN -> NaN with a NaN derivative,
    +inf -> 1 and -inf -> 0 with derivative 0."""
    for dtype in (torch.float32, torch.float64):
        la = LA.to(dtype)
        for z, dz in (sample_gate_tensor(la, 5, (3,) + tuple(la.shape), DEFAULT_CONFIG),
                      eval_gates_and_grad(la, DEFAULT_CONFIG)):
            z, dz = z.reshape(-1, la.numel()), dz.reshape(-1, la.numel())
            assert z[:, 0].isnan().all() and (z[:, 1] == 1).all() and (z[:, 2] == 0).all(), (dtype, z)
            assert dz[:, 0].isnan().all() and (dz[:, 1:3] == 0).all(), (dtype, dz)
            assert torch.isfinite(z[:, 3:]).all()
        assert torch.isnan(l0k.deterministic_gates(la)[0])
        assert torch.isnan(l0k.sample_gates(la, 3)[0])


def test_eval_module_keeps_nan_gate():
    """The eval plan of a module keeps a NaN gate (its NaN reaches the output, as in the gated op) and drops
    the closed ones."""
    torch.manual_seed(0)
    for gate in ("in", "out", "weight"):
        m = l0k.L0Linear(6, 5, gate=gate).eval()
        with torch.no_grad():
            m.log_alpha.normal_(0, 3)
            m.log_alpha.view(-1)[1] = math.nan
            m.log_alpha.view(-1)[2] = -math.inf
            x = torch.randn(4, 6)
            ref = l0k.l0_linear(x, m.weight, m.log_alpha, m.bias, gate=gate, training=False, backend="torch")
            assert_like_ref(m(x), ref, f"eval {gate}")


triton_mods = pytest.importorskip("triton")


@pytest.mark.interpret
@pytest.mark.parametrize("gate,noise,where,value", [
    ("in", "batch", "log_alpha", "nan"), ("out", "sample", "log_alpha", "inf"), ("weight", "batch", "log_alpha", "-inf"),
    ("in", "sample", "x", "inf"), ("out", "batch", "bias", "nan"), ("in", "batch", "x", "inf"),
    ("out", "batch", "weight", "nan"),
])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_nonfinite_like_float64(gate, noise, where, value, training, monkeypatch):
    """The Triton kernels (interpreter on the CPU): the same non-finite pattern as the float64 reference.
    Training with one gate vector and input/output gates skips closed groups on the Triton backend (their
    data is never read): the reference is then the torch backend's skipping path, forced on."""
    from l0kernels.backends.triton.linear import INTERPRET
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(11)
    m, n, k = 3, 5, 6
    t = {"x": torch.randn(m, k, generator=gen), "weight": torch.randn(n, k, generator=gen),
         "bias": torch.randn(n, generator=gen),
         "log_alpha": torch.randn({"in": (k,), "out": (n,), "weight": (n, k)}[gate], generator=gen) * 2}
    t[where] = _poison(t[where], VALUES[value], gen, count=1)
    args = [t["x"], t["weight"], t["log_alpha"], t["bias"]]

    def run(dtype, backend):
        def f(x, w, la, b):
            return l0k.l0_linear(x, w, la, b, seed=321, gate=gate, noise=noise, training=training, backend=backend)
        y, g = _grads(f, [a.to(dtype).to(dev) for a in args], torch.Generator().manual_seed(4))
        return y.cpu(), [a.cpu() for a in g]

    if training and noise == "batch" and gate in ("in", "out"):
        from l0kernels import _active
        monkeypatch.setattr(_active, "DENSE_ABOVE", 1.0)
        monkeypatch.setattr(_active, "CONV_DENSE_ABOVE", 1.0)
        monkeypatch.setattr(_active, "MIN_SKIPPED_MACS", 0)
    ref_y, ref_g = run(torch.float64, "torch")
    y, g = run(torch.float32, "triton")
    assert_like_ref(y, ref_y, "y", rtol=1e-3, atol=1e-4, nan_inputs=value == "nan")
    for name, a, b in zip(("dx", "dweight", "dlog_alpha", "dbias"), g, ref_g):
        assert_like_ref(a, b, name, rtol=1e-3, atol=1e-4, nan_inputs=value == "nan")
