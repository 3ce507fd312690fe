// Gated GEMV: the same computation as l0_gemm.cuh's gated GEMM (same GatedGemmParams, every gate
// mode, the eval gather / scatter) for skinny x of 1-16 rows, where a 128-row tensor-core tile would
// be mostly padding and the work is reading W once: memory-bound.
//
// Structure: a block of 8 warps owns kBN = 16 outputs (2 per warp) and walks K in chunks of 256.
// Per chunk the block stages the rows of x, gated (input gates) and rounded to T as in the GEMM,
// into shared memory (thread t: column k0 + t of every row; batch input gates are drawn once per
// column per block); each lane then reads 8 consecutive elements of its warp's W rows with one
// 16-byte load (gating them when mode is "weight": every weight gate is drawn exactly once) and
// accumulates dot products with the staged x in fp32, registers acc[output][row]. The W loads of a
// chunk are issued before the x staging and its barrier, so they are in flight meanwhile. After the
// K loop, warp shuffles reduce the lanes' partial sums; lane r writes row r (bias, output gate,
// y_cols scatter, one rounding to T). Works for float, __half and __nv_bfloat16 (fp32 FMAs, no tensor
// cores: float32 keeps full precision).
// Costs to know: per-example input gates are drawn once per block (N / 16 times each), which makes
// that mode compute-bound for large N (the caller's choice between this and the two-pass path sees
// it in its timing); there is no split-K, so N below ~2000 leaves SMs idle.
//
// Device code without PyTorch headers; runs under csrc/tests/cuda_emu.h on the CPU.
// Launcher: csrc/gemm.cu (launch_gated_gemm picks it for M <= kMaxRows).
#pragma once

#include <stdint.h>

#include "l0_gemm.cuh"  // GatedGemmParams, GateMode, gemm::Pack8 / load_chunk / gate_value, L0K_UNROLL

namespace l0k {
namespace gemv {

constexpr int kMaxRows = 16;                 // rows of x this kernel takes
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kOutPerWarp = 2;               // outputs (rows of W) per warp
constexpr int kBN = kWarps * kOutPerWarp;    // outputs per block
constexpr int kVec = gemm::kChunkK;          // elements of W per lane per chunk (one Pack8)
constexpr int kKC = 32 * kVec;               // K per chunk
static_assert(kKC == kThreads, "one staged column of x per thread");

// Grid of the kernel (1-D over N) and the compiled row count (1, 2, 4, 8, 16) that serves M rows.
inline int64_t grid_cols(int64_t N) { return (N + kBN - 1) / kBN; }
inline int row_bucket(int64_t M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16; }

}  // namespace gemv

#if defined(__CUDACC__) || defined(L0K_CUDA_EMU)
namespace gemv {
// Sum over the 32 lanes of a warp (every lane gets the total).
L0K_DEV float warp_sum(float v) {
L0K_UNROLL
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
}  // namespace gemv

// MR: rows of x the block stages (>= M, one of row_bucket's values). kLoopGates: whether gates are
// drawn in the K loop (modes "in" and "weight"); without them ("out", "none") the loop is a plain
// GEMV and needs far fewer registers.
template <typename T, int MR, bool kLoopGates>
__global__ void __launch_bounds__(gemv::kThreads) gated_gemv_kernel(const GatedGemmParams<T> p) {
  using namespace gemv;
  using gemm::Pack8;
  __shared__ __align__(16) T xs[MR][kKC];  // the chunk of x, gated and rounded to T
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t n_first = static_cast<int64_t>(blockIdx.x) * kBN + warp * kOutPerWarp;

  float acc[kOutPerWarp][MR];
L0K_UNROLL
  for (int i = 0; i < kOutPerWarp; ++i) {
L0K_UNROLL
    for (int r = 0; r < MR; ++r) acc[i][r] = 0.0f;
  }

  for (int64_t k0 = 0; k0 < p.K; k0 += kKC) {
    // this chunk's W, issued first (rows past N read zeros)
    const int64_t kl = k0 + lane * kVec;
    Pack8<T> w[kOutPerWarp];
L0K_UNROLL
    for (int i = 0; i < kOutPerWarp; ++i) {
      w[i] = gemm::load_chunk(p.w, p.ldw, n_first + i, p.N, kl, p.K, p.vec, static_cast<const int64_t*>(nullptr));
    }
    // stage x[:, k0 + tid] (gathered through x_cols), input gates applied
    {
      const int64_t k = k0 + tid;
      const bool in_k = k < p.K;
      const int64_t col = !in_k ? 0 : p.x_cols != nullptr ? p.x_cols[k] : k;
      const bool gate_x = kLoopGates && p.mode == kGateIn && in_k;
      const float z_col = gate_x && !p.per_row ? gemm::gate_value(p, k, k) : 1.0f;
L0K_NO_UNROLL  // shared stores need no register indexing; unrolled, MR inline Philox draws cost registers
      for (int r = 0; r < MR; ++r) {
        T v = from_float<T>(0.0f);
        if (r < p.M && in_k) {
          v = p.x[r * p.ldx + col];
          if (gate_x) v = from_float<T>(to_float(v) * (p.per_row ? gemm::gate_value(p, k, r * p.K + k) : z_col));
        }
        xs[r][tid] = v;
      }
    }
    __syncthreads();
L0K_UNROLL
    for (int i = 0; i < kOutPerWarp; ++i) {
      const int64_t n = n_first + i;
      float wf[kVec];
L0K_UNROLL
      for (int j = 0; j < kVec; ++j) {
        wf[j] = to_float(w[i].v[j]);
        const int64_t k = kl + j;
        if (kLoopGates && p.mode == kGateWeight && n < p.N && k < p.K) {
          wf[j] = to_float(from_float<T>(wf[j] * gemm::gate_value(p, n * p.K + k, n * p.K + k)));
        }
      }
L0K_UNROLL
      for (int r = 0; r < MR; ++r) {
        const Pack8<T> xv = *reinterpret_cast<const Pack8<T>*>(&xs[r][lane * kVec]);
        float s = acc[i][r];
L0K_UNROLL
        for (int j = 0; j < kVec; ++j) s += wf[j] * to_float(xv.v[j]);
        acc[i][r] = s;
      }
    }
    __syncthreads();  // xs is rewritten by the next chunk
  }

  // reduce over the lanes; lane r writes row r
L0K_UNROLL
  for (int i = 0; i < kOutPerWarp; ++i) {
    const int64_t n = n_first + i;
    float bias = 0.0f, z = 1.0f;
    if (n < p.N) {
      if (p.bias != nullptr) bias = to_float(p.bias[n]);
      if (p.mode == kGateOut && !p.per_row) z = gemm::gate_value(p, n, n);
    }
L0K_UNROLL
    for (int r = 0; r < MR; ++r) {
      const float total = gemv::warp_sum(acc[i][r]);
      if (lane == r && r < p.M && n < p.N) {
        float v = total + bias;
        if (p.mode == kGateOut) v *= p.per_row ? gemm::gate_value(p, n, r * p.N + n) : z;
        p.y[r * p.ldy + (p.y_cols != nullptr ? p.y_cols[n] : n)] = from_float<T>(v);
      }
    }
  }
}
#endif  // __CUDACC__ || L0K_CUDA_EMU

}  // namespace l0k
