"""Why a backend declines a call and why its paths do not take one (docs/design.md, Architecture: "How a backend
declines a call"): ``Backend.explain`` / ``explain_paths``, ``l0k.explain_linear`` / ``explain_conv2d``, and that
a path with no reasons is the one that runs (the code that picks a path reads the same reasons). The CUDA
backend's paths are checked with the stand-in extension in test_cuda_python.py."""
import pytest
import torch

import l0kernels as l0k
from l0kernels import Backend, _active
from l0kernels._checks import linear_call
from l0kernels._dispatch import explain, get_backend
from l0kernels._lazy import UnavailableBackend
from l0kernels.backends.torch import cpu_paths
from conftest import log_alpha_at_density

CFG = dict(beta=2 / 3, gamma=-0.1, zeta=1.1)


def _linear(m=64, k=512, n=256, density=0.3, gate="in", dtype=torch.float32, seed=0):
    """``(x, weight, log_alpha)`` whose input (or output) gates are open at about ``density`` (1.0: all)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    if gate == "weight":
        la = torch.randn(n, k, generator=gen)
    elif density == 1.0:
        la = torch.full(({"in": k, "out": n}[gate],), 30.0)
    else:
        la = log_alpha_at_density({"in": k, "out": n}[gate], density, gen)
    return x, w, la.to(dtype)


def _conv(density=0.3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, 16, 16, generator=gen)
    w = torch.randn(64, 16, 3, 3, generator=gen)
    return x, w, log_alpha_at_density(64, density, gen)


class TwoReasons(Backend):
    name = "two_reasons"
    priority = -1

    def auto_eligible(self, call):
        return False

    def explain(self, call):
        return ["no float32 here", "no CPU either"]


class LinearOnly(Backend):
    """One reason per op through the hooks the default ``explain`` reads."""

    name = "linear_only"
    priority = -1

    def auto_eligible(self, call):
        return False

    def unsupported_linear(self, call):
        return None


def test_explain_is_the_one_source_of_why_not_and_the_errors(registry):
    registry(TwoReasons())
    registry(LinearOnly())
    x, w, la = _linear(7, 5, 3)
    call = linear_call(x, w, la, None, seed=1, gate="in", noise="batch", training=True, backend="auto", **CFG)
    assert get_backend("two_reasons").explain(call) == ["no float32 here", "no CPU either"]
    assert get_backend("two_reasons").why_not(call) == "no float32 here; no CPU either"
    assert "two_reasons" not in l0k.available_backends(call) and "linear_only" in l0k.available_backends(call)
    with pytest.raises(ValueError, match=r"backend='two_reasons' cannot run this linear call: no float32 here; "
                                         r"no CPU either"):
        l0k.l0_linear(x, w, la, seed=1, backend="two_reasons")
    assert l0k.explain_linear(x, w, la, backend="two_reasons") == {"two_reasons": ["no float32 here", "no CPU either"]}
    assert l0k.explain_linear(x, w, la, backend="linear_only") == {"linear_only": []}  # no paths of its own
    cx, cw, cla = _conv()
    assert l0k.explain_conv2d(cx, cw, cla, backend="linear_only") == {
        "linear_only": ["backend 'linear_only' does not implement l0_conv2d"]}


def test_explain_all_backends_draws_nothing_and_checks_arguments():
    x, w, la = _linear(density=0.3)
    state = torch.get_rng_state()
    out = l0k.explain_linear(x, w, la)  # seed=None: seed 0's gates, no draw from the generator
    assert torch.equal(state, torch.get_rng_state())
    assert out["torch"] == [] and {"torch/eval_plan", "torch/skip", "torch/cpu_paths"} <= set(out)
    names = [k for k in out if "/" not in k]
    assert names == sorted(names, key=lambda n: -get_backend(n).priority)  # highest priority first
    for name in names:  # a backend that declines the call has no path entries
        assert not out[name] or not any(k.startswith(name + "/") for k in out)
    if isinstance(get_backend("cuda"), UnavailableBackend):
        assert "could not be imported" in out["cuda"][0] and not any(k.startswith("cuda/") for k in out)
    assert set(l0k.explain_linear(x, w, la, backend="torch")) == {"torch", "torch/eval_plan", "torch/skip",
                                                                  "torch/cpu_paths"}
    with pytest.raises(ValueError, match="backend"):
        l0k.explain_linear(x, w, la, backend="nope")
    with pytest.raises(ValueError, match="log_alpha must have shape"):
        l0k.explain_linear(x, w, la[:-1])


def _ran_skip(op, run):
    _active.PATHS.clear()
    run()
    return _active.PATHS[op, "fwd", "skip"] == 1


@pytest.mark.parametrize("case,expect", [
    (dict(density=0.3), None),
    (dict(density=0.3, gate="out"), None),
    (dict(density=1.0), "every group of this call is open"),
    (dict(density=0.85), "more than L0K_SKIP_DENSE_ABOVE=0.7"),
    (dict(density=0.3, noise="sample"), "noise='sample'"),
    (dict(density=0.3, m=4, k=16, n=8), "L0K_SKIP_MIN_MACS"),
    (dict(density=0.3, off=True), "L0K_SKIP_CLOSED=0"),
    (dict(density=0.3, dtype=torch.float64), None),  # every dtype skips on the CPU
])
def test_torch_skip_reasons_predict_the_path(case, expect, monkeypatch):
    case = dict(case)
    noise, off = case.pop("noise", "batch"), case.pop("off", False)
    gate = case.get("gate", "in")
    monkeypatch.setattr(_active, "ENABLED", not off)
    x, w, la = _linear(**case)
    reasons = l0k.explain_linear(x, w, la, seed=11, gate=gate, noise=noise, backend="torch")["torch/skip"]
    took = _ran_skip("linear-" + gate, lambda: l0k.l0_linear(x, w, la, seed=11, gate=gate, noise=noise,
                                                            backend="torch"))
    assert took == (reasons == []), reasons
    assert (expect is None) == (reasons == []) and (expect is None or expect in " ".join(reasons)), reasons


def test_torch_skip_reasons_of_weight_gates_and_convolutions():
    x, w, la = _linear(gate="weight")
    assert "gate='weight'" in l0k.explain_linear(x, w, la, gate="weight", backend="torch")["torch/skip"][0]
    cx, cw, cla = _conv(density=0.3)
    reasons = l0k.explain_conv2d(cx, cw, cla, None, 1, 1, seed=5, backend="torch")["torch/skip"]
    assert reasons == [] and _ran_skip("conv2d", lambda: l0k.l0_conv2d(cx, cw, cla, None, 1, 1, seed=5,
                                                                      backend="torch"))
    gw = cw[:, :8].contiguous()
    reasons = l0k.explain_conv2d(cx, gw, cla, None, 1, 1, 1, 2, seed=5, backend="torch")["torch/skip"]
    assert "groups=2" in reasons[0]
    assert not _ran_skip("conv2d", lambda: l0k.l0_conv2d(cx, gw, cla, None, 1, 1, 1, 2, seed=5, backend="torch"))
    reasons = l0k.explain_conv2d(cx, cw, cla, None, 1, 1, seed=5, backend="torch")["torch/cpu_paths"]
    assert reasons == ["a convolution: the C++ paths are for linear layers"]


@pytest.mark.skipif(not cpu_paths.ENABLED, reason="l0kernels._cpu not built")
@pytest.mark.parametrize("case,expect", [
    (dict(), None),
    (dict(dtype=torch.float64), "float64: the C++ paths run float32"),
    (dict(noise="sample"), "noise='sample'"),
    (dict(strided=True), "the weight is not contiguous"),
    (dict(off=True), "L0K_CPU_KERNELS=0"),
    (dict(density=0.3), "the skipping path takes this call"),
])
def test_cpu_path_reasons_predict_the_path(case, expect, monkeypatch):
    case = dict(case)
    noise, off, strided = case.pop("noise", "batch"), case.pop("off", False), case.pop("strided", False)
    monkeypatch.setattr(cpu_paths, "ENABLED", not off)
    x, w, la = _linear(density=case.pop("density", 1.0), **case)
    if strided:
        w = w.t().contiguous().t()
    calls = []
    real = cpu_paths.in_gate_input
    monkeypatch.setattr(cpu_paths, "in_gate_input", lambda *a, **k: calls.append(1) or real(*a, **k))
    reasons = l0k.explain_linear(x, w, la, seed=3, noise=noise, backend="torch")["torch/cpu_paths"]
    l0k.l0_linear(x, w, la, seed=3, noise=noise, backend="torch")
    assert bool(calls) == (reasons == []), reasons
    assert (expect is None) == (reasons == []) and (expect is None or expect in " ".join(reasons)), reasons


def test_eval_plan_reasons():
    layer = l0k.L0Linear(12, 6, backend="torch").eval()
    x = torch.randn(3, 12)

    def reasons(training=False, owner=layer):
        call = linear_call(x, layer.weight, layer.log_alpha, layer.bias, seed=1, gate="in", noise="batch",
                           training=training, backend="torch", **CFG, owner=owner)
        return explain(call, "torch")["torch/eval_plan"]
    with torch.no_grad():
        assert reasons() == []
        assert "a functional call" in reasons(owner=None)[0]
    assert "autograd records" in reasons()[0]  # parameters require grad while autograd records
    assert reasons(training=True)[0].startswith("a training call")


def _triton():
    b = get_backend("triton")
    if isinstance(b, UnavailableBackend):
        pytest.skip(b.reason)
    return b


def test_triton_reasons_and_open_set_paths(monkeypatch):
    tb = _triton()
    from l0kernels.backends.triton import INTERPRET, _gate_math
    x, w, la = _linear(8, 32, 16, density=0.3)
    declined = l0k.explain_linear(x.double(), w.double(), la.double(), backend="triton")["triton"]
    assert "use backend='torch' for float64" in declined[0]
    if not INTERPRET:  # CPU tensors without the interpreter: a second reason
        assert len(declined) == 2 and "needs CUDA tensors" in declined[1]
        return
    monkeypatch.setattr(_gate_math, "SKIP_BELOW", 1.0)
    assert l0k.explain_linear(x, w, la, backend="triton")["triton/open_set"] == []
    assert "noise='sample'" in l0k.explain_linear(x, w, la, noise="sample", backend="triton")["triton/open_set"][0]
    xw, ww, law = _linear(8, 32, 16, gate="weight")
    assert "gate='weight'" in l0k.explain_linear(xw, ww, law, gate="weight", backend="triton")["triton/open_set"][0]
    assert "an eval call" in l0k.explain_linear(x, w, la, training=False, backend="triton")["triton/open_set"][0]
    cx, cw, cla = torch.randn(2, 4, 6, 6), torch.randn(8, 2, 3, 3), torch.randn(8)
    assert "groups=2" in l0k.explain_conv2d(cx, cw, cla, None, 1, 1, 1, 2, backend="triton")["triton/open_set"][0]
    # below 1 the layer's last known open fraction decides (read only: explaining counts no call)
    monkeypatch.setattr(_gate_math, "SKIP_BELOW", 0.5)
    assert "not known yet" in tb.explain_paths(_call(x, w, la))["open_set"][0]
    st = _active._FRACTIONS[la] = _active._OpenFraction()
    for value, want in ((0.8, "0.8 is above L0K_TRITON_SKIP_BELOW=0.5"), (0.3, None)):
        st.value = value
        got = tb.explain_paths(_call(x, w, la))["open_set"]
        assert (got == []) == (want is None) == _active.takes_open_set(la, 32, 0.5)
        assert want is None or want in got[0], got
    assert st.calls == 0


def _call(x, w, la, **kw):
    args = dict(seed=7, gate="in", noise="batch", training=True, backend="auto", **CFG)
    args.update(kw)
    return linear_call(x, w, la, None, **args)


def test_fraction_reasons_and_takes_open_set_agree(monkeypatch):
    la = torch.randn(10)
    assert _active.fraction_reasons(la, 1.0) == [] and _active.takes_open_set(la, 10, 1.0)
    assert "not known yet" in _active.fraction_reasons(la, 0.5, "L0K_X")[0] and not _active.takes_open_set(la, 10, 0.5)
    count = torch.tensor(2)
    assert not _active.takes_open_set(la, 10, 0.5, lambda: count)  # the first read lands on the next call
    assert _active.takes_open_set(la, 10, 0.5, lambda: count)  # 2 of 10 open: 0.2 <= 0.5
    assert _active.fraction_reasons(la, 0.5) == [] and _active.known_fraction(la) == pytest.approx(0.2)
    assert "0.2 is above L0K_X=0.1" in _active.fraction_reasons(la, 0.1, "L0K_X")[0]
