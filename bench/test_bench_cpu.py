"""CPU benchmarks of the torch backend (issue #2 item 8): gated linear forward+backward at
LeNet-300-100's first layer (batch 100, 784->300, input gates, batch noise) against
``F.linear`` forward+backward; target <= 1.5x. Not part of the test run (testpaths=tests):

    pytest bench/test_bench_cpu.py --benchmark-only --benchmark-group-by=param:case

``python bench/cpu_ratio.py`` prints the ratio with dense and gated calls interleaved, which is
robust to other load on the machine.
"""
import pytest
import torch
import torch.nn.functional as F

import l0kernels as l0k

CASES = {
    "lenet300_fc1_in_batch": dict(m=100, k=784, n=300, gate="in", noise="batch"),
    "lenet300_fc2_in_batch": dict(m=100, k=300, n=100, gate="in", noise="batch"),
    "lenet300_fc1_in_sample": dict(m=100, k=784, n=300, gate="in", noise="sample"),
    "lenet300_fc1_out_batch": dict(m=100, k=784, n=300, gate="out", noise="batch"),
    "lenet300_fc1_weight": dict(m=100, k=784, n=300, gate="weight", noise="batch"),
}


def make(case, seed=0):
    c = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c["m"], c["k"], generator=g)
    w = (torch.randn(c["n"], c["k"], generator=g) * 0.05).requires_grad_()
    b = torch.randn(c["n"], generator=g).requires_grad_()
    la_shape = {"in": (c["k"],), "out": (c["n"],), "weight": (c["n"], c["k"])}[c["gate"]]
    la = torch.randn(la_shape, generator=g).requires_grad_()
    gy = torch.randn(c["m"], c["n"], generator=g)
    return c, x, w, b, la, gy


@pytest.mark.benchmark(warmup=True, warmup_iterations=50, min_rounds=200)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["dense", "l0_torch"])
def test_linear_fwd_bwd(benchmark, case, impl):
    c, x, w, b, la, gy = make(case)
    if impl == "dense":
        def step():
            F.linear(x, w, b).backward(gy)
    else:
        def step():
            l0k.l0_linear(x, w, la, b, gate=c["gate"], noise=c["noise"], backend="torch").backward(gy)
    benchmark.group = case
    benchmark(step)
