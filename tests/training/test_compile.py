"""``torch.compile`` of L0 models (docs/design.md §10) on the CPU: training forward and backward, fresh gates
on every call, the eager result for the same seeds, and eval mode; ``fullgraph=True`` and graph breaks
allowed. Compiling is slow on a small CPU, so one model carries every gate kind and noise:
``L0Conv2d`` (sample noise) -> ``L0Linear`` input gates (batch) -> output gates (sample) -> weight gates.
"""
import copy

import pytest
import torch
import torch._dynamo.testing

import l0kernels as l0k
from l0kernels import L0Conv2d, L0Linear

pytestmark = pytest.mark.timeout(1800)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = L0Conv2d(3, 4, 3, padding=1, noise="sample")
        self.conv_b = L0Conv2d(4, 2, 3, stride=2)  # batch noise
        self.a = L0Linear(2 * 2 * 2, 7, gate="in")
        self.b = L0Linear(7, 6, gate="out", noise="sample")
        self.c = L0Linear(6, 3, gate="weight")

    def forward(self, x):
        h = self.conv_b(torch.relu(self.conv(x))).flatten(1)
        return self.c(torch.relu(self.b(self.a(h))))


def _model():
    torch.manual_seed(0)
    m = _Net()
    with torch.no_grad():  # a spread of open, closed and in-between gates
        for mod in m.modules():
            if hasattr(mod, "log_alpha"):
                mod.log_alpha.normal_(0.5, 2.0)
    return m


def _step(model, x):
    y = model(x)
    (y.square().sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y.detach(), grads


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks-ok", "fullgraph"])
def test_compiled_training_and_eval(fullgraph, x):
    """Every gate kind compiled, forward and backward, then eval (with and without autograd: the cached
    eval plans step aside in a trace). Fresh gates on every call; ``torch.manual_seed`` repeats a call.
    ``fullgraph=False`` runs with inductor's ``fallback_random`` (its random ops call PyTorch's own
    generator), so the seeds it draws are eager's and outputs and gradients equal eager's; ``fullgraph=True``
    runs inductor's own random ops (the default: other seed values, still drawn fresh per call)."""
    torch._dynamo.reset()
    eager = _model()
    comp_model = copy.deepcopy(eager)
    comp = torch.compile(comp_model, fullgraph=fullgraph)
    with torch._inductor.config.patch(fallback_random=not fullgraph):
        torch.manual_seed(5)
        yc, gc = _step(comp, x)
        yc2, _ = _step(comp, x)
        torch.manual_seed(5)
        yc3, gc3 = _step(comp, x)
        assert not torch.allclose(yc, yc2), "a second compiled call drew the same gates"
        assert torch.equal(yc3, yc)
        for a, b in zip(gc3, gc):
            assert torch.equal(a, b)
        if not fullgraph:
            torch.manual_seed(5)
            ye, ge = _step(eager, x)
            ye2, _ = _step(eager, x)
            torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
            for a, b in zip(gc, ge):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(yc2, ye2, rtol=1e-5, atol=1e-6)
        eager.eval()
        comp_model.eval()
        torch.testing.assert_close(comp(x), eager(x), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(comp(x), eager(x), rtol=1e-5, atol=1e-6)


def test_compiled_functional_tensor_seed():
    """``l0_linear`` with a seed tensor passed in, compiled with ``fullgraph=True``: the Philox stream traced
    into inductor's int64 code gives eager's gates (the C++ kernels there) for the same seed, and a new seed
    value reuses the compiled graph (no recompilation)."""
    torch._dynamo.reset()
    gate, noise = "out", "sample"
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 11, generator=gen)
    w = torch.randn(6, 11, generator=gen, requires_grad=True)
    la = torch.randn({"in": (11,), "out": (6,), "weight": (6, 11)}[gate], generator=gen).mul(2).requires_grad_()

    def f(seed):
        return l0k.l0_linear(x, w, la, seed=seed, gate=gate, noise=noise, backend="torch")

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    cf = torch.compile(f, fullgraph=True, backend=counter)
    for s in (12345, 2**62 + 3):
        seed = torch.tensor(s)
        ye = f(s)
        yc = cf(seed)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
        gw, gla = torch.autograd.grad(yc.sum(), (w, la))
        ew, ela = torch.autograd.grad(ye.sum(), (w, la))
        torch.testing.assert_close(gw, ew, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gla, ela, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


def test_compiled_training_does_not_recompile():
    """Training calls of a compiled model with one gate vector per call (the calls that take the skipping path
    in eager mode) reuse one graph: nothing in the traced forward (the path counters, the open-fraction reads)
    becomes a guard that changes from call to call."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(L0Conv2d(2, 5, 3), torch.nn.Flatten(), L0Linear(5 * 4 * 4, 6, gate="in"),
                                L0Linear(6, 4, gate="out"))
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    comp = torch.compile(model, backend=counter)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    for _ in range(12):
        comp(x).square().sum().backward()
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 12 calls"
    model.eval()  # eval: one more graph (the mode is guarded), reused by later eval calls
    for _ in range(6):
        comp(x)
    assert counter.frame_count == 2, f"{counter.frame_count} compilations after 6 eval calls"
