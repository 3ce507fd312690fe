"""Training-step benchmark of issue 13: closed gates cost nothing.

CPU (default): one whole LeNet-300-100 training step -- forward, the paper's regularizer
(``l0_regularizer(model, 0.1, 5e-4, N=60000)``), backward, Adam, ``constrain_`` -- against the same
network built from ``nn.Linear`` trained with Adam (``weight_decay = 5e-4 / N``: the gradient of the
expected-L2 term of an always-open weight), batch 100, float32, interleaved (one step of every
configuration per round; medians). fc1 input-gate density 1.0 / 0.5 / 0.3 / 0.1, fc2 at 1.0 and 0.75
(fc3 at 1.0), set through ``log_alpha`` (``common.log_alpha_for_density``: open gates at ``log 100``,
closed ones at ``log 0.01``, so the drawn density per call is the one asked for within a few gates).
Two reference rows run the same L0 step with the skipping turned off (``_active.ENABLED = False``).
Then the layer alone: 784->300 forward+backward with input gates (batch noise) against ``F.linear``.
Goals: step <= 1.15x dense at density 1.0 and <= 0.6x at 0.3; layer <= (d + 0.15)x ``F.linear``.

GPU (``--gpu``; not run yet): 8192 tokens, 4096->4096 and 4096->14336, bfloat16, batch-noise input and
output gates at density 1.0 / 0.5 / 0.25 / 0.1, ``l0_linear`` forward+backward per available backend
against ``F.linear`` forward+backward (``triton.testing.do_bench`` medians), and the Triton and CUDA kernels
with the skipping turned off (``triton-noskip``, ``cuda-noskip``). Goal <= (d + 0.1)x dense. Then
``l0_conv2d`` (3x3, channels_last, bf16: batch 32 of 64x56x56 -> 64 and 256x14x14 -> 256) against ``F.conv2d``
(``gpu_conv_rows``; the CUDA rows are the im2col open-set path).

    nice -n 0 python bench/train_step.py [--reps 300] [--threads N]
    python bench/train_step.py --gpu [--quick]

Writes ``bench/results/<device>-train-step-<date>.json`` and ``.md`` (the load average is recorded).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import l0kernels as l0k  # noqa: E402
from l0kernels import _active  # noqa: E402
from l0kernels.models import LeNet300100  # noqa: E402

N_TRAIN, LAMBA, WD, BATCH = 60000, 0.1, 5e-4, 100
FC1_DENSITIES = (1.0, 0.5, 0.3, 0.1)
FC2_DENSITIES = (1.0, 0.75)
GPU_SHAPES = ((8192, 4096, 4096), (8192, 4096, 14336))
GPU_DENSITIES = (1.0, 0.5, 0.25, 0.1)


def _l0_step(d1: float, d2: float, gen: torch.Generator, skip: bool = True):
    model = LeNet300100()
    layers = [m for _, m in l0k.l0_layers(model)]
    with torch.no_grad():
        for m, d in zip(layers, (d1, d2, 1.0)):
            m.log_alpha.copy_(common.log_alpha_for_density(m.log_alpha.numel(), d, generator=gen))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x, y):
        old = _active.ENABLED
        _active.ENABLED = skip and old
        try:
            loss = F.cross_entropy(model(x), y) + l0k.l0_regularizer(model, LAMBA, WD, N_TRAIN)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            l0k.constrain_(model)
        finally:
            _active.ENABLED = old
    return step


def _dense_step():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=WD / N_TRAIN)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def cpu_rows(reps: int, meta: dict) -> List[dict]:
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(8, BATCH, 784, generator=gen)
    ys = torch.randint(0, 10, (8, BATCH), generator=gen)
    steps: Dict[str, object] = {"dense": _dense_step()}
    for d2 in FC2_DENSITIES:
        for d1 in FC1_DENSITIES:
            steps[f"l0 fc1={d1} fc2={d2}"] = _l0_step(d1, d2, gen)
    for d1 in (1.0, 0.3):
        steps[f"l0 fc1={d1} fc2=1.0 skip off"] = _l0_step(d1, 1.0, gen, skip=False)
    it = [0]

    def bind(f):
        def run():
            i = it[0] = (it[0] + 1) % 8
            f(xs[i], ys[i])
        return run
    names = list(steps)
    _active.PATHS.clear()
    rows = _rows(meta, "train_step", names, common.interleaved_times([bind(steps[n]) for n in names], reps, 20))
    # the layer alone: 784 -> 300, input gates, batch noise, forward+backward against F.linear
    x = torch.randn(BATCH, 784, generator=gen)
    w = (torch.randn(300, 784, generator=gen) * 0.05).requires_grad_()
    b = torch.randn(300, generator=gen).requires_grad_()
    gy = torch.randn(BATCH, 300, generator=gen)
    fns = [lambda: torch.autograd.grad(F.linear(x, w, b), (w, b), gy)]
    for d in FC1_DENSITIES:
        la = common.log_alpha_for_density(784, d, generator=gen).requires_grad_()
        fns.append(lambda la=la: torch.autograd.grad(l0k.l0_linear(x, w, la, b, backend="torch"), (w, la, b), gy))
    layer = _rows(meta, "layer_784_300_in", ["F.linear"] + [f"density={d}" for d in FC1_DENSITIES],
                  common.interleaved_times(fns, reps * 2, 20))
    for r, d in zip(layer[1:], FC1_DENSITIES):
        r["goal"] = d + 0.15
    rows += layer[1:]
    rows.append(dict(meta, bench="paths", config=str({"/".join(k): v for k, v in _active.PATHS.items()})))
    return rows


def _rows(meta, bench, names, times) -> List[dict]:
    """One row per configuration: the median (``step_ms``) and, as a load-robust lower bound, the minimum and
    first quartile of its times, each against the first configuration (the dense one)."""
    stats = []
    for t in times:
        t = sorted(t)
        stats.append((t[len(t) // 2], t[0], t[len(t) // 4]))
    d = stats[0]
    return [dict(meta, bench=bench, config=n, step_ms=s[0], dense_step_ms=d[0], ratio=s[0] / d[0],
                 min_ms=s[1], dense_min_ms=d[1], ratio_min=s[1] / d[1], q25_ms=s[2], ratio_q25=s[2] / d[2])
            for n, s in zip(names, stats)]


def gpu_plan(quick: bool = False):
    """``(shapes, densities, backends)`` of :func:`gpu_rows`."""
    backends = ("triton", "triton-noskip", "cuda", "cuda-noskip")
    if quick:
        return GPU_SHAPES[:1], (1.0, 0.25), backends
    return GPU_SHAPES, GPU_DENSITIES, ("torch",) + backends


def _skip_modules():
    """``(module, attribute)`` of each open-fraction threshold the GPU rows set (the CUDA backend's linear and
    conv ones, Triton's); those of a module that does not import (no extension, no Triton) are left out."""
    out = []
    for name, attrs in (("l0kernels.backends.cuda", ("SKIP_BELOW", "CONV_SKIP_BELOW")),
                        ("l0kernels.backends.triton._gate_math", ("SKIP_BELOW",))):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        out += [(mod, a) for a in attrs]
    return out


def _time_backend(ctx, be: str, f, grads_of, dy, mods):
    """``(fwd_ms, fwd_bwd_ms, peak_mib)`` of ``f`` (one call of backend ``be``) and of its backward (``grads_of``
    the tensors differentiated), or None where the backend cannot run it. ``"<backend>-noskip"``: the kernels
    with the skipping off (``L0K_SKIP_CLOSED=0``: the dense kernels of before), the reference for what the
    device open set costs at density 1.0 and saves below it; otherwise the open-set kernels at every density
    (every threshold of ``mods`` at 1)."""
    old = _active.ENABLED
    old_below = [getattr(m, a) for m, a in mods]
    _active.ENABLED = old and not be.endswith("-noskip")
    for m, a in mods:
        setattr(m, a, 1.0)
    try:
        return (ctx.time_ms(f), ctx.time_ms(lambda: torch.autograd.grad(f(), grads_of, dy)),
                ctx.peak_mib(lambda: torch.autograd.grad(f(), grads_of, dy)))
    except (ValueError, RuntimeError) as e:  # a backend that cannot run the call
        print(f"  {be}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    finally:
        _active.ENABLED = old
        for (m, a), v in zip(mods, old_below):
            setattr(m, a, v)


def gpu_rows(ctx: common.BenchContext, quick: bool = False) -> List[dict]:
    """design.md §7-format rows (``common.FIELDS`` + density) for the transformer MLP shapes on CUDA. ``quick`` (the
    GPU check's second call): 4096->4096 only, densities 1.0 and 0.25, the Triton and CUDA backends with and
    without the skipping."""
    dev, dt = ctx.device, torch.bfloat16
    shapes, densities, backends = gpu_plan(quick)
    rows = []
    mods = _skip_modules()
    for m, k, n in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, k, device=dev, generator=g).to(dt).requires_grad_()
        w = (torch.randn(n, k, device=dev, generator=g) / k ** 0.5).to(dt).requires_grad_()
        b = torch.randn(n, device=dev, generator=g).to(dt).requires_grad_()
        dy = torch.randn(m, n, device=dev, generator=g).to(dt)
        dense = ctx.time_ms(lambda: torch.autograd.grad(F.linear(x, w, b), (x, w, b), dy))
        dense_fwd = ctx.time_ms(lambda: F.linear(x, w, b))
        dense_peak = ctx.peak_mib(lambda: torch.autograd.grad(F.linear(x, w, b), (x, w, b), dy))
        for gate in ("in", "out"):
            for d in densities:
                gcount = k if gate == "in" else n
                la = common.log_alpha_for_density(gcount, d, device=dev).to(dt).requires_grad_()
                kw = dict(gate=gate, noise="batch", training=True)
                for be in backends:
                    f = lambda be=be: l0k.l0_linear(x, w, la, b, backend=be.split("-")[0], **kw)  # noqa: E731
                    timed = _time_backend(ctx, be, f, (x, w, la, b), dy, mods)
                    if timed is None:
                        continue
                    fwd, fb, peak = timed
                    rows.append(ctx.row(op="linear_train", gate=gate, noise="batch", dtype="bfloat16",
                                        shape=f"{m}x{k}->{n},density={d}", backend=be, fwd_ms=fwd, fwd_bwd_ms=fb,
                                        dense_fwd_ms=dense_fwd, dense_fwd_bwd_ms=dense, peak_mib=peak,
                                        dense_peak_mib=dense_peak, density=d, goal=d + 0.1))
                    print(f"{m}x{k}->{n} gate={gate} d={d} {be}: {fb:.3f} ms vs dense {dense:.3f} ms "
                          f"({fb / dense:.2f}x, goal {d + 0.1:.2f}x)")
    return rows


GPU_CONV_SHAPES = ((32, 64, 56, 64), (32, 256, 14, 256))  # batch, C_in, H = W, C_out; 3x3, padding 1, bf16


def gpu_conv_plan(quick: bool = False):
    """``(shapes, densities, backends)`` of :func:`gpu_conv_rows` (quick: the first shape, densities 1.0 and
    0.25, the CUDA backend with and without skipping: no Triton autotuning inside the GPU check's second call)."""
    if quick:
        return GPU_CONV_SHAPES[:1], (1.0, 0.25), ("cuda", "cuda-noskip")
    return GPU_CONV_SHAPES, GPU_DENSITIES, ("triton", "triton-noskip", "cuda", "cuda-noskip")


def gpu_conv_rows(ctx: common.BenchContext, quick: bool = False) -> List[dict]:
    """design.md §7-format rows for ``l0_conv2d`` training (batch noise, channel gates, bf16, channels_last): forward and
    forward+backward against ``F.conv2d`` (cuDNN); ``cuda`` is the im2col open-set path at every density."""
    dev, dt = ctx.device, torch.bfloat16
    shapes, densities, backends = gpu_conv_plan(quick)
    rows = []
    mods = _skip_modules()
    for bsz, cin, hw, cout in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(bsz, cin, hw, hw, device=dev, generator=g).to(dt).to(memory_format=torch.channels_last)
        x.requires_grad_()
        w = (torch.randn(cout, cin, 3, 3, device=dev, generator=g) / (9 * cin) ** 0.5).to(dt).requires_grad_()
        b = torch.randn(cout, device=dev, generator=g).to(dt).requires_grad_()
        dy = torch.randn(bsz, cout, hw, hw, device=dev, generator=g).to(dt).to(memory_format=torch.channels_last)
        dense = ctx.time_ms(lambda: torch.autograd.grad(F.conv2d(x, w, b, padding=1), (x, w, b), dy))
        dense_fwd = ctx.time_ms(lambda: F.conv2d(x, w, b, padding=1))
        for d in densities:
            la = common.log_alpha_for_density(cout, d, device=dev).to(dt).requires_grad_()
            for be in backends:
                f = lambda be=be: l0k.l0_conv2d(x, w, la, b, padding=1, backend=be.split("-")[0])  # noqa: E731
                timed = _time_backend(ctx, be, f, (x, w, la, b), dy, mods)
                if timed is None:
                    continue
                fwd, fb, peak = timed
                shape = f"{bsz}x{cin}x{hw}x{hw}->{cout},3x3,density={d}"
                rows.append(ctx.row(op="conv2d_train", gate="channel", noise="batch", dtype="bfloat16", shape=shape,
                                    backend=be, fwd_ms=fwd, fwd_bwd_ms=fb, dense_fwd_ms=dense_fwd,
                                    dense_fwd_bwd_ms=dense, peak_mib=peak, density=d, goal=d + 0.1))
                print(f"conv {shape} {be}: {fb:.3f} ms vs dense {dense:.3f} ms ({fb / dense:.2f}x)")
    return rows


def cpu_markdown(rows: List[dict]) -> str:
    f = common.fmt
    r0 = rows[0]
    lines = ["| benchmark | configuration | median ms | dense median ms | ratio (medians) | ratio (minima) | "
             "ratio (1st quartiles) | goal |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["bench"] == "paths":
            continue
        goal = r.get("goal")
        if r["bench"] == "train_step" and r["config"].startswith("l0 fc1=1.0 fc2=1.0") and "off" not in r["config"]:
            goal = 1.15
        if r["bench"] == "train_step" and r["config"] == "l0 fc1=0.3 fc2=1.0":
            goal = 0.6
        lines.append(f"| {r['bench']} | {r['config']} | {f(r['step_ms'])} | {f(r['dense_step_ms'])} | "
                     f"{f(r['ratio'], 2)} | {f(r['ratio_min'], 2)} | {f(r['ratio_q25'], 2)} | "
                     f"{f(goal, 2) if goal else ''} |")
    lines.append(f"\nDevice: {r0['device']} ({r0['threads']} threads), torch {r0['torch']}, commit {r0['commit']}, "
                 f"{r0['date']}; load average at start/end {r0['load_start']} / {r0['load_end']}. Interleaved "
                 f"medians of {r0['reps']} steps (the layer: {2 * r0['reps']} calls).")
    lines.append(f"Paths taken: {rows[-1]['config']}\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU rows (CUDA only)")
    ap.add_argument("--quick", action="store_true", help="with --gpu: one shape, densities 1.0 and 0.25")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU; 0 = leave as is)")
    ap.add_argument("--out", default=os.path.join(common.HERE, "results"))
    a = ap.parse_args(argv)
    now = _dt.datetime.now(_dt.timezone.utc)
    if a.gpu:
        if not torch.cuda.is_available():
            print("--gpu: no CUDA device", file=sys.stderr)
            return 2
        dev = torch.device("cuda")
        meta = common.make_meta(dev, now)
        ctx = common.BenchContext(dev, False, False, a.reps, meta)
        l0k.available_backends()
        rows = gpu_rows(ctx, a.quick) + gpu_conv_rows(ctx, a.quick)
        common.write_results(rows, a.out, meta["device"], now, "train-step", common.spec_markdown)
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    meta = common.make_meta(torch.device("cpu"), now)
    meta.update(threads=torch.get_num_threads(), reps=a.reps, load_start=" ".join(f"{v:.1f}" for v in os.getloadavg()))
    rows = cpu_rows(a.reps, meta)
    load_end = " ".join(f"{v:.1f}" for v in os.getloadavg())
    for r in rows:
        r["load_end"] = load_end
    for r in rows:
        if r["bench"] != "paths":
            print(f"{r['bench']:18s} {r['config']:28s} {r['step_ms']:8.3f} ms  dense {r['dense_step_ms']:8.3f} ms"
                  f"  {r['ratio']:.2f}x  (minima {r['min_ms']:.3f} / {r['dense_min_ms']:.3f} ms: "
                  f"{r['ratio_min']:.2f}x; q25 {r['ratio_q25']:.2f}x)")
    common.write_results(rows, a.out, meta["device"], now, "train-step", cpu_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
