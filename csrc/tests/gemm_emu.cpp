// The gated GEMM kernels (csrc/l0_gemm.cuh: tensor cores; csrc/l0_gemv.cuh: 1-16 rows) run on the CPU
// by csrc/tests/cuda_emu.h, as a shared library for tests/test_cuda_emu.py (ctypes). Build:
//   g++ -std=c++20 -O2 -pthread -shared -fPIC -Icsrc -isystem <CUDA include> csrc/tests/gemm_emu.cpp -o gemm_emu.so
#include "cuda_emu.h"  // first: defines the CUDA names the kernels use

#include <type_traits>
#include <vector>

#include "l0_gemm.cuh"
#include "l0_gemv.cuh"
#include "l0_open.cuh"

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

// The open-set fields of GatedGemmParams (training over open features, l0_gemm.cuh).
struct OpenArgs {
  const int64_t* w_rows = nullptr;
  const int64_t* w_cols = nullptr;
  const int64_t* k_count = nullptr;
  const int64_t* n_count = nullptr;
  bool x_mn = false, w_mn = false, y_trans = false;
};

// impl 0: as csrc/gemm.cu's launch_gated_gemm (GEMV for M <= 16), 1: the tensor-core kernel, 2: the GEMV.
// splits: K splits of either kernel (the workspace is allocated here, zeroed, and checked to be left zero).
template <typename T>
int run(int impl, const void* x, int64_t ldx, const void* w, int64_t ldw, const void* log_alpha, const void* bias,
        void* y, int64_t ldy, const int64_t* x_cols, const int64_t* y_cols, const int64_t* idle_cols, int64_t n_idle,
        const void* fill, int splits, int64_t M, int64_t N, int64_t K, const int64_t* seed, int mode, bool per_row,
        bool training, bool allow_vec, const l0k::GateConfig& cfg, int64_t group, const OpenArgs& o = OpenArgs{}) {
  l0k::GatedGemmParams<T> p{static_cast<const T*>(x), ldx, static_cast<const T*>(w), ldw,
                            static_cast<const T*>(log_alpha), static_cast<const T*>(bias), static_cast<T*>(y), ldy,
                            x_cols, y_cols, M, N, K, seed, mode, per_row, training,
                            allow_vec && l0k::gemm::vec_loads_ok(x, ldx), cfg};
  p.vec_w = allow_vec && l0k::gemm::vec_loads_ok(w, ldw);
  p.group = group;
  p.w_rows = o.w_rows;
  p.w_cols = o.w_cols;
  p.k_count = o.k_count;
  p.n_count = o.n_count;
  p.x_mn = o.x_mn;
  p.w_mn = o.w_mn;
  p.y_trans = o.y_trans;
  const int paths = (p.vec_x ? 1 : 0) | (p.vec_w ? 2 : 0);
  p.idle_cols = idle_cols;
  p.n_idle = n_idle;
  p.fill = static_cast<const T*>(fill);
  if (impl == 0) impl = M <= l0k::gemv::kMaxRows && !l0k::gemm::uses_open_set(p) ? 2 : 1;
  if (impl == 2 && l0k::gemm::uses_open_set(p)) return -2;
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

// The tensor-core kernel over an open set (training, l0_gemm.cuh's open-set fields): x (M, K) K-major or,
// with x_mn, stored (K, M); w (N, K) K-major or, with w_mn, stored (K, N); w_rows / w_cols / k_count /
// n_count nullable; y_trans writes y as (N, M). Returns as l0k_emu_gated_gemm.
extern "C" int l0k_emu_open_gemm(int dtype, const void* x, int64_t ldx, const void* w, int64_t ldw,
                                 const void* log_alpha, const void* bias, void* y, int64_t ldy, const int64_t* x_cols,
                                 const int64_t* y_cols, const int64_t* w_rows, const int64_t* w_cols,
                                 const int64_t* k_count, const int64_t* n_count, int x_mn, int w_mn, int y_trans,
                                 int splits, int64_t M, int64_t N, int64_t K, const int64_t* seed, int mode,
                                 int allow_vec, float beta, float gamma, float zeta, float eps, int64_t group) {
  const l0k::GateConfig cfg{beta, gamma, zeta, eps};
  const OpenArgs o{w_rows, w_cols, k_count, n_count, x_mn != 0, w_mn != 0, y_trans != 0};
  switch (dtype) {
    case 0:
      return run<__half>(1, x, ldx, w, ldw, log_alpha, bias, y, ldy, x_cols, y_cols, nullptr, 0, nullptr, splits, M, N,
                         K, seed, mode, false, seed != nullptr, allow_vec, cfg, group, o);
    case 1:
      return run<__nv_bfloat16>(1, x, ldx, w, ldw, log_alpha, bias, y, ldy, x_cols, y_cols, nullptr, 0, nullptr, splits,
                                M, N, K, seed, mode, false, seed != nullptr, allow_vec, cfg, group, o);
    default: return -1;
  }
}

// gathered_dot_kernel of l0_open.cuh (dtype as above; 2: float32), as csrc/reduce.cu launches it.
extern "C" int l0k_emu_gathered_dot(int dtype, const void* a, int64_t a_so, int64_t a_si, const void* b, int64_t b_so,
                                    int64_t b_si, const int64_t* idx, const int64_t* count, int64_t G, int64_t L,
                                    float* out) {
  const unsigned grid = static_cast<unsigned>(l0k::open_set::grid(G));
#define L0K_EMU_DOT(T)                                                                                            \
  emu_launch(grid, 1, l0k::open_set::kThreads, l0k::gathered_dot_kernel<T>, static_cast<const T*>(a), a_so, a_si, \
             static_cast<const T*>(b), b_so, b_si, idx, count, G, L, out)
  if (G <= 0) return 0;
  switch (dtype) {
    case 0: L0K_EMU_DOT(__half); return 0;
    case 1: L0K_EMU_DOT(__nv_bfloat16); return 0;
    case 2: L0K_EMU_DOT(float); return 0;
    default: return -1;
  }
#undef L0K_EMU_DOT
}

// gemv::choose_splits and gemm::choose_splits, for the tests of the host-side rules.
extern "C" int l0k_emu_gemv_splits(int64_t N, int64_t K, int sms) { return l0k::gemv::choose_splits(N, K, sms); }
extern "C" int l0k_emu_gemm_splits(int64_t M, int64_t N, int64_t K, int sms) {
  return l0k::gemm::choose_splits(M, N, K, sms);
}
