"""compact() of tiny Hugging Face transformers models built from configs (no download): Llama (MHA and GQA)
and BERT. The L0 layers are put in by a local helper (the swap that ``l0k.convert`` does)."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import l0kernels as l0k
from l0kernels import compact, compare, summary

transformers = pytest.importorskip("transformers")

CLOSED = -6.0


def to_l0(model, names, gate="in"):
    """Replace the nn.Linear children called one of ``names`` by L0Linear with the same weights (gates open)."""
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child_name in names:
                layer = l0k.L0Linear(child.in_features, child.out_features, bias=child.bias is not None, gate=gate)
                with torch.no_grad():
                    layer.weight.copy_(child.weight)
                    if child.bias is not None:
                        layer.bias.copy_(child.bias)
                    layer.log_alpha.fill_(5.0)
                setattr(parent, child_name, layer)
    return model.eval()


def gates_per_head(layer, closed_heads, hd):
    """Per-feature gates equal within each head (grouped gates of group_size=hd do the same)."""
    with torch.no_grad():
        n = layer.log_alpha.numel() // hd
        la = (torch.rand(n) * 6 - 2).repeat_interleave(hd)
        for h in closed_heads:
            la[h * hd:(h + 1) * hd] = CLOSED
        layer.log_alpha.copy_(la)


def close_units(layer, closed):
    with torch.no_grad():
        la = torch.rand(layer.log_alpha.shape) * 6 - 2
        la[closed] = CLOSED
        layer.log_alpha.copy_(la)


def n_params(m):
    return sum(p.numel() for n, p in m.named_parameters() if not n.endswith("log_alpha"))


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tiny_llama(kv_heads, attn="eager"):
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=kv_heads, head_dim=4,
                                   max_position_embeddings=32, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kv_heads,attn", [(6, "eager"), (2, "sdpa"), (3, "eager")])
def test_llama(kv_heads, attn, rel_err, tmp_path):
    torch.manual_seed(kv_heads)
    model = to_l0(tiny_llama(kv_heads, attn), {"o_proj", "down_proj"})
    hd, r = 4, 6 // kv_heads
    # layer 0: heads 0..2 closed; layer 1: head 5 closed
    closed = [[0, 1, 2], [5]]
    ffn_closed = [[0, 3, 4, 7, 19], []]
    for layer, ch, fc in zip(model.model.layers, closed, ffn_closed):
        gates_per_head(layer.self_attn.o_proj, ch, hd)
        close_units(layer.mlp.down_proj, fc)
    ids = torch.randint(0, 40, (2, 7))
    ref = logits(model, ids)
    c = compact(model)
    y = logits(c, ids)
    assert rel_err(y, ref) < 1e-5
    for m in c.modules():
        assert not type(m).__module__.startswith("l0kernels")
    want_params = n_params(model)
    for layer, cl_layer, ch, fc in zip(model.model.layers, c.model.layers, closed, ffn_closed):
        groups_gone = sum(all(h in ch for h in range(g * r, g * r + r)) for g in range(kv_heads))
        q_gone = groups_gone * r
        attn = cl_layer.self_attn
        assert attn.q_proj.out_features == (6 - q_gone) * hd and attn.o_proj.in_features == (6 - q_gone) * hd
        assert attn.k_proj.out_features == (kv_heads - groups_gone) * hd == attn.v_proj.out_features
        assert cl_layer.mlp.down_proj.in_features == 20 - len(fc) == cl_layer.mlp.gate_proj.out_features
        want_params -= q_gone * hd * 24 * 2 + groups_gone * hd * 24 * 2 + len(fc) * 24 * 3
    assert n_params(c) == want_params
    assert compare(model, c, (ids,))["norm_rel"] < 1e-5
    # generation still runs on the compacted model, and torch.export takes it
    with torch.no_grad():
        c.generate(ids[:1, :3], max_new_tokens=3, do_sample=False)

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(input_ids=x, use_cache=False).logits
    ep = torch.export.export(Logits(c).eval(), (ids,))
    with torch.no_grad():
        assert rel_err(ep.module()(ids), ref) < 1e-5
    # summary: params after = the compacted layers
    s = summary(model)
    assert s.compacted
    layers = [m for m in c.modules() if isinstance(m, nn.Linear)]
    assert s.totals()["params_after"] == sum(p.numel() for m in layers for p in m.parameters())


def test_llama_loads_without_l0kernels(tmp_path, rel_err):
    torch.manual_seed(11)
    model = to_l0(tiny_llama(2), {"o_proj", "down_proj"})
    gates_per_head(model.model.layers[0].self_attn.o_proj, [0, 1, 2], 4)
    close_units(model.model.layers[1].mlp.down_proj, [1, 2])
    ids = torch.randint(0, 40, (1, 6))
    ref = logits(model, ids)
    torch.save(compact(model), tmp_path / "m.pt")
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch\n"
            "sys.modules['l0kernels'] = None\n"
            f"m = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
            f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
            "with torch.no_grad():\n"
            f"    torch.save(m(input_ids=ids).logits, {str(tmp_path / 'y.pt')!r})\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, timeout=300)
    assert rel_err(torch.load(tmp_path / "y.pt"), ref) < 1e-5


def test_llama_gate_and_up_out_gates(rel_err):
    """Closed output gates of up_proj make the product 0; closed gate_proj rows give act(0) = silu(0) = 0; a
    value head whose output gates are all closed is zero, so its head goes."""
    torch.manual_seed(12)
    model = to_l0(tiny_llama(6), {"up_proj", "gate_proj", "v_proj"}, gate="out")
    close_units(model.model.layers[0].mlp.up_proj, [1, 2, 3])
    close_units(model.model.layers[0].mlp.gate_proj, [3, 9])
    close_units(model.model.layers[1].self_attn.v_proj, [8, 9, 10, 11, 13])  # value head 2 is zero: it goes
    ids = torch.randint(0, 40, (2, 5))
    c = compact(model)
    assert rel_err(logits(c, ids), logits(model, ids)) < 1e-5
    assert c.model.layers[0].mlp.down_proj.in_features == 20 - 4
    assert c.model.layers[1].self_attn.q_proj.out_features == 20 == c.model.layers[1].self_attn.o_proj.in_features


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=6,
                                  intermediate_size=20, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def test_bert(rel_err):
    torch.manual_seed(13)
    model = tiny_bert()
    to_l0(model, {"dense"})  # attention output dense, intermediate dense, output dense: gate="in"
    hd = 4
    for layer, ch in zip(model.encoder.layer, ([1, 4], [0, 1, 2, 3, 4])):
        gates_per_head(layer.attention.output.dense, ch, hd)
        close_units(layer.output.dense, [0, 5, 6])
    # an out-gated intermediate layer: closed units are act(0) = 0 constants (folded)
    inter = model.encoder.layer[1].intermediate
    lin = inter.dense
    inter.dense = l0k.L0Linear(lin.in_features, lin.out_features, gate="out")
    with torch.no_grad():
        inter.dense.weight.copy_(lin.weight)
        inter.dense.bias.copy_(lin.bias)
    inter.dense.eval()
    close_units(inter.dense, [2, 7])
    ids = torch.randint(0, 40, (2, 6))
    ref = logits(model, ids)
    c = compact(model)
    assert rel_err(logits(c, ids), ref) < 1e-5
    a0, a1 = c.encoder.layer[0].attention, c.encoder.layer[1].attention
    assert a0.self.query.out_features == 16 and a0.self.num_attention_heads == 4 and a0.self.all_head_size == 16
    assert a1.self.value.out_features == 4 and a1.output.dense.in_features == 4
    assert c.encoder.layer[0].output.dense.in_features == 17
    assert c.encoder.layer[1].intermediate.dense.out_features == 15
    # parameters: 2 + 5 heads of 4 (q/k/v rows with bias, o columns), 3 + 5 FFN units (in row + bias, out column)
    assert n_params(c) == n_params(model) - 7 * 4 * (3 * 25 + 24) - 8 * (25 + 24)
    for m in c.modules():
        assert not type(m).__module__.startswith("l0kernels")


def test_llama_keeps_its_class_and_generates(rel_err):
    """compact() returns the model's own class: a LlamaForCausalLM still generates, with the gated model's
    tokens."""
    torch.manual_seed(14)
    model = to_l0(tiny_llama(6), {"o_proj", "down_proj"})
    for layer in model.model.layers:
        gates_per_head(layer.self_attn.o_proj, [1, 4], 4)
        close_units(layer.mlp.down_proj, [0, 3, 7])
    c = compact(model)
    assert type(c) is type(model)
    ids = torch.randint(0, 40, (1, 4))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(c.generate(ids, **kw), model.eval().generate(ids, **kw))
    assert c.model.layers[0].self_attn.q_proj.out_features == 16


def test_config_follows_sizes_one_value_describes(tmp_path, rel_err):
    """Where every layer keeps as many FFN units and heads, compact() sets the config's sizes to them
    (intermediate_size, num_attention_heads, num_key_value_heads), so save_pretrained / from_pretrained give the
    same model back; where the layers differ no single value describes them and the config stays as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=100)
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    for uniform in (True, False):
        torch.manual_seed(3)
        model = LlamaForCausalLM(cfg).eval()
        l0k.convert(model, structure=("ffn", "heads"))
        with torch.no_grad():
            for i, (_, g) in enumerate(l0k.l0_gates(model)):
                g.log_alpha.fill_(10.0)
                g.log_alpha[:30 if g.kind == "ffn" and (uniform or i < 2) else 20 if g.kind == "ffn" else 2] = -10.0
        small = compact(model, {"input_ids": ids})
        assert rel_err(small(ids).logits, model(ids).logits) < 1e-5
        c = small.config
        if uniform:
            assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (66, 2, 1, 16)
            small.save_pretrained(tmp_path)
            back = LlamaForCausalLM.from_pretrained(tmp_path).eval()
            assert torch.equal(back(ids).logits, small(ids).logits)
        else:  # FFN widths 66 and 76: the config keeps 96, the heads (2 and 1 in both layers) follow
            assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (96, 2, 1)
            assert model.config.intermediate_size == 96 and model.config.num_attention_heads == 4
