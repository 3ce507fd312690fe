"""The regularizer of LeNet-300-100 (forward+backward of ``l0_regularizer(model, 0.1, 5e-4, N=60000)``) with
the fused Function (``l0kernels/_regularizer.py``: one pass per layer, one autograd node per model) against
the same terms written with autograd ops (the code it replaced), and against plain weight decay (``0.5 * wd/N * sum ||theta||^2``), interleaved
medians on the CPU. Usage: ``python bench/regularizer.py [--reps 1000] [--threads N]``."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import l0kernels as l0k  # noqa: E402
from l0kernels.models import LeNet300100  # noqa: E402

LAMBA, WD, N = 0.1, 5e-4, 60000

def autograd_regularizer(model) -> torch.Tensor:
    """The terms as autograd ops (input gates, ungated bias), as the layers computed them before."""
    terms = []
    for _, m in l0k.l0_layers(model):
        p = m.prob_open()
        sq = m.weight.pow(2).sum(0)
        t = (p * (LAMBA * m.params_per_gate + 0.5 * WD * sq)).sum() + 0.5 * WD * m.bias.pow(2).sum()
        terms.append((t / N).float())
    return torch.stack(terms).sum()

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = LeNet300100()
    params = list(model.parameters())
    weights = [p for n, p in model.named_parameters() if not n.endswith("log_alpha")]

    def run(f):
        def go():
            for p in params:
                p.grad = None
            f().backward()
        return go
    fns = {"autograd ops (before)": run(lambda: autograd_regularizer(model)),
           "fused (now)": run(lambda: l0k.l0_regularizer(model, LAMBA, WD, N)),
           "weight decay only": run(lambda: 0.5 * WD / N * sum(w.pow(2).sum() for w in weights))}
    ref = float(autograd_regularizer(model).detach())

    assert abs(float(l0k.l0_regularizer(model, LAMBA, WD, N).detach()) - ref) <= 1e-5 * abs(ref)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    ms = common.interleaved_ms(list(fns.values()), a.reps, warmup=50)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load} -> "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; interleaved medians of {a.reps}")
    for name, t in zip(fns, ms):
        print(f"{name:24s} {t * 1e3:8.0f} us")
    return 0

if __name__ == "__main__":
    sys.exit(main())
