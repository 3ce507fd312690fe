"""Gated / dense forward+backward time ratio on the CPU, dense and gated calls interleaved so that
other load on the machine hits both alike. Usage: python bench/cpu_ratio.py [--reps 400] [--threads N]"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import l0kernels as l0k  # noqa: E402
from common import CASES, make  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--case", action="append", choices=list(CASES))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu kernels: "
          f"{l0k._philox._cpu is not None}")
    for case in a.case or list(CASES):
        c, x, w, b, la, gy = make(case)
        fs = {"dense": lambda: F.linear(x, w, b).backward(gy),
              "gated": lambda: l0k.l0_linear(x, w, la, b, gate=c["gate"], noise=c["noise"], backend="torch").backward(gy)}
        for f in fs.values():
            for _ in range(20):
                f()
        ts = {k: [] for k in fs}
        for _ in range(a.reps):
            for k, f in fs.items():
                t0 = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in ts.items()}
        print(f"{case:28s} dense {med['dense']:8.0f} us  gated {med['gated']:8.0f} us  ratio {med['gated'] / med['dense']:.2f}")


if __name__ == "__main__":
    main()
