// The gated GEMM kernels (csrc/l0_gemm.cuh: tensor cores; csrc/l0_gemv.cuh: 1-16 rows) run on the CPU
// by csrc/tests/cuda_emu.h, as a shared library for tests/test_cuda_emu.py (ctypes). Build:
//   g++ -std=c++20 -O2 -pthread -shared -fPIC -Icsrc -isystem <CUDA include> csrc/tests/gemm_emu.cpp -o gemm_emu.so
#include "cuda_emu.h"  // first: defines the CUDA names the kernels use

#include <type_traits>

#include "l0_gemm.cuh"
#include "l0_gemv.cuh"

namespace {

template <typename T, int MR>
void launch_gemv(const l0k::GatedGemmParams<T>& p) {
  const unsigned grid = static_cast<unsigned>(l0k::gemv::grid_cols(p.N));
  if (p.mode == l0k::kGateIn || p.mode == l0k::kGateWeight) {
    emu_launch(grid, 1, l0k::gemv::kThreads, l0k::gated_gemv_kernel<T, MR, true>, p);
  } else {
    emu_launch(grid, 1, l0k::gemv::kThreads, l0k::gated_gemv_kernel<T, MR, false>, p);
  }
}

// impl 0: as csrc/gemm.cu's launch_gated_gemm (GEMV for M <= 16), 1: the tensor-core kernel, 2: the GEMV.
template <typename T>
int run(int impl, const void* x, int64_t ldx, const void* w, int64_t ldw, const void* log_alpha, const void* bias,
        void* y, int64_t ldy, const int64_t* x_cols, const int64_t* y_cols, int64_t M, int64_t N, int64_t K,
        uint64_t seed, int mode, bool per_row, bool training, bool allow_vec, const l0k::GateConfig& cfg) {
  l0k::GatedGemmParams<T> p{static_cast<const T*>(x), ldx, static_cast<const T*>(w), ldw,
                            static_cast<const T*>(log_alpha), static_cast<const T*>(bias), static_cast<T*>(y), ldy,
                            x_cols, y_cols, M, N, K, seed, mode, per_row, training,
                            allow_vec && l0k::gemm::vec_loads_ok(x, ldx, w, ldw), cfg};
  if (impl == 0) impl = M <= l0k::gemv::kMaxRows ? 2 : 1;
  if (impl == 2 && M > l0k::gemv::kMaxRows) return -2;
  if (M <= 0 || N <= 0) return p.vec ? 1 : 0;
  if (impl == 1) {
    if constexpr (std::is_same_v<T, float>) {
      return -2;
    } else {
      emu_launch(static_cast<unsigned>(l0k::gemm::grid_cols(N)), static_cast<unsigned>(l0k::gemm::grid_rows(M)),
                 l0k::gemm::kThreads, l0k::gated_gemm_kernel<T>, p);
    }
  } else {
    switch (l0k::gemv::row_bucket(M)) {
      case 1: launch_gemv<T, 1>(p); break;
      case 2: launch_gemv<T, 2>(p); break;
      case 4: launch_gemv<T, 4>(p); break;
      case 8: launch_gemv<T, 8>(p); break;
      default: launch_gemv<T, 16>(p); break;
    }
  }
  return p.vec ? 1 : 0;
}

}  // namespace

// dtype 0: float16, 1: bfloat16, 2: float32 (GEMV only); impl as run() above; mode 3 (no gates) with
// x_cols / y_cols (nullable) runs an eval plan. Returns 1 if the 16-byte load path ran, 0 if the
// scalar one, -1 on a bad dtype, -2 when the chosen kernel cannot take the call.
extern "C" int l0k_emu_gated_gemm(int dtype, int impl, const void* x, int64_t ldx, const void* w, int64_t ldw,
                                  const void* log_alpha, const void* bias, void* y, int64_t ldy, const int64_t* x_cols,
                                  const int64_t* y_cols, int64_t M, int64_t N, int64_t K, uint64_t seed, int mode,
                                  int per_row, int training, int allow_vec, float beta, float gamma, float zeta,
                                  float eps) {
  const l0k::GateConfig cfg{beta, gamma, zeta, eps};
  switch (dtype) {
    case 0:
      return run<__half>(impl, x, ldx, w, ldw, log_alpha, bias, y, ldy, x_cols, y_cols, M, N, K, seed, mode, per_row,
                         training, allow_vec, cfg);
    case 1:
      return run<__nv_bfloat16>(impl, x, ldx, w, ldw, log_alpha, bias, y, ldy, x_cols, y_cols, M, N, K, seed, mode,
                                per_row, training, allow_vec, cfg);
    case 2:
      return run<float>(impl, x, ldx, w, ldw, log_alpha, bias, y, ldy, x_cols, y_cols, M, N, K, seed, mode, per_row,
                        training, allow_vec, cfg);
    default:
      return -1;
  }
}
