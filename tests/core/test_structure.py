"""Structure gates (docs/design.md §11) against a float64 reference, on real transformers model definitions.

The reference is the dense model before ``convert`` with the block's hidden activation (the heads' outputs)
multiplied by the same ``z``: a forward pre-hook on the consumer multiplies its input column ``k`` by
``z[col_gates[k]]``; the producers compute every row. The structure-gated model must give the same outputs and
the same gradients of every parameter, ``log_alpha`` included, with the closed rows of every producer and the
closed columns of every consumer exactly 0 (outputs and gradients), while the gates are drawn in training mode
(the models themselves in eval mode: no dropout).
"""
import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import l0kernels as l0k
from l0kernels.structure import StructureGate

transformers = pytest.importorskip("transformers")
import _model_zoo as zoo  # noqa: E402
from conftest import zoo_model  # noqa: E402

FAMILIES = ["llama-gqa", "gpt2", "bert", "opt", "phi3", "t5"]


def _build(name):
    model, inputs = zoo_model(name)
    return model.double(), inputs


def _kwargs(inputs):
    if len(inputs) == 3:  # T5: input_ids, attention_mask, decoder_input_ids
        return {"input_ids": inputs[0], "decoder_input_ids": inputs[2]}
    if inputs[0].is_floating_point():  # ViT: pixels
        return {"pixel_values": inputs[0]}
    return {"input_ids": inputs[0]}


def _close_some(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in l0k.l0_gates(model):
            la = torch.empty(m.log_alpha.shape, dtype=torch.float64).uniform_(-5, 4, generator=g)
            la[0] = 5.0  # every block keeps a unit
            m.log_alpha.copy_(la)


NARROW: set = set()  # gates whose block ran narrow (the tensors between its layers: open units only)


def _record(model):
    """Patch each gate's ``state()`` to keep the ``z`` it returns (one draw per block call)."""
    seen = {}
    for name, g in l0k.l0_gates(model):
        def state(g=g, name=name, orig=type(g).state):
            st = orig(g)
            seen.setdefault(name, [])
            if not seen[name] or seen[name][-1] is not st[0]:
                seen[name].append(st[0])
            if st[1] is not None:
                NARROW.add(name)
            return st
        g.state = state
    return seen


def _main(out):
    return zoo.main_output(out)


@pytest.fixture(params=["gather", "dense"])
def path(request, monkeypatch):
    """gather: every call with a closed row or column gathers the open ones; dense: every call multiplies."""
    from l0kernels import _active
    monkeypatch.setattr(_active, "MIN_SKIPPED_MACS", 0 if request.param == "gather" else 1 << 62)
    monkeypatch.setattr(_active, "DENSE_ABOVE", 1.0)
    return request.param


@pytest.mark.parametrize("name", FAMILIES)
def test_structure_gates_match_reference(name, path):
    NARROW.clear()
    model, inputs = _build(name)
    dense = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0k.convert(model, structure=("ffn", "heads"), example_inputs=_kwargs(inputs))
    gates = dict(l0k.l0_gates(model))
    assert gates, "no block found"
    assert {g.kind for g in gates.values()} == KINDS.get(name, {"ffn", "heads"})
    _close_some(model, 7)
    for g in gates.values():
        g.train()
    seen = _record(model)

    # producers' outputs, to check the closed rows
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, key=n: outs.setdefault(key, o))
             for n, m in model.named_modules() if isinstance(m, l0k.StructureLinear) and m._row_gate is not None]
    torch.manual_seed(0)
    y = _main(model(**_kwargs(inputs)))
    for h in hooks:
        h.remove()
    assert all(len(v) == 1 for v in seen.values()), "one draw per block call"
    if path == "gather":  # the narrow form ran where convert found it exact (it is, on these families)
        narrow = {n for n, g in gates.items() if g.narrow}
        every_class_open = {n for n in narrow if bool((seen[n][0] != 0)[gates[n].class_gates].any(-1).all())}
        assert narrow and narrow <= NARROW | every_class_open and NARROW
    gy = torch.randn_like(y)
    (y * gy).sum().backward(retain_graph=True)

    # the reference: the dense model, consumer inputs times z
    zref = {n: v[0].detach().clone().requires_grad_(True) for n, v in seen.items()}
    for gname, g in gates.items():
        for role, layer in g.layers():
            if role != "cols":
                continue
            lname = next(n for n, m in model.named_modules() if m is layer)
            cols = layer.col_gates
            dense.get_submodule(lname).register_forward_pre_hook(
                lambda mod, a, z=zref[gname], cols=cols: (a[0] * z[cols],) + tuple(a[1:]))
    yr = _main(dense(**_kwargs(inputs)))
    (yr * gy).sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)

    # gradients of every parameter
    params = dict(model.named_parameters())
    for pname, pr in dense.named_parameters():
        p = params[pname]
        gp = p.grad if p.grad is not None else torch.zeros_like(p)
        gr = pr.grad if pr.grad is not None else torch.zeros_like(pr)
        owner = dense.get_submodule(pname.rpartition(".")[0])
        if type(owner).__name__ == "Conv1D" and pname.endswith("weight"):  # stored (in, out), converted to linear
            gr = gr.t()
        torch.testing.assert_close(gp, gr, rtol=1e-9, atol=1e-11, msg=lambda m: f"{pname}: {m}")
    for gname, g in gates.items():
        (want,) = torch.autograd.grad(seen[gname][0], g.log_alpha, zref[gname].grad, retain_graph=True)
        torch.testing.assert_close(g.log_alpha.grad, want, rtol=1e-9, atol=1e-11)

    # closed rows and columns: exactly 0 in the outputs and the gradients
    for gname, g in gates.items():
        z = seen[gname][0].detach()
        for role, layer in g.layers():
            lname = next(n for n, m in model.named_modules() if m is layer)
            if role == "rows":
                closed = ~(z != 0)[layer.row_gates].any(-1)
                out = outs[lname]
                if out.shape[-1] != closed.numel():  # narrow: the output holds the open classes' rows
                    present = (z != 0)[g.class_gates].any(-1)[layer.row_classes]
                    assert out.shape[-1] == int(present.sum()) and not bool((present & closed).any()) or \
                        g.class_gates.shape[1] > 1, lname
                    assert bool((out[..., closed[present]] == 0).all()), lname
                else:
                    assert bool((out[..., closed] == 0).all()), lname
                assert bool((layer.weight.grad[closed] == 0).all()), lname
            else:
                closed = z[layer.col_gates] == 0
                assert bool((layer.weight.grad[:, closed] == 0).all()), lname


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "bert"])
def test_open_gates_compute_what_the_model_computed(name):
    model, inputs = _build(name)
    model = model.float()
    ref = _main(model(**_kwargs(inputs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0k.convert(model, structure=("ffn", "heads"))
    assert torch.equal(_main(model(**_kwargs(inputs))), ref)


# blocks convert() finds per coverage family beyond FFN units and heads (docs/design.md §11): none (Gemma's
# multi-query attention is found, Mixtral's and Qwen3-MoE's FFN units are their experts' units)
KINDS: dict = {}


@pytest.mark.parametrize("name", zoo.TRANSFORMERS)
def test_compact_removes_closed_units_from_every_layer(name):
    model, inputs = _build(name)
    model = model.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0k.convert(model, structure=("ffn", "heads"), example_inputs=_kwargs(inputs))
    assert {g.kind for _, g in l0k.l0_gates(model)} == KINDS.get(name, {"ffn", "heads"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _close_some(model, 3)
        small = l0k.compact(model, _kwargs(inputs))
    assert type(small) is type(model)
    assert not list(l0k.l0_gates(small)), "the compacted model holds no gates"
    assert l0k.compare(model, small, _kwargs(inputs))["norm_rel"] <= 1e-5
    before = zoo.n_params(model)
    after = zoo.n_params(small)
    from l0kernels.experts import ExpertGate
    closed_units = sum(float(((g.deterministic_gates() == 0).double() * g.params_per_gate).sum())
                       for _, g in l0k.l0_gates(model) if g.kind == "ffn" and not isinstance(g, ExpertGate))
    # routed experts: each expert cut to the most units any keeps (tests/core/test_experts.py)
    closed_units += sum(g.experts_shape[0] * (g.experts_shape[1] - g.packed_width()) * g.unit_params()
                        for _, g in l0k.l0_gates(model) if isinstance(g, ExpertGate))
    assert before - after >= closed_units - 1e-6  # every closed FFN unit gone from all its layers


def test_one_draw_per_block_call_and_fresh_draws_per_call():
    model, inputs = _build("llama-gqa")
    l0k.convert(model, structure="ffn")
    model.train()
    _close_some(model, 1)
    seen = _record(model)
    model(**_kwargs(inputs))
    model(**_kwargs(inputs))
    for v in seen.values():
        assert len(v) == 2 and not torch.equal(v[0], v[1])


def test_counting_and_regularizer():
    model, inputs = _build("llama-gqa")
    total = sum(p.numel() for p in model.parameters())
    l0k.convert(model, structure=("ffn", "heads"))
    _close_some(model, 5)
    gates = [g for _, g in l0k.l0_gates(model)]
    # with every gate surely open, expected_params counts every parameter once
    for g in gates:
        spanned = sum(p.numel() for p in g.counted_parameters())
        assert float(g.params_per_gate.sum()) + g.ungated_params == pytest.approx(spanned)
    e = l0k.expected_params(model)
    manual = total - sum(p.numel() for g in gates for p in g.counted_parameters()) + \
        sum(float((g.prob_open().detach().double() * g.params_per_gate).sum()) + g.ungated_params for g in gates)
    assert float(e.detach()) == pytest.approx(manual, rel=1e-9)
    # the FFN gate of a Llama MLP controls its row of gate_proj and up_proj and its column of down_proj
    ffn = next(g for g in gates if g.kind == "ffn")
    h = model.config.hidden_size
    assert torch.all(ffn.params_per_gate == 3 * h)
    # heads with grouped-query attention: q rows + o columns + the kv head's rows shared by its query heads
    heads = next(g for g in gates if g.kind == "heads")
    d = model.config.hidden_size // model.config.num_attention_heads
    r = model.config.num_attention_heads // model.config.num_key_value_heads
    assert torch.allclose(heads.params_per_gate, torch.full_like(heads.params_per_gate, 2 * d * h + 2 * d * h / r))
    # the regularizer: lambda |g| p_g summed, divided by N, plus the L2 part over the spanned weights
    lam, wd, N = 0.3, 0.01, 50
    reg = l0k.l0_regularizer(model, lam, wd, N)
    want = 0.0
    for g in gates:
        p = g.prob_open().double()
        sq = torch.zeros_like(p)
        rest = 0.0
        for role, layer in g.layers():
            w2 = layer.weight.detach().double() ** 2
            if role == "rows":
                for n in range(w2.shape[0]):
                    ids = layer.row_gates[n].unique()
                    sq[ids] += w2[n].sum() / ids.numel()
            else:
                sq.index_add_(0, layer.col_gates, w2.sum(0))
        want += float((p * (lam * g.params_per_gate + 0.5 * wd * sq)).sum() + 0.5 * wd * rest) / N
    assert float(reg) == pytest.approx(want, rel=1e-5)
    reg.backward()
    assert all(g.log_alpha.grad is not None for g in gates)


def test_sparsity_target_counts_structure_gates():
    model, inputs = _build("llama-gqa")
    l0k.convert(model, structure=("ffn", "heads"))
    ctl = l0k.SparsityTarget(model, 0.5)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("log_alpha"))
    assert ctl.expected() == pytest.approx(float(l0k.expected_params(model)) / total, rel=1e-6)
    assert ctl.min_fraction() < 0.9
    with pytest.raises(ValueError, match="flops"):
        l0k.SparsityTarget(model, 0.5, metric="flops")


def test_bad_input_changes_nothing():
    model, inputs = _build("llama-gqa")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="structure"):
        l0k.convert(model, structure="channels")
    with pytest.raises(ValueError, match="noise"):
        l0k.convert(model, structure="ffn", noise="sample")
    with pytest.raises(ValueError, match="backend"):
        l0k.convert(model, structure="ffn", backend="tpu")
    with pytest.raises(ValueError, match="group_size"):
        l0k.convert(model, structure="ffn", group_size=2)
    with pytest.warns(UserWarning, match="matched no"):
        l0k.convert(model, structure="ffn", include="nothing.*")
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_include_selects_blocks_by_name():
    model, inputs = _build("llama-gqa")
    l0k.convert(model, structure="ffn", include="model.layers.0.*")
    names = [n for n, _ in l0k.l0_gates(model)]
    assert names == ["model.layers.0.mlp.down_proj.l0_gate"]
    # a block already converted is refused when named again
    with pytest.raises(ValueError, match="not a plain linear layer"):
        l0k.convert(model, structure="ffn", include="model.layers.0.mlp")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 9), k=st.integers(1, 9), lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
       seed=st.integers(0, 2**31 - 1), p_rows=st.floats(0.0, 1.0), p_cols=st.floats(0.0, 1.0),
       bias=st.booleans())
def test_structure_linear_functional_against_reference(path, n, k, lead, seed, p_rows, p_cols, bias):
    """The op against its definition in float64 (``F.linear(x * scale, W, b)`` with the closed rows 0), forward and
    gradients, full width and narrow, non-contiguous ``x``."""
    gather = path == "gather"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k + 2, dtype=torch.float64, generator=g)[..., 1:k + 1].requires_grad_(True)
    w = torch.randn(n, k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    rows = torch.rand(n, generator=g) < p_rows
    s = torch.rand(k, dtype=torch.float64, generator=g) * (torch.rand(k, generator=g) < p_cols)
    s.requires_grad_(True)
    ins = tuple(t for t in (x, w, b, s) if t is not None)
    y = l0k.structure_linear(x, w, b, rows=rows, scale=s)
    ref = torch.nn.functional.linear(x * s, w, b) * rows
    torch.testing.assert_close(y, ref)
    assert bool((y[..., ~rows] == 0).all())
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((y * gy).sum(), ins)
    want = torch.autograd.grad((ref * gy).sum(), ins)
    open_cols = s.detach() != 0
    for a, c in zip(got[:-1], want[:-1]):
        torch.testing.assert_close(a, c)
    # scale's gradient where scale is 0: 0 when those columns are skipped (a hard-concrete gate is 0 only where
    # its own derivative is 0, so log_alpha's gradient is the same either way)
    if gather:
        torch.testing.assert_close(got[-1], want[-1] * open_cols)
    else:
        torch.testing.assert_close(got[-1][open_cols], want[-1][open_cols])
    assert bool((got[1][~rows] == 0).all()) and bool((got[1][:, ~open_cols] == 0).all())
    # narrow: x holds the columns `cols`, the output the open rows only
    cols = torch.rand(k, generator=g) < 0.7
    xn = x.detach()[..., cols].requires_grad_(True)
    yn = l0k.structure_linear(xn, w, b, rows=rows, scale=s, cols=cols, open_out=True)
    xfull = torch.zeros_like(x.detach())
    xfull[..., cols] = xn.detach()
    torch.testing.assert_close(yn, (torch.nn.functional.linear(xfull * s, w, b))[..., rows])


def test_structure_linear_bad_input():
    x, w, b = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4)
    n, k = 4, 3
    with pytest.raises(ValueError, match="rows"):
        l0k.structure_linear(x, w, b, rows=torch.ones(n + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        l0k.structure_linear(x, w, b, scale=torch.ones(k + 1))
    with pytest.raises(ValueError, match="cols"):
        l0k.structure_linear(x, w, b, cols=torch.ones(k))
    with pytest.raises(ValueError, match="x must have 2 features"):
        l0k.structure_linear(x, w, b, cols=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="open_out"):
        l0k.structure_linear(x, w, b, open_out=True)
    with pytest.raises(ValueError, match="bias"):
        l0k.structure_linear(x, w, torch.randn(5))
    with pytest.raises(TypeError, match="weight"):
        l0k.structure_linear(x, w.long())
    for bad in ("auto", "nope", 3):
        with pytest.raises(ValueError, match="backend"):
            l0k.structure_linear(x, w, b, rows=torch.ones(n, dtype=torch.bool), host=False, backend=bad)


def _needs_triton():
    pytest.importorskip("triton")
    import os
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, k, lead, p_open, bias, strided", [
    (37, 19, (3, 5), 0.3, True, True), (16, 16, (17,), 1.0, False, False), (5, 33, (2, 1, 3), 0.0, True, False),
    (70, 9, (4,), 0.6, True, True), (1, 1, (1,), 1.0, True, False)])
def test_producer_kernels_over_the_open_rows(n, k, lead, p_open, bias, strided, dtype):
    """The device form of a producer (``host=False`` on the Triton backend): the GEMMs over the open rows only,
    found on the device, against the float64 definition, forward and every gradient; closed rows exact zeros in
    the output and in ``dW``/``db``; odd shapes, non-contiguous ``x`` and ``W``, every row open / closed."""
    dev = _needs_triton()
    g = torch.Generator().manual_seed(n * 1000 + k)
    x64 = torch.randn(*lead, k + 3, dtype=torch.float64, generator=g)[..., 2:k + 2]
    w64 = (torch.randn(k, n, dtype=torch.float64, generator=g).t() if strided
           else torch.randn(n, k, dtype=torch.float64, generator=g))
    b64 = torch.randn(n, dtype=torch.float64, generator=g) if bias else None
    rows = torch.rand(n, generator=g) < p_open
    gy = torch.randn(*lead, n, dtype=torch.float64, generator=g)
    leaves = [t.to(dev, dtype).requires_grad_(True) if t is not None else None for t in (x64, w64, b64)]
    if not strided:
        leaves[0] = leaves[0].detach().contiguous().requires_grad_(True)
    refs = [t.detach().double().cpu().requires_grad_(True) if t is not None else None for t in leaves]
    from l0kernels import _active
    _active.PATHS.clear()
    y = l0k.structure_linear(*leaves, rows=rows.to(dev), host=False, backend="triton")
    assert _active.PATHS["structure-rows", "fwd", "skip"] == 1
    ref = torch.nn.functional.linear(*refs) * rows
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.double().cpu(), ref, **tol)
    assert bool((y[..., ~rows.to(dev)] == 0).all())
    got = torch.autograd.grad(y, [t for t in leaves if t is not None], gy.to(dev, dtype))
    want = torch.autograd.grad(ref, [t for t in refs if t is not None], gy)
    for a, c in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), c, **tol)
    assert bool((got[1][~rows.to(dev)] == 0).all())
    if bias:
        assert bool((got[2][~rows.to(dev)] == 0).all())


def test_summary_shows_each_structure_gate_once():
    model, inputs = _build("llama-gqa")
    l0k.convert(model, structure=("ffn", "heads"))
    _close_some(model, 2)
    rows = {r.name: r for r in l0k.summary(model, example_inputs=_kwargs(inputs)).layers}
    down, gate_proj = rows["model.layers.0.mlp.down_proj"], rows["model.layers.0.mlp.gate_proj"]
    g = model.model.layers[0].mlp.down_proj.l0_gate
    assert down.gate == "ffn:cols" and gate_proj.gate == "ffn:rows"
    assert (down.gates_active, down.gates_total) == (g.num_active(), g.num_gates()) and gate_proj.gates_total is None
    assert gate_proj.shape_after == (g.num_active(), model.config.hidden_size)


@pytest.mark.parametrize("name", ["phi3", "gpt2", "gpt-neox"])
def test_fused_projections_get_a_gate_per_head(name):
    """A fused q/k/v projection (Phi-3's qkv_proj with grouped-query attention, GPT-2's c_attn, GPT-NeoX's
    query_key_value): one gate per query head, its rows of q with it, the key/value rows with their group."""
    model, inputs = _build(name)
    l0k.convert(model, structure="heads", example_inputs=_kwargs(inputs))
    heads = [g for _, g in l0k.l0_gates(model)]
    n_heads = getattr(model.config, "num_attention_heads", None) or model.config.n_head
    assert heads and all(g.num_gates() == n_heads for g in heads)
    producer = next(m for role, m in heads[0].layers() if role == "rows")
    hd = model.config.hidden_size // n_heads
    rows_per_gate = torch.bincount(producer.row_gates[:, 0], minlength=n_heads)
    kv = getattr(model.config, "num_key_value_heads", n_heads)
    # q rows of the head (+ its k and v rows when every head has its own)
    assert torch.all(rows_per_gate >= hd) and int(producer.row_gates.shape[0]) == (n_heads + 2 * kv) * hd


@pytest.mark.timeout(900)
def test_torch_compile():
    """Under torch.compile the eval model computes what the eager one does, and a training step runs forward
    and backward (the full-width form; the narrow one is off in a trace)."""
    model, inputs = _build("llama-gqa")
    model = model.float()
    l0k.convert(model, structure=("ffn", "heads"))
    _close_some(model, 4)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs[0]).logits, model(inputs[0]).logits, rtol=1e-5, atol=1e-5)
    model.train()
    loss = compiled(inputs[0]).logits.square().mean()
    loss.backward()
    for _, g in l0k.l0_gates(model):
        assert g.log_alpha.grad is not None and bool(torch.isfinite(g.log_alpha.grad).all())


def test_a_layer_called_on_its_own_keeps_its_width():
    model, inputs = _build("llama-gqa")
    l0k.convert(model, structure="ffn")
    mlp = model.model.layers[0].mlp
    assert mlp.down_proj.l0_gate.narrow
    with torch.no_grad():
        mlp.down_proj.l0_gate.log_alpha[::2] = -10.0
    x = torch.randn(2, 3, model.config.hidden_size, dtype=torch.float64)
    y = mlp.gate_proj(x)  # outside the block's call: full width, closed rows 0
    assert y.shape[-1] == model.config.intermediate_size and bool((y[..., ::2] == 0).all())
    torch.testing.assert_close(mlp(x), mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)))


@pytest.mark.interpret
def test_device_form_on_triton_matches_the_torch_path():
    """backend="triton" (the device form: no host reads; the consumer through the Triton kernels, which skip the
    closed columns; under TRITON_INTERPRET=1 on the CPU) against the torch path: same seeds, same outputs and
    gradients."""
    _needs_triton()
    from l0kernels import _active
    base, inputs = _build("llama-gqa")
    base = base.float()
    ids = inputs[0][:, :5]
    runs = []
    for backend in ("torch", "triton"):
        model = copy.deepcopy(base)
        l0k.convert(model, structure=("ffn", "heads"), backend=backend)
        _close_some(model, 9)
        model.train()
        torch.manual_seed(3)
        _active.PATHS.clear()
        y = model(ids).logits
        y.square().mean().backward()
        runs.append((y.detach(), {n: p.grad for n, p in model.named_parameters()}))
        if backend == "triton":  # every producer (gate, up, q, k, v of both layers) over its open rows, the
            # attention of both layers over the open heads (the model's own implementation otherwise)
            assert _active.PATHS["structure-rows", "fwd", "skip"] == 2 * 5, dict(_active.PATHS)
            assert _active.PATHS["structure-attention", "fwd", "skip"] == 2, dict(_active.PATHS)
            assert model.config._attn_implementation == "l0k_heads_sdpa"
            from l0kernels.attention import reasons
            attn = model.model.layers[0].self_attn
            q = torch.zeros(1, 4, 3, 16)
            assert any("dropout" in r for r in reasons(attn, q, q[:, :2], q[:, :2], 0.1, {}))
            small = l0k.compact(model, {"input_ids": ids})
            assert small.config._attn_implementation == "sdpa" and "_l0_heads" not in vars(small.model.layers[0].self_attn)
    (y0, g0), (y1, g1) = runs
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    for n, g in g0.items():
        if g is None:
            assert g1[n] is None or not g1[n].any(), n
            continue
        torch.testing.assert_close(g1[n], g, rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_compact_removes_heads_behind_per_head_norms():
    """Qwen3's attention normalises each head (q_norm / k_norm over the head dim): a closed key/value group
    leaves q, k, v and o_proj, exactly."""
    model, inputs = _build("qwen3-moe")
    model = model.float()
    l0k.convert(model, structure="heads", example_inputs=_kwargs(inputs))
    cfg = model.config
    r = cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        for _, g in l0k.l0_gates(model):
            g.log_alpha.fill_(10.0)
            g.log_alpha[:r] = -10.0  # every query head of the first key/value head
    small = l0k.compact(model, _kwargs(inputs))
    attn = small.model.layers[0].self_attn
    d = cfg.head_dim
    assert attn.q_proj.out_features == (cfg.num_attention_heads - r) * d
    assert attn.k_proj.out_features == (cfg.num_key_value_heads - 1) * d
    assert l0k.compare(model, small, _kwargs(inputs))["norm_rel"] <= 1e-5


def test_counts_stay_exact_in_half_precision():
    model, inputs = _build("llama-gqa")
    l0k.convert(model, structure="ffn")
    want = float(l0k.expected_params(model.float()).detach())
    g = model.model.layers[0].mlp.down_proj.l0_gate
    model.to(torch.bfloat16)
    assert g.params_per_gate.dtype == torch.float64 and torch.all(g.params_per_gate == 3 * model.config.hidden_size)
    got = float(l0k.expected_params(model).detach())
    assert got == pytest.approx(want, rel=1e-2)  # p_open in bfloat16; the counts themselves exact
