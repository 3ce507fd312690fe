"""Training time per epoch of an L0 run beside the dense baseline, in one plot (issue 13: a reader sees
training get cheaper as gates close).

    python examples/mnist_l0.py --model lenet300 --quiet            # docs/results/mnist_lenet300.json
    python examples/mnist_l0.py --model lenet300 --dense --quiet    # docs/results/mnist_lenet300_dense.json
    python examples/plot_epoch_time.py docs/results/mnist_lenet300.json docs/results/mnist_lenet300_dense.json

Reads each file's ``history``: ``--clock cpu`` (default) plots ``train_cpu_seconds``, the process CPU time of
the training steps of an epoch (without the evaluation), which a loaded, shared machine inflates far less
than the wall time; ``--clock wall`` plots ``train_seconds``. Writes ``<first file without .json>_epoch_time.png`` (or ``--out``); the L0 run's open input gates of its
first layer (``--layer``: another one) go on a second axis.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("l0_json")
    ap.add_argument("dense_json")
    ap.add_argument("--out", default=None)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--layer", type=int, default=0,
                    help="which L0 layer's open gates go on the second axis (index into the history's arch)")
    a = ap.parse_args(argv)
    key = "train_cpu_seconds" if a.clock == "cpu" else "train_seconds"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for path in (a.l0_json, a.dense_json):
        with open(path) as f:
            r = json.load(f)
        h = [e for e in r["history"] if key in e]
        if not h:
            print(f"{path}: no epoch has {key} (run it with this version of mnist_l0.py)", file=sys.stderr)
            return 2
        runs.append((r, h))
    fig, ax = plt.subplots(figsize=(7, 4))
    (l0, hl), (dense, hd) = runs
    mk = "o" if max(len(hl), len(hd)) < 20 else None
    ax.plot([e["epoch"] for e in hl], [e[key] for e in hl], marker=mk, label=l0.get("method", "L0"))
    ax.plot([e["epoch"] for e in hd], [e[key] for e in hd], marker=mk,
            label="dense (nn.Linear, the same L2 term with every gate open)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"training {'CPU' if a.clock == 'cpu' else 'wall'} time per epoch (s)")
    ax.set_ylim(bottom=0)
    if hl[0].get("arch"):
        ax2 = ax.twinx()
        ax2.plot([e["epoch"] for e in hl], [e["arch"][a.layer] for e in hl], color="gray", ls=":", marker=mk,
                 label=f"open gates of L0 layer {a.layer + 1}")
        ax2.set_ylabel(f"open gates (L0 layer {a.layer + 1})")
        ax2.set_ylim(bottom=0)
        ax2.legend(loc="upper center")
    ax.legend(loc="lower left")
    ax.set_title(f"{l0.get('model', '')}: time per epoch as gates close")
    out = a.out or os.path.splitext(a.l0_json)[0] + "_epoch_time.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
