"""Seeds as tensors (docs/design.md §10): the functional ops and ``sample_gates`` take an int or a 0-d int64
tensor with the same result; layers draw their seed as a tensor on the input's device; checks name ``seed``."""
import pytest
import torch

import l0kernels as l0k
import l0kernels._gates as gates_mod
from l0kernels._checks import draw_seed
from l0kernels.backends.torch import cpu_paths

SEEDS = [0, 77, 2**32 + 5, 2**63 - 1]


@pytest.fixture(params=["cpp", "plain"])
def cpu_path(request, monkeypatch):
    if request.param == "plain":
        monkeypatch.setattr(cpu_paths, "ENABLED", False)
        monkeypatch.setattr(gates_mod, "_CPU_GATE_KERNEL", False)
    return request.param


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gate,noise", [("in", "batch"), ("in", "sample"), ("out", "batch"), ("out", "sample"),
                                        ("weight", "batch")])
def test_linear_tensor_seed_equals_int(cpu_path, gate, noise, seed):
    gen = torch.Generator().manual_seed(seed % 97)
    x = torch.randn(4, 9, generator=gen)
    w = torch.randn(5, 9, generator=gen, requires_grad=True)
    la = torch.randn({"in": (9,), "out": (5,), "weight": (5, 9)}[gate], generator=gen, requires_grad=True)
    outs = []
    for s in (seed, torch.tensor(seed)):
        y = l0k.l0_linear(x, w, la, seed=s, gate=gate, noise=noise, backend="torch")
        outs.append((y,) + torch.autograd.grad(y.square().sum(), (w, la)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("noise", ["batch", "sample"])
def test_conv_and_sample_gates_tensor_seed(cpu_path, noise):
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 3, 6, 5, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    la = torch.randn(4, generator=gen)
    for seed in SEEDS:
        ref = l0k.l0_conv2d(x, w, la, seed=seed, noise=noise, backend="torch")
        assert torch.equal(l0k.l0_conv2d(x, w, la, seed=torch.tensor(seed), noise=noise, backend="torch"), ref)
        assert torch.equal(l0k.sample_gates(la, torch.tensor(seed), (3, 4)), l0k.sample_gates(la, seed, (3, 4)))


def test_negative_tensor_seed_takes_low_63_bits():
    la = torch.randn(6)
    x, w = torch.randn(3, 6), torch.randn(2, 6)
    for v in (-1, -(2**63), -12345):
        t = torch.tensor(v)
        assert torch.equal(l0k.sample_gates(la, t), l0k.sample_gates(la, v + 2**63))
        assert torch.equal(l0k.l0_linear(x, w, la, seed=t), l0k.l0_linear(x, w, la, seed=v + 2**63))


def test_layer_draws_a_device_tensor_seed_from_the_default_generator():
    """A training layer's seed is ``torch.randint`` on the input's device (no host sync): the same draw by
    hand gives the same output, and ``torch.manual_seed`` repeats it."""
    layer = l0k.L0Linear(7, 4, gate="in", noise="sample")
    x = torch.randn(3, 7)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    s = draw_seed(x.device)
    assert s.dtype == torch.int64 and s.dim() == 0 and s.device == x.device
    torch.manual_seed(11)
    s2 = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
    assert torch.equal(s, s2)
    ref = l0k.l0_linear(x, layer.weight, layer.log_alpha, layer.bias, seed=int(s), gate="in", noise="sample")
    assert torch.equal(y, ref)
    assert not torch.equal(layer(x), y)


@pytest.mark.parametrize("seed,exc,msg", [
    (torch.tensor(3, dtype=torch.int32), TypeError, r"^seed must be an int in \[0, 2\*\*63\) or a 0-d torch.int64"),
    (torch.tensor([3]), ValueError, r"^seed as a tensor must be 0-d"),
    (torch.tensor(3.0), TypeError, r"^seed must be an int"),
    (torch.tensor(True), TypeError, r"^seed must be an int"),
])
def test_bad_tensor_seeds(seed, exc, msg):
    la = torch.randn(5)
    with pytest.raises(exc, match=msg):
        l0k.l0_linear(torch.randn(2, 5), torch.randn(3, 5), la, seed=seed)
    with pytest.raises(exc, match=msg):
        l0k.sample_gates(la, seed)
