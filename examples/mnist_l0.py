"""Reproduce the MNIST rows of Table 1 of Louizos, Welling, Kingma (ICLR 2018) with l0kernels.

    python examples/mnist_l0.py --model lenet300 --data /path/to/mnist            # L0, lambda = 0.1/N
    python examples/mnist_l0.py --model lenet5 --sep --data /path/to/mnist        # L0-sep, [10, .5, .1, 10]/N
    python examples/mnist_l0.py --model lenet5 --dense --data /path/to/mnist      # the dense baseline

Paper settings are the defaults: Adam 1e-3, batch 100, 200 epochs, lambda = 0.1/N per layer,
the authors' expected-L2 term with weight decay 5e-4, droprate_init 0.2 for LeNet-300-100's input
layer and 0.5 elsewhere, log_alpha clamped to [log 0.01, log 100] after each step.

Where the authors' two MNIST models differ, ``authors`` defaults follow their code
(github.com/AMLab-Amsterdam/L0_regularization, ``models.py``):
- weight decay: ``L0MLP`` hands ``N * weight_decay`` to its layers and divides the penalty by N, so
  its L2 term is ``0.5 * wd * p_g * ||theta_g||^2`` (the usual per-parameter weight decay); ``L0LeNet5``
  hands ``weight_decay`` unscaled, so its term is N times weaker, ``(1/N) * 0.5 * wd * p_g * ||theta_g||^2``.
  ``--wd-convention authors`` (default) does the same per model; ``per-example`` / ``per-N`` force one.
- EMA of the parameters for evaluation: ``L0MLP`` defaults to ``beta_ema`` 0.999; ``L0LeNet5`` to 0 (and
  ``train_lenet5.py`` does not pass its ``--beta_ema``), so ``--ema`` defaults to 0.999 / 0.
- init (``--init kaiming``, default): Kaiming-normal weights with std sqrt(2 / fan_in) (their dense
  ``mode='fan_out'`` on an (in, out) matrix is fan_in of our (out, in) weight), zero biases; ``--init
  torch`` keeps the ``nn.Linear`` / ``nn.Conv2d`` defaults.

``--dense`` trains the same network with plain ``nn.Linear`` / ``nn.Conv2d`` (no gates), same optimizer,
init and L2 term (with p_g = 1): the baseline for the training time. Every epoch writes a checkpoint
(``--resume`` continues from it) and refreshes the report (markdown + json + plot, with the per-epoch
history) under ``--results``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import l0kernels as l0k
from l0kernels.data import load_mnist
from l0kernels.models import (PAPER_TABLE1, LeNet300100, LeNet5Caffe, architecture, arch_str,
                              count_flops, count_params, dense_copy, expected_cost, time_inference)

try:
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5-Caffe"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(NAMES), default="lenet300")
    p.add_argument("--data", default=os.environ.get("L0K_MNIST_DIR", os.path.join(REPO, "..", "shared", "data", "mnist")),
                   help="folder with the four MNIST IDX files (.gz or raw)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--lamba", type=float, default=0.1, help="L0 strength per layer; the penalty uses lamba/N")
    p.add_argument("--lambdas", type=float, nargs="+", default=None,
                   help="one lambda per L0 layer (overrides --lamba), e.g. 10 0.5 0.1 0.1")
    p.add_argument("--sep", action="store_true",
                   help="L0-sep: lambdas [10, 0.5, 0.1, 10] (LeNet-5, the paper's Table 1)")
    p.add_argument("--dense", action="store_true",
                   help="train the network without gates (nn.Linear/nn.Conv2d): the dense baseline")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="the expected-L2 term's weight decay")
    p.add_argument("--wd-convention", choices=["authors", "per-example", "per-N"], default="authors",
                   help="per-example: L2 term 0.5*wd*p_g*||theta_g||^2 (weight_decay*N goes to l0_regularizer); "
                        "per-N: (1/N) times that (weight_decay as is); authors: per-example for lenet300, "
                        "per-N for lenet5, as the authors' L0MLP / L0LeNet5")
    p.add_argument("--init", choices=["kaiming", "torch"], default="kaiming",
                   help="kaiming: the authors' Kaiming-normal (fan_in, ReLU gain) weights and zero biases; "
                        "torch: the nn.Linear / nn.Conv2d defaults")
    p.add_argument("--droprate-init", type=float, nargs="+", default=None,
                   help="per L0 layer (default: 0.2 0.5 0.5 for lenet300, 0.5 x4 for lenet5)")
    p.add_argument("--noise", choices=["batch", "sample"], default="batch",
                   help="one gate vector per minibatch (authors' default) or per example (local_rep)")
    p.add_argument("--ema", type=float, default=None,
                   help="EMA decay of the parameters for evaluation (0: off; default: the authors' 0.999 for "
                        "lenet300, 0 for lenet5)")
    p.add_argument("--speed-every", type=int, default=10,
                   help="re-time inference for the report every this many epochs (and at the last)")
    p.add_argument("--train-size", type=int, default=None, help="use the first N training images (smoke runs)")
    p.add_argument("--inputs", choices=["unit", "standardized"], default="unit",
                   help="unit: pixels in [0, 1], as the authors' data loader (ToTensor) feeds them; "
                        "standardized: then shifted and scaled by MNIST's mean and std")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="checkpoint folder (default: runs/<model>)")
    p.add_argument("--results", default=os.path.join(REPO, "docs", "results"),
                   help="where the report, json and plot go")
    p.add_argument("--tag", default=None, help="name of the result files (default: mnist_<model>[_sep])")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.speed_every < 1:
        p.error("--speed-every must be >= 1")
    if a.sep and a.dense:
        p.error("--sep and --dense exclude each other")
    if a.sep and a.lambdas is None:
        a.lambdas = [10.0, 0.5, 0.1, 10.0]
    if a.ema is None:
        a.ema = 0.999 if a.model == "lenet300" else 0.0
    suffix = "_sep" if a.sep else "_dense" if a.dense else ""
    a.out = a.out or os.path.join("runs", a.model + suffix)
    a.tag = a.tag or f"mnist_{a.model}" + suffix
    return a


def wd_scale(a, n: int) -> int:
    """Factor on ``--weight-decay`` before it goes to ``l0_regularizer`` (which divides by N)."""
    conv = a.wd_convention
    if conv == "authors":
        conv = "per-example" if a.model == "lenet300" else "per-N"
    return n if conv == "per-example" else 1


def dense_l2(model: torch.nn.Module, weight_decay: float, n: int) -> torch.Tensor:
    """The dense baseline's L2 term, ``(1/N) * 0.5 * weight_decay * ||theta||^2`` (the L0 term with p_g = 1)."""
    return 0.5 * weight_decay / n * sum((p * p).sum() for p in model.parameters())


@torch.no_grad()
def kaiming_init_(model: torch.nn.Module) -> None:
    """The authors' init: weights ~ N(0, 2 / fan_in), biases 0 (log_alpha untouched)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, l0k.L0Linear, l0k.L0Conv2d)):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                m.bias.zero_()


def build_model(a, device) -> torch.nn.Module:
    if a.model == "lenet300":
        dr = a.droprate_init or [0.2, 0.5, 0.5]
        model = LeNet300100(droprate_init=dr, noise=a.noise, backend=a.backend, device=device)
    else:
        dr = a.droprate_init or [0.5] * 4
        model = LeNet5Caffe(droprate_init=dr, noise=a.noise, backend=a.backend, device=device)
    if a.dense:
        arch = model.dense_architecture
        model = dense_copy(model).train()  # same layers, nn.Linear / nn.Conv2d; fresh init below
        model.dense_architecture = arch
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.reset_parameters()
    if a.init == "kaiming":
        kaiming_init_(model)
    return model


class EMA:
    """Bias-corrected exponential moving average of every parameter (the authors' ``beta_ema``)."""

    def __init__(self, model: torch.nn.Module, beta: float):
        self.beta = beta
        self.steps = 0
        self.avg = [torch.zeros_like(p) for p in model.parameters()]

    @torch.no_grad()
    def update(self, model):
        self.steps += 1
        for a, p in zip(self.avg, model.parameters()):
            a.mul_(self.beta).add_(p.detach(), alpha=1 - self.beta)

    def averaged(self, model) -> torch.nn.Module:
        m = copy.deepcopy(model)
        corr = 1 - self.beta ** max(self.steps, 1)
        with torch.no_grad():
            for a, p in zip(self.avg, m.parameters()):
                p.copy_(a / corr)
        return m

    def state_dict(self):
        return {"beta": self.beta, "steps": self.steps, "avg": self.avg}

    def load_state_dict(self, s):
        self.beta, self.steps = s["beta"], s["steps"]
        for a, b in zip(self.avg, s["avg"]):
            a.copy_(b)


@torch.no_grad()
def test_error(model, x, y, batch=1000) -> float:
    model.eval()
    wrong = 0
    for i in range(0, len(x), batch):
        wrong += int((model(x[i:i + batch]).argmax(1) != y[i:i + batch]).sum())
    return wrong / len(x)


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def device_str(device) -> str:
    return str(device) if device.type != "cpu" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def common_fields(a, history: List[Dict], n_train: int, device) -> Dict:
    cpu = [e["train_cpu_seconds"] for e in history if "train_cpu_seconds" in e]  # absent in older histories
    return {"N": n_train, "epochs_done": history[-1]["epoch"], "epochs_planned": a.epochs,
            "train_seconds_total": sum(e.get("train_seconds", e["seconds"]) for e in history),
            "seconds_total": sum(e["seconds"] for e in history),
            "train_cpu_seconds_total": sum(cpu), "train_cpu_epochs": len(cpu),
            "weight_decay_passed": a.weight_decay * wd_scale(a, n_train),
            "settings": {k: v for k, v in vars(a).items() if k not in ("data", "out", "results")},
            "device": device_str(device), "torch": torch.__version__,
            "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"), "history": history}


def dense_report(a, model, history: List[Dict], dense_arch, input_shape, device, n_train) -> Dict:
    """The dense baseline's numbers: error, size, FLOPs and the per-epoch history."""
    last = history[-1]
    r = {"model": NAMES[a.model], "method": "dense", "test_error": last["test_error"],
         "architecture": list(dense_arch), "dense_architecture": list(dense_arch),
         "dense_params": count_params(model), "dense_flops": count_flops(model, input_shape)}
    r.update(common_fields(a, history, n_train, device))
    return r


def report(a, model_eval, history: List[Dict], dense_arch, input_shape, device, n_train,
           speed: Optional[Dict] = None) -> Dict:
    """Numbers of the evaluated (EMA) model: error, architecture, costs, compaction and speed
    (``speed`` re-used when given, else timed)."""
    last = history[-1]
    cost = expected_cost(model_eval, input_shape)
    compacts = [("l0kernels.compact", l0k.compact(model_eval))]
    dense = dense_copy(model_eval)
    model_eval.eval()
    if speed is None or set(next(iter(speed.values()))) != {"dense_ms", "l0_eval_ms", *(h for h, _ in compacts)}:
        speed = {}
        for b in (1, 100):
            x = torch.randn(b, *input_shape, device=device)
            speed[b] = {"dense_ms": time_inference(dense, x, repeats=50),
                        "l0_eval_ms": time_inference(model_eval, x, repeats=50)}
            for how, c in compacts:
                speed[b][how] = time_inference(c, x, repeats=50)
    x = torch.randn(64, *input_shape, device=device)
    with torch.no_grad():
        max_diff = max(float((c(x) - model_eval(x)).abs().max()) for _, c in compacts)
    c0 = compacts[0][1]
    r = {
        "model": NAMES[a.model], "method": "L0-sep" if a.sep or a.lambdas else "L0",
        "lambdas_times_N": a.lambdas or [a.lamba] * len(dense_arch),
        "test_error": last["test_error"], "architecture": last["arch"], "dense_architecture": list(dense_arch),
        "expected_params": cost["expected_params"], "dense_params": cost["dense_params"],
        "expected_flops": cost["expected_flops"], "dense_flops": cost["dense_flops"],
        "compact_params": count_params(c0, nonzero=True), "compact_flops": count_flops(c0, input_shape),
        "compacted_with": [h for h, _ in compacts], "compact_max_abs_diff": max_diff, "speed": speed,
    }
    r.update(common_fields(a, history, n_train, device))
    return r


def inputs_text(r: Dict) -> str:
    """How the run's pixels were fed; runs recorded before ``--inputs`` existed standardised them."""
    how = r["settings"].get("inputs", "standardized")
    return "pixels in [0, 1] (the authors' loader)" if how == "unit" else "pixels standardised with MNIST's mean and std"


def settings_line(a, r: Dict) -> str:
    wd = r["weight_decay_passed"]
    return (f"Inputs: {inputs_text(r)}. Init: {a.init}; L2 term: weight_decay {a.weight_decay:g} in the {a.wd_convention} convention, i.e. "
            f"{wd:g} passed to the regularizer = (1/N) * 0.5 * {wd:g} * p_g * ||theta_g||^2 per group; "
            f"EMA: {a.ema or 'off'}. Training time: {r['train_seconds_total'] / 60:.1f} min for {r['epochs_done']} "
            f"epochs ({r['train_seconds_total'] / r['epochs_done']:.1f} s per epoch; with evaluation and "
            f"reporting {r['seconds_total'] / 60:.1f} min)" + (
                f"; CPU time {r['train_cpu_seconds_total'] / r['train_cpu_epochs']:.1f} s per epoch (mean of "
                f"{r['train_cpu_epochs']} epochs; the machine is shared, so compare CPU times)."
                if r["train_cpu_epochs"] else "."))


def write_results(a, r: Dict) -> None:
    os.makedirs(a.results, exist_ok=True)
    base = os.path.join(a.results, a.tag)
    tmp = base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(r, f, indent=1)
    os.replace(tmp, base + ".json")
    if r["method"] == "dense":
        done = r["epochs_done"]
        lines = [f"# {r['model']} on MNIST, dense baseline (no gates)", "",
                 f"**Epochs trained: {done}** (started for {a.epochs}). Device: {r['device']}; torch {r['torch']}; "
                 f"{r['date']}. Produced by `examples/mnist_l0.py` with: `{' '.join(sys.argv[1:]) or '(defaults)'}`.",
                 "", settings_line(a, r), "",
                 f"Test error {100 * r['test_error']:.2f}%; {r['dense_params']:,d} parameters, "
                 f"{r['dense_flops']:,d} FLOPs per example.", "",
                 f"Per-epoch history (train cross-entropy, test error, seconds) is in `{os.path.basename(base)}.json`.",
                 ""]
        with open(base + ".md", "w") as f:
            f.write("\n".join(lines))
        return
    plot = None if a.no_plot else make_plot(r, base + ".png")
    paper = PAPER_TABLE1["lenet300" if a.model == "lenet300" else "lenet5"]
    lam = ", ".join(f"{v:g}" for v in r["lambdas_times_N"])
    done = r["epochs_done"]
    lines = [
        f"# {r['model']} on MNIST with L0 gates ({r['method']}, lambda = [{lam}]/N)",
        "",
        f"**Epochs trained: {done}** (this run was started for {a.epochs}; the paper trains for 200)"
        + (". The run was stopped early: the numbers below are for this epoch count." if done < a.epochs else "."),
        f"Device: {r['device']}; torch {r['torch']}; {r['date']}. Produced by `examples/mnist_l0.py` with: "
        f"`{' '.join(sys.argv[1:]) or '(defaults)'}`.",
        "",
        settings_line(a, r),
        "",
        "| | architecture | test error |",
        "|---|---|---|",
        f"| dense | {arch_str(r['dense_architecture'])} | |",
    ]
    for meth, (arch, err) in paper.items():
        lines.append(f"| paper, {meth} (200 epochs) | {arch} | {err:.1f}% |")
    lines += [
        f"| **this run, {r['method']} ({done} epochs)** | **{arch_str(r['architecture'])}** | "
        f"**{100 * r['test_error']:.2f}%** |",
        "",
        "Architecture = open test-time gates per L0 layer (input neurons of dense layers, output channels of "
        "convolutions); test error with the deterministic gates"
        + (f" and the EMA (beta {a.ema}) parameters." if a.ema else "."),
        "",
        "| cost per example | params | FLOPs |",
        "|---|---:|---:|",
        f"| dense | {r['dense_params']:,.0f} | {r['dense_flops']:,.0f} |",
        f"| expected (sum of p_open x group size) | {r['expected_params']:,.0f} | {r['expected_flops']:,.0f} |",
        f"| compacted network (actual, non-zero) | {r['compact_params']:,d} | {r['compact_flops']:,d} |",
        "",
        f"Max |compacted - L0 model| = {r['compact_max_abs_diff']:.1e}. `l0kernels.compact` removes the closed "
        "input gates of the first layer with an input-selection step.",
        "",
        "| inference, median ms (speed-up vs dense) | dense nn | L0 model, eval gates | "
        + " | ".join(f"compacted: {h}" for h in r["compacted_with"]) + " |",
        "|---|---:|---:|" + "---:|" * len(r["compacted_with"]),
    ]
    for b, s in r["speed"].items():
        cells = " | ".join(f"{s[h]:.3f} ({s['dense_ms'] / s[h]:.2f}x)" for h in r["compacted_with"])
        lines.append(f"| batch {b} | {s['dense_ms']:.3f} | {s['l0_eval_ms']:.3f} | {cells} |")
    if plot:
        lines += ["", f"![architecture and error over epochs]({os.path.basename(plot)})"]
    lines += ["", "Per-epoch history (architecture, test error, expected L0) is in "
              f"`{os.path.basename(base)}.json`.", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))


def make_plot(r: Dict, path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    h = r["history"]
    ep = [e["epoch"] for e in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    dense = r["dense_architecture"]
    for i in range(len(dense)):
        ax1.plot(ep, [e["arch"][i] / dense[i] for e in h], label=f"layer {i + 1} ({dense[i]})")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("open gates / gates")
    ax1.set_ylim(0, 1.05)
    ax1.set_title(f"{r['model']}: architecture {arch_str(r['architecture'])}")
    ax1.legend()
    ax2.plot(ep, [100 * e["test_error"] for e in h], label="test error (deterministic gates)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test error (%)")
    ax2.set_yscale("log")
    ax2.set_title(f"final {100 * r['test_error']:.2f}% after {r['epochs_done']} epochs")
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    xtr, ytr, xte, yte = load_mnist(a.data, normalize=a.inputs == "standardized")
    if a.train_size:
        xtr, ytr = xtr[:a.train_size], ytr[:a.train_size]
    input_shape = (784,) if a.model == "lenet300" else (1, 28, 28)
    xtr, ytr = xtr.reshape(len(xtr), *input_shape).to(device), ytr.to(device)
    xte, yte = xte.reshape(len(xte), *input_shape).to(device), yte.to(device)
    n = len(xtr)
    model = build_model(a, device)
    dense_arch = model.dense_architecture
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    ema = EMA(model, a.ema) if a.ema else None
    wd = a.weight_decay * wd_scale(a, n)
    make_report = dense_report if a.dense else report
    speed = None
    gen = torch.Generator().manual_seed(a.seed)
    history: List[Dict] = []
    start = 0
    os.makedirs(a.out, exist_ok=True)
    ckpt = os.path.join(a.out, "checkpoint.pt")
    if a.resume:
        if not os.path.exists(ckpt):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        s = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        if ema is not None and s.get("ema"):
            ema.load_state_dict(s["ema"])
        gen.set_state(s["gen"])
        torch.set_rng_state(s["torch_rng"])
        history, start = s["history"], s["epoch"]
        print(f"resumed from {ckpt} at epoch {start}")
    per_epoch = math.ceil(n / a.batch_size)
    model_eval = model
    for epoch in range(start, a.epochs):
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        perm = torch.randperm(n, generator=gen).to(device)
        bar = None if (a.quiet or tqdm is None) else tqdm(total=per_epoch, desc=f"epoch {epoch + 1}/{a.epochs}",
                                                          leave=False, dynamic_ncols=True, file=sys.stderr)
        tot = tot_loss = 0.0
        for b in range(per_epoch):
            idx = perm[b * a.batch_size:(b + 1) * a.batch_size]
            ce = F.cross_entropy(model(xtr[idx]), ytr[idx])
            reg = dense_l2(model, wd, n) if a.dense else l0k.l0_regularizer(model, a.lambdas or a.lamba, wd, n)
            loss = ce + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not a.dense:
                l0k.constrain_(model)
            if ema is not None:
                ema.update(model)
            tot += float(ce.detach())
            tot_loss += float(loss.detach())
            if bar is not None:
                bar.update(1)
                if b % 100 == 0 and not a.dense:
                    bar.set_postfix(ce=f"{float(ce.detach()):.3f}", arch=arch_str(architecture(model)))
        if bar is not None:
            bar.close()
        t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
        model_eval = ema.averaged(model) if ema is not None else model
        err = test_error(model_eval, xte, yte)
        with torch.no_grad():
            el0 = [float(m.expected_l0()) for _, m in l0k.l0_layers(model_eval)]
        history.append({"epoch": epoch + 1, "train_ce": tot / per_epoch, "train_loss": tot_loss / per_epoch,
                        "test_error": err, "arch": list(dense_arch) if a.dense else architecture(model_eval),
                        "expected_l0": el0, "train_seconds": t_train, "train_cpu_seconds": c_train,
                        "seconds": time.perf_counter() - t0})
        msg = (f"epoch {epoch + 1:3d}  ce {tot / per_epoch:.4f}  test error {100 * err:5.2f}%  "
               f"arch {arch_str(history[-1]['arch'])}  ({t_train:.1f} s training)")
        print(msg, flush=True)
        save_checkpoint(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(),
                               "ema": ema.state_dict() if ema is not None else None, "gen": gen.get_state(),
                               "torch_rng": torch.get_rng_state(), "history": history, "epoch": epoch + 1,
                               "args": vars(a)})
        retime = (epoch + 1) % a.speed_every == 0 or epoch + 1 == a.epochs
        r = make_report(a, model_eval, history, dense_arch, input_shape, device, n,
                        **({} if a.dense else {"speed": None if retime else speed}))
        speed = r.get("speed")
        write_results(a, r)
    if not history:
        print("nothing trained yet (--epochs 0)")
        return 0
    model_eval = ema.averaged(model) if ema is not None else model  # also when --resume had nothing left to do
    r = make_report(a, model_eval, history, dense_arch, input_shape, device, n)
    write_results(a, r)
    if a.dense:
        print(f"\n{r['model']} dense: {r['epochs_done']} epochs, test error {100 * r['test_error']:.2f}%, "
              f"{r['train_seconds_total']:.0f} s training; report: {os.path.join(a.results, a.tag)}.md")
        return 0
    print(f"\n{r['model']} {r['method']}: {r['epochs_done']} epochs, test error {100 * r['test_error']:.2f}%, "
          f"architecture {arch_str(r['architecture'])} (dense {arch_str(dense_arch)}); "
          f"compacted params {r['compact_params']:,d} / {r['dense_params']:,.0f}; report: "
          f"{os.path.join(a.results, a.tag)}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
