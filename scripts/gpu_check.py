#!/usr/bin/env python3
"""The GPU check, in two device calls that fit the GPU machine's limits (15 minutes of device time in all, at
most 8 files back from ``$OUT``, no deeper than two folders). Run from the repository root:

    python3 scripts/gpu_check.py --call 1   # <= 7 min: versions and paths; build _C (sm_90) and import it;
                                            # the CUDA GPU tests; the Triton GPU tests (autotuning off);
                                            # the benchmark rows behind docs/benchmarks.md's claims
    python3 scripts/gpu_check.py --call 2   # <= 4 min: compute-sanitizer memcheck and racecheck over chosen
                                            # tests, then the further benchmark rows that fit
    python3 scripts/gpu_check.py --call 1 --dry-run [--json]   # print steps, limits and files; run nothing

Each step runs under its own ``timeout`` and writes its log straight into ``$OUT`` (a temporary folder when
unset) while it runs, so a call cut off early still returns what the first steps found; the summary file
gets one line per finished step. Exit status 0 only if every step passed. ``import l0kernels._C`` failing
after the build is a hard error (the CUDA tests are then not run: they would only skip); the check never
falls back to ``L0K_SKIP_CUDA``. CPU-only work (the nvcc compile test, the emulator under ThreadSanitizer)
is CI's and is not run here; the GPU tests run once (``-m gpu``), the sanitizers rerun a fixed list of them.

Call 1 returns the built extension (``_C.<python tag>.so``). Copy it to ``l0kernels/`` and name that path in
the device call's ``carry`` for call 2: call 2 then imports it instead of building (a fresh machine has no
build; without it call 2 builds first and takes up to ``BUILD_S`` seconds longer).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = "scripts/gpu_check.py"
CALL_LIMIT_S = {1: 420, 2: 240}  # the budget per device call
MAX_FILES = 8
BUILD_S = 150
XDIST_WORKERS = 8

# compute-sanitizer runs these exact test ids (tests/gpu/test_gpu_check.py checks that each one is collected).
# Ids: dtype0/1/2 index the test's own dtype list (test_cuda_gpu.py): DTYPES = float32, float16, bfloat16;
# the fused forward and sparse_linear tests: float16, bfloat16, float32; the split-K test: float32, bfloat16.
# FUSED_SHAPES: shape0 = 87 rows (tensor-core GEMM), shape3 = K 0, shape4 = 1 row (GEMV), shape5 = 7 rows
# N 1030, shape7 = GEMV split over K, shape8 = tensor-core GEMM split over K. The open-set test: gate-group-density-
# dtype (float16, bfloat16).
_T = "tests/gpu/test_cuda_gpu.py::"
MEMCHECK_TESTS = [  # this package's own kernels first: a call cut off still checked them
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape0-in-batch-True-dtype0]",
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape1-weight-batch-True-dtype1]",
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape3-out-sample-True-dtype0]",
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape4-in-sample-True-dtype2]",
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape5-weight-batch-False-dtype1]",
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape7-out-batch-True-dtype2]",
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape8-weight-batch-True-dtype0]",
    _T + "test_eval_sparse_linear_kernel[1-in-dtype2]",
    _T + "test_eval_sparse_linear_kernel[13-out-dtype1]",
    _T + "test_eval_sparse_linear_kernel[300-weight-dtype0]",
    _T + "test_gemv_split_k_workspace_left_zero[dtype1]",
    _T + "test_eval_gather_from_a_column_strided_x[in-40]",
    _T + "test_eval_idle_outputs_in_one_launch",
    _T + "test_uniform_stream_bit_exact",
    _T + "test_gates_match_float64_formula[sample-dtype1]",
    _T + "test_gates_match_float64_formula[weight-dtype2]",
    _T + "test_linear_matches_float64_reference[True-in-batch-True-dtype1]",
    _T + "test_linear_matches_float64_reference[False-weight-batch-True-dtype2]",
    _T + "test_linear_matches_float64_reference[True-out-sample-False-dtype0]",
    _T + "test_conv2d_matches_float64_reference[sample-True-True-dtype2]",
    # training over the open set (device counts, gathered operands, MN-major loads, the gathered dot)
    _T + "test_training_over_the_open_set[in-1-0.5-dtype0]",
    _T + "test_training_over_the_open_set[out-3-one-dtype1]",
    _T + "test_training_over_the_open_set[in-3-0.0-dtype1]",
    _T + "test_conv2d_training_over_the_open_set[2-True-0.5-dtype0]",
]
# racecheck: the kernels that share memory between threads (GEMM, GEMV, split-K finish, reductions)
RACECHECK_TESTS = [
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape0-in-batch-True-dtype0]",
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape4-in-sample-True-dtype2]",
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape7-out-batch-True-dtype2]",
    _T + "test_linear_fused_forward_matches_two_pass_and_reference[shape8-weight-batch-True-dtype0]",
    _T + "test_eval_sparse_linear_kernel[13-out-dtype1]",
    _T + "test_eval_sparse_linear_kernel[300-weight-dtype0]",
    _T + "test_gemv_split_k_workspace_left_zero[dtype0]",
    _T + "test_linear_matches_float64_reference[True-in-batch-True-dtype1]",
    _T + "test_training_over_the_open_set[out-1-0.5-dtype0]",
]

# the benchmark rows (bench/run_bench.py --only) of call 1: docs/benchmarks.md's claims: small_m (1, 16, 256 rows) and
# 8192x4096->4096, fused vs two-pass vs dense; the eval (inference) row 4096->4096 at density 0.25 (batches 1,
# 16, 8192). Call 2 benchmarks issue 13's training rows instead (bench/train_step.py --gpu --quick: 8192 tokens,
# 4096->4096, bf16, input and output gates at density 1.0 and 0.25, Triton and CUDA with and without skipping).
BENCH_ROWS = {
    1: ["shape=*x4096->4096,4096->4096", "density=0.25", "backend=cuda,cuda[fused],cuda[two_pass]"],
}


@dataclass
class Step:
    name: str
    limit_s: int
    log: str  # file under $OUT the step's output goes to as it runs
    cmds: List[List[str]]  # run in order, under one deadline
    files: List[str] = field(default_factory=list)  # further files it writes under $OUT (glob patterns)
    env: Dict[str, str] = field(default_factory=dict)
    kind: str = ""  # versions | build | tests | sanitizer | bench
    needs_c: bool = False  # not run (and failed) when l0kernels._C did not import
    note: str = ""


def _pytest(py, args, timeout_s):
    return [py, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", f"--timeout={timeout_s}", *args]


def _so_name():
    return "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def plan(call: int, py: str = "python3", out: str = "$OUT", prebuilt: bool = True, xdist: bool = True,
         sanitizer: str = "compute-sanitizer") -> List[Step]:
    """The steps of one call, in order. ``prebuilt``: call 2 finds a built ``_C`` (carried or left by call 1)."""
    p = f"gpu{call}-"
    test_env = {"L0K_TRITON_AUTOTUNE": "0", "PYTHONUNBUFFERED": "1"}
    par = ["-n", str(XDIST_WORKERS)] if xdist else []
    build = [py, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    build_env = {"TORCH_CUDA_ARCH_LIST": "9.0", "L0K_FORCE_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 8)}
    versions = Step("versions", 20, p + "summary.txt", [[py, SELF, "--versions"]], kind="versions",
                    note="then one line per finished step")
    bench_cmd = ([py, "bench/run_bench.py", "--ops", "linear", "--out", f"{out}/bench"]
                 + [a for r in BENCH_ROWS[call] for a in ("--only", r)]) if call == 1 else \
        [py, "bench/train_step.py", "--gpu", "--quick", "--out", f"{out}/bench"]
    bench_cmds = [bench_cmd] if call == 1 else \
        [bench_cmd, [py, "bench/llama_step.py", "--gpu", "--gates", "all", "--reps", "10", "--out", f"{out}/bench"]]
    bench = Step("bench", 0, p + "bench.txt", bench_cmds, files=["bench/*.json", "bench/*.md"], env=dict(test_env),
                 kind="bench")
    if call == 1:
        steps = [
            versions,
            Step("build", BUILD_S, p + "build.txt", [build, [py, SELF, "--import-check", "--copy-to", out]],
                 files=[_so_name()], env=build_env, kind="build",
                 note="pip install -e . (sm_90), then import l0kernels._C, list its ops, run one"),
            Step("tests-cuda", 80, p + "tests-cuda.txt",
                 [_pytest(py, ["-v", "-m", "gpu", "tests", "--ignore=tests/gpu/test_triton_gpu.py", *par], 60)],
                 env=test_env, kind="tests", needs_c=True,
                 note="every test marked gpu outside test_triton_gpu.py: the CUDA backend and CUDA tensors"),
            Step("tests-triton", 80, p + "tests-triton.txt",
                 [_pytest(py, ["-v", "-m", "gpu", "tests/gpu/test_triton_gpu.py", *par], 120)],
                 env=test_env, kind="tests", note="L0K_TRITON_AUTOTUNE=0: one fixed tile configuration"),
            bench,
        ]
    elif call == 2:
        imp = [[py, SELF, "--import-check"]]
        steps = [
            versions,
            Step("import", 30, p + "import.txt", imp, env=build_env, kind="build",
                 note="imports the _C that call 1 built (carried into l0kernels/)") if prebuilt else
            Step("build", BUILD_S, p + "import.txt", [build] + imp, env=build_env, kind="build",
                 note="no built _C found: building it"),
            Step("memcheck", 95, p + "memcheck.txt",
                 [[sanitizer, "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "20",
                   *_pytest(py, ["-v", *MEMCHECK_TESTS], 60)]],
                 env=dict(test_env, PYTORCH_NO_CUDA_MEMORY_CACHING="1"), kind="sanitizer", needs_c=True),
            Step("racecheck", 60, p + "racecheck.txt",
                 [[sanitizer, "--tool", "racecheck", "--error-exitcode", "9", "--print-limit", "20",
                   *_pytest(py, ["-v", *RACECHECK_TESTS], 60)]],
                 env=dict(test_env), kind="sanitizer", needs_c=True),
            bench,
        ]
    else:
        raise ValueError(f"call must be 1 or 2, not {call!r}")
    bench.limit_s = CALL_LIMIT_S[call] - sum(s.limit_s for s in steps if s is not bench)
    if bench.limit_s < 15:  # call 2 that must build first: no time left for benchmarks
        steps.remove(bench)
    return steps


def files_of(steps: List[Step]) -> List[str]:
    seen = []
    for s in steps:
        for f in [s.log] + s.files:
            if f not in seen:
                seen.append(f)
    return seen


def shell_line(step: Step, cmd: List[str]) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in step.env.items())
    return f"{env + ' ' if env else ''}timeout -k 5 <{step.limit_s} s left> {shlex.join(cmd)} >> $OUT/{step.log} 2>&1"


def dry_run(call: int, as_json: bool, steps: List[Step]) -> None:
    files = files_of(steps)
    total = sum(s.limit_s for s in steps)
    if as_json:
        print(json.dumps(dict(call=call, total_limit_s=total, call_limit_s=CALL_LIMIT_S[call], files=files,
                              steps=[dict(name=s.name, kind=s.kind, limit_s=s.limit_s, log=s.log, files=s.files,
                                          env=s.env, cmds=s.cmds, needs_c=s.needs_c) for s in steps]), indent=1))
        return
    print(f"call {call}: {len(steps)} steps, {total} s of time limits (budget {CALL_LIMIT_S[call]} s), "
          f"{len(files)} files in $OUT (at most {MAX_FILES})")
    for i, s in enumerate(steps, 1):
        extra = f" + {', '.join(s.files)}" if s.files else ""
        print(f"  {i}. {s.name:<13} {s.limit_s:>4} s  -> {s.log}{extra}{'  (' + s.note + ')' if s.note else ''}")
        for c in s.cmds:
            print(f"       $ {shell_line(s, c)}")
    if call == 2:
        print(f"  (with no built _C in l0kernels/, step 2 builds it: limit {BUILD_S} s instead of 30 s, and the "
              f"bench step is left out: {sum(x.limit_s for x in plan(2, prebuilt=False))} s in all)")


# ---------------------------------------------------------------------------------------------- the steps
def _versions() -> int:
    """Step 1: versions and paths. Fails (1) when no CUDA device is visible: nothing after it could run. A
    setuptools below the floor is reported here; the build step then stops at once with the same line."""
    ok = True

    def show(label, fn):
        try:
            print(f"{label}: {fn()}")
        except Exception as e:  # a missing tool is a reading, not a crash
            print(f"{label}: ({type(e).__name__}: {e})")

    def run(*cmd):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
        return (r.stdout + r.stderr).strip()

    def version(dist):
        from importlib import metadata
        return metadata.version(dist)

    print(f"== gpu_check versions and paths, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    show("commit", lambda: run("git", "-C", ROOT, "log", "-1", "--format=%h %s"))
    show("nvidia-smi", lambda: run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                   "--format=csv,noheader"))
    print(f"python: {sys.version.split()[0]} ({sys.executable}); cpus {os.cpu_count()}")
    import torch
    print(f"torch: {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}) "
          f"{os.path.dirname(torch.__file__)}")
    if torch.cuda.is_available():
        pr = torch.cuda.get_device_properties(0)
        print(f"device: {pr.name}, sm_{pr.major}{pr.minor}, {pr.multi_processor_count} SMs, "
              f"{pr.total_memory / 2**30:.0f} GiB")
    else:
        print("device: NONE -- torch.cuda.is_available() is False: nothing below can run")
        ok = False
    for dist in ("triton", "numpy", "setuptools", "pip", "pytest", "pytest-timeout", "pytest-xdist", "ninja"):
        show(dist, lambda dist=dist: version(dist))
    setup_py = _setup_py()
    try:
        setup_py._check_setuptools()
    except SystemExit as e:
        print(f"HARD ERROR (the build step will stop on it): {e}")
    nvcc = shutil.which("nvcc")
    print(f"nvcc on PATH: {nvcc} -> {os.path.realpath(nvcc) if nvcc else '-'}")
    home, why = setup_py._cuda_home()
    print(f"CUDA_HOME for the build: {home} ({why})")
    if home:
        show("nvcc --version", lambda: run(os.path.join(home, "bin", "nvcc"), "--version").splitlines()[-1])
    san = _sanitizer(home)
    show("compute-sanitizer", lambda: f"{san}: " + run(san, "--version").splitlines()[-1] if san else "not found")
    show("built _C", lambda: glob.glob(os.path.join(ROOT, "l0kernels", "_C*.so")) or "none yet")
    return 0 if ok else 1


def _setup_py():
    """setup.py as a module (its setup() runs only as __main__): the CUDA_HOME choice and setuptools floor."""
    import importlib.util
    import warnings
    warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")
    spec = importlib.util.spec_from_file_location("l0k_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sanitizer(home: Optional[str]) -> Optional[str]:
    for cand in ([os.path.join(home, "bin", "compute-sanitizer")] if home else []) + [
            shutil.which("compute-sanitizer") or "", "/usr/local/cuda/bin/compute-sanitizer"]:
        if cand and os.path.isfile(cand):
            return cand
    return None


def _import_check(copy_to: Optional[str]) -> int:
    """Import l0kernels._C (a hard error if that fails), list torch.ops.l0kernels.*, and where a GPU is
    visible run one of its kernels (the Philox stream) against the CPU stream bit for bit."""
    sys.path.insert(0, ROOT)
    try:
        import torch
        import l0kernels
        import l0kernels._C as C
    except Exception as e:
        print(f"HARD ERROR: import l0kernels._C failed after the build: {type(e).__name__}: {e}")
        return 1
    print(f"imported {C.__file__} ({os.path.getsize(C.__file__) / 2**20:.1f} MiB)")
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("l0kernels::"))
    for n in ops:
        print(f"  {getattr(torch.ops.l0kernels, n.split('::')[1]).default._schema}")
    if not ops:
        print("HARD ERROR: l0kernels._C registered no torch.ops.l0kernels.* ops")
        return 1
    print(f"{len(ops)} ops; backends: {l0kernels.available_backends()}")
    if torch.cuda.is_available():
        off = torch.arange(4096, device="cuda") * 7919
        u = torch.ops.l0kernels.uniform(2**40 + 3, off)
        torch.cuda.synchronize()
        ref = l0kernels.philox_uniform(2**40 + 3, off.cpu())
        if not torch.equal(u.cpu().view(torch.int32), ref.view(torch.int32)):
            print("HARD ERROR: torch.ops.l0kernels.uniform on the GPU differs from philox_uniform")
            return 1
        print(f"ran torch.ops.l0kernels.uniform on {torch.cuda.get_device_name()}: bit-exact with the CPU stream")
    else:
        print("no CUDA device here: the ops are registered, no kernel was run")
    if copy_to and copy_to != "$OUT":
        os.makedirs(copy_to, exist_ok=True)
        shutil.copy2(C.__file__, os.path.join(copy_to, os.path.basename(C.__file__)))
        print(f"copied to {copy_to}/{os.path.basename(C.__file__)}: for call 2, copy it to l0kernels/ and carry "
              f"l0kernels/{os.path.basename(C.__file__)}")
    return 0


# ---------------------------------------------------------------------------------------------- the driver
def _run_step(step: Step, out: str, py: str) -> str:
    """Run one step's commands under its time limit, appending their output to its log. Returns PASS, FAIL
    (rc) or TIMEOUT."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **step.env)
    deadline = time.monotonic() + step.limit_s
    with open(os.path.join(out, step.log), "a", buffering=1) as log:
        for cmd in step.cmds:
            cmd = [out + a[4:] if a.startswith("$OUT") else a for a in cmd]
            left = int(deadline - time.monotonic())
            log.write(f"\n$ [{step.name}, {left} s left] {shlex.join(cmd)}\n")
            if left < 1:
                return "TIMEOUT"
            r = subprocess.run(["timeout", "-k", "5", str(left), *cmd], stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=ROOT)
            if r.returncode in (124, 137):
                log.write(f"\n[{step.name}: stopped at its time limit, {step.limit_s} s]\n")
                return "TIMEOUT"
            if r.returncode != 0:
                return f"FAIL (exit {r.returncode})"
    return "PASS"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--call", type=int, choices=(1, 2))
    ap.add_argument("--dry-run", action="store_true", help="print the steps, their limits and files; run nothing")
    ap.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    ap.add_argument("--versions", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--import-check", action="store_true", help="import l0kernels._C, list its ops, run one")
    ap.add_argument("--copy-to", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.versions:
        return _versions()
    if a.import_check:
        return _import_check(a.copy_to)
    if a.call is None:
        ap.error("--call 1 or --call 2")
    py = sys.executable
    if a.dry_run:
        dry_run(a.call, a.json, plan(a.call, py="python3"))
        return 0
    import importlib.util
    out = os.environ.get("OUT") or os.path.join("/tmp", f"gpu_check-{time.strftime('%Y%m%dT%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    prebuilt = bool(glob.glob(os.path.join(ROOT, "l0kernels", _so_name())))
    xdist = importlib.util.find_spec("xdist") is not None
    san = _sanitizer(_setup_py()._cuda_home()[0]) or "compute-sanitizer"
    steps = plan(a.call, py=py, out=out, prebuilt=prebuilt, xdist=xdist, sanitizer=san)
    summary = os.path.join(out, steps[0].log)
    t0 = time.monotonic()
    results, c_ok = [], True

    def note(line):
        with open(summary, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)

    for i, s in enumerate(steps, 1):
        took = ""
        if s.needs_c and not c_ok:
            res = "NOT RUN (l0kernels._C did not build or import: these tests would only skip)"
        elif i > 1 and results[0] != "PASS":
            res = "NOT RUN (step 1 failed: no CUDA device)"
        else:
            t = time.monotonic()
            res = _run_step(s, out, py)
            took = f" in {time.monotonic() - t:.0f} s of {s.limit_s} s"
        if s.kind == "build" and res != "PASS":
            c_ok = False
        results.append(res)
        if i == 1 and not xdist:
            note("note: pytest-xdist missing: the test steps run serially and may reach their limits")
        note(f"step {i} {s.name}: {res}{took} -> {s.log}")
    ok = all(r == "PASS" for r in results)
    note(f"gpu_check call {a.call}: {'PASS' if ok else 'FAIL'} in {time.monotonic() - t0:.0f} s "
         f"(limits {sum(s.limit_s for s in steps)} s); files in {out}: {len(files_of(steps))} at most")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
