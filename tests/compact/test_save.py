"""save_compact / load_compact: round trips of compacted models (nn.Sequential MLP and CNN, a custom class
compacted to a Sequential, a module shared by two parents, tiny Llama and BERT from configs), loading without
unpickling, torch.export save/load and ONNX export of compacted models, and every refusal."""
import contextlib
import json
import os
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l0kernels as l0k

pytest.importorskip("safetensors")

CLOSED, OPEN = -10.0, 10.0


def close_gates(model, p, seed):
    """Every gate of every L0 layer closed (log_alpha -10) with probability p, else open (+10)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (l0k.L0Linear, l0k.L0Conv2d)):
                closed = torch.rand(m.log_alpha.shape, generator=g) < p
                m.log_alpha.copy_(torch.where(closed, torch.full_like(m.log_alpha, CLOSED),
                                              torch.full_like(m.log_alpha, OPEN)))
    return model


def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 5))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(12, 10))


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model


BUILDERS = {"mlp": (mlp, (4, 12)), "cnn": (cnn, (2, 3, 8, 8))}


def compacted(kind, seed=0):
    """(gated eval model, compact(gated), example input) for BUILDERS[kind]."""
    build, shape = BUILDERS[kind]
    torch.manual_seed(seed)
    gated = l0k.convert(randomize_bn(build())).eval()
    close_gates(gated, 0.4, seed)
    if kind == "mlp":
        with torch.no_grad():
            gated[0].log_alpha[:4] = CLOSED  # closed model inputs: compact puts an input-selection step first
    return gated, l0k.compact(gated), torch.randn(*shape)


def tree(model):
    """(name, type, own tensor shapes) of every module, and the names of its parameters and buffers."""
    return ([(n, type(m).__name__, [(k, None if v is None else tuple(v.shape)) for k, v in
                                    list(m._parameters.items()) + list(m._buffers.items())])
             for n, m in model.named_modules()],
            [n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()])


def n_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith("log_alpha"))


@contextlib.contextmanager
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_compact unpickled something")
    with monkeypatch.context() as mp:
        for obj, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
            mp.setattr(obj, name, refuse)
        with pytest.raises(AssertionError):
            torch.load(os.devnull)
        yield


# -- round trips -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sequential_round_trip(kind, tmp_path, rel_err, monkeypatch):
    gated, small, x = compacted(kind)
    assert type(small) is nn.Sequential and n_params(small) < n_params(gated)
    if kind == "mlp":
        assert any(name.startswith("input_select") for name, _ in small.named_children())
    with torch.no_grad():
        ref = small(x)
        assert rel_err(ref, gated(x)) < 1e-5
    l0k.save_compact(small, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["compact.json", "model.safetensors"]
    # a fresh dense instance of the same class: the Sequential built as the original was (other weights),
    # or an empty Sequential (every module here can be rebuilt from the record)
    torch.manual_seed(123)
    for fresh in (BUILDERS[kind][0](), nn.Sequential()):
        with no_unpickling(monkeypatch):
            loaded = l0k.load_compact(tmp_path, fresh)
        assert loaded is fresh and type(loaded) is nn.Sequential and not loaded.training
        assert tree(loaded) == tree(small)
        assert [m.requires_grad for m in loaded.parameters()] == [m.requires_grad for m in small.parameters()]
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)


def test_dtype_as_saved(tmp_path):
    _, small, x = compacted("mlp", seed=1)
    small = small.double()
    l0k.save_compact(small, tmp_path)
    loaded = l0k.load_compact(tmp_path, mlp())
    assert {t.dtype for t in loaded.parameters()} == {torch.float64}
    select = next(m for n, m in loaded.named_children() if n.startswith("input_select"))
    assert select.index.dtype == torch.int64
    with torch.no_grad():
        assert torch.equal(loaded(x.double()), small(x.double()))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_custom_class_keeps_its_class(tmp_path, rel_err):
    """compact() of a custom model keeps its class: it loads into a fresh instance of that class (its layers
    reshaped from the record); another class is refused."""
    torch.manual_seed(2)
    gated = close_gates(l0k.convert(TwoLayer()).eval(), 0.4, 2)
    small = l0k.compact(gated)
    assert type(small) is TwoLayer
    l0k.save_compact(small, tmp_path)
    with pytest.raises(ValueError, match=r"saved model is a .*TwoLayer.*Sequential"):
        l0k.load_compact(tmp_path, nn.Sequential())
    loaded = l0k.load_compact(tmp_path, TwoLayer())
    x = torch.randn(5, 10)
    assert tree(loaded) == tree(small)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x)) and rel_err(loaded(x), gated(x)) < 1e-5


def test_shared_module_stays_shared(tmp_path):
    """A layer called twice (Sequential(a, act, a)) is one module listed twice in compact's Sequential; it is
    saved once (its second keys are aliases) and loads as one module."""
    torch.manual_seed(3)
    lin = nn.Linear(8, 8)
    gated = close_gates(l0k.convert(nn.Sequential(lin, nn.Tanh(), lin)).eval(), 0.3, 3)
    small = l0k.compact(gated)
    children = list(small.children())
    assert len(children) == 2 and len(small) == 3  # (one object listed once per call)
    l0k.save_compact(small, tmp_path)
    record = json.loads((tmp_path / "compact.json").read_text())
    assert record["shared_modules"] and set(record["tied"]) == {k for k in small.state_dict()
                                                                  if k.split(".")[0] != "0"}
    lin2 = nn.Linear(8, 8)
    for fresh in (nn.Sequential(lin2, nn.Tanh(), lin2), nn.Sequential()):
        loaded = l0k.load_compact(tmp_path, fresh)
        assert loaded[0] is loaded[2] and tree(loaded) == tree(small)
        x = torch.randn(3, 8)
        with torch.no_grad():
            assert torch.equal(loaded(x), small(x))


# -- transformers --------------------------------------------------------------------------------------------

def tiny_llama(tie):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("tie,include", [(False, ["*o_proj", "*down_proj"]), (True, ["*o_proj", "*down_proj"]),
                                         (True, None)])
def test_llama_round_trip(tie, include, tmp_path, rel_err, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    model = tiny_llama(tie)
    l0k.convert(model, include=include)
    close_gates(model, 0.3, 4)
    with torch.no_grad():  # layer 0: query heads 2 and 3 (the second key/value group) closed whole
        model.model.layers[0].self_attn.o_proj.log_alpha[32:] = CLOSED
    ids = torch.randint(0, 128, (2, 7))
    ref = logits(model, ids)
    small = l0k.compact(model)
    assert type(small) is transformers.LlamaForCausalLM
    assert small.model.layers[0].self_attn.k_proj.out_features == 16  # the second group went
    assert small.model.layers[0].self_attn.q_proj.out_features == 32
    assert rel_err(logits(small, ids), ref) < 1e-5
    small_tied = small.lm_head.weight is small.model.embed_tokens.weight
    l0k.save_compact(small, tmp_path)
    assert {"compact.json", "model.safetensors", "config.json"} <= set(os.listdir(tmp_path))
    with no_unpickling(monkeypatch):
        loaded = l0k.load_compact(tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM and not loaded.training
    assert tree(loaded) == tree(small)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == small_tied
    assert len(list(loaded.parameters())) == len(list(small.parameters()))  # tied: one Parameter
    assert {t.dtype for t in loaded.parameters()} == {torch.float32}
    assert torch.equal(logits(loaded, ids), logits(small, ids))
    with torch.no_grad():
        out = loaded.generate(ids[:1, :3], max_new_tokens=4, do_sample=False)
        assert torch.equal(out, small.generate(ids[:1, :3], max_new_tokens=4, do_sample=False))
    # into a given fresh dense instance too
    loaded2 = l0k.load_compact(tmp_path, tiny_llama(tie))
    assert tree(loaded2) == tree(small) and torch.equal(logits(loaded2, ids), logits(small, ids))


def test_bert_scalar_attributes(tmp_path, rel_err):
    """compact() updates BERT attention's num_attention_heads / all_head_size; they are recorded and set on
    load. BertModel(add_pooling_layer=False) has pooler = None, which the model built from the config gets."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=6,
                                  intermediate_size=20, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    l0k.convert(model, include=["*attention.output.dense", "*.output.dense"])
    close_gates(model, 0.3, 5)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.output.dense.log_alpha[:] = OPEN
            layer.attention.output.dense.log_alpha[4:12] = CLOSED  # heads 1 and 2
    ids = torch.randint(0, 40, (2, 6))
    small = l0k.compact(model)
    attn = small.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.all_head_size) == (4, 16)
    l0k.save_compact(small, tmp_path)
    loaded = l0k.load_compact(tmp_path)
    la = loaded.encoder.layer[0].attention.self
    assert (la.num_attention_heads, la.all_head_size) == (4, 16) and loaded.pooler is None
    assert tree(loaded) == tree(small)
    with torch.no_grad():
        y = loaded(input_ids=ids).last_hidden_state
        assert torch.equal(y, small(input_ids=ids).last_hidden_state)
        assert rel_err(y, model(input_ids=ids).last_hidden_state) < 1e-5


# -- torch.export and ONNX -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_torch_export_save_load(kind, tmp_path):
    _, small, x = compacted(kind, seed=6)
    l0k.save_compact(small, tmp_path / "c")
    loaded = l0k.load_compact(tmp_path / "c", BUILDERS[kind][0]())
    ep = torch.export.export(loaded, (x,))
    torch.export.save(ep, tmp_path / "m.pt2")
    back = torch.export.load(tmp_path / "m.pt2")
    with torch.no_grad():
        assert torch.allclose(back.module()(x), small(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_onnx(kind, dynamo, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX model needs onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    _, small, x = compacted(kind, seed=7)
    l0k.save_compact(small, tmp_path / "c")
    loaded = l0k.load_compact(tmp_path / "c", BUILDERS[kind][0]())
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(loaded, (x,), path, dynamo=dynamo, input_names=["x"], output_names=["y"])
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(y), small(x), rtol=1e-4, atol=1e-5)


# -- refusals ----------------------------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.s = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.s


def test_refuses_graph_module(tmp_path):
    """A torch.fx.GraphModule (not what compact() returns, but a model a user may bring): its generated code
    cannot be rebuilt without pickle."""
    gm = torch.fx.symbolic_trace(Residual())
    with pytest.raises(ValueError, match=r"GraphModule.*cannot be rebuilt without pickle.*torch\.export\.save"):
        l0k.save_compact(gm, tmp_path)
    assert not os.listdir(tmp_path)
    l0k.save_compact(nn.Sequential(nn.Linear(8, 8)), tmp_path)
    with pytest.raises(ValueError, match=r"GraphModule.*torch\.export\.save"):
        l0k.load_compact(tmp_path, gm)


def test_refuses_gated_model(tmp_path):
    gated = l0k.convert(mlp())
    with pytest.raises(ValueError, match=r"module '0' \(L0Linear\) is an l0kernels layer.*compact"):
        l0k.save_compact(gated, tmp_path)


def test_refuses_other_class(tmp_path):
    l0k.save_compact(nn.Sequential(nn.Linear(3, 2)), tmp_path)
    with pytest.raises(ValueError, match=r"saved model is a torch\.nn\.modules\.container\.Sequential.*Residual"):
        l0k.load_compact(tmp_path, Residual())
    with pytest.raises(ValueError, match=r"model=None builds transformers models only.*Sequential"):
        l0k.load_compact(tmp_path)


def test_refuses_types_it_cannot_rebuild(tmp_path):
    l0k.save_compact(nn.Sequential(nn.Linear(3, 4), Scale(4)), tmp_path)
    with pytest.raises(ValueError, match=r"module '1' .*Scale\) is missing in the given model.*cannot be rebuilt"):
        l0k.load_compact(tmp_path, nn.Sequential())
    resized = l0k.load_compact(tmp_path, nn.Sequential(nn.Linear(3, 5), Scale(5)))  # its tensor takes the saved size
    assert resized[1].s.shape == (4,) and torch.equal(resized[1].s, torch.ones(4))
    other = Scale(5)
    other.s = nn.Parameter(torch.ones(5, 1))  # another rank: not the same layout
    with pytest.raises(ValueError, match=r"module '1' .*Scale\) has parameters \(s: \(5, 1\)\).*cannot be rebuilt"):
        l0k.load_compact(tmp_path, nn.Sequential(nn.Linear(3, 5), other))
    with pytest.raises(ValueError, match=r"module '1' .*Scale\) is a torch\.nn\.modules\.linear\.Linear"):
        l0k.load_compact(tmp_path, nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)))
    loaded = l0k.load_compact(tmp_path, nn.Sequential(nn.Linear(3, 5), Scale(4)))  # the Linear is rebuilt
    assert loaded[0].out_features == 4 and torch.equal(loaded[1].s, torch.ones(4))


def test_refuses_missing_files(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        l0k.load_compact(tmp_path / "nowhere", mlp())
    with pytest.raises(ValueError, match="lacks compact.json and model.safetensors"):
        l0k.load_compact(tmp_path, mlp())
    l0k.save_compact(nn.Sequential(nn.Linear(3, 2)), tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks model.safetensors"):
        l0k.load_compact(tmp_path, nn.Sequential())


def test_refuses_bad_records(tmp_path):
    """No config.json for model=None; a transformers class name that is not a model class of the package; a
    record of another format version."""
    pytest.importorskip("transformers")
    l0k.save_compact(tiny_llama(False), tmp_path)
    record = json.loads((tmp_path / "compact.json").read_text())
    os.rename(tmp_path / "config.json", tmp_path / "config.bak")
    with pytest.raises(ValueError, match="has no config.json"):
        l0k.load_compact(tmp_path)
    os.rename(tmp_path / "config.bak", tmp_path / "config.json")
    for name, msg in (("LlamaConfig", "not a model class of the transformers package"),
                      ("os.system", "not a class of the transformers package"),
                      ("BertModel", "transformers.BertModel is .*BertModel, but the saved model's class is "
                                    ".*LlamaForCausalLM")):
        bad = dict(record, transformers=dict(record["transformers"], **{"class": name}))
        (tmp_path / "compact.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            l0k.load_compact(tmp_path)
    (tmp_path / "compact.json").write_text(json.dumps(dict(record, version=99)))
    with pytest.raises(ValueError, match="format version 99"):
        l0k.load_compact(tmp_path)


def test_needs_safetensors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"need the safetensors package \(pip install"):
        l0k.save_compact(nn.Linear(2, 2), tmp_path)
    with pytest.raises(ImportError, match="safetensors"):
        l0k.load_compact(tmp_path, nn.Linear(2, 2))


@pytest.mark.gpu
def test_loads_onto_the_given_models_device(tmp_path):
    _, small, x = compacted("cnn", seed=9)
    l0k.save_compact(small, tmp_path)
    loaded = l0k.load_compact(tmp_path, cnn().cuda())
    assert {t.device.type for t in list(loaded.parameters()) + list(loaded.buffers())} == {"cuda"}
    with torch.no_grad():
        assert torch.allclose(loaded(x.cuda()).cpu(), small(x), rtol=1e-4, atol=1e-5)
