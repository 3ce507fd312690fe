#!/usr/bin/env bash
# Build the CUDA extension l0kernels._C on a machine WITHOUT a GPU, in a virtual environment that holds the
# GPU machine's versions (torch 2.11.0+cu130, triton 3.6.0, Python 3.12, nvcc 13.0), then import it and
# list its ops. Proves, before any GPU time is spent, that the build path scripts/gpu_check.py takes
# (pip install --no-build-isolation -e ., CUDA_HOME resolved by setup.py) compiles, links and loads.
#
#   bash scripts/build_cuda.sh            # from anywhere; the venv goes to $L0K_CUDA_VENV
#
# Environment: L0K_CUDA_VENV (default /work/venv-cuda, outside the repository: several GB),
# PYTHON (the interpreter that makes the venv; default python3.12), TORCH_CUDA_ARCH_LIST (default 9.0).
# Exit status 0 only if _C was built, imports, registers its ops and holds sm_90 machine code.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${L0K_CUDA_VENV:-/work/venv-cuda}
BASE_PY=${PYTHON:-python3.12}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

stamp "1. virtual environment $VENV (torch==2.11.0 triton==3.6.0 numpy<2.4 setuptools>=77)"
if [ ! -x "$VENV/bin/python" ]; then
    "$BASE_PY" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -m pip install -q "torch==2.11.0" "triton==3.6.0" "numpy<2.4" "setuptools>=77" wheel ninja pytest \
        pytest-timeout >/tmp/l0k-venv-cuda.log 2>&1; then
    grep -v "^WARNING: Location" /tmp/l0k-venv-cuda.log | tail -n 20; echo "FAILED: pip install into $VENV"; exit 1
fi
"$PY" -c "import sys, torch, triton, numpy, setuptools; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'cuda', torch.version.cuda, '| triton', triton.__version__, '| numpy', numpy.__version__, '| setuptools', setuptools.__version__)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch in $VENV is not a CUDA build')"

stamp "2. build l0kernels._C (L0K_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST), pip install --no-build-isolation -e ."
cd "$REPO"
rm -f l0kernels/_C.*.so
LOG=$(mktemp /tmp/l0k-build-cuda.XXXXXX.log)
if ! L0K_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$LOG" 2>&1; then
    tail -n 40 "$LOG"; echo "FAILED: the build (full log: $LOG)"; exit 1
fi
grep -E "^l0kernels:" "$LOG" || true
SO=$(ls l0kernels/_C.*.so 2>/dev/null | head -n1)
[ -n "$SO" ] || { tail -n 40 "$LOG"; echo "FAILED: no l0kernels/_C*.so after the build (log: $LOG)"; exit 1; }
ls -l "$SO"

stamp "3. import l0kernels._C and list torch.ops.l0kernels.* (from another folder)"
# A CUDA build of torch loads without a driver; _C links libtorch_cuda and libcudart, not libcuda. If the
# import still asks for libcuda.so.1, retry with the toolkit's stub libcuda (it loads, but every driver call
# fails: that proves linking and op registration, not that a kernel runs).
CUDA_HOME_USED=$(grep -oE "building l0kernels._C with CUDA_HOME=[^ ]+" "$LOG" | head -n1 | cut -d= -f2)
IMPORT=(env PYTHONPATH="$REPO" "$PY" "$REPO/scripts/gpu_check.py" --import-check)
if ! (cd /tmp && "${IMPORT[@]}"); then
    echo "import failed without a driver: retrying with the stub libcuda of $CUDA_HOME_USED/lib64/stubs"
    mkdir -p /tmp/l0k-stubs && ln -sf "$CUDA_HOME_USED/lib64/stubs/libcuda.so" /tmp/l0k-stubs/libcuda.so.1
    (cd /tmp && LD_LIBRARY_PATH=/tmp/l0k-stubs "${IMPORT[@]}")
fi

stamp "4. what the .so holds: machine code per architecture, undefined CUDA symbols"
# the toolkit's cuobjdump, else the one Triton's package carries
CUOBJDUMP=$CUDA_HOME_USED/bin/cuobjdump
[ -x "$CUOBJDUMP" ] || CUOBJDUMP=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))")
echo "cuobjdump: $CUOBJDUMP"
ELFS=$("$CUOBJDUMP" --list-elf "$SO")  # (not piped into grep -q: with pipefail its early exit fails the pipe)
echo "$ELFS"
grep -q "sm_90" <<<"$ELFS" || { echo "FAILED: no sm_90 machine code in $SO"; exit 1; }
SASS=$("$CUOBJDUMP" --dump-sass "$SO" 2>/dev/null)
echo "sm_90 kernels: $(grep -c 'Function :' <<<"$SASS"); tensor-core instructions (HMMA): $(grep -c 'HMMA' <<<"$SASS")"
echo "dynamic libraries:"; readelf -d "$SO" | grep NEEDED | sed 's/.*\[\(.*\)\]/  \1/'
echo "undefined cuda* symbols (resolved by libcudart at load):"
nm -D --undefined-only "$SO" | awk '{print $2}' | sed 's/@.*//' | grep -E '^_*cuda[A-Z]' | sort -u | tr '\n' ' '; echo
echo "highest glibc / libstdc++ symbol versions it needs (the GPU machine's must be at least these):" \
    "$(objdump -T "$SO" | grep -oE 'GLIBC_[0-9.]+' | sort -Vu | tail -n1)" \
    "$(objdump -T "$SO" | grep -oE 'GLIBCXX_[0-9.]+' | sort -Vu | tail -n1)"
stamp "OK: l0kernels._C built, imported and registered ($SO)"
