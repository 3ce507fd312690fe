"""The torch backend's CPU fast paths (``l0kernels._cpu`` via ``backends/torch/cpu_paths.py`` and the C++ gate
kernel of ``_gates.py``) against the plain torch code they stand in for, and the gates against the
float64 formula (docs/design.md §6: within 1e-6)."""
import pytest
import torch

import l0kernels as l0k
from l0kernels import _active, _gates
from l0kernels._philox import _cpu, philox_range
from l0kernels.backends.torch import cpu_paths
from conftest import TOL

pytestmark = pytest.mark.skipif(_cpu is None, reason="l0kernels._cpu was not built")
CFG = _gates.DEFAULT_CONFIG


@pytest.fixture(autouse=True)
def _dense_paths(monkeypatch):
    """These tests cover the dense C++ paths; skipping closed groups is tests/backends/torch/test_sparse_train.py's."""
    monkeypatch.setattr(_active, "ENABLED", False)


@pytest.fixture
def plain(monkeypatch):
    """Turns the C++ paths off for the duration of a block: ``with plain(): ...``."""
    class _Off:
        def __enter__(self):
            monkeypatch.setattr(cpu_paths, "ENABLED", False)
            monkeypatch.setattr(_gates, "_CPU_GATE_KERNEL", False)

        def __exit__(self, *exc):
            monkeypatch.setattr(cpu_paths, "ENABLED", True)
            monkeypatch.setattr(_gates, "_CPU_GATE_KERNEL", True)
    return _Off


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7, 2**63 - 1])
def test_gate_kernel_matches_float64_formula(rows, seed):
    g = 1031
    la = torch.randn(g, generator=torch.Generator().manual_seed(seed % 1000)) * 3
    z, dz = _gates._cpu_gates(la, seed, (rows, g), True, CFG, True)
    u = philox_range(seed, rows * g).reshape(rows, g).double()
    z64, dz64 = _gates.gates_from_uniform(la.double(), u, CFG)
    assert (z.double() - z64).abs().max() <= 1e-6
    assert (dz.double() - dz64).abs().max() <= 1e-6
    assert torch.equal(z == 0, z64 == 0) and torch.equal(z == 1, z64 == 1)
    z_only, none = _gates._cpu_gates(la, seed, (rows, g), True, CFG, False)
    assert none is None and torch.equal(z_only, z)


def test_eval_gate_kernel_matches_formula_and_thresholds():
    la = torch.cat([torch.linspace(-6, 6, 997), torch.tensor([CFG.closed_threshold, CFG.open_threshold])])
    z, dz = _gates._cpu_gates(la, 0, tuple(la.shape), False, CFG, True)
    z64, dz64 = _gates.eval_gates_and_grad(la.double(), CFG)
    assert (z.double() - z64).abs().max() <= 1e-6 and (dz.double() - dz64).abs().max() <= 1e-6
    assert z[la <= CFG.closed_threshold - 1e-6].eq(0).all() and z[la >= CFG.open_threshold + 1e-6].eq(1).all()


def test_gate_kernel_bad_sizes_raise():
    la = torch.randn(4)
    out = torch.empty(8)
    with pytest.raises(ValueError, match="multiple"):
        _cpu.gates(0, True, la.data_ptr(), 4, 6, out.data_ptr(), 0, *CFG.as_tuple)
    with pytest.raises(ValueError, match="eval"):
        _cpu.gates(0, False, la.data_ptr(), 4, 8, out.data_ptr(), 0, *CFG.as_tuple)


def test_gate_kernel_not_used_where_autograd_needs_the_graph():
    la = torch.randn(5, requires_grad=True)
    z, _ = _gates.eval_gates_and_grad(la, CFG, need_grad=False)
    assert z.requires_grad  # the torch ops path, differentiable
    with torch.no_grad():
        assert not _gates.eval_gates_and_grad(la, CFG, need_grad=False)[0].requires_grad


def _linear_case(gen, lead, n, k, gate, bias):
    x = torch.randn(*lead, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.3
    la = torch.randn(k if gate == "in" else n, generator=gen) * 2
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, la, b


def _fwd_bwd(x, w, la, b, grads, **kw):
    ts = [t.detach().clone().requires_grad_(bool(f)) if t is not None else None for t, f in zip((x, w, la, b), grads)]
    y = l0k.l0_linear(*ts, backend="torch", **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(99))
    y.backward(gy)
    return y.detach(), [t.grad if t is not None and t.requires_grad else None for t in ts]


@pytest.mark.parametrize("gate", ["in", "out"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grads", [(0, 1, 1, 1), (1, 1, 1, 1), (1, 0, 1, 0), (0, 1, 0, 1)])
def test_linear_fast_path_matches_plain_torch(gate, training, bias, grads, plain, monkeypatch):
    gen = torch.Generator().manual_seed(hash((gate, training, bias, grads)) % 2**31)
    x, w, la, b = _linear_case(gen, (37,), 23, 61, gate, bias)
    kw = dict(seed=2**33 + 5, gate=gate, noise="batch", training=training)
    calls = []
    for name in ("in_gate_input", "gate_backward"):
        fn = getattr(cpu_paths, name)
        monkeypatch.setattr(cpu_paths, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    y, g = _fwd_bwd(x, w, la, b, grads, **kw)
    # the C++ paths ran: input gates' forward always, the backward wherever dlog_alpha is wanted
    assert ("in_gate_input" in calls) == (gate == "in")
    assert ("gate_backward" in calls) == bool(grads[2])
    with plain():
        y_ref, g_ref = _fwd_bwd(x, w, la, b, grads, **kw)
    assert torch.allclose(y, y_ref, rtol=TOL[torch.float32], atol=1e-5)
    for a, r in zip(g, g_ref):
        assert (a is None) == (r is None)
        if a is not None:
            assert float((a - r).norm() / r.norm().clamp_min(1e-12)) < TOL[torch.float32]


@pytest.mark.parametrize("gate", ["in", "out"])
def test_linear_fast_path_3d_and_non_contiguous_inputs(gate, plain):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 9, 2 * 33, generator=gen)[..., ::2]  # (5, 9, 33), last-dim stride 2
    w = torch.randn(17, 33, generator=gen)
    la = torch.randn(33 if gate == "in" else 17, generator=gen)
    b = torch.randn(17, generator=gen)
    kw = dict(seed=11, gate=gate, noise="batch")
    y, g = _fwd_bwd(x, w, la, b, (1, 1, 1, 1), **kw)
    with plain():
        y_ref, g_ref = _fwd_bwd(x, w, la, b, (1, 1, 1, 1), **kw)
    assert y.shape == (5, 9, 17) and torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g, g_ref):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-5)


def test_workspace_output_is_not_aliased_across_calls():
    gen = torch.Generator().manual_seed(3)
    x1, w, la, b = _linear_case(gen, (8,), 6, 10, "in", True)
    x2 = torch.randn(8, 10, generator=gen)
    y1 = l0k.l0_linear(x1, w, la, b, seed=1, backend="torch")
    keep = y1.clone()
    l0k.l0_linear(x2, w, la, b, seed=2, backend="torch")  # reuses the (8, 10) workspace
    assert torch.equal(y1, keep)
    assert torch.equal(l0k.l0_linear(x1, w, la, b, seed=1, backend="torch"), keep)


@pytest.mark.parametrize("gate", ["in", "out"])
def test_fast_path_zero_sizes(gate):
    for m, k in ((0, 7), (4, 0)):
        x = torch.randn(m, k)
        w = torch.randn(3, k, requires_grad=True)
        la = torch.randn(k if gate == "in" else 3, requires_grad=True)
        b = torch.randn(3, requires_grad=True)
        y = l0k.l0_linear(x, w, la, b, seed=4, gate=gate, backend="torch")
        assert y.shape == (m, 3)
        y.sum().backward()
        assert w.grad.shape == w.shape and la.grad.shape == la.shape and torch.isfinite(la.grad).all()


def test_float64_never_takes_the_fast_path():
    x = torch.randn(4, 5, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64)
    la = torch.randn(5, dtype=torch.float64)
    assert not cpu_paths.applies(x, w, la, True)
    assert cpu_paths.applies(x.float(), w.float(), la.float(), True)
    assert not cpu_paths.applies(x.float(), w.float().t().contiguous().t(), la.float(), True)
    assert not cpu_paths.applies(x.float(), w.float(), la.float(), False)  # per-example gates


def test_env_switch_turns_the_cpu_kernels_off():
    import subprocess
    import sys
    code = ("import l0kernels._gates as g, l0kernels.backends.torch.cpu_paths as p; "
            "print(g._CPU_GATE_KERNEL, p.ENABLED)")
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "L0K_CPU_KERNELS": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
