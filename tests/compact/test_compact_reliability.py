"""compact() never returns a wrong model: modules called more than once (a shared activation, a layer applied
twice, ``Sequential(a, act, a)``), BatchNorms all of whose channels are removed, and random small residual
models (hypothesis) compared with the gated eval model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

try:  # the property test needs hypothesis (the test extras); the other tests run without it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    st = None

import l0kernels as l0k
from conftest import randomize_bn
from l0kernels import compact

CLOSED, OPEN = -10.0, 10.0


def close(layer, closed):
    """``log_alpha``: ``closed`` (a bool mask over the gates, or a probability) at -10, the others at +10."""
    with torch.no_grad():
        la = layer.log_alpha
        if not isinstance(closed, torch.Tensor):
            closed = torch.rand(la.shape) < closed
        la.copy_(torch.where(closed, torch.tensor(CLOSED), torch.tensor(OPEN)))


def check(model, x, example=False):
    """The compacted model runs and gives the gated eval model's output."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
        c = compact(model, x if example else None)
        y = c(x)
    assert y.shape == ref.shape
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * max(scale, 1.0))
    for m in c.modules():
        assert not type(m).__module__.startswith("l0kernels"), type(m)
        assert getattr(m, "num_features", 1) > 0, m  # (a BatchNorm of 0 features raises when called)
    return c


# -- modules called more than once -------------------------------------------------------------------------

class SharedAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = l0k.L0Linear(5, 6, gate="out")
        self.act = nn.ReLU()
        self.l2 = l0k.L0Linear(6, 4)
        self.l3 = nn.Linear(4, 3)

    def forward(self, x):
        return self.l3(self.act(self.l2(self.act(self.l1(x)))))


def test_shared_activation_after_two_layers():
    torch.manual_seed(0)
    model = SharedAct()
    close(model.l1, torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool))
    close(model.l2, torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.bool))
    with torch.no_grad():
        model.l2.bias.copy_(torch.tensor([-3.0, 2.0, -1.0, 1.0]))  # the second ReLU clips
    c = check(model, torch.randn(16, 5))
    assert sum(isinstance(m, nn.ReLU) for m in c.modules()) == 1  # still one shared module


@pytest.mark.parametrize("gate", ["in", "out"])
def test_sequential_with_a_gated_layer_twice(gate):
    torch.manual_seed(1)
    a = l0k.L0Linear(6, 6, gate=gate)
    close(a, torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool))
    model = nn.Sequential(a, nn.Tanh(), a)
    c = check(model, torch.randn(8, 6))
    linears = [m for m in c.modules() if isinstance(m, nn.Linear)]
    assert len(c) == 3 and len(linears) == 1 and c[0] is c[2]  # one layer, called twice


def test_sequential_with_a_plain_layer_twice_after_a_gated_one():
    torch.manual_seed(2)
    g = l0k.L0Linear(5, 6, gate="out")
    close(g, torch.tensor([0, 0, 1, 0, 1, 1], dtype=torch.bool))
    a = nn.Linear(6, 6)
    model = nn.Sequential(g, a, nn.Tanh(), a)
    check(model, torch.randn(8, 5))


class Twice(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.a = l0k.L0Linear(6, 6, gate=gate)
        self.o = nn.Linear(6, 2)

    def forward(self, x):
        return self.o(torch.tanh(self.a(F.relu(self.a(x)))))


@pytest.mark.parametrize("gate", ["in", "out", "weight"])
def test_layer_called_twice_in_forward(gate):
    torch.manual_seed(3)
    model = Twice(gate)
    close(model.a, 0.4)
    check(model, torch.randn(8, 6))


class SharedBNBlock(nn.Module):
    """A residual conv block whose BatchNorm and activation modules are each used twice."""

    def __init__(self, residual=True):
        super().__init__()
        self.c1 = l0k.L0Conv2d(4, 4, 3, padding=1)
        self.c2 = l0k.L0Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.Sigmoid()
        self.residual = residual
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.bn(self.c1(x)))
        h = self.bn(self.c2(h))
        h = self.act(h + x) if self.residual else self.act(h)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("residual", [True, False])
def test_shared_batchnorm_and_activation(residual):
    torch.manual_seed(4)
    model = SharedBNBlock(residual)
    randomize_bn(model.bn)
    close(model.c1, torch.tensor([0, 1, 0, 1], dtype=torch.bool))
    close(model.c2, torch.tensor([1, 0, 0, 0], dtype=torch.bool))
    check(model, torch.randn(2, 4, 5, 5), example=True)


def test_chain_with_a_shared_batchnorm():
    torch.manual_seed(5)
    c1, c2 = l0k.L0Conv2d(3, 4, 3, padding=1), l0k.L0Conv2d(4, 4, 3, padding=1)
    bn = nn.BatchNorm2d(4)
    randomize_bn(bn)
    close(c1, torch.tensor([0, 1, 0, 0], dtype=torch.bool))
    close(c2, torch.tensor([0, 0, 1, 0], dtype=torch.bool))
    model = nn.Sequential(c1, bn, nn.ReLU(), c2, bn, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 25, 2))
    check(model, torch.randn(2, 3, 5, 5))


# -- BatchNorm over removed channels only ------------------------------------------------------------------

class BN1dBranch(nn.Module):
    def __init__(self, live):
        super().__init__()
        self.a = l0k.L0Linear(5, 4, gate="out")
        self.bn = nn.BatchNorm1d(4)
        self.b = nn.Linear(5, 3)
        self.live = live
        self.o = nn.Linear({"sum": 4, "cat": 7, None: 4}[live], 2)

    def forward(self, x):
        h = self.bn(self.a(x))
        if self.live == "sum":
            h = h + self.b(x)[:, :1].expand(-1, 4)
        elif self.live == "cat":
            h = torch.cat([h, self.b(x)], 1)
        return self.o(F.relu(h))


@pytest.mark.parametrize("live", [None, "cat", "sum"])
def test_batchnorm1d_with_every_channel_closed(live):
    torch.manual_seed(6)
    model = BN1dBranch(live)
    randomize_bn(model.bn)
    close(model.a, torch.ones(4, dtype=torch.bool))
    check(model, torch.randn(8, 5), example=True)


class BN2dBranch(nn.Module):
    def __init__(self, live, src):
        super().__init__()
        self.src = src
        self.a = l0k.L0Conv2d(3, 4, 3, padding=1) if src == "conv" else l0k.L0Linear(3, 4, gate="out")
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(3, 2, 1)
        self.live = live
        self.o = nn.Linear(6 if live == "cat" else 4, 2)

    def forward(self, x):
        if self.src == "conv":
            h = self.a(x)
            g = self.b(x)
        else:  # a Linear's output seen as a 1x1 feature map
            h = self.a(x.mean((2, 3))).view(x.size(0), 4, 1, 1)
            g = self.b(x).mean((2, 3), keepdim=True)
        h = self.bn(h)
        if self.live == "cat":
            h = torch.cat([h, g], 1)
        elif self.live == "sum":
            h = h + g[:, :1]
        return self.o(F.relu(h).mean((2, 3)))


@pytest.mark.parametrize("live", [None, "cat", "sum"])
@pytest.mark.parametrize("src", ["conv", "linear"])
def test_batchnorm2d_with_every_channel_closed(live, src):
    torch.manual_seed(7)
    model = BN2dBranch(live, src)
    randomize_bn(model.bn)
    close(model.a, torch.ones(4, dtype=torch.bool))
    check(model, torch.randn(2, 3, 4, 4), example=True)


# -- property: random small residual models ----------------------------------------------------------------

ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class RandNet(nn.Module):
    """``depth`` blocks ``x -> [BN] -> act -> (+ x)`` around an L0 layer (a 3x3 conv or a Linear), optionally one
    shared activation module and a layer applied twice (``"chain"``: ``layer(act(layer(x)))``, ``"parallel"``:
    ``layer(x) + layer(act(x))``); then a head."""

    def __init__(self, conv, widths, bn, act, shared, residual, twice, gates):
        super().__init__()
        self.conv = conv
        self.layers = nn.ModuleList()
        self.bns = nn.ModuleList()
        for cin, cout, g in zip(widths[:-1], widths[1:], gates):
            if conv:
                self.layers.append(l0k.L0Conv2d(cin, cout, 3, padding=1))
            else:
                self.layers.append(l0k.L0Linear(cin, cout, gate=g))
            self.bns.append((nn.BatchNorm2d if conv else nn.BatchNorm1d)(cout) if bn else nn.Identity())
        self.shared = ACTS[act]() if shared else None
        self.acts = nn.ModuleList(ACTS[act]() for _ in self.layers)
        self.residual = [r and cin == cout for r, cin, cout in zip(residual, widths[:-1], widths[1:])]
        self.twice = [t if cin == cout else None for t, cin, cout in zip(twice, widths[:-1], widths[1:])]
        self.head = nn.Linear(widths[-1], 3)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            act = self.shared if self.shared is not None else self.acts[i]
            h = layer(x)
            if self.twice[i] == "chain":
                h = layer(act(h))
            elif self.twice[i] == "parallel":
                h = h + layer(act(x))
            h = act(self.bns[i](h))
            x = h + x if self.residual[i] else h
        if self.conv:
            x = x.mean((2, 3))
        return self.head(x)


if st is not None:
    @st.composite
    def rand_nets(draw):
        depth = draw(st.integers(1, 3))
        widths = draw(st.lists(st.integers(1, 6), min_size=depth + 1, max_size=depth + 1))
        conv = draw(st.booleans())
        per_layer = lambda s: st.lists(s, min_size=depth, max_size=depth)
        net = RandNet(conv, widths, bn=draw(st.booleans()), act=draw(st.sampled_from(sorted(ACTS))),
                      shared=draw(st.booleans()), residual=draw(per_layer(st.booleans())),
                      twice=draw(per_layer(st.sampled_from([None, None, "chain", "parallel"]))),
                      gates=draw(per_layer(st.sampled_from(["in", "out", "weight"]))))
        torch.manual_seed(draw(st.integers(0, 2 ** 16)))
        for layer, b in zip(net.layers, net.bns):
            for p in layer.parameters():
                if p is not layer.log_alpha:
                    with torch.no_grad():
                        p.normal_(0, 0.7)
            mode = draw(st.sampled_from(["open", "random", "random", "closed"]))
            n = layer.log_alpha.numel()
            closed = {"open": torch.zeros(n, dtype=torch.bool), "closed": torch.ones(n, dtype=torch.bool),
                      "random": torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))}[mode]
            close(layer, closed.view(layer.log_alpha.shape))
            if isinstance(b, nn.modules.batchnorm._BatchNorm):
                randomize_bn(b)
        x = torch.randn((3, widths[0], 4, 4) if conv else (5, widths[0]))
        return net, x

    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rand_nets(), st.booleans())
    def test_random_residual_models(net_x, example):
        net, x = net_x
        check(net, x, example=example or net.conv)
else:
    @pytest.mark.skip(reason="needs hypothesis")
    def test_random_residual_models():
        pass


# -- sizes a forward computes, gates that never act ----------------------------------------------------------

class HardCoded(nn.Module):
    """Heads reshaped with a literal head count: compact cannot change the literal, so it keeps the heads."""
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.o = l0k.L0Linear(8, 8, gate="in")

    def forward(self, x):
        h = self.q(x).view(x.shape[0], x.shape[1], 4, 2).transpose(1, 2)
        h = F.scaled_dot_product_attention(h, h, h)
        return self.o(h.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8))


class FromAttribute(HardCoded):
    """The same with the head count read from an attribute: compact sets the attribute."""
    def __init__(self):
        super().__init__()
        self.heads = 4

    def forward(self, x):
        h = self.q(x).view(x.shape[0], x.shape[1], self.heads, 2).transpose(1, 2)
        h = F.scaled_dot_product_attention(h, h, h)
        return self.o(h.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * 2))


def test_hard_coded_size_keeps_its_units_with_a_warning():
    torch.manual_seed(21)
    x = torch.randn(2, 3, 8)
    closed = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)  # head 1
    model = HardCoded()
    close(model.o, closed)
    with pytest.warns(UserWarning, match="computes sizes that compact\\(\\) cannot update"):
        check(model, x, example=True)
    assert compact(model, x).q.out_features == 8
    model = FromAttribute()
    close(model.o, closed)
    check(model, x, example=True)
    c = compact(model, x)
    assert c.q.out_features == 6 and c.heads == 3 and c.o.in_features == 6


class ReadsWeight(nn.Module):
    """The parent reads its child's weight (as torchvision's Swin does with its qkv layer)."""
    def __init__(self):
        super().__init__()
        self.inner = l0k.L0Linear(4, 4, gate="out")
        self.head = l0k.L0Linear(4, 2, gate="out")

    def forward(self, x):
        return self.head(F.linear(x, self.inner.weight, self.inner.bias))


def test_gates_that_never_act_compact_dense_with_a_warning():
    torch.manual_seed(22)
    model = ReadsWeight()
    close(model.inner, torch.tensor([1, 1, 0, 0], dtype=torch.bool))
    close(model.head, torch.tensor([1, 0], dtype=torch.bool))
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="gates of inner never act"):
        check(model, x)
    c = compact(model, x)
    assert torch.equal(c.inner.weight, model.inner.weight)  # as the model computes it: ungated
    assert torch.equal(c.head.weight[0], torch.zeros(4))  # a closed output row of the model: zeros, kept


class SizesFromShapes(HardCoded):
    """Head count taken from the tensor (-1); ``num_heads`` is not read by the forward, ``layer_idx`` only
    happens to equal the head count."""
    def __init__(self):
        super().__init__()
        self.num_heads, self.layer_idx = 4, 4

    def forward(self, x):
        h = self.q(x).view(x.shape[0], x.shape[1], -1, 2).transpose(1, 2)
        h = F.scaled_dot_product_attention(h, h, h)
        return self.o(h.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def test_size_attributes_stay_true_and_others_alone():
    torch.manual_seed(23)
    x = torch.randn(2, 3, 8)
    model = SizesFromShapes()
    close(model.o, torch.tensor([0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool))
    check(model, x, example=True)
    c = compact(model, x)
    assert c.q.out_features == 6 and c.num_heads == 3 and c.layer_idx == 4
