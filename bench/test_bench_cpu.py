"""CPU benchmarks of the torch backend (issue #2 item 8): gated linear forward+backward at
LeNet-300-100's first layer (batch 100, 784->300, input gates, batch noise) against
``F.linear`` forward+backward; target <= 1.5x. Not part of the test run (testpaths=tests):

    pytest bench/test_bench_cpu.py --benchmark-only --benchmark-group-by=param:case

``python bench/cpu_ratio.py`` prints the ratio with dense and gated calls interleaved, which is
robust to other load on the machine.
"""
import pytest
import torch.nn.functional as F

import l0kernels as l0k

from common import CASES, make  # noqa: E402  (pytest puts bench/ on sys.path)


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
