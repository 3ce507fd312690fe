"""Per-call cost of an eval-mode L0 layer at batch 1, against ``F.linear`` on the compacted weight.

At batch 1 the work is tiny, so this measures what the eval path adds around the GEMM: the plan-cache
lookup, the per-call checks, the choice of kernel and, for output gates, the scatter into the full-width
output. Interleaved rounds (one call of each per round), medians::

    python bench/eval_overhead.py [--device cuda] [--features 64] [--rounds 20000]

On CUDA each call is followed by nothing (launches are asynchronous): the numbers are host-side costs,
which is what bounds a batch-1 loop that is not captured in a CUDA graph.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import l0kernels as l0k
from l0kernels.backends._plans import build_linear_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    f = a.features
    print(f"device {a.device}, {f}->{f}, batch 1, medians of {a.rounds} interleaved rounds (us)")
    for gate in ("in", "out", "weight"):
        m = l0k.L0Linear(f, f, gate=gate, device=a.device).eval()
        with torch.no_grad():
            m.log_alpha.copy_(torch.randn_like(m.log_alpha) * 3)  # about a third closed
        plan = build_linear_plan(m)
        x = torch.randn(1, f, device=a.device)
        xc = x if plan.in_idx is None else x[:, plan.in_idx].contiguous()
        fns = {"L0Linear.eval()": lambda: m(x), "F.linear, compacted": lambda: F.linear(xc, plan.weight, plan.bias)}
        times = {k: [] for k in fns}
        with torch.no_grad():
            for fn in fns.values():
                for _ in range(200):
                    fn()
            for _ in range(a.rounds):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
        row = ", ".join(f"{k} {statistics.median(v) * 1e6:.1f}" for k, v in times.items())
        print(f"gate={gate:6s} {row}")


if __name__ == "__main__":
    main()
