"""compact() through graphs: residual blocks with BatchNorm, concatenation, attention (MHA, GQA) with SwiGLU
FFNs, the input-selection step, loading without l0kernels, torch.export, rules and errors."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l0kernels as l0k
from l0kernels import compact, compare

from conftest import TOL, randomize_bn

CLOSED = -6.0


def set_gates(layer, closed):
    """Open gates: random log_alpha in (-2, 4) (partly or fully open); ``closed`` (bool mask over gates): closed."""
    with torch.no_grad():
        la = layer.log_alpha
        la.copy_(torch.rand_like(la) * 6 - 2)
        la[closed] = CLOSED


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def no_l0_modules(c):
    for m in c.modules():
        assert not type(m).__module__.startswith("l0kernels"), type(m)


def check_same(model, x, rel_err, example=True):
    model.eval()
    with torch.no_grad():
        ref = model(x)
        c = compact(model, x if example else None)
        y = c(x)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 1e-5 if x.dtype == torch.float32 else TOL[x.dtype]
    d = compare(model, c, x)
    assert d["norm_rel"] < 1e-5 and d["max_abs"] >= 0
    no_l0_modules(c)
    return c


# -- residual CNN ------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = l0k.L0Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.down is None else self.down(x)
        return F.relu(out + idt)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = l0k.L0Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b1 = BasicBlock(8, 8)
        self.b2 = BasicBlock(8, 12, stride=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.b2(self.b1(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _resnet(seed):
    torch.manual_seed(seed)
    model = TinyResNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    return model


def test_residual_cnn_with_batchnorm(rel_err):
    model = _resnet(0)
    closed1 = torch.zeros(8, dtype=torch.bool)
    closed1[[1, 4, 6]] = True
    closed2 = torch.zeros(12, dtype=torch.bool)
    closed2[[0, 2, 3, 7, 11]] = True
    set_gates(model.b1.conv1, closed1)
    set_gates(model.b2.conv1, closed2)
    set_gates(model.stem, torch.zeros(8, dtype=torch.bool))
    with torch.no_grad():  # closed inner channels give ReLU(BN(0)) = 0 here, except channel 6 of b1
        for bn, cl in ((model.b1.bn1, closed1), (model.b2.bn1, closed2)):
            bn.bias[cl] = -bn.weight[cl].abs() - 1.0
            bn.running_mean[cl] = 0.0
        model.b1.bn1.bias[6] = 2.0  # ReLU(BN(0)) > 0: a constant channel the zero-padded conv2 cannot fold
        model.b1.bn1.weight[6] = 0.5
    x = torch.randn(2, 3, 9, 9)
    c = check_same(model, x, rel_err)
    assert type(c) is type(model)
    # inner channels: closed ones go, except the nonzero constant a padded conv reads
    assert c.b1.conv1.out_channels == 6 and c.b1.bn1.num_features == 6 and c.b1.conv2.in_channels == 6
    assert c.b2.conv1.out_channels == 7 and c.b2.conv2.in_channels == 7
    # residual widths stay
    assert c.b1.conv2.out_channels == 8 and c.b2.conv2.out_channels == 12 and c.fc.in_features == 12
    removed = (8 - 6) * (8 * 9 + 8 * 9 + 2) + (12 - 7) * (8 * 9 + 12 * 9 + 2)  # conv1 rows, conv2 cols, BN
    assert n_params(c) == n_params(model) - sum(m.log_alpha.numel() for m in model.modules()
                                                if isinstance(m, l0k.L0Conv2d)) - removed


def test_residual_stream_closed_gates_stay_as_zeros(rel_err):
    """Closed output channels of the stem feed the identity path: they stay (the residual width is kept)."""
    model = _resnet(1)
    set_gates(model.stem, torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool))
    c = check_same(model, torch.randn(2, 3, 8, 8), rel_err)
    assert c.stem.out_channels == 8


def test_conv_sigmoid_conv_folds_constants(rel_err):
    """Closed channels after a sigmoid are 0.5 everywhere: an unpadded conv folds them into its bias."""
    torch.manual_seed(2)
    model = nn.Sequential(l0k.L0Conv2d(3, 6, 3), nn.Sigmoid(), l0k.L0Conv2d(6, 4, 3), nn.ReLU())
    set_gates(model[0], torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool))
    set_gates(model[2], torch.zeros(4, dtype=torch.bool))
    c = check_same(model, torch.randn(2, 3, 9, 9), rel_err, example=False)
    assert c[0].out_channels == 3 and c[2].in_channels == 3


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = l0k.L0Conv2d(3, 4, 3, padding=1)
        self.b = l0k.L0Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(9)
        self.head = l0k.L0Conv2d(9, 6, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        return self.head(F.relu(self.bn(y)))


def test_concatenation(rel_err):
    torch.manual_seed(3)
    model = TwoBranch()
    randomize_bn(model.bn)
    set_gates(model.a, torch.tensor([0, 1, 0, 0], dtype=torch.bool))
    set_gates(model.b, torch.tensor([1, 0, 0, 1, 0], dtype=torch.bool))
    set_gates(model.head, torch.zeros(6, dtype=torch.bool))
    c = check_same(model, torch.randn(2, 3, 7, 7), rel_err)
    # a 1x1 conv folds any constant (BN shift of a closed channel)
    assert c.a.out_channels == 3 and c.b.out_channels == 3
    assert c.bn.num_features == 6 and c.head.in_channels == 6


def test_first_layer_inputs_selected_and_saved_model_loads_without_l0kernels(tmp_path, rel_err):
    """Inputs nobody reads: a model of its own class keeps them (its forward takes the full input); an
    ``nn.Sequential`` gets an input-selection step, a plain module that torch.load loads without l0kernels."""
    torch.manual_seed(4)
    model = TwoBranch()
    randomize_bn(model.bn)
    with torch.no_grad():  # input channel 1 is read by nobody
        model.a.weight[:, 1] = 0
        model.b.weight[:, 1] = 0
    set_gates(model.a, torch.tensor([0, 1, 0, 0], dtype=torch.bool))
    set_gates(model.b, torch.tensor([0, 0, 0, 1, 0], dtype=torch.bool))
    x = torch.randn(2, 3, 7, 7)
    c = check_same(model, x, rel_err)
    assert c.a.in_channels == 3 and c.b.in_channels == 3
    seq = nn.Sequential(l0k.L0Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        seq[0].weight[:, 1] = 0
    c = check_same(seq, x, rel_err)
    assert c[1].in_channels == 2 and isinstance(c[0], torch.fx.GraphModule)  # the input selection
    with torch.no_grad():
        ref = seq(x)
    torch.save(c, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            "sys.modules['l0kernels'] = None  # not importable\n"
            f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "assert not any(k.startswith('l0kernels') and sys.modules[k] is not None for k in sys.modules)\n"
            "with torch.no_grad():\n"
            f"    torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, timeout=120)
    assert rel_err(torch.load(tmp_path / "y.pt"), ref) < TOL[torch.float32]


def test_torch_export_of_compacted_graphs(rel_err):
    model = _resnet(5)
    set_gates(model.b1.conv1, torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool))
    x = torch.randn(2, 3, 8, 8)
    c = compact(model.eval(), x)
    ep = torch.export.export(c, (x,))
    with torch.no_grad():
        assert rel_err(ep.module()(x), model(x)) < 1e-5
    seq = nn.Sequential(l0k.L0Linear(6, 5), nn.ReLU(), l0k.L0Linear(5, 3))
    set_gates(seq[0], torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool))
    cs = compact(seq.eval())
    xs = torch.randn(4, 6)
    with torch.no_grad():
        assert rel_err(torch.export.export(cs, (xs,)).module()(xs), seq(xs)) < 1e-5


# -- attention ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm transformer block: attention (q/k/v/o, SDPA, optional GQA) and a SwiGLU FFN."""

    def __init__(self, d=16, h=4, hk=4, hd=4, ff=12, norm=nn.LayerNorm, repeat_kv=False):
        super().__init__()
        self.h, self.hk, self.hd, self.repeat_kv = h, hk, hd, repeat_kv
        self.ln1, self.ln2 = norm(d), norm(d)
        self.q = nn.Linear(d, h * hd)
        self.k = nn.Linear(d, hk * hd)
        self.v = nn.Linear(d, hk * hd)
        self.o = l0k.L0Linear(h * hd, d, gate="in")
        self.gate = nn.Linear(d, ff, bias=False)
        self.up = nn.Linear(d, ff, bias=False)
        self.down = l0k.L0Linear(ff, d, gate="in", bias=False)

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        y = self.ln1(x)
        q = self.q(y).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(y).view(b, t, self.hk, self.hd).transpose(1, 2)
        v = self.v(y).view(b, t, self.hk, self.hd).transpose(1, 2)
        if self.repeat_kv:  # grouped-query attention written out, as Hugging Face's repeat_kv does
            r = self.h // self.hk
            k = k[:, :, None].expand(b, self.hk, r, t, self.hd).reshape(b, self.h, t, self.hd)
            v = v.repeat_interleave(r, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.h != self.hk)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, self.h * self.hd))
        y = self.ln2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def close_heads(layer, heads, hd):
    """Per-feature input gates of an output projection, equal within a head; ``heads`` closed (the effect of
    grouped gates with group_size=hd)."""
    with torch.no_grad():
        n_heads = layer.log_alpha.numel() // hd
        la = (torch.rand(n_heads) * 6 - 2).repeat_interleave(hd)
        for h in heads:
            la[h * hd:(h + 1) * hd] = CLOSED
        layer.log_alpha.copy_(la)


@pytest.mark.parametrize("h,hk,closed,kept_q,kept_kv,repeat", [
    (4, 4, [1, 2], 2, 2, False),          # MHA: closed heads go
    (4, 2, [0, 1, 2], 2, 1, False),       # GQA: group 0 (heads 0, 1) goes; head 2 stays as zeros beside head 3
    (6, 2, [3, 4, 5, 1], 3, 1, False),    # GQA 3 query heads per kv head
    (6, 2, [3, 4, 5, 1], 3, 1, True),     # the same with key/value heads repeated by expand / repeat_interleave
])
def test_attention_heads_and_swiglu(h, hk, closed, kept_q, kept_kv, repeat, rel_err):
    torch.manual_seed(6 + h + hk)
    hd, d, ff = 4, 16, 12
    model = Block(d, h, hk, hd, ff, repeat_kv=repeat)
    close_heads(model.o, closed, hd)
    ffc = torch.zeros(ff, dtype=torch.bool)
    ffc[[0, 5, 6, 11]] = True
    set_gates(model.down, ffc)
    x = torch.randn(2, 5, d)
    c = check_same(model, x, rel_err)
    assert c.q.out_features == kept_q * hd and c.o.in_features == kept_q * hd
    assert c.k.out_features == kept_kv * hd and c.v.out_features == kept_kv * hd
    assert c.gate.out_features == ff - 4 and c.up.out_features == ff - 4 and c.down.in_features == ff - 4
    # parameters: what the open gates imply
    want = (n_params(model) - model.o.log_alpha.numel() - model.down.log_alpha.numel()
            - (h - kept_q) * hd * (d + 1 + d) - 2 * (hk - kept_kv) * hd * (d + 1) - 4 * 3 * d)
    assert n_params(c) == want
    ep = torch.export.export(c, (x,))
    with torch.no_grad():
        assert rel_err(ep.module()(x), model(x)) < 1e-5


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="needs nn.RMSNorm")
def test_attention_block_with_rmsnorm_and_closed_residual_units(rel_err):
    """Closed input gates of the residual stream stay (RMSNorm couples every unit)."""
    torch.manual_seed(9)
    model = Block(norm=nn.RMSNorm)
    model.q = l0k.L0Linear(16, 16, gate="in")
    set_gates(model.q, torch.rand(16) < 0.5)
    close_heads(model.o, [3], 4)
    c = check_same(model, torch.randn(3, 4, 16), rel_err)
    assert c.q.in_features == 16 and c.q.out_features == 12


def test_attention_needs_example_inputs():
    model = Block().eval()
    with pytest.raises(ValueError, match="example_inputs"):
        compact(model)


# -- rules and errors --------------------------------------------------------------------------------------

class Square(nn.Module):
    def forward(self, x):
        return x * x + 1.0


class UsesSquare(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = l0k.L0Linear(5, 6, gate="out")
        self.sq = Square()
        self.b = l0k.L0Linear(6, 2)

    def forward(self, x):
        return self.b(self.sq(self.a(x)))


def test_register_rule(rel_err):
    torch.manual_seed(10)
    model = UsesSquare()
    set_gates(model.a, torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool))
    x = torch.randn(3, 5)
    c = check_same(model, x, rel_err)  # x * x + 1 of a closed unit is the constant 1: folded into b's bias
    assert c.b.in_features == 4 and isinstance(c.sq, Square)
    from l0kernels.compact.rules import _RULES
    try:
        l0k.register_compact_rule(torch.ops.aten.mul.Tensor, "frozen")  # keeps the units it reads
        c = check_same(model, x, rel_err)
        assert c.b.in_features == 6
        l0k.register_compact_rule(torch.ops.aten.mul, "elementwise")  # every overload
        _RULES.pop(torch.ops.aten.mul.Tensor)
        c = check_same(model, x, rel_err)
        assert c.b.in_features == 4
    finally:
        _RULES.pop(torch.ops.aten.mul.Tensor, None)
        _RULES.pop(torch.ops.aten.mul, None)
    with pytest.raises(ValueError, match="rule"):
        l0k.register_compact_rule(torch.ops.aten.mul.Tensor, "unknown")
    with pytest.raises(TypeError, match="ATen"):
        l0k.register_compact_rule(Square, "frozen")  # compact() sees ops, not module classes


class Roll(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = l0k.L0Linear(5, 6, gate="out")
        self.b = l0k.L0Linear(6, 2)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, -1))


def test_ops_without_a_rule_keep_their_units(rel_err):
    """torch.roll (no rule) and a BatchNorm without running statistics keep the units they read: exact."""
    torch.manual_seed(13)
    model = Roll()
    set_gates(model.a, torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool))
    c = check_same(model, torch.randn(3, 5), rel_err)
    assert c.a.out_features == 6 and c.b.in_features == 6
    bn = nn.BatchNorm1d(4, track_running_stats=False)
    seq = nn.Sequential(l0k.L0Linear(3, 4, gate="out"), bn, nn.Linear(4, 2)).eval()
    set_gates(seq[0], torch.tensor([1, 0, 0, 1], dtype=torch.bool))
    c = check_same(seq, torch.randn(5, 3), rel_err)
    assert c[0].out_features == 4
    with pytest.raises(TypeError, match="model"):
        compact(3)


def test_summary_of_residual_cnn_and_attention():
    model = _resnet(20)
    set_gates(model.b1.conv1, torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool))
    x = torch.randn(1, 3, 8, 8)
    s = l0k.summary(model, example_inputs=x)
    c = compact(model.eval(), x)
    assert s.compacted
    convs = [m for m in c.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert s.totals()["params_after"] == sum(p.numel() for m in convs for p in m.parameters())
    row = next(l for l in s.layers if l.name == "b1.conv1")
    assert row.shape_after == tuple(c.b1.conv1.weight.shape)
    assert row.flops_after == c.b1.conv1.out_channels * 64 * (2 * 8 * 9 - 1)
    assert s.totals()["flops_after"] < s.totals()["flops_before"]
    blk = Block(h=4, hk=2)
    close_heads(blk.o, [0, 1], 4)
    xb = torch.randn(1, 3, 16)
    s = l0k.summary(blk, example_inputs=xb)
    cb = compact(blk.eval(), xb)
    assert s.compacted and "o" in [l.name for l in s.layers]
    lin = [m for m in cb.modules() if isinstance(m, nn.Linear)]
    assert s.totals()["params_after"] == sum(p.numel() for m in lin for p in m.parameters())


def test_grouped_gates_expand_to_their_features(rel_err):
    """A layer with one gate per g features (``log_alpha`` of features // g, set by hand here: the grouped
    eval forward is another change) compacts with each gate repeated over its g features."""
    torch.manual_seed(30)
    first = l0k.L0Linear(6, 8, gate="out")
    lin = l0k.L0Linear(8, 3, gate="in", group_size=2)
    conv = l0k.L0Conv2d(2, 6, 3, group_size=2)
    with torch.no_grad():
        lin.log_alpha.copy_(torch.tensor([3.0, CLOSED, 0.5, CLOSED]))  # 4 gates of 2 inputs
        conv.log_alpha.copy_(torch.tensor([CLOSED, 3.0, 1.0]))  # 3 gates of 2 channels
    model = nn.Sequential(first, nn.ReLU(), lin).eval()
    c = compact(model)
    assert c[0].out_features == 4 and c[2].in_features == 4
    zf = l0k.deterministic_gates(lin.log_alpha.detach()).repeat_interleave(2)
    x = torch.randn(5, 6)
    with torch.no_grad():
        ref = F.linear(F.relu(first(x)), lin.weight * zf, lin.bias)
        assert rel_err(c(x), ref) < 1e-6
    cm = compact(nn.Sequential(conv, nn.ReLU(), nn.Conv2d(6, 2, 1)).eval())
    assert cm[0].out_channels == 4 and cm[2].in_channels == 4


def test_attention_graph_loads_without_l0kernels(tmp_path, rel_err):
    """torch.export.save of a compacted model loads and runs with torch alone."""
    torch.manual_seed(31)
    model = Block(h=4, hk=2, repeat_kv=True).eval()
    close_heads(model.o, [2, 3], 4)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = model(x)
    c = compact(model, x)
    assert c.q.out_features == 8
    torch.export.save(torch.export.export(c, (x,)), tmp_path / "m.pt2")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            "sys.modules['l0kernels'] = None\n"
            f"m = torch.export.load({str(tmp_path / 'm.pt2')!r}).module()\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "with torch.no_grad():\n"
            f"    torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, timeout=120)
    assert rel_err(torch.load(tmp_path / "y.pt"), ref) < 1e-5


def test_compact_leaves_the_model_modes_alone():
    model = _resnet(32)
    model.eval()
    model.b1.train()
    flags = [m.training for m in model.modules()]
    compact(model, torch.randn(1, 3, 8, 8))
    assert [m.training for m in model.modules()] == flags


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = l0k.L0Linear(6, 8, gate="out")
        self.b = l0k.L0Linear(8, 8, gate="in")
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.c(self.b(h) + self.b(torch.sigmoid(h)))


def test_layer_called_twice(rel_err):
    torch.manual_seed(33)
    model = Shared()
    set_gates(model.a, torch.tensor([1, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool))
    set_gates(model.b, torch.tensor([0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool))
    c = check_same(model, torch.randn(4, 6), rel_err)
    # closed units of a are 0 at one call and sigmoid(0) = 0.5 at the other: kept (one layer, one fold);
    # the closed inputs of b go
    assert c.b.in_features == 6 and c.a.out_features == 6


class TinyLM(nn.Module):
    """Embedding -> block -> LayerNorm -> tied-free head: integer inputs have no units."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.block = Block()
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 20)

    def forward(self, ids):
        return self.head(self.norm(self.block(self.emb(ids))))


def test_language_model_with_embedding(rel_err):
    torch.manual_seed(34)
    model = TinyLM().eval()
    close_heads(model.block.o, [0], 4)
    set_gates(model.block.down, torch.rand(12) < 0.5)
    ids = torch.randint(0, 20, (2, 6))
    with torch.no_grad():
        ref = model(ids)
        c = compact(model, ids)
        assert rel_err(c(ids), ref) < 1e-5
    assert c.block.q.out_features == 12 and c.emb.embedding_dim == 16


def test_zero_value_head_goes(rel_err):
    """Closed output gates of v (a whole key/value head) make that head's attention output 0: o folds it and
    the head (with its query heads) goes."""
    torch.manual_seed(35)
    model = Block(h=4, hk=2)
    model.v = l0k.L0Linear(16, 8, gate="out")
    set_gates(model.v, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool))
    close_heads(model.o, [], 4)
    c = check_same(model, torch.randn(2, 5, 16), rel_err)
    assert c.v.out_features == 4 and c.q.out_features == 8 and c.o.in_features == 8


class _SizeArithmetic(nn.Module):
    """Sizes computed from the input (``// 2``), an input check, a channel split, a ``self.training`` branch."""

    def __init__(self):
        super().__init__()
        self.conv1 = l0k.L0Conv2d(3, 8, 3, padding=1)
        self.conv2 = l0k.L0Conv2d(8, 6, 3, padding=1)
        self.fc = l0k.L0Linear(6, 4)

    def forward(self, x):
        torch._assert(x.shape[1] == 3, "three input channels")
        h = self.conv1(x)
        a, b = h.chunk(2, dim=1)
        h = torch.cat((F.relu(a), b * 2.0), dim=1)
        if self.training:
            h = h * 0.5
        h = self.conv2(h)
        n, c = h.size(0), h.size(1)
        h = h.reshape(n, c, h.size(2) * h.size(3) // 2, 2).mean(dim=(2, 3))
        return self.fc(h)


def test_size_arithmetic_asserts_and_splits_compact_exactly(rel_err):
    torch.manual_seed(21)
    model = _SizeArithmetic()
    set_gates(model.conv1, torch.tensor([1, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool))
    set_gates(model.conv2, torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool))
    set_gates(model.fc, torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.bool))
    x = torch.randn(2, 3, 6, 6)
    c = check_same(model, x, rel_err)
    convs = [m for m in c.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 6  # equal chunks shrink alike: closed 3 and 7 (same place in each) go, 0 stays
    assert convs[1].out_channels == 3  # conv2: its two closed channels and the one fc does not read go
    model.train()  # compact traces the eval forward whatever mode the model is in, and puts the modes back
    c = compact(model, x)
    assert model.training and model.conv1.training
    with torch.no_grad():
        assert rel_err(c(x), model.eval()(x)) < 1e-5
