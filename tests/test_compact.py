"""compact(model) and summary(model): plain torch.nn models with the zero-gated groups removed."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l0kernels as l0k
from l0kernels.compact import compact, summary

from conftest import TOL

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


def randomize_bn(bn):
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.normal_()
        bn.bias.normal_()


def check_same(model, x, rel_err, tol=None):
    model.eval()
    with torch.no_grad():
        ref = model(x)
        c = compact(model)
        y = c(x)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < (tol or TOL[x.dtype])
    for m in c.modules():
        assert type(m).__module__.startswith("torch.nn"), type(m)
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
    # the model input keeps its size; a layer's rows go where the next layer's input gate is closed
    assert shapes == [(6, 12), (6, 6), (3, 6)]
    assert torch.count_nonzero(c[0].weight[:, [0, 5]]) == 0  # closed input gates of layer 1: zero columns
    assert [type(m) for m in c] == [nn.Linear, nn.ReLU, nn.Linear, nn.Tanh, nn.Linear]


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
    assert isinstance(c, nn.Sequential)


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


def test_unsupported_models_raise():
    with pytest.raises(ValueError, match="add"):
        compact(nn.Sequential(l0k.L0Linear(4, 4), Residual()))
    with pytest.raises(ValueError, match="flip"):
        compact(nn.Sequential(l0k.L0Linear(4, 4), Flip(), l0k.L0Linear(4, 2)))
    with pytest.raises(ValueError, match="LSTM"):
        compact(nn.Sequential(nn.LSTM(4, 4), l0k.L0Linear(4, 2)))
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
    assert c[3].groups == 2 and c[3].out_channels == 6  # a grouped conv keeps its channels (gates folded)


def test_summary_of_unsupported_graph_counts_own_gates():
    torch.manual_seed(11)
    model = nn.Sequential(l0k.L0Linear(4, 4, gate="out"), Residual())
    random_closed(model[0], 0.5)
    random_closed(model[1].fc, 0.5)
    s = summary(model)
    assert not s.compacted and "add" in s.note
    fc = model[1].fc
    k_active = int((fc.deterministic_gates() > 0).sum())
    assert s.layers[1].params_after == 4 * k_active + 4
