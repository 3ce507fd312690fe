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
// Split-K (grid.y = splits > 1, chosen by the host with choose_splits when N alone gives too few
// blocks): each split walks its own chunks and adds its sums into an fp32 workspace with atomics; the
// last split of a block column to arrive (a counter per column, CUDA's threadfence-reduction pattern)
// reads the totals back, leaves workspace and counter zero, and runs the epilogue: still one launch.
// Idle outputs of eval plans (idle_cols) are written by extra blocks of the same launch.
// Costs to know: per-example input gates are drawn once per block column (N / 16 times each), which
// makes that mode compute-bound for large N (the caller's choice between this and the two-pass path
// sees it in its timing).
//
// Device code without PyTorch headers; runs under csrc/tests/cuda_emu.h on the CPU.
// Launcher: csrc/gemm.cu (launch_gated_gemm picks it for M <= kMaxRows).
#pragma once

#include <stdint.h>

#include "l0_gemm.cuh"  // GatedGemmParams, GateMode, gemm::Pack8 / load_chunk / gate_value / feature_gate, L0K_UNROLL

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

// Grid of the kernel: x over the block columns of N, then over the idle outputs (kThreads per block);
// y over the K splits. And the compiled row count (1, 2, 4, 8, 16) that serves M rows.
L0K_HD int64_t grid_cols(int64_t N) { return (N + kBN - 1) / kBN; }
L0K_HD int64_t grid_idle_cols(int64_t n_idle) { return (n_idle + kThreads - 1) / kThreads; }
inline int row_bucket(int64_t M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16; }

constexpr int kMaxSplits = 32;
constexpr int kMinChunksPerSplit = 2;

// K splits for an (M <= 16) x K x N call on a GPU with `sms` multiprocessors: enough blocks for about
// two per multiprocessor (the kernel is latency-bound with fewer: each block keeps only 8 KB of W in
// flight), at least kMinChunksPerSplit chunks of K each, and no split left without chunks.
inline int choose_splits(int64_t N, int64_t K, int sms) {
  const int64_t blocks = grid_cols(N), chunks = (K + kKC - 1) / kKC;
  if (blocks == 0) return 1;
  int64_t s = (2 * static_cast<int64_t>(sms) + blocks - 1) / blocks;
  const int64_t by_k = chunks / kMinChunksPerSplit;
  if (s > by_k) s = by_k;
  if (s > kMaxSplits) s = kMaxSplits;
  if (s <= 1) return 1;
  const int64_t span = (chunks + s - 1) / s;  // no split left without chunks
  return static_cast<int>((chunks + span - 1) / span);
}
// K elements per split (a whole number of chunks, so each chunk lies in one split).
L0K_HD int64_t split_span(int64_t K, int splits) {
  const int64_t chunks = (K + kKC - 1) / kKC;
  return (chunks + splits - 1) / splits * kKC;
}

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
  __shared__ int last_split;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (static_cast<int64_t>(blockIdx.x) >= grid_cols(p.N)) {  // a block of idle outputs (split 0 writes them)
    if (blockIdx.y == 0) {
      gemm::write_idle(p, (blockIdx.x - grid_cols(p.N)) * gemv::kThreads, gemv::kThreads, 0, p.M, tid,
                       gemv::kThreads);
    }
    return;
  }
  const int64_t n_first = static_cast<int64_t>(blockIdx.x) * kBN + warp * kOutPerWarp;
  const int64_t span = split_span(p.K, p.splits);
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * span;
  const int64_t k_end = k_begin + span < p.K ? k_begin + span : p.K;

  float acc[kOutPerWarp][MR];
L0K_UNROLL
  for (int i = 0; i < kOutPerWarp; ++i) {
L0K_UNROLL
    for (int r = 0; r < MR; ++r) acc[i][r] = 0.0f;
  }

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kKC) {  // chunks past k_end belong to the next split
    // this chunk's W, issued first (rows past N read zeros)
    const int64_t kl = k0 + lane * kVec;
    Pack8<T> w[kOutPerWarp];
L0K_UNROLL
    for (int i = 0; i < kOutPerWarp; ++i) {
      w[i] = gemm::load_chunk(p.w, p.ldw, n_first + i, p.N, kl, p.K, p.vec_w, static_cast<const int64_t*>(nullptr));
    }
    // stage x[:, k0 + tid] (gathered through x_cols), input gates applied
    {
      const int64_t k = k0 + tid;
      const bool in_k = k < p.K;
      const int64_t col = !in_k ? 0 : p.x_cols != nullptr ? p.x_cols[k] : k;
      const bool gate_x = kLoopGates && p.mode == kGateIn && in_k;
      const float z_col = gate_x && !p.per_row ? gemm::feature_gate(p, k, 0) : 1.0f;
L0K_NO_UNROLL  // shared stores need no register indexing; unrolled, MR inline Philox draws cost registers
      for (int r = 0; r < MR; ++r) {
        T v = from_float<T>(0.0f);
        if (r < p.M && in_k) {
          v = p.x[r * p.ldx + col];
          if (gate_x) v = from_float<T>(to_float(v) * (p.per_row ? gemm::feature_gate(p, k, r) : z_col));
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

  // reduce over the lanes: lane r keeps row r's sums
  float mine[kOutPerWarp];
L0K_UNROLL
  for (int i = 0; i < kOutPerWarp; ++i) {
    mine[i] = 0.0f;
L0K_UNROLL
    for (int r = 0; r < MR; ++r) {
      const float total = gemv::warp_sum(acc[i][r]);
      if (lane == r) mine[i] = total;
    }
  }
  const bool row_lane = lane < p.M;  // M <= MR <= 16: one lane per row
  if (p.splits > 1) {
    // split-K: partial sums into ws; the last split of this block column to arrive finishes it
L0K_UNROLL
    for (int i = 0; i < kOutPerWarp; ++i) {
      const int64_t n = n_first + i;
      if (row_lane && n < p.N) atomicAdd(&p.ws[lane * p.N + n], mine[i]);
    }
    __threadfence();  // the partial sums are visible before the arrival is counted
    __syncthreads();
    if (tid == 0) last_split = atomicAdd(&p.ws_count[blockIdx.x], 1) == p.splits - 1;
    __syncthreads();
    if (!last_split) return;
    __threadfence();
L0K_UNROLL
    for (int i = 0; i < kOutPerWarp; ++i) {
      const int64_t n = n_first + i;
      if (row_lane && n < p.N) mine[i] = atomicExch(&p.ws[lane * p.N + n], 0.0f);  // read and leave zero
    }
    if (tid == 0) p.ws_count[blockIdx.x] = 0;
  }
  // epilogue: bias, output gate, scatter, one rounding to T
L0K_UNROLL
  for (int i = 0; i < kOutPerWarp; ++i) {
    const int64_t n = n_first + i;
    if (row_lane && n < p.N) {
      float v = mine[i];
      if (p.bias != nullptr) v += to_float(p.bias[n]);
      if (p.mode == kGateOut) v *= gemm::feature_gate(p, n, p.per_row ? lane : 0);
      p.y[lane * p.ldy + (p.y_cols != nullptr ? p.y_cols[n] : n)] = from_float<T>(v);
    }
  }
}
#endif  // __CUDACC__ || L0K_CUDA_EMU

}  // namespace l0k
