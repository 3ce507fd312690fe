"""l0k.convert (docs/design.md §8): gates put into existing models, in place."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l0kernels as l0k
from l0kernels import L0Conv2d, L0Linear


def _cnn(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding="valid", bias=False), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding="same", groups=3), nn.ReLU(),
        nn.Flatten(), nn.Linear(12 * 3 * 3, 10))


class Block(nn.Module):
    """A small pre-norm transformer block with hand-written attention (heads in the projections)."""

    def __init__(self, d=16, heads=4, ffn=24):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.gate_proj = nn.Linear(d, ffn), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate_proj(h)) * self.up(h))


def _randomize_bn(model, gen):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.mark.parametrize("gate", ["in", "out", "weight"])
def test_cnn_equals_original_in_eval(gate):
    gen = torch.Generator().manual_seed(1)
    model = _cnn(gen)
    _randomize_bn(model, gen)
    ref = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    out = l0k.convert(model, gate=gate)
    assert out is model
    kinds = [type(m) for m in model]
    assert kinds.count(L0Conv2d) == 3 and kinds.count(L0Linear) == 1
    assert model[-1].gate == gate
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert torch.equal(model(x), ref(x))  # the differentiable eval path too
    # padding strings were translated
    assert model[3].padding == (0, 0) and model[5].padding == (1, 1) and model[5].groups == 3


def test_transformer_block_equals_original_and_grouped_heads():
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    block = Block()
    ref = copy.deepcopy(block).eval()
    x = torch.randn(3, 5, 16, generator=gen)
    l0k.convert(block, include="o", group_size=4)  # one gate per head (head_dim 4) on o's inputs
    l0k.convert(block, include="down")  # FFN units
    assert isinstance(block.o, L0Linear) and block.o.group_size == 4 and block.o.log_alpha.shape == (4,)
    assert isinstance(block.down, L0Linear) and block.down.log_alpha.shape == (24,)
    assert not isinstance(block.q, L0Linear)
    block.eval()
    with torch.no_grad():
        assert torch.equal(block(x), ref(x))
        # closing head 1 zeroes o's input columns 4..7 only
        block.o.log_alpha[1] = -10.0
        want = ref.o.weight.clone()
        want[:, 4:8] = 0
        ref.o.weight.copy_(want)
        torch.testing.assert_close(block(x), ref(x), rtol=1e-6, atol=1e-6)


def test_include_exclude_forms_and_idempotence():
    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)))

    def converted(m):
        return [n for n, mod in m.named_modules() if isinstance(mod, L0Linear)]

    assert converted(l0k.convert(make())) == ["0", "2.0", "2.1"]
    assert converted(l0k.convert(make(), include="2.*")) == ["2.0", "2.1"]
    assert converted(l0k.convert(make(), include=["0", "2.1"])) == ["0", "2.1"]
    assert converted(l0k.convert(make(), exclude="2.1")) == ["0", "2.0"]
    assert converted(l0k.convert(make(), include=lambda n, m: m.out_features == 6, exclude=["0"])) == ["2.0"]
    assert converted(l0k.convert(make(), include="nothing")) == []
    m = l0k.convert(make(), include="0")
    first = m[0]
    la = first.log_alpha.detach().clone()
    l0k.convert(m, gate="out")  # second call: layer 0 is left alone, the others get output gates
    assert m[0] is first and torch.equal(m[0].log_alpha, la) and m[0].gate == "in"
    assert m[2][0].gate == "out"
    # the root itself
    lin = nn.Linear(3, 2)
    new = l0k.convert(lin)
    assert isinstance(new, L0Linear) and new.weight is lin.weight


def test_same_parameters_optimizer_and_tied_weights():
    torch.manual_seed(4)
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight  # tied
    shared = nn.Linear(6, 6)
    model = nn.ModuleDict({"emb": emb, "a": shared, "b": shared, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w_before = shared.weight
    l0k.convert(model, gate="out")
    assert model["a"] is model["b"] and isinstance(model["a"], L0Linear)  # shared module: one L0 layer
    assert model["a"].weight is w_before
    assert model["head"].weight is model["emb"].weight  # tying survives
    # the optimizer built before the conversion still updates the layer's weight
    x = torch.randint(0, 10, (4,))
    before = model["head"].weight.detach().clone()
    model["head"](model["b"](model["a"](model["emb"](x)))).sum().backward()
    opt.step()
    assert not torch.equal(model["head"].weight.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_dtype_and_open_gates(dtype):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(7, 5), nn.Conv2d(1, 3, 1)).to(dtype)
    l0k.convert(model, group_size=1)
    for m in model:
        assert m.log_alpha.dtype == dtype and m.log_alpha.device == m.weight.device
        assert bool((m.deterministic_gates() == 1).all())  # z_eval exactly 1
        assert float(m.log_alpha.detach().float().min()) > m.cfg.open_threshold
        assert not m.log_alpha.is_meta
    # droprate_init given: the contract's (docs/design.md) initialisation (z_eval ~ 0.5 at p = 0.5)
    m2 = l0k.convert(nn.Sequential(nn.Linear(7, 5)), droprate_init=0.5)[0]
    assert float(m2.log_alpha.abs().max()) < 0.1
    # training mode flag is kept
    lin = nn.Linear(3, 3).eval()
    assert not l0k.convert(lin).training


def test_penalty_at_open_init():
    model = l0k.convert(nn.Sequential(nn.Linear(8, 4)))
    p = float(l0k.l0_penalty(model))
    assert p == pytest.approx(8 / (1 + math.exp(-(3.0 - 2 / 3 * math.log(0.1 / 1.1)))), rel=1e-6)


def test_errors_name_the_module_and_leave_the_model_unchanged():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(3, 4, 3, padding_mode="reflect"))
    with pytest.raises(ValueError, match="module '1'.*padding_mode"):
        l0k.convert(model)
    assert type(model[0]) is nn.Linear  # nothing replaced
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5))
    with pytest.raises(ValueError, match="module '1'.*group_size"):
        l0k.convert(model, gate="out", group_size=2)  # 5 output features
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="group_size must be 1 for gate='weight'"):
        l0k.convert(nn.Linear(4, 4), gate="weight", group_size=2)
    with pytest.raises(ValueError, match="gate"):
        l0k.convert(model, gate="rows")
    with pytest.raises(TypeError, match="include"):
        l0k.convert(model, include=3)
    with pytest.raises(TypeError, match="model"):
        l0k.convert("model")
    with pytest.raises(ValueError, match="droprate_init"):
        l0k.convert(model, droprate_init=1.0)
    with pytest.raises(ValueError, match="module '0'.*lazy"):
        l0k.convert(nn.Sequential(nn.LazyLinear(3)))
    with pytest.raises(ValueError, match="padding='same'"):
        l0k.convert(nn.Conv2d(2, 2, 2, padding="same"))


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class PlainSub(nn.Linear):
    pass


def test_subclasses_and_multihead_attention():
    torch.manual_seed(7)
    model = nn.Sequential(MyLinear(4, 4), PlainSub(4, 4))
    l0k.convert(model)
    assert type(model[0]) is MyLinear and isinstance(model[1], L0Linear)  # own forward: skipped
    with pytest.raises(ValueError, match="module '0'.*overrides Linear.forward"):
        l0k.convert(nn.Sequential(MyLinear(4, 4)), include="0")
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    wrapper = nn.Sequential(mha)
    l0k.convert(wrapper)
    assert type(mha.out_proj) is not L0Linear  # MHA reads out_proj.weight directly: skipped
    with pytest.raises(ValueError, match="MultiheadAttention"):
        l0k.convert(wrapper, include="0.out_proj")


def test_transformer_encoder_layer_fast_path_stays_off():
    torch.manual_seed(8)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 5, 16)
    l0k.convert(layer)  # linear1 / linear2 (self_attn.out_proj is skipped)
    assert isinstance(layer.linear1, L0Linear) and isinstance(layer.linear2, L0Linear)
    with torch.no_grad():
        assert torch.equal(layer(x), ref(x))
        layer.linear2.log_alpha[:20] = -10.0  # close FFN units: the fused path would ignore them
        ref.linear2.weight[:, :20] = 0
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_converted_model_trains():
    torch.manual_seed(9)
    model = l0k.convert(_cnn(torch.Generator().manual_seed(9)), group_size=2)
    x = torch.randn(4, 3, 8, 8)
    model.train()
    loss = model(x).square().mean() + 1e-3 * l0k.l0_penalty(model)
    loss.backward()
    for m in model:
        if isinstance(m, (L0Linear, L0Conv2d)):
            assert m.log_alpha.grad is not None and torch.isfinite(m.log_alpha.grad).all()
            assert m.log_alpha.shape[0] * 2 == (m.out_channels if isinstance(m, L0Conv2d) else m.in_features)


def test_convert_check_run_keeps_no_eval_plans():
    """The run that looks for bypassed layers builds eval plans (folded weights, up to the model's size again):
    convert() drops them."""
    from l0kernels.backends._plans import _CACHES
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    l0k.convert(model)
    assert not any(m in _CACHES for m in model.modules())
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 8))  # the user's own eval calls do build and keep them
    assert any(m in _CACHES for m in model.modules())
