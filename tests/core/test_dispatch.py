"""Backend registry and dispatch (docs/design.md §4: "auto", "torch", named backends that say why they cannot run)."""
import pytest
import torch

import l0kernels as l0k
from l0kernels import Backend
from l0kernels._checks import conv2d_call, linear_call
from l0kernels._dispatch import _REGISTRY, Conv2dCall, LinearCall, get_backend, select_backend
from conftest import RecordingBackend

CFG = dict(beta=2 / 3, gamma=-0.1, zeta=1.1)


def _linear_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(7, 5, generator=gen, dtype=dtype), torch.randn(3, 5, generator=gen, dtype=dtype),
            torch.randn(5, generator=gen, dtype=dtype), torch.randn(3, generator=gen, dtype=dtype))


def _conv_inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 6, 6, generator=gen), torch.randn(6, 4, 3, 3, generator=gen),
            torch.randn(6, generator=gen), torch.randn(6, generator=gen))


def _lcall(training=True, **kw):
    x, w, la, b = _linear_inputs()
    args = dict(seed=3, gate="in", noise="batch", training=training, backend="auto", **CFG)
    args.update(kw)
    return linear_call(x, w, la, b, **args)


@pytest.fixture
def registry(monkeypatch):
    """Register backends for one test only (the registry is restored afterwards)."""
    l0k.available_backends()  # resolve the lazy backends first, so they are restored too

    def add(b):
        monkeypatch.setitem(_REGISTRY, b.name, b)
        return b
    return add


def test_torch_backend_runs_linear_and_conv():
    x, w, la, b = _linear_inputs()
    y = l0k.l0_linear(x, w, la, b, seed=1, backend="torch")
    assert y.shape == (7, 3) and torch.isfinite(y).all()
    cx, cw, cla, cb = _conv_inputs()
    y = l0k.l0_conv2d(cx, cw, cla, cb, 1, 1, seed=1, backend="torch")
    assert y.shape == (2, 6, 6, 6) and torch.isfinite(y).all()


def test_auto_picks_torch_on_cpu():
    for training in (True, False):
        call = _lcall(training)
        assert select_backend(call, "auto").name == "torch"
    x, w, la, b = _linear_inputs()
    assert torch.equal(l0k.l0_linear(x, w, la, b, seed=9, backend="auto"),
                       l0k.l0_linear(x, w, la, b, seed=9, backend="torch"))
    cx, cw, cla, cb = _conv_inputs()
    assert torch.equal(l0k.l0_conv2d(cx, cw, cla, cb, seed=9, noise="sample", backend="auto"),
                       l0k.l0_conv2d(cx, cw, cla, cb, seed=9, noise="sample", backend="torch"))


def test_cuda_backend_on_cpu_says_why():
    x, w, la, b = _linear_inputs()
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run this linear call: .*"
                                         r"(_C is not built|needs CUDA tensors)"):
        l0k.l0_linear(x, w, la, b, seed=1, backend="cuda")
    cx, cw, cla, cb = _conv_inputs()
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run this conv2d call: .*"
                                         r"(_C is not built|needs CUDA tensors)"):
        l0k.l0_conv2d(cx, cw, cla, cb, seed=1, backend="cuda")


def test_available_backends():
    names = l0k.available_backends()
    assert {"torch", "triton", "cuda"} <= set(names)
    prios = [get_backend(n).priority for n in names]
    assert prios == sorted(prios, reverse=True)  # highest priority first
    call = _lcall()
    can = l0k.available_backends(call)
    assert "torch" in can and set(can) <= set(names)
    for n in names:
        assert (n in can) == (get_backend(n).why_not(call) is None)
    assert "cuda" not in can  # CPU tensors: the extension is not built, or it needs CUDA tensors
    assert isinstance(get_backend("cuda").why_not(call), str)


def test_get_backend_unknown_name():
    with pytest.raises(ValueError, match=r"backend 'nope' is not registered"):
        get_backend("nope")


class Declining(Backend):
    name = "cuda"  # stands in for a backend that is named by the user
    priority = 50

    def unsupported_linear(self, call):
        return f"declined: {call.x.shape[0]} rows is not a multiple of 8"

    def unsupported_conv2d(self, call):
        return "declined: conv is not implemented here"


class Recording(RecordingBackend):
    name = "triton"
    priority = 100


def test_custom_backend_reason_is_in_the_error(registry):
    registry(Declining())
    x, w, la, b = _linear_inputs()
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run this linear call: declined: 7 rows is not a "
                                         r"multiple of 8"):
        l0k.l0_linear(x, w, la, b, seed=1, backend="cuda")
    cx, cw, cla, cb = _conv_inputs()
    with pytest.raises(ValueError, match=r"declined: conv is not implemented here"):
        l0k.l0_conv2d(cx, cw, cla, cb, seed=1, backend="cuda")
    assert "cuda" not in l0k.available_backends(_lcall())
    # auto skips a declining backend even with a higher priority than torch
    assert select_backend(_lcall(), "auto").name != "cuda"


def test_auto_with_no_capable_backend_lists_every_reason(registry, monkeypatch):
    registry(Declining())
    torch_b = get_backend("torch")
    monkeypatch.setattr(torch_b, "explain", lambda call: ["torch says no"])
    monkeypatch.setattr(type(get_backend("triton")), "auto_eligible", lambda self, call: False, raising=False)
    x, w, la, b = _linear_inputs()
    with pytest.raises(ValueError, match=r"no backend can run this linear call \(.*torch: torch says no") as ei:
        l0k.l0_linear(x, w, la, b, seed=1)
    assert "declined: 7 rows" in str(ei.value)


def test_custom_backend_receives_validated_calls(registry):
    rec = registry(Recording())
    x, w, la, b = _linear_inputs()
    torch.manual_seed(0)
    y = l0k.l0_linear(x, w, la, b, gate="in", noise="sample")  # auto: the highest priority that can run it
    assert len(rec.calls) == 1
    call = rec.calls[-1]
    # a drawn seed: a 0-d int64 tensor on x's device (docs/design.md §10)
    assert isinstance(call, LinearCall) and call.training and isinstance(call.seed, torch.Tensor)
    assert call.seed.dtype == torch.int64 and call.seed.dim() == 0 and call.seed.device == x.device
    assert 0 <= int(call.seed) < 2**63 and call.noise == "sample" and call.gate == "in"
    assert torch.equal(y, l0k.l0_linear(x, w, la, b, seed=call.seed, gate="in", noise="sample", backend="torch"))
    l0k.l0_linear(x, w, la, b, seed=5, training=False, backend="triton")
    assert rec.calls[-1].seed is None and rec.calls[-1].training is False
    cx, cw, cla, cb = _conv_inputs()
    l0k.l0_conv2d(cx, cw, cla, cb, stride=2, padding=(1, 0), dilation=1, seed=4, backend="triton")
    call = rec.calls[-1]
    assert isinstance(call, Conv2dCall)
    assert call.stride == (2, 2) and call.padding == (1, 0) and call.dilation == (1, 1) and call.groups == 1
    assert call.seed == 4 and call.cfg == l0k.GateConfig()


def test_call_signatures_distinguish_what_matters():
    a, b = _lcall(), _lcall()
    assert a.signature() == b.signature()
    x, w, la, bias = _linear_inputs()
    no_bias = linear_call(x, w, la, None, seed=3, gate="in", noise="batch", training=True, backend="auto", **CFG)
    assert no_bias.signature() != a.signature()
    more_rows = linear_call(torch.cat([x, x]), w, la, bias, seed=3, gate="in", noise="batch", training=True,
                            backend="auto", **CFG)
    assert more_rows.signature() != a.signature()
    # the seed is not part of the signature: every training call has a fresh one
    assert _lcall(seed=4).signature() == a.signature()
    assert _lcall(noise="sample").signature() != a.signature()
    assert _lcall(training=False).signature() != a.signature()
    cx, cw, cla, cb = _conv_inputs()
    c1 = conv2d_call(cx, cw, cla, cb, 1, 0, 1, 1, seed=1, noise="batch", training=True, backend="auto", **CFG)
    c2 = conv2d_call(cx.to(memory_format=torch.channels_last), cw, cla, cb, 1, 0, 1, 1, seed=1, noise="batch",
                     training=True, backend="auto", **CFG)
    assert c1.signature() != c2.signature()  # layouts are timed separately


def test_user_registered_backend_can_be_chosen_by_name(registry):
    class Mine(Recording):
        name = "mine"
        priority = -1  # auto never prefers it over torch

    rec = registry(Mine())
    x, w, la, b = _linear_inputs()
    y = l0k.l0_linear(x, w, la, b, seed=3, backend="mine")
    assert len(rec.calls) == 1
    assert torch.equal(y, l0k.l0_linear(x, w, la, b, seed=3, backend="torch"))
    layer = l0k.L0Linear(w.shape[1], w.shape[0], backend="mine")
    layer(x)
    assert len(rec.calls) == 2
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'torch', 'triton', 'cuda', 'mine'"):
        l0k.l0_linear(x, w, la, b, seed=3, backend="yours")
