// csrc/l0_gemm.cuh's gated GEMM kernel run on the CPU by csrc/tests/cuda_emu.h, as a shared library
// for tests/test_cuda_emu.py (ctypes). Build:
//   g++ -std=c++20 -O2 -pthread -shared -fPIC -Icsrc -isystem <CUDA include> csrc/tests/gemm_emu.cpp -o gemm_emu.so
#include "cuda_emu.h"  // first: defines the CUDA names the kernel uses

#include "l0_gemm.cuh"

namespace {

template <typename T>
int run(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* log_alpha, const void* bias, void* y,
        int64_t ldy, const int64_t* x_cols, const int64_t* y_cols, int64_t M, int64_t N, int64_t K, uint64_t seed, int mode, bool per_row, bool training,
        bool allow_vec, const l0k::GateConfig& cfg) {
  l0k::GatedGemmParams<T> p{static_cast<const T*>(x), ldx, static_cast<const T*>(w), ldw,
                            static_cast<const T*>(log_alpha), static_cast<const T*>(bias), static_cast<T*>(y), ldy,
                            x_cols, y_cols, M, N, K, seed, mode, per_row, training,
                            allow_vec && l0k::gemm::vec_loads_ok(x, ldx, w, ldw), cfg};
  if (M <= 0 || N <= 0) return 0;
  emu_launch(static_cast<unsigned>(l0k::gemm::grid_cols(N)), static_cast<unsigned>(l0k::gemm::grid_rows(M)),
             l0k::gemm::kThreads, l0k::gated_gemm_kernel<T>, p);
  return p.vec ? 1 : 0;
}

}  // namespace

// dtype 0: float16, 1: bfloat16; mode 3 (no gates) with x_cols / y_cols (nullable) runs an eval plan. Returns 1 if the 16-byte load path ran, 0 if the scalar one, -1 on a
// bad dtype.
extern "C" int l0k_emu_gated_gemm(int dtype, const void* x, int64_t ldx, const void* w, int64_t ldw,
                                  const void* log_alpha, const void* bias, void* y, int64_t ldy, const int64_t* x_cols,
                                  const int64_t* y_cols, int64_t M, int64_t N, int64_t K, uint64_t seed, int mode, int per_row, int training, int allow_vec,
                                  float beta, float gamma, float zeta, float eps) {
  const l0k::GateConfig cfg{beta, gamma, zeta, eps};
  if (dtype == 0) {
    return run<__half>(x, ldx, w, ldw, log_alpha, bias, y, ldy, x_cols, y_cols, M, N, K, seed, mode, per_row, training, allow_vec, cfg);
  }
  if (dtype == 1) {
    return run<__nv_bfloat16>(x, ldx, w, ldw, log_alpha, bias, y, ldy, x_cols, y_cols, M, N, K, seed, mode, per_row, training,
                              allow_vec, cfg);
  }
  return -1;
}
