"""MNIST LeNet-300-100 trained to a parameter budget with ``l0k.SparsityTarget`` instead of a lambda.

    python examples/mnist_target.py --target 0.1 --epochs 8 --warmup-epochs 4 --lr 3e-3 --threads 1

The controller's penalty replaces the paper's lambda term; its multipliers rise until the expected
fraction of parameters meets the target (moved linearly from 1.0 over the warm-up). After training,
``finalize_()`` makes the deterministic gates meet the target within 1 point. Writes
``docs/results/<tag>.{json,md,png}`` (expected vs target fraction over training, test error).
``log_alpha`` is not clamped (``constrain_``): its lower bound log(0.01) keeps every gate's p_open at or
above 0.047, which puts a floor under the expected fraction near small targets.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import l0kernels as l0k  # noqa: E402
from l0kernels.data import load_mnist  # noqa: E402
from l0kernels.models import LeNet300100, arch_str, architecture  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=os.environ.get("L0K_MNIST_DIR", os.path.join(REPO, "..", "shared", "data", "mnist")))
    p.add_argument("--target", type=float, default=0.1, help="fraction of the parameters to keep")
    p.add_argument("--metric", choices=["params", "flops", "gates"], default="params")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--warmup-epochs", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (weights and log_alpha)")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", default=os.path.join(REPO, "docs", "results"))
    p.add_argument("--tag", default="mnist_lenet300_target")
    p.add_argument("--log-every", type=int, default=50, help="steps between points of the curve")
    return p.parse_args(argv)


@torch.no_grad()
def test_error(model, x, y, batch=1000) -> float:
    was = model.training
    model.eval()
    wrong = sum(int((model(x[i:i + batch]).argmax(1) != y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was)
    return wrong / len(x)


def make_plot(r, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    c = r["curve"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(c["step"], c["expected"], label="expected fraction E")
    ax.plot(c["step"], c["target"], "--", label="target t (warm-up, then fixed)")
    ax.plot(c["step"], c["deterministic"], ":", label="deterministic gates (z_eval > 0)")
    ax.axhline(r["target"], color="grey", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel(f"fraction of {r['metric']}")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"LeNet-300-100 to {100 * r['target']:g}% of {r['metric']} ({r['epochs']} epochs)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(a, r):
    os.makedirs(a.results, exist_ok=True)
    base = os.path.join(a.results, a.tag)
    with open(base + ".json", "w") as f:
        json.dump(r, f, indent=1)
    plot = make_plot(r, base + ".png")
    fin = r["finalize"]
    lines = [
        f"# LeNet-300-100 on MNIST to a {r['metric']} target of {100 * r['target']:g}% (`l0k.SparsityTarget`)",
        "",
        f"**Epochs trained: {r['epochs']}** ({r['steps']} steps, warm-up {r['warmup_steps']} steps), Adam lr {a.lr:g}, "
        f"batch {a.batch_size}, no lambda to tune. {r['device']}, torch {r['torch']}, {r['date']}.",
        f"Produced by `examples/mnist_target.py {' '.join(sys.argv[1:])}`.",
        "",
        "| | fraction of " + r["metric"] + " | test error |",
        "|---|---:|---:|",
        f"| target | {r['target']:.4f} | |",
        f"| expected fraction E at the end of training | {r['final_expected']:.4f} | |",
        f"| deterministic gates before `finalize_()` | {r['deterministic_before']:.4f} | {100 * r['test_error_before']:.2f}% |",
        f"| deterministic gates after `finalize_()` | {fin['fraction']:.4f} | {100 * r['test_error_after']:.2f}% |",
        "",
        f"`finalize_()` closed {fin['closed']} and opened {fin['opened']} gates. Architecture (open input gates per "
        f"layer) after it: {arch_str(r['architecture'])} (dense 784-300-100). Steps after the warm-up until E stayed "
        f"within 3 points of the target: {r['settle_steps']}; lowest E after the warm-up: {r['min_expected_after']:.4f}. "
        f"Final multipliers: lambda_1 = {r['lambda_1']:.3f}, lambda_2 = {r['lambda_2']:.3f}.",
    ]
    lines += ["", "Test error per epoch (deterministic gates): "
              + ", ".join(f"{100 * e:.2f}%" for e in r["test_error_per_epoch"]) + "."]
    if plot:
        lines += ["", f"![expected vs target over training]({os.path.basename(plot)})"]
    lines.append("")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    xtr, ytr, xte, yte = load_mnist(a.data)
    if a.train_size:
        xtr, ytr = xtr[:a.train_size], ytr[:a.train_size]
    xtr, ytr = xtr.reshape(len(xtr), 784).to(device), ytr.to(device)
    xte, yte = xte.reshape(len(xte), 784).to(device), yte.to(device)
    model = LeNet300100(device=device)
    per_epoch = math.ceil(len(xtr) / a.batch_size)
    warm = int(round(a.warmup_epochs * per_epoch))
    ctl = l0k.SparsityTarget(model, a.target, metric=a.metric, warmup_steps=warm,
                             example_inputs=xtr[:2] if a.metric == "flops" else None)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    curve = {"step": [], "expected": [], "target": [], "deterministic": []}
    errors = []
    step = 0
    for epoch in range(a.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(xtr), generator=gen).to(device)
        for b in range(per_epoch):
            idx = perm[b * a.batch_size:(b + 1) * a.batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx]) + ctl.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ctl.step()
            step += 1
            if step % a.log_every == 0:
                curve["step"].append(step)
                curve["expected"].append(ctl.expected())
                curve["target"].append(ctl.current_target())
                curve["deterministic"].append(ctl.deterministic())
        err = test_error(model, xte, yte)
        errors.append(err)
        print(f"epoch {epoch + 1}: E {ctl.expected():.4f} t {ctl.current_target():.4f} deterministic "
              f"{ctl.deterministic():.4f} test error {100 * err:.2f}% arch {arch_str(architecture(model))} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    after = [(s, e) for s, e in zip(curve["step"], curve["expected"]) if s >= warm]
    settle = next((s - warm for i, (s, _) in enumerate(after)
                   if all(abs(e - a.target) <= 0.03 for _, e in after[i:])), None)
    before, final_e = ctl.deterministic(), ctl.expected()
    err_before = test_error(model, xte, yte)
    fin = ctl.finalize_()
    r = {"target": a.target, "metric": a.metric, "epochs": a.epochs, "steps": step, "warmup_steps": warm,
         "final_expected": final_e, "deterministic_before": before, "test_error_before": err_before,
         "finalize": fin, "test_error_after": test_error(model, xte, yte), "architecture": architecture(model),
         "settle_steps": settle, "min_expected_after": min((e for _, e in after), default=float("nan")),
         "lambda_1": float(ctl.lambda_1), "lambda_2": float(ctl.lambda_2), "test_error_per_epoch": errors,
         "curve": curve, "device": f"{device}, {torch.get_num_threads()} threads", "torch": torch.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    write_report(a, r)
    print(f"target {a.target:g}: E {r['final_expected']:.4f}, deterministic {before:.4f} -> {fin['fraction']:.4f} "
          f"after finalize_, test error {100 * r['test_error_after']:.2f}%; report {a.results}/{a.tag}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
