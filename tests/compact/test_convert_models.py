"""convert() on models it did not write: layers whose parent reads their weights directly (found by running the
model), transformers' Conv1D (GPT-2), tied weights (kept tied by convert and compact), include matching nothing."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l0kernels as l0k


class DirectRead(nn.Module):
    """Reads ``qkv.weight`` itself (as attention implementations with fused kernels do): gates on ``qkv``
    would never act."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(F.linear(x, self.qkv.weight, self.qkv.bias)[..., :8])


def _direct_model():
    torch.manual_seed(0)
    return nn.Sequential(DirectRead(), nn.ReLU(), nn.Linear(8, 3))


def _kinds(model):
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (nn.Linear, l0k.L0Linear))}


def test_a_directly_read_layer_is_left_with_a_warning():
    model, x = _direct_model(), torch.randn(4, 8)
    before = model(x)
    with pytest.warns(UserWarning, match=r"'0\.qkv' \(weight\)"):
        l0k.convert(model, example_inputs=x)
    assert _kinds(model) == {"0.qkv": "Linear", "0.proj": "L0Linear", "2": "L0Linear"}
    assert model.training  # the probe ran in eval mode and put the modes back
    model.eval()
    assert torch.equal(model(x), before)


def test_a_directly_read_layer_named_by_include_raises_and_changes_nothing():
    model, x = _direct_model(), torch.randn(4, 8)
    kinds = _kinds(model)
    with pytest.raises(ValueError, match=r"'0\.qkv'"):
        l0k.convert(model, include=["0.qkv", "2"], example_inputs=x)
    assert _kinds(model) == kinds


def test_a_failing_probe_changes_nothing():
    model, wrong = _direct_model(), torch.randn(4, 5)  # wrong width: the example run fails
    kinds = _kinds(model)
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError):
        l0k.convert(model, droprate_init=0.3, example_inputs=wrong)
    assert _kinds(model) == kinds
    assert torch.equal(torch.get_rng_state(), state)


class NeedsTwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = DirectRead()

    def forward(self, x, scale):
        return self.inner(x) * scale


def test_without_example_inputs_an_input_is_made():
    """No inputs: convert makes one as compact() does (a batch for a first Linear) and finds the direct read;
    a model that runs on no made input is converted unchecked."""
    model = _direct_model()
    with pytest.warns(UserWarning, match=r"'0\.qkv' \(weight\)"):
        l0k.convert(model)
    assert _kinds(model) == {"0.qkv": "Linear", "0.proj": "L0Linear", "2": "L0Linear"}
    model = NeedsTwoInputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        l0k.convert(model)
    assert isinstance(model.inner.qkv, l0k.L0Linear)


def test_include_matching_nothing_warns():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="matched no"):
        l0k.convert(model, include="decoder.*")
    l0k.convert(model, include="0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        l0k.convert(model, include="0")  # already converted: matched, nothing to do, no warning


# -- transformers models ------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _gpt2(tie=True):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_gpt2_conv1d_layers_are_gated():
    model = _gpt2()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    l0k.convert(model, example_inputs=(ids,))
    gated = [n for n, m in model.named_modules() if isinstance(m, l0k.L0Linear)]
    assert len(gated) == 8 and all(n.split(".")[-1] in ("c_attn", "c_proj", "c_fc") for n in gated)
    assert isinstance(model.lm_head, nn.Linear)  # tied to the embedding: left alone
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    model.train()
    loss = model(ids, labels=ids).loss + l0k.l0_penalty(model) * 1e-3
    loss.backward()
    assert all(m.log_alpha.grad is not None for m in model.modules() if isinstance(m, l0k.L0Linear))


def test_gpt2_compact_keeps_the_tie_and_never_grows():
    model = _gpt2()
    dense = _params(model)
    ids = torch.randint(0, 64, (2, 9))
    l0k.convert(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, l0k.L0Linear):
                m.log_alpha[torch.rand(m.log_alpha.shape, generator=g) < 0.4] = -10.0
        ref = model(ids).logits
    small = l0k.compact(model)
    assert type(small) is type(model)
    assert small.lm_head.weight is small.transformer.wte.weight
    assert _params(small) <= dense
    with torch.no_grad():
        out = small(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_tied_layer_named_by_include_raises():
    model = _gpt2()
    with pytest.raises(ValueError, match="tied"):
        l0k.convert(model, include="lm_head")


def test_untied_gpt2_head_is_gated():
    model = _gpt2(tie=False)
    l0k.convert(model)
    assert isinstance(model.lm_head, l0k.L0Linear)


class _TiedByHand(nn.Module):
    """An L0 output layer sharing its weight with an embedding, built by hand (convert would not gate it)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = l0k.L0Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight
        with torch.no_grad():
            self.head.log_alpha.fill_(3.0)  # every gate exactly open

    def forward(self, ids):
        return self.head(self.emb(ids).relu())


def test_compact_reties_an_open_gated_tied_layer():
    torch.manual_seed(3)
    model = _TiedByHand().eval()
    ids = torch.randint(0, 10, (3, 4))
    small = l0k.compact(model, example_inputs=(ids,))
    weights = {id(p) for p in small.parameters()}
    assert _params(small) <= _params(model) and len(weights) == 1
    assert torch.allclose(small(ids), model(ids))


def test_compact_refuses_to_untie():
    torch.manual_seed(4)
    model = _TiedByHand().eval()
    with torch.no_grad():
        model.head.log_alpha[2] = -10.0  # one input closed: the head's weight changes, the embedding's does not
    with pytest.raises(ValueError, match="tied"):
        l0k.compact(model, example_inputs=(torch.randint(0, 10, (3, 4)),))
