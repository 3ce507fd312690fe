"""The one autotuner (issue 13, "one route"): ``auto``'s backend choice in training and in eval, and the CUDA
backend's kernel choice, all pick through ``l0kernels._autotune.AUTOTUNER``; it times only on a GPU, never
under ``torch.compile`` or with ``L0K_AUTO_TUNE=0``, and never reads its picks there or on the CPU."""
import pytest
import torch

import l0kernels as l0k
from l0kernels import _checks, functional
from l0kernels._autotune import AUTOTUNER, Autotuner
from l0kernels._dispatch import _REGISTRY, get_backend, select_backend
from conftest import RecordingBackend

CUDA = torch.device("cuda")  # a device object only: nothing here runs on a GPU


class Wrapping(RecordingBackend):
    """An auto-eligible backend that runs the torch backend's ops (training and eval) and records its calls."""

    def __init__(self, name, priority):
        super().__init__()
        self.name, self.priority = name, priority


@pytest.fixture
def tuner(monkeypatch):
    """The autotuner emptied for one test, and restored (its picks included) afterwards."""
    monkeypatch.setattr(AUTOTUNER, "best", {})
    return AUTOTUNER


@pytest.fixture
def two_backends(monkeypatch, tuner):
    """Only two auto candidates, ``slow`` (preferred by priority) and ``fast``."""
    l0k.available_backends()  # load the lazy backends first, so none registers (and clears) later
    for name in list(_REGISTRY):
        if name != "torch":
            monkeypatch.delitem(_REGISTRY, name)
    slow, fast = Wrapping("slow", 50), Wrapping("fast", 40)
    monkeypatch.setitem(_REGISTRY, "slow", slow)
    monkeypatch.setitem(_REGISTRY, "fast", fast)
    monkeypatch.setattr(get_backend("torch"), "auto_eligible", lambda call: False, raising=False)
    return slow, fast


def _fake_gpu_clock(monkeypatch, seconds):
    """Let the autotuner time CPU calls, with a clock that says ``seconds[backend name]`` per call."""
    timed = []

    def measure(fn, device):
        for b in (_REGISTRY["slow"], _REGISTRY["fast"]):
            b.calls.clear()
        fn()
        name = "slow" if _REGISTRY["slow"].calls else "fast"
        timed.append(name)
        return seconds[name]
    monkeypatch.setattr(AUTOTUNER, "can_time", lambda device: True)
    monkeypatch.setattr(AUTOTUNER, "measure", measure)
    return timed


def test_training_and_eval_auto_pick_through_the_one_cache(two_backends, monkeypatch, tuner):
    slow, fast = two_backends
    timed = _fake_gpu_clock(monkeypatch, {"slow": 2.0, "fast": 1.0})
    lin = l0k.L0Linear(6, 4, gate="out", noise="sample")  # no density in the key (test_auto_follows_the_density)
    x = torch.randn(3, 6)
    lin(x)  # training: timed once, the faster backend runs
    assert sorted(timed) == ["fast", "slow"] and fast.calls and fast.calls[-1].training
    assert len(tuner.best) == 1 and list(tuner.best.values()) == ["fast"]
    lin(x)
    assert len(timed) == 2  # remembered
    lin.eval()
    with torch.no_grad():
        lin(x)  # eval: another signature, timed in the same cache
        lin(x)
    assert len(timed) == 4 and len(tuner.best) == 2 and list(tuner.best.values()) == ["fast", "fast"]
    (train_key, train_names), (eval_key, eval_names) = tuner.best
    assert train_names == eval_names == ("slow", "fast")
    def signature(training):
        return functional.linear_call(x, lin.weight, lin.log_alpha, lin.bias, seed=None, gate="out",
                                      noise="sample", training=training, backend="auto",
                                      beta=2 / 3, gamma=-0.1, zeta=1.1).signature()
    assert train_key == (signature(True), (), (), None) and eval_key == (signature(False), (), (), None)
    # the default Backend.eval: the backend's own op on the layer's call, no plan
    assert not fast.calls[-1].training and fast.calls[-1].owner is lin
    assert l0k.backends._plans.cached_plan(lin) is None
    # a new registration forgets every pick (they were made without it)
    monkeypatch.setitem(_REGISTRY, "fast", fast)
    l0k.register_backend(_REGISTRY["slow"])
    assert tuner.best == {}


def test_auto_follows_the_density(two_backends, monkeypatch, tuner):
    """Training with one gate vector: the tenth of the layer's open fraction is part of the key, read without
    a sync every REFRESH_EVERY calls, so ``auto`` times the backends again as the gates close (a backend that
    skips closed groups may win only then), once per tenth."""
    from l0kernels import _active
    slow, fast = two_backends
    clock = {"slow": 1.0, "fast": 2.0}
    timed = _fake_gpu_clock(monkeypatch, clock)
    monkeypatch.setattr(_active, "REFRESH_EVERY", 1)
    lin = l0k.L0Linear(40, 4, gate="in")
    x = torch.randn(3, 40)
    with torch.no_grad():
        lin.log_alpha.fill_(9.0)  # every gate open
    lin(x)  # the fraction is not known yet: timed under "unknown"
    lin(x)  # now known (all open): timed under its tenth
    assert len(timed) == 4
    keys = [k[0][-1] for k in tuner.best]
    assert keys == [None, 9] and list(tuner.best.values()) == ["slow", "slow"] and slow.calls
    lin(x)
    assert len(timed) == 4  # the same tenth: remembered
    clock.update(slow=3.0)  # the skipping backend wins at low density
    with torch.no_grad():
        lin.log_alpha[:30] = -9.0  # 10 of 40 open
    lin(x)  # the count read now lands on the next call
    lin(x)
    assert [k[0][-1] for k in tuner.best] == [None, 9, 2] and tuner.best[list(tuner.best)[-1]] == "fast"
    assert len(timed) == 6 and fast.calls and fast.calls[-1].training


def test_eval_auto_key_holds_the_plan_shape(monkeypatch, tuner):
    """Two layers of one shape but different open sets are timed apart (the built-in backends' plans)."""
    timed = []
    monkeypatch.setattr(AUTOTUNER, "can_time", lambda device: True)
    monkeypatch.setattr(AUTOTUNER, "measure", lambda fn, device: timed.append(fn()) or 1.0)
    monkeypatch.setattr(type(get_backend("triton")), "auto_eligible", lambda self, call: True, raising=False)
    if get_backend("triton").why_not(l0k._dispatch.LinearCall(torch.randn(2, 3), torch.randn(4, 3), torch.randn(3),
                                                              None, None, "in", "batch", False, l0k.GateConfig())):
        pytest.skip("needs TRITON_INTERPRET=1 (two built-in candidates on the CPU)")
    a, b = (l0k.L0Linear(8, 5, gate="in").eval() for _ in range(2))
    with torch.no_grad():
        b.log_alpha[:4] = -10.0  # four inputs closed: a smaller plan
        x = torch.randn(2, 8)
        a(x)
        a(x)
        b(x)
    assert len(tuner.best) == 2 and len(timed) == 4  # two candidates per layer
    assert all(names == ("triton", "torch") for key, names in tuner.best)
    # the key: the call's signature, then each candidate's tune_key (here both: the plan's shape)
    assert sorted(key[1][0] for key, names in tuner.best) == [(5, 4), (5, 8)]
    assert all(key[1] == key[2] for key, names in tuner.best)


def test_not_consulted_on_the_cpu(two_backends, monkeypatch, tuner):
    slow, fast = two_backends

    def boom(fn, device):
        raise AssertionError("timed on the CPU")
    monkeypatch.setattr(AUTOTUNER, "measure", boom)
    lin = l0k.L0Linear(6, 4, gate="in")
    x = torch.randn(3, 6)
    lin(x)
    lin.eval()
    with torch.no_grad():
        lin(x)
    assert tuner.best == {}
    # a pick stored under the key is not read either: the CPU goes by priority
    tuner.best[(object(), ("slow", "fast"))] = "fast"
    assert select_backend(functional.linear_call(x, lin.weight, lin.log_alpha, lin.bias, seed=1, gate="in",
                                                 noise="batch", training=True, backend="auto", beta=2 / 3,
                                                 gamma=-0.1, zeta=1.1), "auto") is slow
    assert fast.calls == [] and len(slow.calls) == 2


def test_pick_rules_without_a_gpu(monkeypatch):
    """The rules of ``Autotuner.pick`` on a CUDA device object: timed once per key where it may time;
    the fallback, with nothing timed or read, on the CPU, under torch.compile and with L0K_AUTO_TUNE=0."""
    t = Autotuner()
    timed = []
    monkeypatch.setattr(t, "measure", lambda fn, device: timed.append(fn()) or {"a": 2.0, "b": 1.0}[timed[-1]])
    cands = {"a": lambda: "a", "b": lambda: "b"}
    assert t.pick("k", cands, CUDA) == "b" and timed == ["a", "b"]
    assert t.pick("k", cands, CUDA) == "b" and len(timed) == 2
    assert t.pick(lambda: "k", cands, CUDA) == "b" and len(timed) == 2  # a key given by a callable
    assert t.pick("k", {"a": cands["a"]}, CUDA) == "a"  # one candidate: nothing to time
    assert t.pick("k", cands, torch.device("cpu")) == "a"  # by priority: the first
    assert t.pick("k", cands, torch.device("cpu"), fallback="b") == "b"

    def never(*a):
        raise AssertionError("the key was needed")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert t.pick(never, cands, CUDA, fallback="a") == "a"  # the remembered "b" is not read in a trace
    monkeypatch.undo()
    monkeypatch.setenv("L0K_AUTO_TUNE", "0")
    monkeypatch.setattr(t, "measure", never)
    assert t.pick(never, cands, CUDA) == "a"
    monkeypatch.delenv("L0K_AUTO_TUNE")
    assert t.pick("k", cands, CUDA) == "b"  # tuning on again: the pick is still there
    t.clear()
    assert t.best == {}


def test_select_backend_under_compile_skips_the_autotuner(two_backends, monkeypatch, tuner):
    def boom(*a):
        raise AssertionError("the autotuner was asked in a trace")
    monkeypatch.setattr(AUTOTUNER, "pick", boom)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(2, 5)
    for training in (True, False):
        call = functional.linear_call(x, torch.randn(3, 5), torch.randn(5), None, seed=1, gate="in", noise="batch",
                                      training=training, backend="auto", beta=2 / 3, gamma=-0.1, zeta=1.1)
        assert select_backend(call, "auto").name == "torch"


# -- one validation per call -----------------------------------------------------------------------------

def _count_x_checks(monkeypatch):
    """Count the checks of ``x`` (``_checks.check_tensor(x, "x")``) and the validator calls."""
    seen = {"x": 0, "linear_call": 0, "conv2d_call": 0}
    real_check = _checks.check_tensor

    def check_tensor(t, name, **kw):
        if name == "x":
            seen["x"] += 1
        return real_check(t, name, **kw)
    monkeypatch.setattr(_checks, "check_tensor", check_tensor)
    for name in ("linear_call", "conv2d_call"):
        real = getattr(_checks, name)

        def counted(*a, _real=real, _name=name, **kw):
            seen[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(functional, name, counted)
    return seen


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_eval_validates_once_per_call(backend, monkeypatch):
    seen = _count_x_checks(monkeypatch)
    lin = l0k.L0Linear(6, 4, gate="out", backend=backend).eval()
    conv = l0k.L0Conv2d(3, 4, 3, padding=1, backend=backend).eval()
    for layer, x, op in ((lin, torch.randn(2, 3, 6), "linear_call"), (conv, torch.randn(2, 3, 5, 5), "conv2d_call")):
        for grad, autocast in ((False, False), (True, False), (False, True)):  # plan, differentiable op, plan
            for rep in range(2):  # the first call builds the plan, the second reuses it
                before = dict(seen)
                with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    layer(x)
                assert seen["x"] - before["x"] == 1 and seen[op] - before[op] == 1, (op, grad, autocast, rep)
    assert l0k.backends._plans.cached_plan(lin) is not None and l0k.backends._plans.cached_plan(conv) is not None
    # a bad x is caught by that one validation, with its message
    with torch.no_grad(), pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in_features=6\)"):
        lin(torch.randn(2, 5))
    with torch.no_grad(), pytest.raises(TypeError, match=r"weight must have the dtype of x"):
        lin(torch.randn(2, 6, dtype=torch.float64))
