"""Inference rows of docs/design.md §7: eval-mode ``L0Linear`` with structured gate sparsity.

For the linear shapes (784->300, 300->100 float32; 4096->4096, 4096->14336 bfloat16 on CUDA) at gate
density 1.0 / 0.5 / 0.25 / 0.1 (input and output gates) and batch 1, 16, 8192, times the module's
eval forward (cached compact plan) per backend -- ``torch`` everywhere; ``triton`` (sparse_eval
kernels) and ``auto`` (the faster of the two, timed once) on CUDA -- against the dense full
layer (``dense_fwd_ms``: ``F.linear`` with the full weight) and a dense layer of the compacted shape
(``compact_dense_fwd_ms``: ``F.linear`` on a contiguous input of the kept size; the floor a gather or
scatter can reach). Forward only, under ``torch.no_grad()``: ``fwd_bwd_ms`` is None.

Imported by ``bench/run_bench.py`` (appends to ``common.EXTRA_SUITES``), or standalone:

    python bench/inference_suite.py --cpu      # small shapes only on the CPU
    python bench/inference_suite.py            # CUDA: all shapes

Standalone runs write ``bench/results/<device>-inference-<date>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from typing import List

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common  # noqa: E402
import l0kernels as l0k  # noqa: E402

# (suite, K, N, dtype); the transformer shapes run on CUDA only
SHAPES = [("lenet300", 784, 300, "float32"), ("lenet300", 300, 100, "float32"),
          ("transformer_mlp", 4096, 4096, "bfloat16"), ("transformer_mlp", 4096, 14336, "bfloat16")]
DENSITIES = (1.0, 0.5, 0.25, 0.1)
BATCHES = (1, 16, 8192)
GATES = ("in", "out")


def _layer(k, n, gate, density, dt, dev, g):
    m = l0k.L0Linear(k, n, gate=gate, device=dev, dtype=dt).eval()
    with torch.no_grad():
        m.weight.copy_(torch.randn(n, k, device=dev, generator=g) / k ** 0.5)
        m.bias.copy_(torch.randn(n, device=dev, generator=g))
        g_count = m.log_alpha.numel()
        keep = torch.randperm(g_count, device=dev, generator=g)[:max(1, round(density * g_count))]
        la = torch.full((g_count,), -6.0, device=dev)
        la[keep] = 5.0  # z_eval == 1 for open gates, 0 for closed ones
        m.log_alpha.copy_(la.to(dt))
    return m, int(keep.numel())


def _times(ctx, fns) -> List[float]:
    """Median ms of each function: interleaved on the CPU (``common.interleaved_ms``), ``ctx.time_ms`` (do_bench)
    on CUDA."""
    if ctx.device.type == "cuda":
        return [ctx.time_ms(f) for f in fns]
    return common.interleaved_ms(fns, ctx.reps)


def inference_suite(ctx) -> List[dict]:
    rows = []
    dev = ctx.device
    # module eval path per backend: "torch" (compact weight, F.linear + index_select/index_copy_), and on
    # CUDA "triton" (sparse_eval kernels), "cuda" (the extension's sparse_linear; float16/bfloat16, else
    # the torch path) and "auto" (the fastest, timed once per signature)
    backends = ["torch", "triton", "cuda", "auto"] if dev.type == "cuda" else ["torch"]
    for suite, k, n, dts in SHAPES:
        if ctx.cpu and suite != "lenet300":
            print(f"{suite}: {k}->{n} skipped on the CPU (inference rows on CPU: small shapes only)")
            continue
        if not ctx.wants(suite=suite, shape=f"{k}->{n}"):
            continue
        dt = common.DT[dts]
        g = torch.Generator(device=dev).manual_seed(0)
        for gate in GATES:
            for density in DENSITIES:
                if not ctx.wants(gate=gate, density=density) or not any(
                        ctx.wants(batch=m) for m in BATCHES) or not any(ctx.wants(backend=b) for b in backends):
                    continue
                layer, kept = _layer(k, n, gate, density, dt, dev, g)
                kc, nc = (kept, n) if gate == "in" else (k, kept)
                wc = torch.randn(nc, kc, device=dev, generator=g).to(dt)
                bc = torch.randn(nc, device=dev, generator=g).to(dt)
                for m in BATCHES:
                    if (ctx.quick and m > 16) or not ctx.wants(batch=m):
                        continue
                    x = torch.randn(m, k, device=dev, generator=g).to(dt)
                    xc = torch.randn(m, kc, device=dev, generator=g).to(dt)
                    with torch.no_grad():
                        dense, dense_c = _times(ctx, [lambda: F.linear(x, layer.weight, layer.bias),
                                                      lambda: F.linear(xc, wc, bc)])
                        dpeak = ctx.peak_mib(lambda: F.linear(x, layer.weight, layer.bias))
                    shape = f"{m}x{k}->{n},density={density}"
                    for backend in backends:
                        if not ctx.wants(backend=backend):
                            continue
                        layer.backend = backend
                        try:
                            with torch.no_grad():
                                layer(x)  # builds the cached plan (and, for auto, times its two paths)
                                fwd, = _times(ctx, [lambda: layer(x)])
                                peak = ctx.peak_mib(lambda: layer(x))
                        except Exception as e:  # one failing backend must not lose the other rows
                            print(f"  {backend}: FAILED ({type(e).__name__}: {e})", file=sys.stderr)
                            continue
                        print(f"{suite}: eval linear {shape} {dts} gate={gate} backend={backend}: {fwd:.3f} ms, "
                              f"dense {dense:.3f} ms, compacted dense {dense_c:.3f} ms", flush=True)
                        rows.append(ctx.row(op="linear_eval", gate=gate, noise=None, dtype=dts, shape=shape,
                                            backend=backend, fwd_ms=fwd, fwd_bwd_ms=None, dense_fwd_ms=dense,
                                            dense_fwd_bwd_ms=None, peak_mib=peak, dense_peak_mib=dpeak,
                                            density=density, batch=m, compact_shape=f"{kc}->{nc}",
                                            compact_dense_fwd_ms=dense_c))
                layer = None  # free the layer before the next one (not del: the lambdas above read it)
    return rows


common.EXTRA_SUITES.append(inference_suite)


def to_markdown(rows: List[dict]) -> str:
    f = common.fmt
    lines = ["| gate | dtype | shape | density | compact shape | backend | eval fwd ms | dense fwd ms | "
             "compacted dense fwd ms | eval / dense | eval / compacted |", "|" + "---|" * 11]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["gate"]), str(r["dtype"]), str(r["shape"]), str(r["density"]), str(r["compact_shape"]),
            str(r["backend"]), f(r["fwd_ms"]), f(r["dense_fwd_ms"]), f(r["compact_dense_fwd_ms"]),
            f(r["fwd_ms"] / r["dense_fwd_ms"], 2), f(r["fwd_ms"] / r["compact_dense_fwd_ms"], 2)]) + " |")
    r0 = rows[0] if rows else {}
    return "\n".join(lines) + (f"\n\nDevice: {r0.get('device')} ({torch.get_num_threads()} threads); torch {r0.get('torch')}; triton {r0.get('triton')}; "
                               f"commit {r0.get('commit')}; {r0.get('date')}. Medians in milliseconds, forward "
                               f"only under no_grad.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (small shapes only)")
    ap.add_argument("--quick", action="store_true", help="batches 1 and 16 only")
    ap.add_argument("--reps", type=int, default=20, help="CPU timing repetitions (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU; 0 = leave as is)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA device: use --cpu", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if a.cpu else "cuda")
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = common.make_meta(dev, now)
    ctx = common.BenchContext(dev, dev.type == "cpu", a.quick, a.reps, meta)
    rows = inference_suite(ctx)
    common.write_results(rows, a.out, meta["device"], now, "inference", to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
