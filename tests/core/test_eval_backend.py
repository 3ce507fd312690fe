"""Eval asks the named backend the same question training does (issue 13, "one route").

A module with ``backend="X"`` (X not "auto"/"torch") raises the dispatcher's
``ValueError("backend='X' cannot run this ... call: <why>")`` in eval -- with and without autograd -- exactly
where training raises, before any kernel runs; a user-registered backend serves eval through its ``eval``
(by default its own ``linear`` / ``conv2d``).
"""
import pytest
import torch

import l0kernels as l0k
from l0kernels.backends import _plans
from l0kernels._dispatch import Backend
from conftest import RecordingBackend


@pytest.fixture
def no_interpreter(monkeypatch):
    """The Triton backend as on a machine without TRITON_INTERPRET: CPU tensors refused (eval asks it, not
    a second list of reasons)."""
    tb = pytest.importorskip("l0kernels.backends.triton")
    monkeypatch.setattr(tb, "INTERPRET", False)


def _layers(backend):
    torch.manual_seed(0)
    lin = l0k.L0Linear(7, 5, gate="in", backend=backend)
    conv = l0k.L0Conv2d(3, 4, 3, padding=1, backend=backend)
    return [(lin, torch.randn(3, 7)), (conv, torch.randn(2, 3, 6, 5))]


def _raises_everywhere(layer, x, pattern):
    layer.train()
    with pytest.raises(ValueError, match=pattern):
        layer(x)
    layer.eval()
    with torch.no_grad(), pytest.raises(ValueError, match=pattern):
        layer(x)
    with pytest.raises(ValueError, match=pattern):  # autograd on: the differentiable eval path
        layer(x)
    with pytest.raises(ValueError, match=pattern):  # again: a cached check must not let it through
        with torch.no_grad():
            layer(x)
    assert _plans.cached_plan(layer) is None  # raised before any plan (kernel) was built or run


def test_triton_without_interpreter_raises_in_eval_as_in_training(no_interpreter):
    for layer, x in _layers("triton"):
        op = "linear" if isinstance(layer, l0k.L0Linear) else "conv2d"
        _raises_everywhere(layer, x, rf"backend='triton' cannot run this {op} call: Triton backend needs CUDA "
                                     r"tensors")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors: the CUDA backend refuses them")
def test_cuda_on_cpu_tensors_raises_in_eval():
    # here l0kernels._C is absent or, where built, cannot take CPU tensors: either way the backend declines
    for layer, x in _layers("cuda"):
        op = "linear" if isinstance(layer, l0k.L0Linear) else "conv2d"
        _raises_everywhere(layer, x, rf"backend='cuda' cannot run this {op} call: \S")


class Declining(Backend):
    name = "mine_declines"
    priority = -1

    def auto_eligible(self, call):
        return False

    def unsupported_linear(self, call):
        return f"declined: {call.x.shape[0]} rows is not a multiple of 8"

    def unsupported_conv2d(self, call):
        return "declined: no conv here"


class Recording(RecordingBackend):
    name = "mine_records"
    priority = -1
    auto = False


def test_custom_backend_that_declines_raises_in_eval(registry):
    registry(Declining())
    lin, x = _layers("mine_declines")[0]
    _raises_everywhere(lin, x, r"backend='mine_declines' cannot run this linear call: declined: 3 rows is not a "
                               r"multiple of 8")
    conv, x = _layers("mine_declines")[1]
    _raises_everywhere(conv, x, r"backend='mine_declines' cannot run this conv2d call: declined: no conv here")


def test_custom_backend_that_accepts_serves_eval(registry):
    rec = registry(Recording())
    for layer, x in _layers("mine_records"):
        layer.eval()
        _plans.clear_eval_cache(layer)
        for grad in (False, True):
            rec.calls.clear()
            with torch.set_grad_enabled(grad):
                y = layer(x)
            assert len(rec.calls) == 1 and rec.calls[0].training is False, grad
            assert rec.calls[0].x is x
            # the same numbers as the torch backend's eval
            layer.backend = "torch"
            with torch.no_grad():
                ref = layer(x)
            layer.backend = "mine_records"
            torch.testing.assert_close(y.detach(), ref)


def test_auto_and_torch_keep_the_plan_path():
    for backend in ("auto", "torch"):
        for layer, x in _layers(backend):
            layer.eval()
            with torch.no_grad():
                layer(x)
            assert _plans.cached_plan(layer) is not None


def test_triton_interpreter_eval_keeps_the_plan_path():
    tb = pytest.importorskip("l0kernels.backends.triton")
    if not tb.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    lin, x = _layers("triton")[0]
    lin.eval()
    with torch.no_grad():
        y = lin(x)
    assert _plans.cached_plan(lin) is not None
    lin.backend = "torch"
    with torch.no_grad():
        torch.testing.assert_close(y, lin(x), rtol=1e-4, atol=1e-5)


class OwnEval(Recording):
    """A registered backend with its own eval entry point (``Backend.eval``)."""

    name = "mine_evals"

    def __init__(self):
        super().__init__()
        self.evals = []

    def eval(self, call):
        self.evals.append(call)
        return super().eval(call)  # the default: its own linear / conv2d on the cast call


def test_custom_backend_eval_entry_point(registry):
    own = registry(OwnEval())
    for layer, x in _layers("mine_evals"):
        own.calls.clear(), own.evals.clear()
        layer.train()
        layer(x)
        assert own.evals == [] and len(own.calls) == 1  # training: run, not eval
        layer.eval()
        for grad in (False, True):
            own.calls.clear(), own.evals.clear()
            with torch.set_grad_enabled(grad):
                y = layer(x)
            assert len(own.evals) == 1 and own.evals[0].owner is layer and own.evals[0].training is False
            assert own.calls == [own.evals[0]]  # no cast outside autocast: the same call
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            yb = layer(x)
        ev = own.evals[-1]
        # eval sees the call as checked (autocast noted, tensors as given); run gets it cast
        assert ev.autocast == torch.bfloat16 and ev.x is x and ev.weight is layer.weight
        assert own.calls[-1].autocast is None and own.calls[-1].x.dtype == own.calls[-1].weight.dtype == torch.bfloat16
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.float(), y.detach(), rtol=0.05, atol=0.05)
        assert _plans.cached_plan(layer) is None  # nothing built on its behalf
        # the functional API: eval calls without an owner reach the same entry point
        if isinstance(layer, l0k.L0Linear):
            y2 = l0k.l0_linear(x, layer.weight, layer.log_alpha, layer.bias, gate="in", training=False,
                               backend="mine_evals")
            assert own.evals[-1].owner is None
            torch.testing.assert_close(y2, y)


def test_clear_eval_cache_is_public():
    lin, x = _layers("auto")[0]
    lin.eval()
    with torch.no_grad():
        lin(x)
    assert _plans.cached_plan(lin) is not None
    l0k.clear_eval_cache(torch.nn.Sequential(lin))
    assert _plans.cached_plan(lin) is None
