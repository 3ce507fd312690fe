"""``python -m l0kernels.demo``: an L0 network finds the inputs a teacher uses, then gets compacted.

The built-in task (:func:`l0kernels.data.teacher_task`): 500 Gaussian inputs, a fixed random
teacher that reads 50 of them (a linear term plus a small tanh MLP). A 500-64-1 network with
input gates (:class:`L0Linear`) is trained with the paper's regularizer; the first layer's
test-time gates should keep exactly the 50 true inputs. ``--mnist DIR`` trains LeNet-300-100 on
MNIST IDX files instead. Either way the demo prints per-layer sparsity, expected vs dense cost,
and the inference time of the dense network against the compacted one.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import constrain_, l0_layers, l0_regularizer
from .compact import compact
from .data import load_mnist, teacher_task
from .models import (LeNet300100, architecture, arch_str, count_flops, count_params, dense_copy,
                     expected_cost, time_inference)
from .modules import L0Linear

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is a dependency; keep the demo usable without it
    tqdm = None


def _progress(total: int, desc: str, quiet: bool):
    if quiet or tqdm is None:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def teacher_model(n_features: int, hidden: int = 64, backend: str = "auto", device=None) -> nn.Sequential:
    """``L0Linear(n, hidden) -> ReLU -> L0Linear(hidden, 1)``, input gates (droprate_init 0.2 then 0.5)."""
    return nn.Sequential(
        L0Linear(n_features, hidden, droprate_init=0.2, backend=backend, device=device), nn.ReLU(),
        L0Linear(hidden, 1, droprate_init=0.5, backend=backend, device=device))


def run_teacher(seed: int = 0, steps: int = 1000, lamba: float = 0.5, lr: float = 0.01, batch_size: int = 256,
                n_features: int = 500, n_true: int = 50, n_train: int = 4096, hidden: int = 64,
                backend: str = "auto", device: str = "cpu", quiet: bool = False) -> Dict:
    """Train on the teacher task; returns the model, the task and the gate-recovery numbers."""
    torch.manual_seed(seed)
    task = teacher_task(n_features=n_features, n_true=n_true, n_train=n_train, seed=seed)
    dev = torch.device(device)
    xtr, ytr = task.x_train.to(dev), task.y_train.to(dev)
    model = teacher_model(n_features, hidden, backend, dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = xtr.shape[0]
    bar = _progress(steps, "teacher", quiet)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen).to(dev)
        mse = F.mse_loss(model(xtr[idx]), ytr[idx])
        loss = mse + l0_regularizer(model, lamba, 0.0, n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        constrain_(model)
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(mse=f"{mse.item():.4f}", inputs=model[0].num_active())
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        test_mse = F.mse_loss(model(task.x_test.to(dev)), task.y_test.to(dev)).item()
    kept = set(model[0].active_mask().nonzero().flatten().tolist())
    truth = set(task.support.tolist())
    tp, fp, missed = len(kept & truth), len(kept - truth), len(truth - kept)
    return {"model": model, "task": task, "train_s": train_s, "test_mse": test_mse, "noise_var": task.noise_std ** 2,
            "tp": tp, "fp": fp, "missed": missed, "recall": tp / len(truth),
            "precision": tp / len(kept) if kept else 0.0, "input_shape": (n_features,)}


def run_mnist(folder: str, seed: int = 0, epochs: int = 1, lamba: float = 0.5, lr: float = 2e-3,
              gate_lr: float = 0.01, batch_size: int = 100, max_steps: Optional[int] = None, backend: str = "auto", device: str = "cpu",
              quiet: bool = False) -> Dict:
    """Train LeNet-300-100 on MNIST IDX files in ``folder`` with ``lamba / N`` per layer (plus
    the authors' expected-L2 term, weight decay 5e-4); returns the model and test error.

    ``gate_lr`` is Adam's learning rate for the ``log_alpha`` parameters: higher than the weights'
    so that gates can close within the demo's single epoch (the paper uses 1e-3 for all, 200 epochs).
    """
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_mnist(folder)
    dev = torch.device(device)
    xtr, ytr = xtr.reshape(len(xtr), -1).to(dev), ytr.to(dev)
    model = LeNet300100(backend=backend, device=dev)
    gates = [p for n_, p in model.named_parameters() if n_.endswith("log_alpha")]
    rest = [p for n_, p in model.named_parameters() if not n_.endswith("log_alpha")]
    opt = torch.optim.Adam([{"params": rest}, {"params": gates, "lr": gate_lr}], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = xtr.shape[0]
    per_epoch = math.ceil(n / batch_size)
    total = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    bar = _progress(total, "LeNet-300-100", quiet)
    t0 = time.perf_counter()
    step = 0
    model.train()
    while step < total:
        perm = torch.randperm(n, generator=gen).to(dev)
        for b in range(per_epoch):
            if step >= total:
                break
            idx = perm[b * batch_size:(b + 1) * batch_size]
            ce = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss = ce + l0_regularizer(model, lamba, 5e-4, n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            constrain_(model)
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(ce=f"{ce.item():.3f}", arch=arch_str(architecture(model)))
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xte[i:i + 1000].reshape(-1, 784).to(dev)).argmax(1) for i in range(0, len(xte), 1000)])
    err = (pred.cpu() != yte).float().mean().item()
    return {"model": model, "train_s": train_s, "test_error": err, "steps": step, "input_shape": (784,)}


def cost_report(model: nn.Module, input_shape, batch: int, device: str) -> List[str]:
    """Per-layer sparsity, expected vs dense cost, and dense vs compacted inference time."""
    lines = ["per-layer sparsity (open test-time gates / gates):"]
    for name, m in l0_layers(model):
        na, ng = m.num_active(), m.num_gates()
        lines.append(f"  {name:>4} {type(m).__name__}(gate={m.gate!r}) {na:5d}/{ng:<5d} ({100.0 * na / ng:5.1f}% open)")
    cost = expected_cost(model, tuple(input_shape))
    compacts = [("l0kernels.compact", compact(model))]
    dense = dense_copy(model)
    cp = count_params(compacts[0][1], nonzero=True)
    cf = count_flops(compacts[0][1], tuple(input_shape))
    lines += [
        f"architecture (open gates per layer): {arch_str(architecture(model))}",
        "cost per example            params        FLOPs",
        f"  dense                {cost['dense_params']:12,.0f} {cost['dense_flops']:12,.0f}",
        f"  expected (p_open)    {cost['expected_params']:12,.0f} {cost['expected_flops']:12,.0f}",
        f"  compacted (actual)   {cp:12,d} {cf:12,d}   ({cp / cost['dense_params']:.1%} of dense params; non-zero)",
    ]
    x = torch.randn(batch, *input_shape, device=device)
    model.eval()
    t_dense = time_inference(dense, x)
    t_gated = time_inference(model, x)
    lines += [f"inference, batch {batch} on {device} (median ms):",
              f"  dense nn model                                      {t_dense:8.3f}",
              f"  L0 model, eval gates                                {t_gated:8.3f}"]
    for how, c in compacts:
        with torch.no_grad():
            diff = (c(x) - model(x)).abs().max().item()
        t = time_inference(c, x)
        lines.append(f"  compacted, {how:<40} {t:8.3f}  ({t_dense / t:.2f}x vs dense; max |diff| {diff:.1e})")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m l0kernels.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seeds the task, the init, the batches and the gate noise")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 1000 on the teacher task, 1 epoch = 600 on MNIST)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--mnist", metavar="DIR", default=None,
                   help="train LeNet-300-100 on the MNIST IDX files in DIR instead of the teacher task")
    p.add_argument("--epochs", type=int, default=1, help="MNIST epochs (with --mnist)")
    p.add_argument("--lamba", type=float, default=None,
                   help="L0 strength lambda (the penalty is lambda/N per gated weight; default 0.5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = print
    if args.mnist:
        r = run_mnist(args.mnist, seed=args.seed, epochs=args.epochs, max_steps=args.steps,
                      lamba=0.5 if args.lamba is None else args.lamba, backend=args.backend, device=args.device,
                      quiet=args.quiet)
        out(f"LeNet-300-100 on MNIST: {r['steps']} steps in {r['train_s']:.1f} s, "
            f"test error {100 * r['test_error']:.2f}% (deterministic gates)")
        batch = 100
    else:
        r = run_teacher(seed=args.seed, steps=1000 if args.steps is None else args.steps,
                        lamba=0.5 if args.lamba is None else args.lamba, backend=args.backend,
                        device=args.device, quiet=args.quiet)
        t = r["task"]
        out(f"teacher task: {t.n_features} inputs, the target uses {len(t.support)} of them; "
            f"trained in {r['train_s']:.1f} s")
        out(f"test MSE {r['test_mse']:.4f} (label noise variance {r['noise_var']:.4f})")
        out(f"inputs kept by the first layer's gates vs the truth: {r['tp']} true positives, "
            f"{r['fp']} false positives, {r['missed']} missed "
            f"(recall {r['recall']:.0%}, precision {r['precision']:.0%})")
        batch = 1024
    for line in cost_report(r["model"], r["input_shape"], batch, args.device):
        out(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
