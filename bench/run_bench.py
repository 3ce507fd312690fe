"""Benchmarks of docs/design.md §7: every gated op against its dense baseline, for every backend that
``l0kernels.available_backends(call)`` says can run the call (torch, triton, and cuda once built).

    python bench/run_bench.py                 # CUDA: all docs/design.md §7 shapes, triton.testing.do_bench medians
    python bench/run_bench.py --cpu --quick   # no GPU: LeNet shapes only, time.perf_counter medians
    python bench/run_bench.py --only 'shape=*x4096->4096' --only 'backend=cuda[fused],cuda[two_pass]'

``--only KEY=PATTERN[,PATTERN...]`` (repeatable, all must hold) keeps the rows whose KEY (suite, shape, gate,
noise, backend; the inference rows also density, batch, with shapes K->N) matches one of the fnmatch
patterns; rows without that key are not filtered by it. The dense baselines are always measured. Each row
is printed as it is measured, so a run cut off by a time limit still leaves its numbers in the log.

Writes ``bench/results/<device>-<date>.json`` (a list of rows with the fields of docs/design.md §7:
op, gate, noise, dtype, shape, backend, fwd_ms, fwd_bwd_ms, dense_fwd_ms, dense_fwd_bwd_ms, peak_mib,
dense_peak_mib, device, torch, triton, commit, date) and a markdown table beside it.

Timing: forward with autograd recording (inputs require grad), and forward+backward as
``torch.autograd.grad`` of the output with a fixed random upstream gradient (no ``.grad``
accumulation), both after warm-up; on CUDA ``triton.testing.do_bench(..., return_mode="median")``.
The dense baseline is ``F.linear`` / ``F.conv2d`` in the same dtype and memory format. ``peak_mib``
is ``torch.cuda.max_memory_allocated`` over one forward+backward, inputs included (None on CPU).

Shared pieces live in ``bench/common.py``. Extra suites: ``common.EXTRA_SUITES`` is a list of callables ``suite(ctx) -> list of row dicts``;
``bench/inference_suite.py`` (imported if present) appends to it. ``ctx`` is a :class:`BenchContext`
with ``device``, ``cpu``, ``quick``, ``time_ms(fn)``, ``peak_mib(fn)`` and ``row(**fields)`` (fills
device/torch/triton/commit/date and leaves absent fields None).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import l0kernels as l0k  # noqa: E402
from l0kernels._checks import conv2d_call, linear_call  # noqa: E402
from common import DT, EXTRA_SUITES, BenchContext, make_meta, parse_only, spec_markdown, write_results  # noqa: E402

LINEAR_MODES = [("in", "batch"), ("in", "sample"), ("out", "batch"), ("out", "sample"), ("weight", "batch")]

# (suite, M, K, N, dtype); docs/design.md §7
LINEAR_SHAPES = [
    ("lenet300", 100, 784, 300, "float32"),
    ("lenet300", 100, 300, 100, "float32"),
    ("transformer_mlp", 8192, 4096, 4096, "bfloat16"),
    ("transformer_mlp", 8192, 4096, 14336, "bfloat16"),
    # small batches, where the CUDA backend's single-launch forward should pay (not a docs/design.md §7 shape)
    ("small_m", 1, 4096, 4096, "bfloat16"),
    ("small_m", 16, 4096, 4096, "bfloat16"),
    ("small_m", 256, 4096, 4096, "float16"),
]
# (suite, B, C_in, C_out, H, W, k, padding, dtype, channels_last)
CONV_SHAPES = [
    ("lenet5", 100, 1, 20, 28, 28, 5, 0, "float32", False),
    ("lenet5", 100, 20, 50, 12, 12, 5, 0, "float32", False),
] + [
    ("wrn28_10", 128, c, c, s, s, 3, 1, dt, cl)
    for (c, s) in ((160, 32), (320, 16), (640, 8)) for (dt, cl) in (("bfloat16", True), ("float32", False))
]
QUICK_SUITES = ("lenet300", "lenet5")


def _grad_fn(f, inputs, dy_holder):
    def run():
        y = f()
        if dy_holder[0] is None:
            dy_holder[0] = torch.randn_like(y)
        torch.autograd.grad(y, inputs, dy_holder[0])
    return run


def _measure(ctx, gated: Dict[str, Callable], dense: Callable, inputs, dense_inputs, common: dict) -> List[dict]:
    dy = [None]
    dense_fb = _grad_fn(dense, dense_inputs, dy)
    dense_fb()  # materialise dy
    dense_t = dict(dense_fwd_ms=ctx.time_ms(dense), dense_fwd_bwd_ms=ctx.time_ms(dense_fb),
                   dense_peak_mib=ctx.peak_mib(dense_fb))
    rows = []
    for name, f in gated.items():
        fb = _grad_fn(f, inputs, dy)
        if not ctx.wants(backend=name):
            continue
        try:
            rows.append(ctx.row(backend=name, fwd_ms=ctx.time_ms(f), fwd_bwd_ms=ctx.time_ms(fb),
                                peak_mib=ctx.peak_mib(fb), **dense_t, **common))
            r = rows[-1]
            print(f"  {name}: fwd {r['fwd_ms']:.4f} ms, fwd+bwd {r['fwd_bwd_ms']:.4f} ms; dense fwd "
                  f"{r['dense_fwd_ms']:.4f} ms, fwd+bwd {r['dense_fwd_bwd_ms']:.4f} ms", flush=True)
        except Exception as e:  # a backend failing one shape must not lose the others' rows
            print(f"  {name}: FAILED ({type(e).__name__}: {e})", file=sys.stderr)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _cuda_forward_variants(x, w, la, b, kw) -> Dict[str, Callable]:
    """Rows ``cuda[fused]`` and ``cuda[two_pass]``: the CUDA backend with each forward forced (the plain
    ``cuda`` row is its ``auto`` pick), where the fused forward can run: the GEMV for 1-16 rows (every
    dtype), the tensor-core GEMM for more (float16 / bfloat16 on sm_80+)."""
    from l0kernels.backends import cuda as cb
    if cb.fused_why_not(x) is not None:
        return {}

    def forced(impl):
        def run():
            with cb.gemm_impl(impl):
                return l0k.l0_linear(x, w, la, b, backend="cuda", **kw)
        return run
    return {f"cuda[{impl}]": forced(impl) for impl in ("fused", "two_pass")}


def linear_suite(ctx: BenchContext) -> List[dict]:
    rows = []
    for suite, m, k, n, dts in LINEAR_SHAPES:
        if (ctx.quick and suite not in QUICK_SUITES) or not ctx.wants(suite=suite, shape=f"{m}x{k}->{n}"):
            continue
        dt = DT[dts]
        g = torch.Generator(device=ctx.device).manual_seed(0)
        x = torch.randn(m, k, device=ctx.device, dtype=dt, generator=g).requires_grad_()
        w = (torch.randn(n, k, device=ctx.device, generator=g) / k ** 0.5).to(dt).requires_grad_()
        b = torch.randn(n, device=ctx.device, dtype=dt, generator=g).requires_grad_()
        for gate, noise in LINEAR_MODES:
            if not ctx.wants(gate=gate, noise=noise):
                continue
            la_shape = {"in": (k,), "out": (n,), "weight": (n, k)}[gate]
            la = (torch.randn(la_shape, device=ctx.device, generator=g) + 1.0).to(dt).requires_grad_()
            kw = dict(seed=1234, gate=gate, noise=noise, training=True)
            call = linear_call(x, w, la, b, backend="auto", beta=2 / 3, gamma=-0.1, zeta=1.1, **kw)
            gated = {be: (lambda be=be: l0k.l0_linear(x, w, la, b, backend=be, **kw))
                     for be in l0k.available_backends(call)}
            gated.update(_cuda_forward_variants(x, w, la, b, kw) if "cuda" in gated else {})
            common = dict(op="linear", gate=gate, noise=noise, dtype=dts, shape=f"{m}x{k}->{n}")
            print(f"{suite}: linear {common['shape']} {dts} gate={gate} noise={noise}: "
                  f"{sorted(b for b in gated if ctx.wants(backend=b))}", flush=True)
            rows += _measure(ctx, gated, lambda: F.linear(x, w, b), (x, w, la, b), (x, w, b), common)
    return rows


def conv_suite(ctx: BenchContext) -> List[dict]:
    rows = []
    for suite, bsz, cin, cout, h, wd, ks, pad, dts, cl in CONV_SHAPES:
        fmt = "channels_last" if cl else "nchw"
        shape = f"{bsz}x{cin}x{h}x{wd},{cin}->{cout},k{ks},{fmt}"
        if (ctx.quick and suite not in QUICK_SUITES) or not ctx.wants(suite=suite, shape=shape):
            continue
        dt = DT[dts]
        g = torch.Generator(device=ctx.device).manual_seed(0)
        x = torch.randn(bsz, cin, h, wd, device=ctx.device, dtype=dt, generator=g)
        w = (torch.randn(cout, cin, ks, ks, device=ctx.device, generator=g) / (cin * ks * ks) ** 0.5).to(dt)
        if cl:
            x = x.to(memory_format=torch.channels_last)
            w = w.to(memory_format=torch.channels_last)
        x.requires_grad_()
        w.requires_grad_()
        b = torch.randn(cout, device=ctx.device, dtype=dt, generator=g).requires_grad_()
        la = (torch.randn(cout, device=ctx.device, generator=g) + 1.0).to(dt).requires_grad_()
        for noise in ("batch", "sample"):
            if not ctx.wants(gate="channel", noise=noise):
                continue
            kw = dict(padding=pad, seed=1234, noise=noise, training=True)
            call = conv2d_call(x, w, la, b, 1, pad, 1, 1, seed=1234, noise=noise, training=True, backend="auto",
                               beta=2 / 3, gamma=-0.1, zeta=1.1)
            gated = {be: (lambda be=be: l0k.l0_conv2d(x, w, la, b, backend=be, **kw))
                     for be in l0k.available_backends(call)}
            common = dict(op="conv2d", gate="channel", noise=noise, dtype=dts, shape=shape)
            print(f"{suite}: conv2d {shape} {dts} noise={noise}: {sorted(b for b in gated if ctx.wants(backend=b))}",
                  flush=True)
            rows += _measure(ctx, gated, lambda: F.conv2d(x, w, b, padding=pad), (x, w, la, b), (x, w, b), common)
    return rows


SUITES = {"linear": linear_suite, "conv2d": conv_suite}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    ap.add_argument("--quick", action="store_true", help="small shapes only (LeNet-300-100, LeNet-5)")
    ap.add_argument("--ops", default="linear,conv2d", help="comma-separated subset of: linear,conv2d")
    ap.add_argument("--no-extra", action="store_true", help="skip EXTRA_SUITES (bench/inference_suite.py)")
    ap.add_argument("--reps", type=int, default=20, help="CPU timing repetitions (median)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--only", action="append", default=[], metavar="KEY=PATTERN[,PATTERN]",
                    help="keep only rows whose KEY matches a pattern (repeatable; see the module docstring)")
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA device: use --cpu (with --quick for the small shapes only)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if a.cpu else "cuda")
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = make_meta(dev, now)
    ctx = BenchContext(dev, dev.type == "cpu", a.quick, a.reps, meta, parse_only(a.only, ap.error))
    if not a.no_extra:
        try:
            import inference_suite  # noqa: F401  (appends to EXTRA_SUITES)
        except ImportError as e:
            if getattr(e, "name", None) != "inference_suite":
                raise
    rows: List[dict] = []
    for op in [o.strip() for o in a.ops.split(",") if o.strip()]:
        if op not in SUITES:
            ap.error(f"--ops: unknown op {op!r} (choose from {', '.join(SUITES)})")
        rows += SUITES[op](ctx)
    if not a.no_extra:
        for suite in EXTRA_SUITES:
            rows += list(suite(ctx))
    write_results(rows, a.out, meta["device"], now, "", spec_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
