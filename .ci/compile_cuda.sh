#!/usr/bin/env bash
# CPU-side checks of the CUDA extension's sources (no GPU needed):
#   1. every csrc/*.cu compiles with nvcc for sm_80 and sm_90 (in parallel);
#   2. csrc/tests/philox_host.cpp (Philox + gate headers as plain host C++) compiles with g++;
#   3. csrc/binding.cpp passes -fsyntax-only against the installed PyTorch headers.
# Usage: .ci/compile_cuda.sh [OUTDIR]   (OUTDIR defaults to a temp dir; philox_host is left there)
# Exits 0 with a SKIP line when nvcc is absent. PYTHON selects the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [[ -z "$NVCC" ]]; then
  echo "SKIP: nvcc not found; CUDA sources not compiled"
  exit 0
fi
# CUDA's own headers, where nvcc itself finds them (nvcc may be a wrapper script).
CUDA_INC="$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^" ]*\).*/\1/p' | head -n 1)"
CUDA_INC="${CUDA_INC:-${CUDA_HOME:-/usr/local/cuda}/include}"
GENCODE=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

pids=()
for f in csrc/*.cu; do
  b="$(basename "$f" .cu)"
  "$NVCC" -std=c++17 "${GENCODE[@]}" -O2 -Xcompiler -Wall -Icsrc -c "$f" -o "$OUT/$b.o" &
  pids+=("$!")
done
g++ -std=c++17 -O2 -Wall -Wextra -Werror -Icsrc csrc/tests/philox_host.cpp -o "$OUT/philox_host"
for p in "${pids[@]}"; do wait "$p"; done
echo "OK: nvcc sm_80+sm_90: $(ls csrc/*.cu | tr '\n' ' ')"
echo "OK: g++ csrc/tests/philox_host.cpp -> $OUT/philox_host"

# The binding against the installed PyTorch's headers. A CPU wheel lacks the CMake-generated
# c10/cuda/impl/cuda_cmake_macros.h (it only sets the Windows export macro); define the switch that
# skips it. Needs CUDA's own headers (cuda_runtime_api.h) from the toolkit next to nvcc.
if INC="$("$PY" - <<'PYEOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join(["-isystem " + p for p in include_paths()] + ["-isystem " + sysconfig.get_paths()["include"]]))
PYEOF
)"; then
  # shellcheck disable=SC2086
  g++ -std=c++20 -fsyntax-only -Wall -Wextra -Werror -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Icsrc $INC \
      -isystem "$CUDA_INC" csrc/binding.cpp
  echo "OK: g++ -fsyntax-only csrc/binding.cpp against the installed PyTorch headers"
else
  echo "SKIP: torch not importable with $PY; binding.cpp not checked"
fi
