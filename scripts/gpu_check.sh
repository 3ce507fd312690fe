#!/usr/bin/env bash
# One-shot check for a GPU session: install (building the CUDA extension where possible), run the GPU
# tests and the full test suite, run the benchmarks, and copy everything to $OUT if set.
#   bash scripts/gpu_check.sh            # from the repository root
# Environment: PYTHON (default python3), L0K_BENCH_ARGS (extra args for bench/run_bench.py),
# L0K_SKIP_BENCH=1 to skip the benchmarks, L0K_SKIP_TESTS=1 to skip the test steps (pytest and
# compute-sanitizer), L0K_SKIP_SANITIZER=1 to skip compute-sanitizer only. A device call is limited to
# 10 minutes: run the tests and the benchmarks in separate calls if one does not fit
# (the build is kept between calls on a warm machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=bench/results/gpu_check-$(date -u +%Y%m%dT%H%M%S)
mkdir -p bench/results
status=0
step() { echo "== $*"; }

step "environment"
nvidia-smi || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

step "install (CUDA extension built when nvcc and a CUDA torch are present; no build isolation so it sees torch)"
# (no network on the machine? the last tries install the package alone, with what is already installed)
if ! $PY -m pip install --no-build-isolation -e ".[test,bench]" >"$LOG-install.txt" 2>&1 &&
   ! $PY -m pip install --no-build-isolation --no-deps -e . >>"$LOG-install.txt" 2>&1; then
    echo "install with the CUDA extension failed (see $LOG-install.txt); installing without it"
    L0K_SKIP_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . >>"$LOG-install.txt" 2>&1 || status=1
fi
$PY -c "import l0kernels as l0k; print('backends', l0k.available_backends()); print({n: l0k.get_backend(n).__class__.__name__ for n in l0k.available_backends()})"

if [ "${L0K_SKIP_TESTS:-0}" != "1" ]; then
step "pytest -m gpu"
$PY -m pytest -q -rs -m gpu tests 2>&1 | tee "$LOG-pytest-gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "full test suite"
$PY -m pytest -q -rs --durations=15 tests 2>&1 | tee "$LOG-pytest-all.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if command -v compute-sanitizer >/dev/null 2>&1 && [ "${L0K_SKIP_SANITIZER:-0}" != "1" ]; then
    step "compute-sanitizer memcheck + racecheck over the CUDA tests (L0K_SKIP_SANITIZER=1 skips)"
    for args in "memcheck -k linear and float16" "memcheck -k sparse_linear" "racecheck -k linear and float32" \
                "racecheck -k fused and float16"; do
        tool=${args%% *}; sel=${args#* -k }
        compute-sanitizer --tool "$tool" --error-exitcode 9 $PY -m pytest -q -x tests/test_cuda_gpu.py -k "$sel" \
            2>&1 | tail -n 5 | tee -a "$LOG-sanitizer.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
fi
fi  # L0K_SKIP_TESTS

if [ "${L0K_SKIP_BENCH:-0}" != "1" ]; then
    step "benchmarks (bench/run_bench.py ${L0K_BENCH_ARGS:-})"
    # shellcheck disable=SC2086
    $PY bench/run_bench.py ${L0K_BENCH_ARGS:-} 2>&1 | tee "$LOG-bench.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ -n "${OUT:-}" ]; then
    step "copying bench/results to $OUT"
    mkdir -p "$OUT"
    cp -r bench/results/. "$OUT/"
fi
echo "gpu_check finished with status $status"
exit $status
