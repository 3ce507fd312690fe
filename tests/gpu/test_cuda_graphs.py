"""CUDA graphs of an L0 training step (docs/design.md §10; needs a GPU: marked ``gpu``, skipped without one).

A layer in training draws its seed with ``torch.randint`` on the input's device: inside a captured graph
that is a Philox kernel of PyTorch's default CUDA generator, whose offset the graph advances on every
replay (PyTorch's "CUDA Graph-safe RNG states", aten/src/ATen/CUDAGeneratorImpl.h), and every backend's
kernels read the seed from that tensor on the device. So each replay draws fresh gates, and
``torch.cuda.manual_seed`` repeats the replays' sequence. A seed passed in as a tensor is read at replay
time: refilling it in place changes the gates without recapturing (and, on the Triton backend, the open
set of the closed groups it skips, found on the device in the graph).
"""
import pytest
import torch

import l0kernels as l0k
from l0kernels import L0Conv2d, L0Linear

pytestmark = pytest.mark.gpu


def _backends():
    names = ["torch", "triton"]
    try:
        import l0kernels._C  # noqa: F401
        names.append("cuda")
    except ImportError:
        pass
    return names


class _Net(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.conv = L0Conv2d(3, 8, 3, padding=1, noise="sample", backend=backend)
        self.a = L0Linear(8 * 8 * 8, 32, gate="in", backend=backend)
        self.b = L0Linear(32, 16, gate="out", noise="sample", backend=backend)
        self.c = L0Linear(16, 12, gate="weight", backend=backend)
        self.d = L0Linear(12, 4, gate="out", backend=backend)  # batch noise: skips closed rows on Triton

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.d(torch.relu(self.c(torch.relu(self.b(self.a(h))))))


def _capture(model, x):
    """Warm up on a side stream (autotuning, backend choices), then capture forward + backward."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    model.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = model(x)
        out.square().sum().backward()
    return g, out


@pytest.mark.parametrize("backend", _backends())
def test_graph_replays_draw_fresh_gates(backend):
    torch.manual_seed(0)
    model = _Net(backend).cuda()
    x = torch.randn(16, 3, 8, 8, device="cuda")
    g, out = _capture(model, x)
    grad = model.a.log_alpha.grad

    torch.cuda.manual_seed(7)
    g.replay()
    y1, g1 = out.clone(), grad.clone()
    g.replay()
    y2, g2 = out.clone(), grad.clone()
    torch.cuda.manual_seed(7)
    g.replay()
    y3, g3 = out.clone(), grad.clone()
    torch.cuda.synchronize()
    assert not torch.allclose(y1, y2), "two replays drew the same gates"
    assert not torch.allclose(g1, g2)
    assert torch.equal(y1, y3) and torch.equal(g1, g3), "torch.cuda.manual_seed did not repeat the replays"
    assert torch.isfinite(y1).all() and torch.isfinite(g1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gate,noise", [("in", "batch"), ("out", "batch"), ("out", "sample"), ("weight", "batch")])
def test_graph_reads_seed_tensor_at_replay(backend, gate, noise, dtype):
    """A seed tensor refilled in place between replays gives the gates of that seed (eager, int seed).
    bfloat16 with batch in/out gates on the CUDA backend captures its open-set path (device counts)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(24, 40, device="cuda", generator=gen).to(dtype)
    w = torch.randn(20, 40, device="cuda", generator=gen).to(dtype)
    la = torch.randn({"in": (40,), "out": (20,), "weight": (20, 40)}[gate], device="cuda", generator=gen).to(dtype)
    b = torch.randn(20, device="cuda", generator=gen).to(dtype)
    seed = torch.zeros((), dtype=torch.int64, device="cuda")

    def step():
        return l0k.l0_linear(x, w, la, b, seed=seed, gate=gate, noise=noise, backend=backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for value in (5, 2**40 + 3, 2**63 - 1):
        seed.fill_(value)
        graph.replay()
        ref = l0k.l0_linear(x, w, la, b, seed=value, gate=gate, noise=noise, backend=backend)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"])
def test_graph_conv_open_set_reads_seed_tensor_at_replay(backend, monkeypatch):
    """A bfloat16 convolution with batch channel gates captured on its open-set path (the CUDA backend's
    im2col + open-set GEMMs, Triton's kernels; every open-fraction threshold at 1): each replay with a seed
    refilled in place gives the output and gradients of that seed's eager call."""
    from l0kernels.backends.triton import _gate_math
    monkeypatch.setattr(_gate_math, "SKIP_BELOW", 1.0)
    if backend == "cuda":
        from l0kernels.backends import cuda as cb
        monkeypatch.setattr(cb, "CONV_SKIP_BELOW", 1.0)
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4, 5, 9, 7, device="cuda", generator=gen).bfloat16().to(memory_format=torch.channels_last)
    w = (torch.randn(12, 5, 3, 3, device="cuda", generator=gen) * 0.2).bfloat16().requires_grad_()
    la = torch.randn(12, device="cuda", generator=gen).mul(2).bfloat16().requires_grad_()
    seed = torch.zeros((), dtype=torch.int64, device="cuda")

    def step(s):
        y = l0k.l0_conv2d(x, w, la, None, padding=1, seed=s, backend=backend)
        return (y,) + torch.autograd.grad(y.float().square().sum(), (w, la))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step(seed)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(seed)
    for value in (5, 2**40 + 3):
        seed.fill_(value)
        graph.replay()
        for got, ref in zip(outs, step(value)):
            torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"])
def test_graph_of_a_structure_gated_llama_step(backend, monkeypatch):
    """Structure gates in their device form (docs/design.md §11): a transformers Llama's training step with every
    producer over its open rows, the attention over the open heads and the consumers over their open columns
    (every threshold at 1) captured in a CUDA graph; replays are finite, draw fresh gates, and repeat under
    ``torch.cuda.manual_seed``."""
    transformers = pytest.importorskip("transformers")
    from l0kernels import _active
    from l0kernels.backends.triton import _gate_math
    monkeypatch.setattr(_gate_math, "SKIP_BELOW", 1.0)
    if backend == "cuda":
        from l0kernels.backends import cuda as cb
        monkeypatch.setattr(cb, "SKIP_BELOW", 1.0)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, vocab_size=128, attn_implementation="sdpa")
    llama = transformers.LlamaForCausalLM(cfg).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    l0k.convert(llama, structure=("ffn", "heads"), backend=backend,
                example_inputs={"input_ids": ids[:, :16], "use_cache": False})
    with torch.no_grad():
        for _, g in l0k.l0_gates(llama):
            g.log_alpha.uniform_(-3, 4)

    class Lm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = llama

        def forward(self, x):
            return self.m(input_ids=x, use_cache=False).logits.float()

    model = Lm().train()
    _active.PATHS.clear()
    graph, out = _capture(model, ids)
    assert _active.PATHS["structure-rows", "fwd", "skip"] > 0 and _active.PATHS["structure-attention", "fwd", "skip"] > 0
    grad = llama.model.layers[0].mlp.gate_proj.weight.grad
    torch.cuda.manual_seed(11)
    graph.replay()
    y1, g1 = out.clone(), grad.clone()
    graph.replay()
    y2 = out.clone()
    torch.cuda.manual_seed(11)
    graph.replay()
    assert torch.isfinite(y1).all() and torch.isfinite(g1).all()
    assert not torch.equal(y1, y2), "a replay drew the same gates again"
    assert torch.equal(out, y1) and torch.equal(grad, g1), "torch.cuda.manual_seed did not repeat the replays"
