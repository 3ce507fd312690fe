"""A small ResNet of BasicBlocks on MNIST: inner channels gated, trained with the L0 penalty, compacted, timed.

    python examples/resnet_mnist.py --data /path/to/mnist --steps 400

Each BasicBlock is ``L0Conv2d -> ReLU -> Conv2d -> BatchNorm -> + shortcut -> ReLU`` (a 1x1 conv with
BatchNorm on the shortcut where the shape changes; a stem conv with BatchNorm before the blocks). The
first conv of each block gates its output channels (the block's inner width). It has a bias and no
BatchNorm of its own: a closed channel is then exactly 0, and ``compact`` removes it. A closed channel
followed by BatchNorm would be the constant ``ReLU(BN(0))``. The next conv is zero-padded, so that
constant cannot be folded exactly and ``compact`` would keep the channel.

The script trains on the MNIST training set (cross-entropy plus ``--lam`` times the mean probability that a
gate is open), then reports the test error of the gated eval model, ``l0k.compact(model, x)``'s
parameters, FLOPs and CPU latency against the dense original (the same trained weights with every gate
open), and the largest difference between the compacted and the gated model (``l0k.compare``). Results go
to ``docs/results/resnet_mnist.{md,json}``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

import l0kernels as l0k
from l0kernels.data import load_mnist
from l0kernels.models import count_flops, time_inference


class BasicBlock(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, droprate_init: float = 0.3):
        super().__init__()
        self.conv1 = l0k.L0Conv2d(cin, width, 3, stride=stride, padding=1, droprate_init=droprate_init)
        self.conv2 = nn.Conv2d(width, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.conv1(x))))
        return F.relu(out + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    def __init__(self, widths=(32, 32, 64, 64), channels=(16, 16, 32, 32), droprate_init: float = 0.3):
        super().__init__()
        self.stem = nn.Conv2d(1, channels[0], 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels[0])
        blocks, cin = [], channels[0]
        for i, (w, c) in enumerate(zip(widths, channels)):
            blocks.append(BasicBlock(cin, w, c, stride=2 if c != cin else 1, droprate_init=droprate_init))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def gated(model):
    return [m for m in model.modules() if isinstance(m, l0k.L0Conv2d)]


def evaluate(model, x, y, batch=500):
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred != y).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("L0K_MNIST_DIR", "../shared/data/mnist"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--gate-lr", type=float, default=0.03, help="Adam learning rate of log_alpha")
    p.add_argument("--lam", type=float, default=1.0, help="weight of the mean P(gate open)")
    p.add_argument("--test", type=int, default=2000, help="test images used (from the start of the test set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default="docs/results")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    xtr, ytr, xte, yte = load_mnist(a.data)
    xte, yte = xte[:a.test], yte[:a.test]
    model = ResNet()
    la = [p_ for n, p_ in model.named_parameters() if n.endswith("log_alpha")]
    rest = [p_ for n, p_ in model.named_parameters() if not n.endswith("log_alpha")]
    opt = torch.optim.Adam([{"params": rest}, {"params": la, "lr": a.gate_lr}], lr=a.lr)
    n_gates = sum(m.num_gates() for m in gated(model))
    t0 = time.perf_counter()
    model.train()
    for step in range(a.steps):
        idx = torch.randint(0, len(xtr), (a.batch,))
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx]) + a.lam * l0k.l0_penalty(model) / n_gates
        opt.zero_grad()
        loss.backward()
        opt.step()
        l0k.constrain_(model)
        if step % 100 == 0:
            print(f"step {step:5d} loss {loss.item():.4f} open gates "
                  f"{sum(m.num_active() for m in gated(model))}/{n_gates}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    err = evaluate(model, xte, yte)
    x1 = xte[:1]
    small = l0k.compact(model, x1)
    dense_model = copy.deepcopy(model)
    with torch.no_grad():
        for m in gated(dense_model):
            m.log_alpha.fill_(10.0)  # every gate open: the dense original with the trained weights
    dense = l0k.compact(dense_model, x1)
    diff = l0k.compare(model, small, xte[:256])
    err_small = evaluate(small, xte, yte)
    params = lambda m: sum(t.numel() for t in m.parameters())
    shape = (1, 28, 28)
    speed = {}
    for b in (1, 64):
        xb = xte[:b]
        speed[b] = {"dense_ms": time_inference(dense, xb), "l0_eval_ms": time_inference(model, xb),
                    "compact_ms": time_inference(small, xb)}
    widths = [(m.num_active(), m.num_gates()) for m in gated(model)]
    r = {"steps": a.steps, "batch": a.batch, "lam": a.lam, "lr": a.lr, "gate_lr": a.gate_lr, "seed": a.seed, "train_s": train_s,
         "test_images": len(xte), "test_error_gated": err, "test_error_compact": err_small,
         "inner_widths_open_total": widths, "dense_params": params(dense), "compact_params": params(small),
         "dense_flops": count_flops(dense, shape), "compact_flops": count_flops(small, shape),
         "compare": diff, "speed": {str(k): v for k, v in speed.items()}, "torch": torch.__version__,
         "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, "resnet_mnist.json"), "w") as f:
        json.dump(r, f, indent=1)
    lines = [
        "# Small ResNet on MNIST: gated inner channels, compacted",
        "",
        f"`python examples/resnet_mnist.py --steps {a.steps} --batch {a.batch} --lam {a.lam} --gate-lr {a.gate_lr}` "
        f"(a short run: {a.steps} steps of batch {a.batch}, {train_s:.0f} s on {r['threads']} CPU thread(s); "
        f"test error on the first {len(xte)} test images).",
        "",
        "| | dense original | compacted |",
        "|---|---:|---:|",
        f"| parameters | {r['dense_params']:,d} | {r['compact_params']:,d} |",
        f"| FLOPs per image | {r['dense_flops']:,d} | {r['compact_flops']:,d} |",
    ]
    for b, s in speed.items():
        lines.append(f"| CPU latency, batch {b} (median ms) | {s['dense_ms']:.3f} | {s['compact_ms']:.3f} "
                     f"({s['dense_ms'] / s['compact_ms']:.2f}x) |")
    lines += [
        f"| test error | {err:.2%} (gated eval model) | {err_small:.2%} |",
        "",
        "Open inner channels per block (open / total): "
        + ", ".join(f"{o}/{t}" for o, t in widths) + ".",
        f"Largest difference, compacted vs gated eval model on 256 test images: max |diff| "
        f"{diff['max_abs']:.1e}, relative (norm) {diff['norm_rel']:.1e}.",
        f"The gated eval model runs in {speed[64]['l0_eval_ms']:.3f} ms at batch 64.",
        "",
    ]
    with open(os.path.join(a.results, "resnet_mnist.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
