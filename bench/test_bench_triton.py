"""GPU benchmarks of the Triton backend with pytest-benchmark (skipped without CUDA). Not part of the
test run (testpaths=tests):

    pytest bench/test_bench_triton.py --benchmark-only --benchmark-group-by=param:case

Each case times forward+backward of the gated op on the triton and torch backends and the dense
baseline (``F.linear``/``F.conv2d``, same dtype and layout), synchronising the device inside the timed call.
``bench/run_bench.py`` writes the docs/design.md §7 tables; this file is for quick A/B comparisons.
"""
import pytest
import torch
import torch.nn.functional as F

import l0kernels as l0k

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = {
    "lenet300_fc1_in_batch": dict(op="linear", m=100, k=784, n=300, gate="in", noise="batch", dtype=torch.float32),
    "mlp_4096x4096_in_batch_bf16": dict(op="linear", m=8192, k=4096, n=4096, gate="in", noise="batch",
                                        dtype=torch.bfloat16),
    "mlp_4096x14336_out_sample_bf16": dict(op="linear", m=8192, k=4096, n=14336, gate="out", noise="sample",
                                           dtype=torch.bfloat16),
    "mlp_4096x4096_weight_bf16": dict(op="linear", m=8192, k=4096, n=4096, gate="weight", noise="batch",
                                      dtype=torch.bfloat16),
    "wrn_160_32x32_cl_bf16": dict(op="conv2d", b=128, c=160, s=32, noise="batch", dtype=torch.bfloat16),
    "wrn_640_8x8_fp32": dict(op="conv2d", b=128, c=640, s=8, noise="sample", dtype=torch.float32),
}


def make(case):
    c = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = c["dtype"]
    if c["op"] == "linear":
        x = torch.randn(c["m"], c["k"], device="cuda", dtype=dt, generator=g)
        w = (torch.randn(c["n"], c["k"], device="cuda", generator=g) / c["k"] ** 0.5).to(dt)
        la_shape = {"in": (c["k"],), "out": (c["n"],), "weight": (c["n"], c["k"])}[c["gate"]]
    else:
        x = torch.randn(c["b"], c["c"], c["s"], c["s"], device="cuda", dtype=dt, generator=g)
        w = (torch.randn(c["c"], c["c"], 3, 3, device="cuda", generator=g) / (9 * c["c"]) ** 0.5).to(dt)
        if dt != torch.float32:
            x = x.to(memory_format=torch.channels_last)
            w = w.to(memory_format=torch.channels_last)
        la_shape = (c["c"],)
    b = torch.randn(w.shape[0], device="cuda", dtype=dt, generator=g)
    la = (torch.randn(la_shape, device="cuda", generator=g) + 1).to(dt)
    return c, [t.requires_grad_() for t in (x, w, la, b)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["dense", "torch", "triton"])
def test_fwd_bwd(benchmark, case, impl):
    c, (x, w, la, b) = make(case)
    if c["op"] == "linear":
        kw = dict(seed=7, gate=c["gate"], noise=c["noise"])
        gated = lambda be: l0k.l0_linear(x, w, la, b, backend=be, **kw)  # noqa: E731
        dense = lambda: F.linear(x, w, b)  # noqa: E731
    else:
        kw = dict(padding=1, seed=7, noise=c["noise"])
        gated = lambda be: l0k.l0_conv2d(x, w, la, b, backend=be, **kw)  # noqa: E731
        dense = lambda: F.conv2d(x, w, b, padding=1)  # noqa: E731
    f = dense if impl == "dense" else (lambda: gated(impl))
    inputs = (x, w, b) if impl == "dense" else (x, w, la, b)
    dy = torch.randn_like(f())

    def step():
        torch.autograd.grad(f(), inputs, dy)
        torch.cuda.synchronize()

    step()  # compile / autotune outside the timing
    benchmark.group = case
    benchmark(step)
