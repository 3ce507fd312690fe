"""Pieces shared by the benchmark scripts of ``bench/`` (no script imports another script).

- :class:`BenchContext` (timing, peak memory, docs/design.md §7 rows), :data:`FIELDS`, :data:`DT`;
- :data:`EXTRA_SUITES`: suites ``suite(ctx) -> rows`` that ``run_bench.py`` runs after its own
  (``inference_suite.py`` appends to it when imported);
- :func:`spec_markdown` (the docs/design.md table), :func:`interleaved_ms`: medians of several functions timed one call each per round (other load on the
  machine hits them alike), :func:`make_meta`, :func:`write_results`, :func:`fmt`;
- the CPU layer cases of ``cpu_ratio.py`` / ``test_bench_cpu.py`` (:data:`CASES`, :func:`make`);
- :func:`log_alpha_for_density`: gates whose drawn density is a given fraction.
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

FIELDS = ["op", "gate", "noise", "dtype", "shape", "backend", "fwd_ms", "fwd_bwd_ms", "dense_fwd_ms",
          "dense_fwd_bwd_ms", "peak_mib", "dense_peak_mib", "device", "torch", "triton", "commit", "date"]

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EXTRA_SUITES: List[Callable[["BenchContext"], List[dict]]] = []


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                       stderr=subprocess.DEVNULL).decode().strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


@dataclass
class BenchContext:
    device: torch.device
    cpu: bool
    quick: bool
    reps: int
    meta: Dict[str, Optional[str]]
    only: Optional[Dict[str, List[str]]] = None  # --only: key -> fnmatch patterns

    def wants(self, **fields) -> bool:
        """True if every ``--only`` key among ``fields`` equals or matches one of its patterns (``cuda[fused]``
        is taken literally: in fnmatch its brackets would be a character class)."""
        return all(any(str(v) == p or fnmatch.fnmatchcase(str(v), p) for p in (self.only or {})[k])
                   for k, v in fields.items() if k in (self.only or {}))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn`` after warm-up."""
        if self.device.type == "cuda":
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        for _ in range(2):
            fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return float(statistics.median(times))

    def peak_mib(self, fn: Callable[[], object]) -> Optional[float]:
        if self.device.type != "cuda":
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def row(self, **fields) -> dict:
        r = {k: None for k in FIELDS}
        r.update(self.meta)
        r.update(fields)
        return r


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "cpu"


def fmt(v, nd=3):
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def spec_markdown(rows: List[dict]) -> str:
    """The markdown table of docs/design.md §7 rows."""
    head = ("| op | gate | noise | dtype | shape | backend | fwd ms | fwd+bwd ms | dense fwd ms | dense fwd+bwd ms "
            "| fwd+bwd / dense | peak MiB | dense peak MiB |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        ratio = (r["fwd_bwd_ms"] / r["dense_fwd_bwd_ms"]) if r.get("fwd_bwd_ms") and r.get("dense_fwd_bwd_ms") else None
        lines.append("| " + " | ".join([str(r.get("op")), str(r.get("gate")), str(r.get("noise")), str(r.get("dtype")),
                                        str(r.get("shape")), str(r.get("backend")), fmt(r.get("fwd_ms")),
                                        fmt(r.get("fwd_bwd_ms")), fmt(r.get("dense_fwd_ms")),
                                        fmt(r.get("dense_fwd_bwd_ms")), fmt(ratio, 2), fmt(r.get("peak_mib"), 1),
                                        fmt(r.get("dense_peak_mib"), 1)]) + " |")
    r0 = rows[0] if rows else {}
    foot = (f"\nDevice: {r0.get('device')}; torch {r0.get('torch')}; triton {r0.get('triton')}; commit "
            f"{r0.get('commit')}; {r0.get('date')}. Medians in milliseconds; peak = max allocated over one "
            f"forward+backward, inputs included.\n")
    return "\n".join(lines) + "\n" + foot


def write_results(rows, out_dir, device, now, kind, markdown):
    """Write ``<device>[-kind]-<date>.json`` and the ``.md`` table beside it (docs/design.md §7)."""
    os.makedirs(out_dir, exist_ok=True)
    tag = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in device).strip("-")
    stem = os.path.join(out_dir, f"{tag}{'-' + kind if kind else ''}-{now.strftime('%Y-%m-%dT%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows))
    print(f"{len(rows)} rows -> {stem}.json, {stem}.md")
    return stem


def make_meta(dev: torch.device, now: _dt.datetime) -> Dict[str, Optional[str]]:
    """The fields every row carries: device, torch, triton, commit, date, triton_autotune."""
    return dict(device=device_name(dev), torch=torch.__version__, triton=triton_version(), commit=git_commit(),
                date=now.isoformat(timespec="seconds"), triton_autotune=triton_autotune())


def triton_autotune() -> bool:
    """Whether the Triton kernels autotune (``L0K_TRITON_AUTOTUNE=0``: one fixed configuration); recorded in
    every row, since fixed tiles make the Triton rows slower than a tuned run."""
    return os.environ.get("L0K_TRITON_AUTOTUNE", "1") != "0"


ONLY_KEYS = ("suite", "shape", "gate", "noise", "backend", "density", "batch")


def parse_only(specs, error) -> Optional[Dict[str, List[str]]]:
    """``["backend=cuda*,torch", "shape=*->4096"]`` -> ``{"backend": ["cuda*", "torch"], ...}``."""
    only: Dict[str, List[str]] = {}
    for spec in specs:
        key, sep, pats = spec.partition("=")
        if not sep or key not in ONLY_KEYS or not pats:
            error(f"--only {spec!r}: expected KEY=PATTERN[,PATTERN...] with KEY one of {', '.join(ONLY_KEYS)}")
        if key in only:
            error(f"--only: {key} given twice")
        only[key] = pats.split(",")
    return only or None


def interleaved_times(fns: Sequence[Callable[[], object]], reps: int, warmup: int = 2,
                      device: Optional[torch.device] = None) -> List[List[float]]:
    """Milliseconds of every call of each function, timed in rounds of one call each (on CUDA synchronised
    around every call), so that other load on the machine hits them alike. Each round starts one function
    later than the one before, so no function always runs right after the same other one."""
    cuda = device is not None and device.type == "cuda"
    for f in fns:
        for _ in range(warmup):
            f()
    times = [[] for _ in fns]
    n = len(fns)
    for r in range(reps):
        for i in range(n):
            t, f = times[(i + r) % n], fns[(i + r) % n]
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            f()
            if cuda:
                torch.cuda.synchronize(device)
            t.append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_ms(fns: Sequence[Callable[[], object]], reps: int, warmup: int = 2,
                   device: Optional[torch.device] = None) -> List[float]:
    """Median milliseconds of each function (:func:`interleaved_times`)."""
    return [float(statistics.median(t)) for t in interleaved_times(fns, reps, warmup, device)]


def log_alpha_for_density(g: int, density: float, *, beta: float = 2.0 / 3.0, gamma: float = -0.1,
                          zeta: float = 1.1, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """``log_alpha`` of ``g`` gates whose training draws have about ``density`` open gates per call: a random
    ``round(density * g)`` of them at ``log 100`` (the authors' upper clamp, ``p_open`` 0.998), the others at
    ``log 0.01`` (``p_open`` 0.0015); density 1.0 puts every gate at ``log 100``."""
    la = torch.full((g,), math.log(1e-2), device=device)
    keep = torch.randperm(g, generator=generator, device=device)[:round(density * g)]
    la[keep] = math.log(1e2)
    return la


# The CPU layer cases of cpu_ratio.py and test_bench_cpu.py (issue #2 item 8)
CASES = {
    "lenet300_fc1_in_batch": dict(m=100, k=784, n=300, gate="in", noise="batch"),
    "lenet300_fc2_in_batch": dict(m=100, k=300, n=100, gate="in", noise="batch"),
    "lenet300_fc1_in_sample": dict(m=100, k=784, n=300, gate="in", noise="sample"),
    "lenet300_fc1_out_batch": dict(m=100, k=784, n=300, gate="out", noise="batch"),
    "lenet300_fc1_weight": dict(m=100, k=784, n=300, gate="weight", noise="batch"),
}


def make(case, seed=0):
    """``(case dict, x, w, b, log_alpha, dY)`` for a CPU case (``log_alpha ~ N(0, 1)``)."""
    c = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c["m"], c["k"], generator=g)
    w = (torch.randn(c["n"], c["k"], generator=g) * 0.05).requires_grad_()
    b = torch.randn(c["n"], generator=g).requires_grad_()
    la_shape = {"in": (c["k"],), "out": (c["n"],), "weight": (c["n"], c["k"])}[c["gate"]]
    la = torch.randn(la_shape, generator=g).requires_grad_()
    gy = torch.randn(c["m"], c["n"], generator=g)
    return c, x, w, b, la, gy
