"""scripts/gpu_check.py, checked on the CPU through its dry run, so that the GPU calls' shape cannot drift:
at most 8 files per call, no deeper than two folders, time limits within 7 and 4 minutes, the step order
(versions first, build before tests, tests before benchmarks), the GPU tests run once and nothing CPU-only
runs, every sanitizer test id exists, and the benchmark selections pick the rows they are meant to."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
LIMIT_S = {1: 7 * 60, 2: 4 * 60}


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gc = _load(SCRIPT, "l0k_gpu_check")


def _dry(call, *extra):
    r = subprocess.run([sys.executable, SCRIPT, "--call", str(call), "--dry-run", *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def plans():
    return {c: json.loads(_dry(c, "--json")) for c in (1, 2)}


def _collect(args):
    """Node ids pytest collects for ``args`` (the plan's own pytest arguments, less -n and -v)."""
    keep, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "-n":
            skip = True
        elif a not in ("-v", "-q"):
            keep.append(a)
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *keep], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {ln.strip() for ln in r.stdout.splitlines() if "::" in ln}


@pytest.fixture(scope="module")
def gpu_ids():
    """The GPU tests of the two GPU test files (one collection: it imports torch and the test modules)."""
    return _collect(["-m", "gpu", "tests/gpu/test_cuda_gpu.py", "tests/gpu/test_triton_gpu.py"])


def _pytest_args(cmd):
    i = cmd.index("pytest")
    return cmd[i + 1:]


def test_dry_run_prints_steps_limits_and_files(plans):
    for call in (1, 2):
        text = _dry(call)
        assert text.startswith(f"call {call}: {len(plans[call]['steps'])} steps")
        for s in plans[call]["steps"]:
            assert re.search(rf"\b{re.escape(s['name'])}\s+{s['limit_s']} s\s+-> {re.escape(s['log'])}", text), s
        assert "timeout -k 5" in text


@pytest.mark.parametrize("call", [1, 2])
def test_files_count_depth_and_names(plans, call):
    files = plans[call]["files"]
    assert len(files) <= 8 and len(files) == len(set(files))
    for f in files:
        parts = f.split("/")
        assert len(parts) - 1 <= 2, f  # $OUT/a/b/file comes back, $OUT/a/b/c/file does not
        for part in parts:
            assert re.fullmatch(r"[A-Za-z0-9._-]+", part.replace("*", "x")), f
    logs = [s["log"] for s in plans[call]["steps"]]
    assert len(logs) == len(set(logs)), "one log per step"
    assert logs[0] == f"gpu{call}-summary.txt"


@pytest.mark.parametrize("call", [1, 2])
def test_time_limits_fit_the_call(plans, call):
    p = plans[call]
    assert p["total_limit_s"] == sum(s["limit_s"] for s in p["steps"]) <= LIMIT_S[call]
    assert all(s["limit_s"] >= 15 for s in p["steps"]), [(s["name"], s["limit_s"]) for s in p["steps"]]


def test_call_2_without_a_carried_build():
    """No built _C found: call 2 builds it, keeps both sanitizer steps, and drops the benchmarks rather than
    start a step with no time left."""
    steps = gc.plan(2, prebuilt=False)
    assert [s.name for s in steps] == ["versions", "build", "memcheck", "racecheck"]
    assert steps[1].limit_s == gc.BUILD_S and "--import-check" in steps[1].cmds[-1]


@pytest.mark.parametrize("call", [1, 2])
def test_step_order(plans, call):
    kinds = [s["kind"] for s in plans[call]["steps"]]
    assert kinds[0] == "versions"
    checks = [i for i, k in enumerate(kinds) if k in ("tests", "sanitizer")]
    benches = [i for i, k in enumerate(kinds) if k == "bench"]
    assert checks and benches
    assert kinds.index("build") < min(checks)
    assert max(checks) < min(benches)
    if call == 1:
        assert [s["name"] for s in plans[1]["steps"]] == ["versions", "build", "tests-cuda", "tests-triton", "bench"]


def test_build_step_is_sm90_without_fallback(plans):
    build = plans[1]["steps"][1]
    assert build["kind"] == "build" and build["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0"
    pip, check = build["cmds"]
    assert "--no-build-isolation" in pip and "-e" in pip
    assert "--import-check" in check
    assert "L0K_SKIP_CUDA" not in json.dumps(plans)  # never a silent CPU-only reinstall
    for call in (1, 2):  # the CUDA tests and the sanitizers are not run without an imported _C
        for s in plans[call]["steps"]:
            if s["kind"] == "sanitizer" or s["name"] == "tests-cuda":
                assert s["needs_c"], s["name"]


def test_gpu_tests_once_with_timeouts_and_no_cpu_only_work(plans, gpu_ids):
    steps = [s for c in (1, 2) for s in plans[c]["steps"] if s["kind"] == "tests"]
    assert [s["name"] for s in steps] == ["tests-cuda", "tests-triton"]  # call 1 only
    paths = {}
    for s in steps:
        (cmd,) = s["cmds"]
        args = _pytest_args(cmd)
        assert any(a.startswith("--timeout=") for a in args) and "-m" in args and args[args.index("-m") + 1] == "gpu"
        assert s["env"]["L0K_TRITON_AUTOTUNE"] == "0"
        paths[s["name"]] = [a for a in args if a.startswith("tests") or a.startswith("--ignore")]
    # every GPU test once: the CUDA step takes the whole folder (new files too) less the Triton file, which
    # the Triton step takes alone; -m gpu leaves out the CPU-only tests (nvcc compile, emulator, TSan)
    assert paths == {"tests-cuda": ["tests", "--ignore=tests/gpu/test_triton_gpu.py"],
                     "tests-triton": ["tests/gpu/test_triton_gpu.py"]}
    assert any(t.startswith("tests/gpu/test_triton_gpu.py::") for t in gpu_ids)
    assert any(t.startswith("tests/gpu/test_cuda_gpu.py::") for t in gpu_ids)
    everything = " ".join(a for s in steps for a in s["cmds"][0])
    assert "test_cuda_build" not in everything and "test_cuda_emu" not in everything
    everything = " ".join(a for s in steps for a in s["cmds"][0])
    assert "test_cuda_build" not in everything and "test_cuda_emu" not in everything


def test_sanitizer_test_ids_exist(plans, gpu_ids):
    san = [s for s in plans[2]["steps"] if s["kind"] == "sanitizer"]
    assert [s["name"] for s in san] == ["memcheck", "racecheck"]
    collected = gpu_ids
    ids = set()
    for s in san:
        (cmd,) = s["cmds"]
        assert cmd[:3] == ["compute-sanitizer", "--tool", s["name"]] and "--error-exitcode" in cmd
        args = _pytest_args(cmd)
        assert any(a.startswith("--timeout=") for a in args)
        tests = [a for a in args if a.startswith("tests/")]
        assert tests and all("::" in t for t in tests)  # exact ids, no -k selections
        missing = [t for t in tests if t not in collected]
        assert not missing, f"sanitizer test ids not collected (renamed or re-parametrized?): {missing}"
        ids |= set(tests)
    assert 15 <= len(ids) <= 30
    assert san[0]["env"]["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"


def test_bench_selections_pick_the_intended_rows():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import inference_suite
    import run_bench

    def picked(call):
        only = run_bench.parse_only(gc.BENCH_ROWS[call], pytest.fail)
        ctx = run_bench.BenchContext(None, False, False, 1, {}, only)
        lin = [f"{m}x{k}->{n}" for _, m, k, n, _ in run_bench.LINEAR_SHAPES
               if ctx.wants(shape=f"{m}x{k}->{n}")]
        inf = [(f"{k}->{n}", d) for _, k, n, _ in inference_suite.SHAPES for d in inference_suite.DENSITIES
               if ctx.wants(shape=f"{k}->{n}", density=d)]
        backends = [b for b in ("torch", "triton", "cuda", "auto", "cuda[fused]", "cuda[two_pass]")
                    if ctx.wants(backend=b)]
        return lin, inf, backends

    lin, inf, backends = picked(1)
    assert sorted(lin) == ["16x4096->4096", "1x4096->4096", "256x4096->4096", "8192x4096->4096"]
    assert inf == [("4096->4096", 0.25)]
    assert {"cuda[fused]", "cuda[two_pass]"} <= set(backends) and "triton" not in backends
    # call 2: issue 13's training rows, the quick set of bench/train_step.py --gpu; then the whole Llama step
    cmd, llama = [s for s in gc.plan(2) if s.kind == "bench"][0].cmds
    assert cmd[1:] == ["bench/train_step.py", "--gpu", "--quick", "--out", "$OUT/bench"]
    assert llama[1:] == ["bench/llama_step.py", "--gpu", "--gates", "all", "--reps", "10", "--out", "$OUT/bench"]
    import train_step
    shapes, densities, backends = train_step.gpu_plan(quick=True)
    assert shapes == ((8192, 4096, 4096),) and densities == (1.0, 0.25)
    assert set(backends) == {"triton", "triton-noskip", "cuda", "cuda-noskip"}
    cshapes, cdens, cbackends = train_step.gpu_conv_plan(quick=True)
    assert cshapes == ((32, 64, 56, 64),) and cdens == (1.0, 0.25) and cbackends == ("cuda", "cuda-noskip")


def test_gpu_conv_rows_run(monkeypatch):
    """``bench/train_step.py``'s convolution rows, run on the CPU with a one-call clock: the torch backend's rows
    in the docs/design.md §7 format (a backend that cannot run the call is skipped, not fatal)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import common
    import train_step
    monkeypatch.setattr(train_step, "gpu_conv_plan", lambda quick=False: (((2, 3, 6, 4),), (1.0, 0.25), ("torch", "cuda")))
    ctx = common.BenchContext(torch.device("cpu"), False, False, 1, {"device": "cpu"})
    monkeypatch.setattr(ctx, "time_ms", lambda fn: (fn(), 1.0)[1])
    rows = train_step.gpu_conv_rows(ctx, quick=True)
    assert [(r["backend"], r["density"]) for r in rows] == [("torch", 1.0), ("torch", 0.25)]
    assert all(r["op"] == "conv2d_train" and r["shape"].startswith("2x3x6x6->4,3x3") for r in rows)


def test_autotune_switch(tmp_path):
    """L0K_TRITON_AUTOTUNE=0 (the test steps' setting) turns the Triton autotuner off on a GPU (not
    interpreting), for the training and the eval kernels."""
    pytest.importorskip("triton")
    code = "from l0kernels.backends.triton import linear, sparse_eval; print(linear.AUTOTUNE, sparse_eval.AUTOTUNE)"
    env = dict(os.environ, L0K_TRITON_AUTOTUNE="0", TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["False", "False"]


def test_step_timeout_keeps_the_partial_log(tmp_path):
    step = gc.Step("slow", 2, "slow.txt", [[sys.executable, "-c",
                                            "import time; print('started', flush=True); time.sleep(60)"]])
    assert gc._run_step(step, str(tmp_path), sys.executable) == "TIMEOUT"
    log = (tmp_path / "slow.txt").read_text()
    assert "started" in log and "stopped at its time limit" in log


def test_without_a_gpu_the_check_fails_and_still_reports(tmp_path):
    """Run for real on a machine without a GPU: step 1 says so, the rest is NOT RUN, exit status 1, and the
    summary is in $OUT."""
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, SCRIPT, "--call", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (tmp_path / "gpu1-summary.txt").read_text()
    # on a busy CI machine the 20 s step can run out before it prints its verdict
    assert "step 1 versions: FAIL" in summary and "torch.cuda.is_available() is False" in summary \
        or "step 1 versions: TIMEOUT" in summary, summary
    assert "step 2 build: NOT RUN" in summary
    assert "gpu_check call 1: FAIL" in summary
    assert os.listdir(tmp_path) == ["gpu1-summary.txt"]


def test_import_check_is_a_hard_error_without_the_extension(tmp_path):
    code = f"import sys; sys.modules['l0kernels._C'] = None; sys.argv = ['x', '--import-check']; " \
           f"import runpy; runpy.run_path({SCRIPT!r}, run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "HARD ERROR: import l0kernels._C failed" in r.stdout
