// Single-launch gated GEMM: the forward of l0_linear for float16 / bfloat16 on tensor cores (WMMA,
// sm_80+), with the gates drawn inside the kernel from (seed, offset) through l0_gate.cuh:
//
//   gate "in":     y = (x * z_in) @ W^T + b      z_in: (K,) batch / eval, (M, K) per example
//   gate "weight": y = x @ (W * Z)^T + b         Z: (N, K)
//   gate "out":    y = (x @ W^T + b) * z_out     z_out: (N,) batch / eval, (M, N) per example
//
// Offsets are the row-major index into the noise tensor (docs/design.md §2), as in gates.cu.
// Eval plans (l0kernels/backends/_plans.py) use it without gates (kGateNone) on the compact,
// gate-folded weight, gathering the active columns of x in the loads (x_cols) and scattering the
// active outputs in the epilogue (y_cols).
// Structure: 128 x 128 x 32 block tiles, 8 warps of 64 x 32 outputs, register-staged double
// buffering (global -> registers -> gate -> shared memory, so the gate multiplies the operand on its
// way into shared memory; cp.async cannot do that), fp32 accumulation, one rounding of each gated
// operand to T (as the two-pass path: scale kernel + cuBLAS). Batch / eval input gates are drawn once
// per k-tile into shared memory (two tiles ahead); per-example and weight gates are drawn per
// element on load, so each is drawn once per block column (N / 128 times) or block row (M / 128
// times): cheap for small M or N, expensive for large ones (the caller picks between this kernel and
// the two-pass path). Output gates are applied in the epilogue with the bias.
// Split-K (grid.z = splits > 1, chosen by the host with choose_splits when the output tiles alone
// leave multiprocessors idle, e.g. M <= 256 with N = 4096): each split runs its share of the k-tiles
// and adds its partial sums into an fp32 workspace with atomics; the last split of an output tile to
// arrive (a counter per tile) reads the sums back, leaves workspace and counter zero, and finishes the
// tile with bias, output gate and scatter. Idle outputs of eval plans are written by extra block
// columns of the same launch.
//
// Device code without PyTorch headers. It uses only threadIdx/blockIdx, __syncthreads/__syncwarp,
// static shared memory and nvcuda::wmma, so csrc/tests/cuda_emu.h can run it on the CPU.
// Launcher: csrc/gemm.cu (launch_gated_gemm in l0_kernels.h).
#pragma once

#include <stdint.h>

#include "l0_gate.cuh"
#include "l0_types.cuh"

#if defined(__CUDACC__)
#include <mma.h>
#define L0K_UNROLL _Pragma("unroll")
#define L0K_NO_UNROLL _Pragma("unroll 1")
#else
#define L0K_UNROLL
#define L0K_NO_UNROLL
#endif

namespace l0k {

enum GateMode : int { kGateIn = 0, kGateOut = 1, kGateWeight = 2, kGateNone = 3 };

template <typename T>
struct GatedGemmParams {
  const T* x;          // (M, K), row stride ldx, unit column stride
  int64_t ldx;
  const T* w;          // (N, K), row stride ldw, unit column stride
  int64_t ldw;
  const T* log_alpha;  // contiguous: (K,) for "in", (N,) for "out", (N, K) for "weight"
  const T* bias;       // (N,) or nullptr
  T* y;                // (M, N), row stride ldy
  int64_t ldy;
  const int64_t* x_cols;  // nullptr, or K indices: GEMM column k reads x[:, x_cols[k]] (eval: active inputs)
  const int64_t* y_cols;  // nullptr, or N indices: GEMM column n is written to y[:, y_cols[n]] (active outputs)
  int64_t M, N, K;
  const int64_t* seed;  // device pointer to the 0-d int64 seed tensor (load_seed), nullptr without training gates
  int mode;            // GateMode; kGateNone: no gates (eval plans, gates folded into w and bias)
  bool per_row;        // training with per-example noise ("in" / "out")
  bool training;       // false: deterministic z_eval, seed unused
  bool vec_x;          // 16-byte loads of x allowed: x 16-byte aligned, ldx a multiple of 8 (vec_loads_ok)
  GateConfig cfg;
  // Eval plans: the outputs that are not computed, y[:, idle_cols[i]] = fill ? fill[idle_cols[i]] : 0 for
  // i < n_idle, written by extra blocks of the same launch (grid columns after the GEMM's).
  const int64_t* idle_cols = nullptr;
  int64_t n_idle = 0;
  const T* fill = nullptr;     // (ldy-wide output row) fill values, or nullptr for zeros
  // Split-K: splits > 1 partitions K (GEMV: grid.y, tensor-core GEMM: grid.z); ws (M x N floats) and
  // ws_count (one int per output tile: block columns of the GEMV, block rows x columns of the GEMM) are
  // zero on entry and left zero by the kernel.
  int splits = 1;
  float* ws = nullptr;
  int* ws_count = nullptr;
  bool vec_w = false;  // the same for w (its own flag: a gathered or oddly strided x keeps W's fast loads)
  // Grouped gates ("in" / "out"): `group` consecutive features share gate f / group; log_alpha then has
  // K / group or N / group entries and the noise tensor is over the gates (feature_gate).
  int64_t group = 1;
  // Training over the open set (batch gates, l0kernels/_active.py): the GEMM runs over gathered
  // features whose number it reads from device memory, so no size reaches the host (no sync, CUDA
  // graphs). Index maps: GEMM row n of the B operand is row w_rows[n] of w (and feature w_rows[n]:
  // its output gate and bias), reduction index k reads w column (K-major) / row (MN-major) w_cols[k]
  // and x column / row x_cols[k] (whose input gate it takes).
  const int64_t* w_rows = nullptr;
  const int64_t* w_cols = nullptr;
  const int64_t* k_count = nullptr;  // device: the reduction runs over k < min(K, *k_count)
  const int64_t* n_count = nullptr;  // device: GEMM columns n >= min(N, *n_count) are written as zeros, not computed
  // Operand layouts: K-major (default) reads element (row, k) at ptr[row * ld + k]; MN-major at
  // ptr[k * ld + row] (x: (K, M) storage, e.g. dY^T; w: (K, N) storage, e.g. W^T). y_trans writes output
  // (m, n) at y[n' * ldy + m] (n' = y_cols[n] or n) instead of y[m * ldy + n'].
  bool x_mn = false;
  bool w_mn = false;
  bool y_trans = false;
};

namespace gemm {

constexpr int kBM = 128, kBN = 128, kBK = 32;  // block tile
constexpr int kWarpM = 64, kWarpN = 32;        // warp tile
constexpr int kWarpsN = kBN / kWarpN;
constexpr int kThreads = (kBM / kWarpM) * kWarpsN * 32;
constexpr int kFM = kWarpM / 16, kFN = kWarpN / 16;  // 16 x 16 fragments per warp
constexpr int kLds = kBK + 8;  // shared row stride in elements: 80 bytes keeps rows 16-byte aligned
constexpr int kChunkK = 8;     // one 16-byte chunk of 8 elements
constexpr int kChunksPerRow = kBK / kChunkK;
constexpr int kChunksA = kBM * kChunksPerRow / kThreads;
constexpr int kChunksB = kBN * kChunksPerRow / kThreads;
constexpr int kTileElems = kBM > kBN ? kBM * kLds : kBN * kLds;
constexpr int kStageBytes = 2 * kTileElems * 2;                   // A and B tiles of a 2-byte T
constexpr int kEpilogueBytes = (kThreads / 32) * 16 * 16 * 4;     // a float 16 x 16 tile per warp
constexpr int kSmemBytes = 2 * kStageBytes > kEpilogueBytes ? 2 * kStageBytes : kEpilogueBytes;
static_assert(kChunksA * kThreads == kBM * kChunksPerRow && kChunksB * kThreads == kBN * kChunksPerRow,
              "tile loads must divide evenly among the threads");
static_assert(kBK % 16 == 0 && kBM <= kThreads && kBN <= kThreads && kBK <= kThreads, "tile shape");

// Grid of the kernel: (x: block columns over N, then over the idle outputs; y: block rows over M).
L0K_HD int64_t grid_cols(int64_t N) { return (N + kBN - 1) / kBN; }
L0K_HD int64_t grid_idle_cols(int64_t n_idle) { return (n_idle + kBN - 1) / kBN; }
L0K_HD int64_t grid_rows(int64_t M) { return (M + kBM - 1) / kBM; }

constexpr int kMaxSplits = 16;
constexpr int kMinTilesPerSplit = 4;  // k-tiles of kBK per split at least

// K splits (grid.z) for an M x K x N call on `sms` multiprocessors: as many as fit in one wave (one
// 160-register, 41 KB block per SM: rounding up would start a second, mostly idle wave), at least
// kMinTilesPerSplit k-tiles each, and no split left without tiles.
inline int choose_splits(int64_t M, int64_t N, int64_t K, int sms) {
  const int64_t blocks = grid_cols(N) * grid_rows(M), tiles = (K + kBK - 1) / kBK;
  if (blocks == 0) return 1;
  int64_t s = sms / blocks;
  if (s > tiles / kMinTilesPerSplit) s = tiles / kMinTilesPerSplit;
  if (s > kMaxSplits) s = kMaxSplits;
  if (s <= 1) return 1;
  const int64_t span = (tiles + s - 1) / s;
  return static_cast<int>((tiles + span - 1) / span);
}
// k-tiles per split.
L0K_HD int split_tiles(int64_t K, int splits) {
  const int64_t tiles = (K + kBK - 1) / kBK;
  return static_cast<int>((tiles + splits - 1) / splits);
}

// Whether GatedGemmParams::vec_x / vec_w may be set for an operand: 16-byte aligned, row stride a
// multiple of 8 elements.
inline bool vec_loads_ok(const void* p, int64_t ld) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % kChunkK == 0;
}

// Whether a call uses the open-set fields (index maps, device counts, MN-major operands, y_trans):
// only the tensor-core kernel reads them, so the launcher never sends such a call to the GEMV.
template <typename T>
inline bool uses_open_set(const GatedGemmParams<T>& p) {
  return p.w_rows != nullptr || p.w_cols != nullptr || p.k_count != nullptr || p.n_count != nullptr || p.x_mn ||
         p.w_mn || p.y_trans;
}

// Eight consecutive elements, one 16-byte access.
template <typename T>
struct alignas(16) Pack8 {
  T v[kChunkK];
};

// Elements [k, k + 8) of row `row` of a (rows, K) matrix with row stride ld, zeros outside; with
// `cols`, element k is read from column cols[k] (a gather, scalar loads).
template <typename T>
L0K_DEV Pack8<T> load_chunk(const T* p, int64_t ld, int64_t row, int64_t rows, int64_t k, int64_t K, bool vec,
                            const int64_t* cols) {
  Pack8<T> out;
  if (row < rows && vec && cols == nullptr && k + kChunkK <= K) {
    return *reinterpret_cast<const Pack8<T>*>(p + row * ld + k);
  }
L0K_UNROLL
  for (int j = 0; j < kChunkK; ++j) {
    const bool in = row < rows && k + j < K;
    out.v[j] = in ? p[row * ld + (cols != nullptr ? cols[k + j] : k + j)] : from_float<T>(0.0f);
  }
  return out;
}

// Element (row, k) of a K-major or MN-major operand with optional row / k index maps (see
// GatedGemmParams), zero outside [0, rows) x [0, K). Eight of them per chunk: along k (K-major, the
// chunk of load_chunk) or along rows (MN-major: rows r .. r + 7 of column k, one 16-byte access where
// contiguous).
template <typename T>
L0K_DEV Pack8<T> load_chunk_mn(const T* p, int64_t ld, int64_t r, int64_t rows, int64_t k, int64_t K, bool vec,
                               const int64_t* row_map, const int64_t* k_map) {
  Pack8<T> out;
  if (k < K) {
    const int64_t kk = k_map != nullptr ? k_map[k] : k;
    if (vec && row_map == nullptr && r + kChunkK <= rows) {
      return *reinterpret_cast<const Pack8<T>*>(p + kk * ld + r);
    }
L0K_UNROLL
    for (int j = 0; j < kChunkK; ++j) {
      const int64_t row = r + j;
      out.v[j] = row < rows ? p[kk * ld + (row_map != nullptr ? row_map[row] : row)] : from_float<T>(0.0f);
    }
    return out;
  }
L0K_UNROLL
  for (int j = 0; j < kChunkK; ++j) out.v[j] = from_float<T>(0.0f);
  return out;
}

// The same along k (K-major) with a row index map (the B operand's w_rows).
template <typename T>
L0K_DEV Pack8<T> load_chunk_rows(const T* p, int64_t ld, int64_t row, int64_t rows, int64_t k, int64_t K, bool vec,
                                 const int64_t* row_map, const int64_t* k_map) {
  if (row_map == nullptr || row >= rows) return load_chunk(p, ld, row, rows, k, K, vec, k_map);
  return load_chunk(p + row_map[row] * ld, ld, 0, 1, k, K, vec, k_map);
}

// Output (m, n) of the GEMM: its address in y (scatter y_cols, layout y_trans).
template <typename T>
L0K_DEV int64_t y_offset(const GatedGemmParams<T>& p, int64_t m, int64_t n) {
  const int64_t col = p.y_cols != nullptr ? p.y_cols[n] : n;
  return p.y_trans ? col * p.ldy + m : m * p.ldy + col;
}

// Idle outputs idle_cols[c0, c0 + cols) of rows [r0, r0 + rows) (clipped to n_idle and M): the fill
// value or zero. Consecutive threads take consecutive idle columns of a row.
template <typename T>
L0K_DEV void write_idle(const GatedGemmParams<T>& p, int64_t c0, int cols, int64_t r0, int64_t rows, int tid,
                        int threads) {
  const int64_t nc = p.n_idle - c0 < cols ? p.n_idle - c0 : cols;
  const int64_t nr = p.M - r0 < rows ? p.M - r0 : rows;
  for (int64_t i = tid; i < nc * nr; i += threads) {
    const int64_t col = p.idle_cols[c0 + i % nc], m = r0 + i / nc;
    p.y[m * p.ldy + col] = p.fill != nullptr ? p.fill[col] : from_float<T>(0.0f);
  }
}

// Gate of noise element `offset` with parameter log_alpha[g].
template <typename T>
L0K_DEV float gate_value(const GatedGemmParams<T>& p, int64_t g, int64_t offset) {
  float z;
  gate_at(to_float(p.log_alpha[g]), p.training ? load_seed(p.seed) : 0, static_cast<uint64_t>(offset), p.training,
          p.cfg, &z, nullptr);
  return z;
}

// Gate of input ("in") or output ("out") feature f in noise row `row` (0 for batch / eval gates):
// parameter log_alpha[f / group] at offset row * G + f / group, G = K / group or N / group gates.
template <typename T>
L0K_DEV float feature_gate(const GatedGemmParams<T>& p, int64_t f, int64_t row) {
  const int64_t features = p.mode == kGateIn ? p.K : p.N;
  if (p.group == 1) return gate_value(p, f, row * features + f);
  const int64_t g = f / p.group;
  return gate_value(p, g, row * (features / p.group) + g);
}

// The input gate of reduction index k (feature x_cols[k]) and the output gate / bias index of GEMM
// column n (feature w_rows[n]).
template <typename T>
L0K_DEV int64_t k_feature(const GatedGemmParams<T>& p, int64_t k) { return p.x_cols != nullptr ? p.x_cols[k] : k; }
template <typename T>
L0K_DEV int64_t n_feature(const GatedGemmParams<T>& p, int64_t n) { return p.w_rows != nullptr ? p.w_rows[n] : n; }

}  // namespace gemm

// The kernel: nvcc, or host C++ under csrc/tests/cuda_emu.h (which defines L0K_CUDA_EMU). Plain host
// code (csrc/binding.cpp) sees only the parameters and helpers above.
#if defined(__CUDACC__) || defined(L0K_CUDA_EMU)
template <typename T>
__global__ void __launch_bounds__(gemm::kThreads) gated_gemm_kernel(const GatedGemmParams<T> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace gemm;
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  __shared__ float z_k[2][kBK];  // batch / eval input gates of k-tiles t (slot t % 2)
  __shared__ float z_n[kBN];     // batch / eval output gates of this block's columns

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (static_cast<int64_t>(blockIdx.x) >= grid_cols(p.N)) {  // a block of idle outputs (split 0 writes them)
    if (blockIdx.z == 0) {
      write_idle(p, (blockIdx.x - grid_cols(p.N)) * kBN, kBN, static_cast<int64_t>(blockIdx.y) * kBM, kBM, tid,
                 gemm::kThreads);
    }
    return;
  }
  T* const a_smem = reinterpret_cast<T*>(smem);  // [stage][kBM][kLds]
  T* const b_smem = a_smem + 2 * kTileElems;     // [stage][kBN][kLds]
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  // the open set's sizes, read on the device (training over open features), else the full ones
  const int64_t n_eff = p.n_count != nullptr ? (*p.n_count < 0 ? 0 : (*p.n_count < p.N ? *p.n_count : p.N)) : p.N;
  const int64_t k_eff = p.k_count != nullptr ? (*p.k_count < 0 ? 0 : (*p.k_count < p.K ? *p.k_count : p.K)) : p.K;
  if (n0 >= n_eff) {  // a tile of closed features: zeros, written by split 0, nothing read
    if (blockIdx.z == 0) {
      const int64_t nc = p.N - n0 < kBN ? p.N - n0 : kBN, nr = p.M - m0 < kBM ? p.M - m0 : kBM;
      for (int64_t i = tid; i < nc * nr; i += gemm::kThreads) {
        p.y[y_offset(p, m0 + i / nc, n0 + i % nc)] = from_float<T>(0.0f);
      }
    }
    return;
  }
  // this block's k-tiles [t_begin, t_end): all of them, or its split's share (grid.z)
  const int ktiles = static_cast<int>((k_eff + kBK - 1) / kBK);
  const int span = p.splits > 1 ? split_tiles(k_eff, p.splits) : ktiles;
  const int t_begin = static_cast<int>(blockIdx.z) * span;
  const int t_end = t_begin + span < ktiles ? t_begin + span : ktiles;
  const bool tile_gates = p.mode == kGateIn && !p.per_row;

  if (p.mode == kGateOut && !p.per_row && tid < kBN) {
    const int64_t n = n0 + tid;
    z_n[tid] = n < n_eff ? feature_gate(p, n_feature(p, n), 0) : 0.0f;
  }
  auto draw_k_gates = [&](int t) {  // into slot t % 2; read when tile t is stored
    if (tid < kBK) {
      const int64_t k = static_cast<int64_t>(t) * kBK + tid;
      z_k[t & 1][tid] = k < k_eff ? feature_gate(p, k_feature(p, k), 0) : 0.0f;
    }
  };

  // A chunk of 8 elements: K-major operands take row id / kChunksPerRow, columns kc .. kc + 7 of the
  // tile; MN-major ones column id / kMnChunks, rows rc .. rc + 7 (consecutive threads, consecutive rows)
  constexpr int kMnChunks = kBM / kChunkK;
  static_assert(kBM == kBN, "the MN-major chunk mapping assumes square block tiles");
  Pack8<T> ra[kChunksA], rb[kChunksB];
  auto load_tile = [&](int t) {  // global -> registers
    const int64_t k0 = static_cast<int64_t>(t) * kBK;
L0K_UNROLL
    for (int c = 0; c < kChunksA; ++c) {
      const int id = tid + c * gemm::kThreads;
      if (p.x_mn) {
        ra[c] = load_chunk_mn(p.x, p.ldx, m0 + (id % kMnChunks) * kChunkK, p.M, k0 + id / kMnChunks, k_eff, p.vec_x,
                              static_cast<const int64_t*>(nullptr), p.x_cols);
      } else {
        ra[c] = load_chunk(p.x, p.ldx, m0 + id / kChunksPerRow, p.M, k0 + (id % kChunksPerRow) * kChunkK, k_eff,
                           p.vec_x, p.x_cols);
      }
    }
L0K_UNROLL
    for (int c = 0; c < kChunksB; ++c) {
      const int id = tid + c * gemm::kThreads;
      if (p.w_mn) {
        rb[c] = load_chunk_mn(p.w, p.ldw, n0 + (id % kMnChunks) * kChunkK, n_eff, k0 + id / kMnChunks, k_eff, p.vec_w,
                              p.w_rows, p.w_cols);
      } else {
        rb[c] = load_chunk_rows(p.w, p.ldw, n0 + id / kChunksPerRow, n_eff, k0 + (id % kChunksPerRow) * kChunkK, k_eff,
                                p.vec_w, p.w_rows, p.w_cols);
      }
    }
  };
  auto store_tile = [&](int t, int stage) {  // registers -> gate -> shared
    const int64_t k0 = static_cast<int64_t>(t) * kBK;
L0K_UNROLL
    for (int c = 0; c < kChunksA; ++c) {
      const int id = tid + c * gemm::kThreads;
      Pack8<T> a = ra[c];
      if (p.x_mn) {  // rows rc .. rc + 7 of column kq (batch input gates only: the host never pairs x_mn with
                     // per-example gates)
        const int kq = id / kMnChunks, rc = (id % kMnChunks) * kChunkK;
        const float z = p.mode == kGateIn ? z_k[t & 1][kq] : 1.0f;
L0K_UNROLL
        for (int j = 0; j < kChunkK; ++j) {
          a_smem[stage * kTileElems + (rc + j) * kLds + kq] =
              p.mode == kGateIn ? from_float<T>(to_float(a.v[j]) * z) : a.v[j];
        }
        continue;
      }
      const int r = id / kChunksPerRow, kc = (id % kChunksPerRow) * kChunkK;
      const int64_t m = m0 + r;
      if (p.mode == kGateIn && m < p.M) {
L0K_UNROLL
        for (int j = 0; j < kChunkK; ++j) {
          const int64_t k = k0 + kc + j;
          if (k < k_eff) {
            const float z = p.per_row ? feature_gate(p, k, m) : z_k[t & 1][kc + j];
            a.v[j] = from_float<T>(to_float(a.v[j]) * z);
          }
        }
      }
      *reinterpret_cast<Pack8<T>*>(a_smem + stage * kTileElems + r * kLds + kc) = a;
    }
L0K_UNROLL
    for (int c = 0; c < kChunksB; ++c) {
      const int id = tid + c * gemm::kThreads;
      Pack8<T> b = rb[c];
      if (p.w_mn) {  // no weight gates on an MN-major B (the host never asks for them)
        const int kq = id / kMnChunks, rc = (id % kMnChunks) * kChunkK;
L0K_UNROLL
        for (int j = 0; j < kChunkK; ++j) b_smem[stage * kTileElems + (rc + j) * kLds + kq] = b.v[j];
        continue;
      }
      const int r = id / kChunksPerRow, kc = (id % kChunksPerRow) * kChunkK;
      const int64_t n = n0 + r;
      if (p.mode == kGateWeight && n < p.N) {
L0K_UNROLL
        for (int j = 0; j < kChunkK; ++j) {
          const int64_t k = k0 + kc + j;
          if (k < p.K) b.v[j] = from_float<T>(to_float(b.v[j]) * gate_value(p, n * p.K + k, n * p.K + k));
        }
      }
      *reinterpret_cast<Pack8<T>*>(b_smem + stage * kTileElems + r * kLds + kc) = b;
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFM][kFN];
L0K_UNROLL
  for (int i = 0; i < kFM; ++i) {
L0K_UNROLL
    for (int j = 0; j < kFN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  auto mma_tile = [&](int stage) {
    const T* a_s = a_smem + stage * kTileElems + wm * kWarpM * kLds;
    const T* b_s = b_smem + stage * kTileElems + wn * kWarpN * kLds;
L0K_UNROLL
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[kFM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[kFN];  // B[k][n] = W[n][k]
L0K_UNROLL
      for (int i = 0; i < kFM; ++i) wmma::load_matrix_sync(fa[i], a_s + i * 16 * kLds + kk, kLds);
L0K_UNROLL
      for (int j = 0; j < kFN; ++j) wmma::load_matrix_sync(fb[j], b_s + j * 16 * kLds + kk, kLds);
L0K_UNROLL
      for (int i = 0; i < kFM; ++i) {
L0K_UNROLL
        for (int j = 0; j < kFN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  };

  // Main loop. Stage t % 2 holds tile t. One barrier per tile: the stores of tile t + 1 go to the
  // stage the previous iteration read, and input gates are drawn two tiles ahead into the slot the
  // previous iteration read, so every shared write is separated by a barrier from its readers.
  if (t_begin < t_end) {
    if (tile_gates) {
      draw_k_gates(t_begin);
      if (t_begin + 1 < t_end) draw_k_gates(t_begin + 1);
    }
    load_tile(t_begin);
    __syncthreads();  // z_k (and z_n) visible
    store_tile(t_begin, t_begin & 1);
    __syncthreads();
    for (int t = t_begin; t < t_end; ++t) {
      if (t + 1 < t_end) load_tile(t + 1);
      if (tile_gates && t + 2 < t_end) draw_k_gates(t + 2);
      mma_tile(t & 1);
      if (t + 1 < t_end) store_tile(t + 1, (t + 1) & 1);
      __syncthreads();
    }
  } else {
    __syncthreads();  // z_n visible
  }

  // output (m, n) from its sum: + bias, * output gate, scatter, one rounding to T
  auto finish = [&](int64_t m, int64_t n, float v) {
    if (n >= n_eff) {  // a closed feature in an open tile: zero, never computed from its data
      p.y[y_offset(p, m, n)] = from_float<T>(0.0f);
      return;
    }
    if (p.bias != nullptr) v += to_float(p.bias[n_feature(p, n)]);
    if (p.mode == kGateOut) v *= p.per_row ? feature_gate(p, n, m) : z_n[n - n0];
    p.y[y_offset(p, m, n)] = from_float<T>(v);
  };
  const bool split = p.splits > 1;

  // Epilogue, one 16 x 16 fragment at a time through a per-warp float tile (aliasing the operand
  // stages, free after the last barrier); with split-K the partial sums go to the workspace instead.
  float* const scratch = reinterpret_cast<float*>(smem) + warp * 16 * 16;
L0K_UNROLL
  for (int i = 0; i < kFM; ++i) {
L0K_UNROLL
    for (int j = 0; j < kFN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
L0K_UNROLL
      for (int e = 0; e < 8; ++e) {
        const int idx = e * 32 + lane, r = idx / 16, c = idx % 16;  // two rows of 16 per step: coalesced
        const int64_t m = m0 + wm * kWarpM + i * 16 + r, n = n0 + wn * kWarpN + j * 16 + c;
        if (m < p.M && n < p.N) {
          if (split) {
            atomicAdd(&p.ws[m * p.N + n], scratch[idx]);
          } else {
            finish(m, n, scratch[idx]);
          }
        }
      }
      __syncwarp();
    }
  }
  if (split) {
    // the last split of this output tile to arrive reads the sums back (leaving the workspace and
    // the counter zero) and finishes the tile (CUDA's threadfence-reduction pattern)
    __shared__ int last_split;
    __threadfence();
    __syncthreads();
    const int64_t tile = static_cast<int64_t>(blockIdx.y) * grid_cols(p.N) + blockIdx.x;
    if (tid == 0) last_split = atomicAdd(&p.ws_count[tile], 1) == p.splits - 1;
    __syncthreads();
    if (!last_split) return;
    __threadfence();
    for (int idx = tid; idx < kBM * kBN; idx += gemm::kThreads) {
      const int64_t m = m0 + idx / kBN, n = n0 + idx % kBN;
      if (m < p.M && n < p.N) finish(m, n, atomicExch(&p.ws[m * p.N + n], 0.0f));
    }
    if (tid == 0) p.ws_count[tile] = 0;
  }
#else
  __trap();  // built for an architecture without bf16 WMMA: fail loudly (the host checks sm_80+ first)
#endif
}
#endif  // __CUDACC__ || L0K_CUDA_EMU

}  // namespace l0k
