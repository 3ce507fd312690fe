"""compact(model) and summary(model): plain torch.nn models with the zero-gated groups removed."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l0kernels as l0k
from l0kernels._gates import eval_gates_and_grad
from l0kernels.compact import compact, summary

from conftest import TOL, randomize_bn

CLOSED, OPEN = -6.0, 5.0  # z_eval == 0 / z_eval == 1


def set_gates(layer, closed):
    """Open gates get random log_alpha in (-2, 4) (partly or fully open); ``closed`` (bool mask) are closed."""
    with torch.no_grad():
        la = layer.log_alpha
        la.copy_(torch.rand_like(la) * 6 - 2)
        la[closed] = CLOSED


def random_closed(layer, p):
    closed = torch.rand(layer.log_alpha.shape) < p
    set_gates(layer, closed)
    return closed


def check_same(model, x, rel_err, tol=None):
    model.eval()
    with torch.no_grad():
        ref = model(x)
        c = compact(model)
        y = c(x)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < (tol or TOL[x.dtype])
    assert type(c) is type(model)  # the model's own class, its L0 layers now plain layers
    assert not any(isinstance(m, (l0k.L0Linear, l0k.L0Conv2d)) for m in c.modules())
    return c


def weight_layers(c):
    return [m for m in c.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_mlp_in_gates_structure(rel_err):
    torch.manual_seed(0)
    model = nn.Sequential(l0k.L0Linear(12, 9), nn.ReLU(), l0k.L0Linear(9, 7), nn.Tanh(), l0k.L0Linear(7, 3))
    closed1 = torch.zeros(12, dtype=torch.bool)
    closed1[[0, 5]] = True
    closed2 = torch.zeros(9, dtype=torch.bool)
    closed2[[1, 2, 8]] = True
    closed3 = torch.zeros(7, dtype=torch.bool)
    closed3[[6]] = True
    for layer, cl in zip((model[0], model[2], model[4]), (closed1, closed2, closed3)):
        set_gates(layer, cl)
    c = check_same(model, torch.randn(5, 12), rel_err)
    shapes = [tuple(m.weight.shape) for m in weight_layers(c)]
    # closed inputs of the model go through an input-selection step; a layer's rows go where the next layer's
    # input gate is closed
    assert shapes == [(6, 10), (6, 6), (3, 6)]
    assert c[0].index.tolist() == [i for i in range(12) if i not in (0, 5)]
    assert [type(m) for m in c][1:] == [nn.Linear, nn.ReLU, nn.Linear, nn.Tanh, nn.Linear]


def test_mlp_out_gates_and_sigmoid_constant(rel_err):
    """A closed output unit after sigmoid is the constant 0.5: folded into the next layer's bias."""
    torch.manual_seed(1)
    model = nn.Sequential(l0k.L0Linear(10, 8, gate="out"), nn.Sigmoid(), l0k.L0Linear(8, 6, gate="out"), nn.ReLU(),
                          l0k.L0Linear(6, 4, gate="in"))
    cl1 = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    cl2 = torch.tensor([0, 1, 0, 0, 0, 1], dtype=torch.bool)
    cl3 = torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.bool)
    for layer, cl in zip((model[0], model[2], model[4]), (cl1, cl2, cl3)):
        set_gates(layer, cl)
    c = check_same(model, torch.randn(7, 10), rel_err)
    assert [tuple(m.weight.shape) for m in weight_layers(c)] == [(5, 10), (3, 5), (4, 3)]


def test_random_sparsity_mlps(rel_err):
    torch.manual_seed(2)
    acts = [nn.ReLU, nn.Sigmoid, nn.GELU, nn.Tanh, nn.ELU, nn.SiLU]
    for trial in range(12):
        gates = [("in", "out", "weight")[(trial + i) % 3] for i in range(3)]
        act = acts[trial % len(acts)]
        dims = [11, 13, 9, 5]
        model = nn.Sequential(
            l0k.L0Linear(dims[0], dims[1], gate=gates[0], bias=trial % 4 != 0), act(),
            nn.Sequential(nn.Dropout(0.3), l0k.L0Linear(dims[1], dims[2], gate=gates[1]), act()),
            nn.BatchNorm1d(dims[2]), l0k.L0Linear(dims[2], dims[3], gate=gates[2]))
        randomize_bn(model[3])
        for m in model.modules():
            if isinstance(m, l0k.L0Linear):
                random_closed(m, 0.3 + 0.05 * trial)
        dtype = torch.float64 if trial % 2 else torch.float32
        check_same(model.to(dtype), torch.randn(6, 11, dtype=dtype), rel_err, tol=1e-5)


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = l0k.L0Conv2d(1, 6, 5)
        self.conv2 = l0k.L0Conv2d(6, 8, 5)
        self.fc1 = l0k.L0Linear(8 * 4 * 4, 20)
        self.fc2 = l0k.L0Linear(20, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


def test_lenet5_traced(rel_err):
    torch.manual_seed(3)
    model = LeNet5()
    cl1 = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)
    cl2 = torch.tensor([1, 0, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    set_gates(model.conv1, cl1)
    set_gates(model.conv2, cl2)
    cl3 = torch.zeros(128, dtype=torch.bool)
    cl3[2 * 16:3 * 16] = True  # every feature of conv2's channel 2 closed in fc1: channel 2 is not needed
    cl3[3 * 16 + 5] = True  # one feature of channel 3: the channel stays
    set_gates(model.fc1, cl3)
    cl4 = torch.rand(20) < 0.4
    set_gates(model.fc2, cl4)
    c = check_same(model, torch.randn(3, 1, 28, 28), rel_err)
    shapes = [tuple(m.weight.shape) for m in weight_layers(c)]
    k2 = 8 - 3  # channels 0 and 6 closed, channel 2 unread
    assert shapes == [(4, 1, 5, 5), (k2, 4, 5, 5), (int((~cl4).sum()), k2 * 16), (10, int((~cl4).sum()))]
    assert type(c) is LeNet5 and c.fc1 is c.get_submodule("fc1")  # the class and its attributes stay


def test_lenet5_sequential_matches_eval_model(rel_err):
    torch.manual_seed(4)
    model = nn.Sequential(l0k.L0Conv2d(1, 7, 5), nn.ReLU(), nn.MaxPool2d(2), l0k.L0Conv2d(7, 9, 5), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), l0k.L0Linear(9 * 16, 15), nn.ReLU(), l0k.L0Linear(15, 10))
    for m in model.modules():
        if isinstance(m, (l0k.L0Linear, l0k.L0Conv2d)):
            random_closed(m, 0.5)
    check_same(model, torch.randn(2, 1, 28, 28), rel_err)


@pytest.mark.parametrize("padding", [0, 1])
def test_conv_batchnorm_relu_chain(padding, rel_err):
    """Closed channels are constant after BatchNorm+ReLU: folded when the next conv has no zero padding,
    kept (as zero-weight channels) when it has."""
    torch.manual_seed(5 + padding)
    model = nn.Sequential(l0k.L0Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          l0k.L0Conv2d(8, 6, 3, padding=padding), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), l0k.L0Linear(6, 4))
    randomize_bn(model[1])
    randomize_bn(model[4])
    with torch.no_grad():
        model[1].running_mean.fill_(-1.0)  # (0 - mean) * w / std + b: make ReLU of it non-zero for w > 0
        model[1].weight.abs_()
        model[1].bias.zero_()
    cl1 = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)
    cl2 = torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.bool)
    set_gates(model[0], cl1)
    set_gates(model[3], cl2)
    set_gates(model[8], torch.zeros(6, dtype=torch.bool))
    c = check_same(model, torch.randn(2, 3, 10, 9), rel_err)
    convs = [m for m in c if isinstance(m, nn.Conv2d)]
    bns = [m for m in c if isinstance(m, nn.BatchNorm2d)]
    want1 = 4 if padding == 0 else 8
    assert convs[0].out_channels == want1 and bns[0].num_features == want1 and convs[1].in_channels == want1
    # conv2's closed channel is constant after BN/ReLU/pool: the Linear folds it (pool keeps constants)
    assert convs[1].out_channels == 5 and bns[1].num_features == 5


def test_layer_with_zero_active_units(rel_err):
    torch.manual_seed(6)
    model = nn.Sequential(l0k.L0Linear(7, 5, gate="out"), nn.Sigmoid(), l0k.L0Linear(5, 3, gate="in"))
    set_gates(model[0], torch.ones(5, dtype=torch.bool))  # every output closed: sigmoid gives 0.5
    set_gates(model[2], torch.zeros(5, dtype=torch.bool))
    c = check_same(model, torch.randn(4, 7), rel_err)
    assert tuple(c[0].weight.shape) == (0, 7) and tuple(c[2].weight.shape) == (3, 0)
    # every channel of a conv closed: nn.Conv2d needs one, so one zero channel stays
    model = nn.Sequential(l0k.L0Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), l0k.L0Linear(4 * 9, 3))
    set_gates(model[0], torch.ones(4, dtype=torch.bool))
    set_gates(model[3], torch.zeros(36, dtype=torch.bool))
    c = check_same(model, torch.randn(2, 2, 5, 5), rel_err)
    assert c[0].out_channels == 1 and c[3].in_features == 9


def test_plain_layers_and_original_untouched(rel_err):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), l0k.L0Linear(8, 5, gate="in"), nn.Linear(5, 2))
    random_closed(model[2], 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = check_same(model, torch.randn(3, 6), rel_err)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert c[0].out_features == int((model[2].log_alpha > -2.398).sum())


def test_saved_model_loads_without_l0kernels(tmp_path, rel_err):
    torch.manual_seed(8)
    model = nn.Sequential(l0k.L0Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          l0k.L0Linear(4 * 9, 6), nn.Tanh(), l0k.L0Linear(6, 3, gate="out")).eval()
    for m in model.modules():
        if isinstance(m, (l0k.L0Linear, l0k.L0Conv2d)):
            random_closed(m, 0.4)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    torch.save(compact(model), tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "assert not any(k.startswith('l0kernels') for k in sys.modules), 'l0kernels imported'\n"
            "with torch.no_grad():\n"
            f"    torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, timeout=120)
    assert rel_err(torch.load(tmp_path / "y.pt"), ref) < TOL[torch.float32]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = l0k.L0Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class Flip(nn.Module):
    def forward(self, x):
        return torch.flip(x, (1,))


class RawLinear(nn.Module):
    """Reads its own parameter through F.linear: no rule follows a weight that is not a layer."""
    def __init__(self):
        super().__init__()
        self.fc = l0k.L0Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return F.linear(self.fc(x), self.w)


class DataDependent(nn.Module):
    """A forward that branches on a tensor's value: torch.export cannot capture it."""
    def __init__(self):
        super().__init__()
        self.fc = l0k.L0Linear(4, 4, gate="out")

    def forward(self, x):
        return self.fc(x) if float(x.sum()) > -1e30 else x


def test_ops_without_rule_keep_their_units(rel_err):
    """An op no rule covers (a flip, an LSTM, a weight read through F.linear) keeps the units it reads: the
    model stays exact, and the rest still shrinks."""
    torch.manual_seed(12)
    outs = []
    for model, x in ((nn.Sequential(l0k.L0Linear(4, 4, gate="out"), RawLinear()), torch.randn(3, 4)),
                     (nn.Sequential(l0k.L0Linear(4, 4, gate="out"), Flip(), l0k.L0Linear(4, 2)), torch.randn(3, 4)),
                     (nn.Sequential(l0k.L0Linear(4, 6, gate="out"), nn.ReLU(), l0k.L0Linear(6, 4, gate="in"),
                                    Flip(), nn.Linear(4, 2)), torch.randn(3, 4))):
        for m in model.modules():
            if isinstance(m, l0k.L0Linear):
                set_gates(m, torch.tensor([True, False] * (m.log_alpha.numel() // 2)))
        outs.append(check_same(model, x, rel_err)[0].out_features)
    # the first layer's closed rows go where a layer reads them (RawLinear's fc), stay where a flip does; the
    # hidden layer of the last model shrinks
    assert outs == [2, 4, 3]
    lstm = nn.Sequential(nn.LSTM(4, 4), l0k.L0Linear(4, 2))
    with pytest.raises(ValueError, match="example_inputs"):  # its first layer is neither Linear nor Conv2d
        compact(lstm)
    with pytest.raises(ValueError, match="torch.export"):
        compact(DataDependent())
    with pytest.raises(TypeError, match="model"):
        compact("not a model")


def test_summary(rel_err):
    torch.manual_seed(9)
    model = nn.Sequential(l0k.L0Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), l0k.L0Linear(6 * 36, 10, gate="in"),
                          nn.ReLU(), l0k.L0Linear(10, 4, gate="out"))
    closed = [random_closed(m, 0.5) for m in model if isinstance(m, (l0k.L0Linear, l0k.L0Conv2d))]
    s = summary(model, input_shape=(1, 1, 8, 8))
    assert [l.name for l in s.layers] == ["0", "3", "5"]
    for l, cl in zip(s.layers, closed):
        assert l.gates_total == cl.numel() and l.gates_active == int((~cl).sum())
    c = compact(model)
    assert s.totals()["params_after"] == sum(p.numel() for m in weight_layers(c) for p in m.parameters())
    assert s.layers[0].flops_before == 6 * 36 * (2 * 9 - 1 + 1)
    assert s.layers[0].flops_after == c[0].out_channels * 36 * (2 * 9 - 1 + 1)
    assert s.layers[2].flops_before == 4 * (2 * 10 - 1 + 1)
    assert abs(s.layers[1].expected_l0 - float(model[3].expected_l0().detach())) < 1e-6
    text = str(s)
    assert "L0Conv2d" in text and "total" in text
    # without input_shape, conv FLOPs come from the last input the layer saw (or are unknown)
    assert summary(nn.Sequential(l0k.L0Conv2d(1, 2, 3))).layers[0].flops_before is None


def test_grouped_conv_and_padded_avgpool(rel_err):
    torch.manual_seed(10)
    model = nn.Sequential(l0k.L0Conv2d(4, 6, 3, padding=1), nn.Sigmoid(), nn.AvgPool2d(3, 1, padding=1),
                          l0k.L0Conv2d(6, 6, 1, groups=2), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.Flatten(),
                          l0k.L0Linear(5 * 9, 3))
    for m in model.modules():
        if isinstance(m, (l0k.L0Linear, l0k.L0Conv2d)):
            random_closed(m, 0.5)
    c = check_same(model, torch.randn(2, 4, 5, 5), rel_err)
    # the grouped conv's channels 3, 4 are closed, 5 is open: group 1 is partly needed, both groups stay
    assert c[3].groups == 2 and c[3].out_channels == 6


def test_summary_of_unsupported_graph_counts_own_gates():
    torch.manual_seed(11)
    model = nn.Sequential(DataDependent(), Residual())
    random_closed(model[0].fc, 0.5)
    random_closed(model[1].fc, 0.5)
    s = summary(model)
    assert not s.compacted and "torch.export" in s.note
    fc = model[1].fc
    k_active = int((fc.deterministic_gates() > 0).sum())
    assert s.layers[1].params_after == 4 * k_active + 4


# -- grouped convolutions: whole groups go ----------------------------------------------------------------

def conv_shapes(c):
    """(in_channels, out_channels, groups) of each Conv2d of a compacted model."""
    return [(m.in_channels, m.out_channels, m.groups) for m in c.modules() if isinstance(m, nn.Conv2d)]


def closed_at(n, idx):
    closed = torch.zeros(n, dtype=torch.bool)
    closed[list(idx)] = True
    return closed


def test_depthwise_separable_chain(rel_err):
    """A closed channel makes its depthwise output the constant ReLU(bias), which the 1x1 conv folds: the
    depthwise group and the producer's channel go. A depthwise output the 1x1 conv does not read goes
    too, and with it the (open) producer channel feeding it."""
    torch.manual_seed(20)
    model = nn.Sequential(l0k.L0Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          l0k.L0Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    set_gates(model[0], closed_at(8, [1, 5]))
    set_gates(model[4], closed_at(6, [2]))
    with torch.no_grad():
        model[4].weight[:, 6] = 0  # depthwise channel 6 is not read
    c = check_same(model, torch.randn(2, 3, 9, 9), rel_err)
    assert conv_shapes(c) == [(3, 5, 1), (5, 5, 5), (5, 5, 1), (5, 4, 1)]


@pytest.mark.parametrize("padding", [0, 1])
def test_depthwise_multiplier_batchnorm_constants(padding, rel_err):
    """Depthwise conv with 2 outputs per channel between BatchNorms. Closed producer channels are nonzero
    constants after BN+ReLU: an unpadded depthwise conv carries them (its group becomes a constant the
    1x1 conv folds), a zero-padded one does not (the group stays). A group is removed only when both its
    outputs can be: channel 2 alone unread keeps group 1; channels 8, 9 unread remove group 4."""
    torch.manual_seed(21 + padding)
    model = nn.Sequential(l0k.L0Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 12, 3, padding=padding, groups=6), nn.BatchNorm2d(12), nn.ReLU6(),
                          l0k.L0Conv2d(12, 5, 1))
    randomize_bn(model[1])
    randomize_bn(model[4])
    with torch.no_grad():
        model[1].running_mean.fill_(-1.0)  # ReLU(BN(0)) > 0
        model[1].weight.abs_()
        model[1].bias.zero_()
        model[6].weight[:, [2, 8, 9]] = 0
    set_gates(model[0], closed_at(6, [0, 3]))
    set_gates(model[6], closed_at(5, []))
    c = check_same(model, torch.randn(2, 3, 8, 8), rel_err)
    kept = 3 if padding == 0 else 5  # groups 0, 3 (constant inputs) only without padding; 4 always
    assert conv_shapes(c) == [(3, kept, 1), (kept, 2 * kept, kept), (2 * kept, 5, 1)]
    assert c[1].num_features == kept and c[4].num_features == 2 * kept


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_whole_groups(groups, rel_err):
    """groups=2: group 1's outputs are all closed, group 0 is partly closed (and reads a closed channel):
    group 0 stays whole and the conv becomes an ordinary one. groups=4: group 1's outputs are closed, group
    3 reads only closed channels (its outputs are the constant ReLU(bias), folded by the 1x1 conv), group 0
    is partly closed: groups 0 and 2 stay."""
    torch.manual_seed(23 + groups)
    model = nn.Sequential(l0k.L0Conv2d(3, 8, 3), nn.ReLU(), l0k.L0Conv2d(8, 16, 3, padding=1, groups=groups),
                          nn.ReLU(), l0k.L0Conv2d(16, 4, 1))
    out_g = 16 // groups
    if groups == 2:
        set_gates(model[0], closed_at(8, [1]))
        set_gates(model[2], closed_at(16, [3] + list(range(out_g, 2 * out_g))))
        want = [(3, 4, 1), (4, 8, 1), (8, 4, 1)]
    else:
        set_gates(model[0], closed_at(8, [0, 6, 7]))
        set_gates(model[2], closed_at(16, [1] + list(range(out_g, 2 * out_g))))
        want = [(3, 4, 1), (4, 8, 2), (8, 4, 1)]
    set_gates(model[4], closed_at(4, []))
    x = torch.randn(2, 3, 9, 9)
    c = check_same(model, x, rel_err)
    assert conv_shapes(c) == want
    # summary counts the compacted conv with its new groups
    s = summary(model, input_shape=(1, 3, 9, 9))
    new = c[2]
    assert s.layers[1].flops_after == new.out_channels * 49 * (2 * new.in_channels // new.groups * 9)
    assert s.totals()["params_after"] == sum(p.numel() for m in weight_layers(c) for p in m.parameters())


def test_grouped_convs_in_a_row_remove_groups_together(rel_err):
    """groups=2 then groups=4: groups 0 and 1 of the second conv read group 0 of the first, so they can
    only go together; groups=4 then groups=2: each group of the second reads two whole groups of the first."""
    def chain(g1, g2, unread):
        model = nn.Sequential(l0k.L0Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=g1), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, padding=1, groups=g2), nn.Tanh(), nn.Conv2d(8, 3, 1))
        set_gates(model[0], closed_at(8, []))
        with torch.no_grad():
            model[6].weight[:, unread] = 0
        return check_same(model, torch.randn(2, 3, 6, 6), rel_err)

    torch.manual_seed(30)
    # second conv's group 0 unread, group 1 read: both stay
    assert conv_shapes(chain(2, 4, [0, 1])) == [(3, 8, 1), (8, 8, 2), (8, 8, 4), (8, 3, 1)]
    # its groups 0 and 1 unread: they go, then the first conv's group 0, then the producer's channels 0-3
    assert conv_shapes(chain(2, 4, [0, 1, 2, 3])) == [(3, 4, 1), (4, 4, 1), (4, 4, 2), (4, 3, 1)]
    assert conv_shapes(chain(4, 2, [0, 1, 2, 3])) == [(3, 4, 1), (4, 4, 2), (4, 4, 1), (4, 3, 1)]
    assert conv_shapes(chain(4, 2, [0, 1, 2])) == [(3, 8, 1), (8, 8, 4), (8, 8, 2), (8, 3, 1)]


def test_grouped_first_layer_drops_groups_through_input_selection(rel_err):
    """A grouped first layer drops an unneeded group with its input block: the model input loses those
    channels through the input-selection step."""
    torch.manual_seed(31)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), l0k.L0Conv2d(8, 3, 1))
    set_gates(model[2], closed_at(3, []))
    with torch.no_grad():
        model[2].weight[:, :4] = 0
    c = check_same(model, torch.randn(2, 4, 6, 6), rel_err)
    assert conv_shapes(c) == [(2, 4, 1), (4, 3, 1)]
    assert c[0].index.tolist() == [2, 3]


def test_random_sparsity_grouped_convs(rel_err):
    torch.manual_seed(32)
    acts = [nn.ReLU, nn.Sigmoid, nn.GELU, nn.Tanh, nn.SiLU]
    removed_groups = 0
    for trial in range(16):
        c1, mult = 8, 1 + trial % 2
        g = (1, 2, 4, 8)[trial % 4] if trial % 8 else 8
        act = acts[trial % len(acts)]
        pad = (trial // 2) % 2
        layers = [l0k.L0Conv2d(3, c1, 3, padding=1, bias=trial % 3 != 0)]
        if trial % 3 == 1:
            layers.append(nn.BatchNorm2d(c1))
        layers += [act(), l0k.L0Conv2d(c1, c1 * mult, 3, padding=pad, groups=g, bias=trial % 5 != 0)]
        if trial % 2 == 0:
            layers.append(nn.BatchNorm2d(c1 * mult))
        grouped_next = trial % 4 == 3  # then the next conv reads every input of its (kept) groups
        layers += [act(), nn.Conv2d(c1 * mult, 6, 1, groups=2 if grouped_next else 1), nn.ReLU(),
                   nn.AdaptiveAvgPool2d(2), nn.Flatten(), l0k.L0Linear(6 * 4, 5, gate="in")]
        model = nn.Sequential(*layers)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                randomize_bn(m)
        grouped = [m for m in model if isinstance(m, l0k.L0Conv2d) and m.groups > 1]
        for m in model.modules():
            if isinstance(m, (l0k.L0Linear, l0k.L0Conv2d)):
                closed = random_closed(m, 0.2 + 0.03 * trial)
                if m in grouped:  # close some whole groups too
                    blocks = closed.view(m.groups, -1)
                    blocks[torch.rand(m.groups) < 0.4] = True
                    set_gates(m, closed)
        dtype = torch.float64 if trial % 2 else torch.float32
        c = check_same(model.to(dtype), torch.randn(3, 3, 7, 7, dtype=dtype), rel_err, tol=1e-5)
        for m, new in zip(model, c):
            if m in grouped:
                open_groups = int((m.deterministic_gates().view(m.groups, -1) > 0).any(1).sum())
                if not grouped_next:  # groups with every output closed go (their outputs are constants)
                    assert new.groups <= max(open_groups, 1)
                assert new.in_channels == new.groups * (m.in_channels // m.groups)
                assert new.out_channels == new.groups * (m.out_channels // m.groups)
                removed_groups += m.groups - new.groups
    assert removed_groups > 0


# -- device and dtype: every tensor compact()/summary() create follows the model's parameters --------------
#
# Without a GPU, ``with torch.device("meta"):`` stands in for one: a tensor made without an explicit device
# lands on ``meta`` and fails when combined with the (CPU) model's tensors, or shows up as a meta tensor in
# the result. A device-correct compact() gives the same result with or without the context.

def _mixed_model():
    """Convs (padded, unpadded, grouped with a closed group, a plain one with an unread output), BatchNorm2d,
    padded AvgPool, PReLU, MaxPool, Flatten, Linear out/weight/in gates, sigmoid constants, BatchNorm1d,
    GELU, Dropout: the forward constants, backward folds, tie-sets and BatchNorm slicing of compact()."""
    model = nn.Sequential(
        l0k.L0Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        l0k.L0Conv2d(8, 8, 3, groups=4), nn.Sigmoid(), nn.AvgPool2d(3, 1, padding=1),
        nn.Conv2d(8, 6, 1), nn.PReLU(), nn.MaxPool2d(2), nn.Flatten(),
        l0k.L0Linear(6 * 9, 12, gate="out"), nn.Sigmoid(), nn.BatchNorm1d(12),
        l0k.L0Linear(12, 10, gate="weight"), nn.GELU(), nn.Dropout(0.2),
        l0k.L0Linear(10, 4, gate="in"))
    randomize_bn(model[1])
    randomize_bn(model[12])
    for m in model.modules():
        if isinstance(m, (l0k.L0Linear, l0k.L0Conv2d)):
            random_closed(m, 0.4)
    with torch.no_grad():
        model[3].log_alpha[2:4] = CLOSED  # a whole group of the grouped conv
        model[6].weight[:, 5] = 0  # an unread grouped-conv output
    return model.eval()


def _mixed_input(dtype=torch.float32, device="cpu", batch=3):
    return torch.randn(batch, 3, 8, 8, dtype=dtype, device=device)


def _assert_on(model, device, dtype):
    device = torch.device(device)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == device.type and (device.index is None or t.device.index == device.index), \
            (name, t.device)
        if t.is_floating_point():
            assert t.dtype == dtype, (name, t.dtype)


def _assert_same_modules(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].device == sb[k].device and sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    assert [repr(m) for m in a.modules()] == [repr(m) for m in b.modules()]


def _compact_under_meta(model, x, rel_err):
    """compact() under a ``meta`` default device equals compact() without it, on the CPU, same outputs."""
    with torch.no_grad():
        ref = model(x)
    c_ref = compact(model)
    with torch.device("meta"):
        c_meta = compact(model)
    _assert_on(c_meta, "cpu", torch.float32)
    _assert_same_modules(c_meta, c_ref)
    with torch.no_grad():
        assert rel_err(c_meta(x), ref) < TOL[torch.float32]
    return c_meta


def test_compact_under_meta_default_device_is_unchanged(rel_err):
    """Every tensor compact() makes is on the model's device: a default device of ``meta`` changes nothing."""
    torch.manual_seed(40)
    model = _mixed_model()
    c_meta = _compact_under_meta(model, _mixed_input(), rel_err)
    # the compact result really removed something (else the check above proves little)
    n_before = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight") and m.weight is not None)
    n_after = sum(m.weight.numel() for m in c_meta.modules() if hasattr(m, "weight") and m.weight is not None)
    assert n_after < n_before


@pytest.mark.parametrize("build", ["lenet", "grouped", "mlp"])
def test_compact_under_meta_default_device_other_models(build, rel_err):
    torch.manual_seed(41)
    if build == "lenet":
        model = LeNet5()
        x = torch.randn(2, 1, 28, 28)
    elif build == "grouped":
        model = nn.Sequential(l0k.L0Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Tanh(), nn.Conv2d(8, 3, 1))
        with torch.no_grad():
            model[6].weight[:, :4] = 0
        x = torch.randn(2, 3, 6, 6)
    else:
        model = nn.Sequential(l0k.L0Linear(7, 5, gate="out"), nn.Sigmoid(), l0k.L0Linear(5, 3, gate="in"))
        x = torch.randn(4, 7)
    for m in model.modules():
        if isinstance(m, (l0k.L0Linear, l0k.L0Conv2d)):
            random_closed(m, 0.5)
    model.eval()
    _compact_under_meta(model, x, rel_err)


def test_summary_under_meta_default_device_is_unchanged():
    """summary() first under meta, on a model that has not run in eval mode yet: its recording forward (the
    eval path, gates not cached) must not take tensors from the default device either."""
    torch.manual_seed(42)
    model = _mixed_model()
    with torch.device("meta"):
        s_meta = summary(model, input_shape=(1, 3, 8, 8))
        s_meta_no_shape = summary(model)
    s_ref = summary(model, input_shape=(1, 3, 8, 8))
    assert s_meta.compacted and s_meta.layers == s_ref.layers
    assert str(s_meta) == str(s_ref)
    assert s_meta.totals()["flops_after"] is not None
    assert s_meta_no_shape.compacted
    assert [l.params_after for l in s_meta_no_shape.layers] == [l.params_after for l in s_ref.layers]
    # the unsupported-graph fallback too
    model2 = nn.Sequential(DataDependent(), Residual())
    random_closed(model2[0].fc, 0.5)
    with torch.device("meta"):
        s2 = summary(model2)
    assert not s2.compacted and s2.layers == summary(model2).layers


def _check_outputs(c, model, x, rel_err):
    """The compacted model against a float64 CPU copy of ``model`` (docs/design.md §6: TOL of x's dtype) and
    against the eval model itself in x's dtype and on its device (both are within TOL of the float64 one:
    2 * TOL)."""
    dtype = x.dtype
    with torch.no_grad():
        ref = model(x)
        ref64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)(x.cpu().double())
        y = c(x)
    assert y.dtype == dtype and y.device == x.device
    assert rel_err(y.cpu(), ref64) < TOL[dtype]
    assert rel_err(y, ref) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_compact_keeps_model_dtype(dtype, rel_err):
    """float64, float32 and bfloat16 models compact to models of the same dtype whose output matches the eval
    model within the dtype's tolerance; the default device is meta, so nothing may come from it."""
    torch.manual_seed(43)
    model = _mixed_model().to(dtype)
    x = _mixed_input(dtype, batch=16)
    with torch.device("meta"):
        c = compact(model)
    _assert_on(c, "cpu", dtype)
    _check_outputs(c, model, x, rel_err)
    s = summary(model, input_shape=(1, 3, 8, 8))
    assert s.totals()["params_after"] == sum(p.numel() for m in weight_layers(c) for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compact_gates_match_eval_path_at_threshold(dtype, rel_err):
    """Gates come from the eval path's computation (its dtype, its kernel): a log_alpha right at the closed
    threshold is open or closed in compact() exactly as in the eval forward."""
    torch.manual_seed(44)
    layer = l0k.L0Linear(64, 6, gate="in").to(dtype)
    thr = layer.cfg.closed_threshold
    with torch.no_grad():
        # values straddling the threshold by a few ulps of the model dtype
        ulp = torch.finfo(dtype).eps * abs(thr)
        la = thr + ulp * torch.arange(-32, 32, dtype=torch.float64)
        layer.log_alpha.copy_(la.to(dtype))
    model = nn.Sequential(layer).eval()
    # the eval forward's gates: z_eval in the gate compute dtype, not rounded to the model dtype
    z = eval_gates_and_grad(layer.log_alpha.detach(), layer.cfg, need_grad=False)[0]
    assert 0 < int((z > 0).sum()) < 64  # the set straddles the threshold
    x = torch.randn(5, 64, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
    with torch.device("meta"):
        c = compact(model)
    open_ = z > 0
    # the closed inputs go through the input selection; the columns are the eval model's folded weights exactly
    assert c[0].index.tolist() == open_.nonzero().flatten().tolist()
    w = c[1].weight
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    assert z.dtype == cd
    want = (layer.weight.detach().to(cd) * z).to(dtype)
    assert torch.equal(w, want[:, open_])
    with torch.no_grad():
        assert rel_err(c(x), ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compact_on_cuda(dtype, rel_err):
    """A model on the GPU compacts to a model on the GPU in its dtype, with the structure the same model gets
    on the CPU, and outputs matching the eval model (TF32 off: float32 tolerances)."""
    torch.manual_seed(45)
    dev = torch.device("cuda", torch.cuda.current_device())
    cpu_model = _mixed_model()
    model = copy.deepcopy(cpu_model).to(device=dev, dtype=dtype)
    x = _mixed_input(dtype, dev, batch=16)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        c = compact(model)
        _assert_on(c, dev, dtype)
        _check_outputs(c, model, x, rel_err)
        c_cpu = compact(cpu_model.to(dtype))
        assert [repr(m) for m in c.modules()] == [repr(m) for m in c_cpu.modules()]
        with torch.device("meta"):
            c_meta = compact(model)
        _assert_on(c_meta, dev, dtype)
        s = summary(model, input_shape=(1, 3, 8, 8))
        assert s.compacted
        assert s.totals()["params_after"] == sum(p.numel() for m in weight_layers(c) for p in m.parameters())
        assert [l.params_after for l in s.layers] == [l.params_after for l in summary(cpu_model).layers]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_compacted_model_shares_no_tensor_with_the_model():
    """compact() works on a copy that shares the model's tensors (memory); its result owns all of its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    l0k.convert(model, include=["3"])
    with torch.no_grad():
        model[3].log_alpha[:4] = -10.0
    model.eval()
    x = torch.randn(4, 6)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    small = l0k.compact(model, x)
    mine = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.numel()}
    assert not [n for n, t in list(small.named_parameters()) + list(small.named_buffers()) if t.data_ptr() in mine]
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())
