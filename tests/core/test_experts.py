"""Structure gates on routed experts (l0kernels/experts.py, docs/design.md §11): one gate per hidden unit of every
expert of the transformers MoE families (experts held as 3-D Parameters), against a float64 reference written out
here (every token through each expert it is routed to, the hidden activation times the unit's gate)."""
import copy
import math

import pytest
import torch

import l0kernels as l0k
from l0kernels.experts import ExpertGate

transformers = pytest.importorskip("transformers")
import _model_zoo as zoo  # noqa: E402
from conftest import zoo_model  # noqa: E402

FAMILIES = ["mixtral", "qwen3-moe"]


def _build(name):
    model, inputs = zoo_model(name)
    return model.float(), inputs


def _experts(model):
    return [m for _, m in model.named_modules() if isinstance(getattr(m, "l0_gate", None), ExpertGate)]


def _reference(mod, x, top_k_index, top_k_weights, z):
    """float64: sum over a token's experts of weight * down(act(gate x) * (up x) * z)."""
    gu, dn = mod.gate_up_proj.double(), mod.down_proj.double()
    e_count, f = dn.shape[0], dn.shape[2]
    z = z.view(e_count, f)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for k in range(top_k_index.shape[1]):
        for e in range(e_count):
            sel = top_k_index[:, k] == e
            if not bool(sel.any()):
                continue
            g, u = (x[sel].double() @ gu[e].T).chunk(2, -1)
            h = mod.act_fn(g) * u * z[e]
            out = out.index_add(0, sel.nonzero().flatten(), (h @ dn[e].T) * top_k_weights[sel, k, None].double())
    return out


def _random_gates(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _experts(model):
            la = torch.empty(m.l0_gate.log_alpha.shape).uniform_(-4, 4, generator=g)
            m.l0_gate.log_alpha.copy_(la)


@pytest.mark.parametrize("path", ["gather", "scaled"])
@pytest.mark.parametrize("name", FAMILIES)
def test_expert_gates_match_reference(name, path, monkeypatch):
    """Training: the experts' output and the gradients of their 3-D Parameters and of log_alpha equal the float64
    reference with the same draw; a closed unit's rows and column get exactly zero gradient. Both paths: each
    expert's open units gathered, or the module's own forward with the down columns times the gates."""
    from l0kernels import _active
    monkeypatch.setattr(_active, "DENSE_ABOVE", 1.0 if path == "gather" else 0.0)
    model, inputs = _build(name)
    l0k.convert(model, structure="ffn")
    experts = _experts(model)
    assert len(experts) == model.config.num_hidden_layers
    _random_gates(model, 1)
    seen = {}
    for mod in experts:
        mod.register_forward_hook(lambda m, args, out, seen=seen: seen.setdefault(id(m), (args, out)) and None)
        orig = type(mod.l0_gate).state
        mod.l0_gate.state = lambda g=mod.l0_gate, orig=orig: seen.setdefault(("st", id(g)), orig(g))
    model.train()
    torch.manual_seed(5)
    zoo.main_output(model(*inputs))
    for mod in experts:
        (x, idx, w), y = seen[id(mod)]
        st = seen[("st", id(mod.l0_gate))]
        assert st.seed is not None
        la = mod.l0_gate.log_alpha.detach().double().requires_grad_(True)
        z = l0k.sample_gates(la, st.seed)
        assert torch.equal(z == 0, st.z.detach() == 0)  # the same draw
        params = [mod.gate_up_proj, mod.down_proj]
        leaves = [p.detach().double().requires_grad_(True) for p in params]
        ref_mod = copy.copy(mod)
        ref_mod.__dict__["_parameters"] = {"gate_up_proj": leaves[0], "down_proj": leaves[1]}
        ref = _reference(ref_mod, x.detach(), idx, w.detach(), z)
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
        # gradients of this module's parameters for the upstream gradient y got
        gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        got = torch.autograd.grad(y, params + [mod.l0_gate.log_alpha], gy.float(), retain_graph=True)
        want = torch.autograd.grad(ref, leaves + [la], gy)
        for n, a, b in zip(("gate_up_proj", "down_proj", "log_alpha"), got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
        e_count, f = mod.l0_gate.experts_shape
        closed = (st.z.detach() == 0).view(e_count, f)
        assert bool((got[1].permute(0, 2, 1)[closed] == 0).all())
        assert bool((got[0][:, :f][closed] == 0).all()) and bool((got[0][:, f:][closed] == 0).all())


@pytest.mark.parametrize("name", FAMILIES)
def test_open_expert_gates_compute_what_the_model_computed(name):
    model, inputs = _build(name)
    base = copy.deepcopy(model)
    l0k.convert(model, structure="ffn")
    with torch.no_grad():
        for m in _experts(model):
            m.l0_gate.log_alpha.fill_(10.0)
    assert torch.equal(zoo.main_output(model(*inputs)), zoo.main_output(base(*inputs)))


def test_expert_counts_and_regularizer():
    model, inputs = _build("mixtral")
    total = sum(p.numel() for p in model.parameters())
    l0k.convert(model, structure="ffn")
    mod = _experts(model)[0]
    g = mod.l0_gate
    e_count, f = g.experts_shape
    h = model.config.hidden_size
    assert g.log_alpha.numel() == e_count * f and torch.all(g.params_per_gate == 3 * h) and g.ungated_params == 0
    assert set(map(id, g.counted_parameters())) == {id(mod.gate_up_proj), id(mod.down_proj)}
    with torch.no_grad():
        for m in _experts(model):
            m.l0_gate.log_alpha.fill_(20.0)
    assert float(l0k.expected_params(model)) == pytest.approx(total, rel=1e-6)
    _random_gates(model, 3)
    lam, wd, n = 0.3, 1e-2, 50
    p = g.prob_open().double().view(e_count, f)
    sq = (mod.gate_up_proj.double().square().sum(2).view(e_count, 2, f).sum(1)
          + mod.down_proj.double().square().sum(1))
    want = ((p * (lam * 3 * h + 0.5 * wd * sq)).sum() / n).item()
    assert float(g.regularizer(lam, wd, n)) == pytest.approx(want, rel=1e-5)
    target = l0k.SparsityTarget(model, 0.5, metric="params")
    total_weights = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("log_alpha"))
    assert target.expected() == pytest.approx(float(l0k.expected_params(model)) / total_weights, rel=1e-6)
    assert math.isfinite(float(target.penalty()))
    assert math.isfinite(float(l0k.l0_regularizer(model, 0.1, 1e-3, 10)))


@pytest.mark.parametrize("name", FAMILIES)
def test_compact_packs_each_experts_open_units(name, tmp_path):
    """compact(): the gates folded, each expert's open units first and every expert cut to the most any keeps
    (rounded up to ALIGN): exact, the class kept, fewer parameters, save_compact / load_compact round-trip."""
    from l0kernels.experts import ALIGN
    model, inputs = _build(name)
    l0k.convert(model, structure="ffn")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in _experts(model):
            la = torch.where(torch.rand(m.l0_gate.log_alpha.shape, generator=g) < 0.5, -10.0, 10.0)
            m.l0_gate.log_alpha.copy_(la)
    keeps = [int((m.l0_gate.eval_gates() != 0).view(m.l0_gate.experts_shape).sum(1).max()) for m in _experts(model)]
    rows = [r for r in l0k.summary(model, example_inputs=inputs[0]).layers if r.gate == "ffn:experts"]
    small = l0k.compact(model, inputs[0])
    assert type(small) is type(model)
    assert [r.params_after for r in rows] == [
        sum(p.numel() for p in layer.mlp.experts.parameters()) for layer in small.model.layers]
    assert l0k.compare(model, small, inputs[0])["norm_rel"] <= 1e-5
    for layer, keep in zip(small.model.layers, keeps):
        ex = layer.mlp.experts
        assert not isinstance(getattr(ex, "l0_gate", None), ExpertGate) and "forward" not in ex.__dict__
        assert ex.down_proj.shape[2] == min(-(-keep // ALIGN) * ALIGN, model.config.intermediate_size
                                            if name == "mixtral" else model.config.moe_intermediate_size)
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for n, p in model.named_parameters() if "log_alpha" not in n)
    l0k.save_compact(small, tmp_path)
    back = l0k.load_compact(tmp_path)
    assert torch.equal(zoo.main_output(back(*inputs)), zoo.main_output(small(*inputs)))


def test_experts_include_exclude_and_refusal():
    model, inputs = _build("mixtral")
    l0k.convert(copy.deepcopy(model), structure="ffn")  # the model itself untouched below
    m1 = copy.deepcopy(model)
    l0k.convert(m1, structure="ffn", include="model.layers.0.*")
    assert len(_experts(m1)) == 1
    m2 = copy.deepcopy(model)
    l0k.convert(m2, structure="ffn", exclude="*.experts")
    assert not _experts(m2)
    m3 = copy.deepcopy(model)
    m3.model.layers[1].mlp.experts._is_expert_parallel = True  # each process would hold part of the experts
    l0k.convert(m3, structure="ffn")
    assert len(_experts(m3)) == 1
    m4 = copy.deepcopy(model)
    m4.model.layers[1].mlp.experts._is_expert_parallel = True
    with pytest.raises(ValueError, match="expert parallel"):
        l0k.convert(m4, structure="ffn", include="model.layers.1.mlp.experts")
    assert not _experts(m4)  # a failed call changes nothing
    from l0kernels.experts import experts_refusal
    ex = copy.deepcopy(model.model.layers[0].mlp.experts)
    assert experts_refusal(ex) is None and experts_refusal(model.model.layers[0].mlp) == ""
    ex.has_post_expert_norm = True
    assert "norm" in experts_refusal(ex)


def test_default_convert_gates_expert_units():
    """``convert(model)`` (input gates) gives routed experts their unit gates too: a unit is the down projection's
    input, as a linear layer's input feature is; other gate kinds leave them ungated."""
    model, inputs = _build("mixtral")
    m1 = copy.deepcopy(model)
    l0k.convert(m1)
    assert len(_experts(m1)) == model.config.num_hidden_layers
    assert any(isinstance(m, l0k.L0Linear) for m in m1.modules())
    for kw in (dict(gate="out"), dict(group_size=2), dict(noise="sample")):
        m2 = copy.deepcopy(model)
        l0k.convert(m2, **kw)
        assert not _experts(m2), kw
    m3 = copy.deepcopy(model)
    l0k.convert(m3, include="*.experts")
    assert len(_experts(m3)) == model.config.num_hidden_layers
    assert not any(isinstance(m, l0k.L0Linear) for m in m3.modules())
