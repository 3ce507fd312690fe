// The gated GEMM kernels (csrc/l0_gemm.cuh: tensor cores; csrc/l0_gemv.cuh: 1-16 rows) run on the CPU
// by csrc/tests/cuda_emu.h, as a shared library for tests/test_cuda_emu.py (ctypes). Build:
//   g++ -std=c++20 -O2 -pthread -shared -fPIC -Icsrc -isystem <CUDA include> csrc/tests/gemm_emu.cpp -o gemm_emu.so
#include "cuda_emu.h"  // first: defines the CUDA names the kernels use

#include <type_traits>
#include <vector>

#include "l0_gemm.cuh"
#include "l0_gemv.cuh"

namespace {

template <typename T, int MR>
void launch_gemv(const l0k::GatedGemmParams<T>& p) {
  const unsigned gx = static_cast<unsigned>(l0k::gemv::grid_cols(p.N) + l0k::gemv::grid_idle_cols(p.n_idle));
  const unsigned gy = static_cast<unsigned>(p.splits);
  if (p.mode == l0k::kGateIn || p.mode == l0k::kGateWeight) {
    emu_launch(gx, gy, l0k::gemv::kThreads, l0k::gated_gemv_kernel<T, MR, true>, p);
  } else {
    emu_launch(gx, gy, l0k::gemv::kThreads, l0k::gated_gemv_kernel<T, MR, false>, p);
  }
}

// impl 0: as csrc/gemm.cu's launch_gated_gemm (GEMV for M <= 16), 1: the tensor-core kernel, 2: the GEMV.
// splits: K splits of either kernel (the workspace is allocated here, zeroed, and checked to be left zero).
template <typename T>
int run(int impl, const void* x, int64_t ldx, const void* w, int64_t ldw, const void* log_alpha, const void* bias,
        void* y, int64_t ldy, const int64_t* x_cols, const int64_t* y_cols, const int64_t* idle_cols, int64_t n_idle,
        const void* fill, int splits, int64_t M, int64_t N, int64_t K, const int64_t* seed, int mode, bool per_row,
        bool training, bool allow_vec, const l0k::GateConfig& cfg, int64_t group) {
  l0k::GatedGemmParams<T> p{static_cast<const T*>(x), ldx, static_cast<const T*>(w), ldw,
                            static_cast<const T*>(log_alpha), static_cast<const T*>(bias), static_cast<T*>(y), ldy,
                            x_cols, y_cols, M, N, K, seed, mode, per_row, training,
                            allow_vec && l0k::gemm::vec_loads_ok(x, ldx), cfg};
  p.vec_w = allow_vec && l0k::gemm::vec_loads_ok(w, ldw);
  p.group = group;
  const int paths = (p.vec_x ? 1 : 0) | (p.vec_w ? 2 : 0);
  p.idle_cols = idle_cols;
  p.n_idle = n_idle;
  p.fill = static_cast<const T*>(fill);
  if (impl == 0) impl = M <= l0k::gemv::kMaxRows ? 2 : 1;
  if (impl == 2 && M > l0k::gemv::kMaxRows) return -2;
  if (splits < 1 || splits > (impl == 2 ? l0k::gemv::kMaxSplits : l0k::gemm::kMaxSplits)) return -2;
  if (M <= 0 || (N <= 0 && n_idle <= 0)) return paths;
  const int64_t tiles = impl == 2 ? l0k::gemv::grid_cols(N) : l0k::gemm::grid_cols(N) * l0k::gemm::grid_rows(M);
  std::vector<float> ws(splits > 1 ? static_cast<size_t>(M * N) : 0, 0.0f);
  std::vector<int> ws_count(splits > 1 ? static_cast<size_t>(tiles) : 0, 0);
  p.splits = splits;
  p.ws = ws.data();
  p.ws_count = ws_count.data();
  if (impl == 1) {
    if constexpr (std::is_same_v<T, float>) {
      return -2;
    } else {
      emu_launch3(static_cast<unsigned>(l0k::gemm::grid_cols(N) + l0k::gemm::grid_idle_cols(n_idle)),
                  static_cast<unsigned>(l0k::gemm::grid_rows(M)), static_cast<unsigned>(splits), l0k::gemm::kThreads,
                  l0k::gated_gemm_kernel<T>, p);
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
  for (float v : ws) {
    if (v != 0.0f) return -3;  // the workspace must be left zero
  }
  for (int c : ws_count) {
    if (c != 0) return -3;
  }
  return paths;
}

}  // namespace

// dtype 0: float16, 1: bfloat16, 2: float32 (GEMV only); impl as run() above; mode 3 (no gates) with
// x_cols / y_cols / idle_cols (nullable) runs an eval plan; group: features per gate ("in" / "out"). Returns the 16-byte load paths taken (bit 0:
// x, bit 1: w), -1 on a bad dtype, -2 when the chosen kernel cannot take the call, -3 when the split-K
// workspace was not left zero.
extern "C" int l0k_emu_gated_gemm(int dtype, int impl, const void* x, int64_t ldx, const void* w, int64_t ldw,
                                  const void* log_alpha, const void* bias, void* y, int64_t ldy, const int64_t* x_cols,
                                  const int64_t* y_cols, const int64_t* idle_cols, int64_t n_idle, const void* fill,
                                  int splits, int64_t M, int64_t N, int64_t K, const int64_t* seed, int mode, int per_row,
                                  int training, int allow_vec, float beta, float gamma, float zeta, float eps,
                                  int64_t group) {
  const l0k::GateConfig cfg{beta, gamma, zeta, eps};
#define L0K_EMU_RUN(T)                                                                                              \
  run<T>(impl, x, ldx, w, ldw, log_alpha, bias, y, ldy, x_cols, y_cols, idle_cols, n_idle, fill, splits, M, N, K, seed, \
         mode, per_row, training, allow_vec, cfg, group)
  switch (dtype) {
    case 0: return L0K_EMU_RUN(__half);
    case 1: return L0K_EMU_RUN(__nv_bfloat16);
    case 2: return L0K_EMU_RUN(float);
    default: return -1;
  }
#undef L0K_EMU_RUN
}

// gemv::choose_splits and gemm::choose_splits, for the tests of the host-side rules.
extern "C" int l0k_emu_gemv_splits(int64_t N, int64_t K, int sms) { return l0k::gemv::choose_splits(N, K, sms); }
extern "C" int l0k_emu_gemm_splits(int64_t M, int64_t N, int64_t K, int sms) {
  return l0k::gemm::choose_splits(M, N, K, sms);
}
