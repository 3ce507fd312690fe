// (d) Reductions of the backward passes: column sums of products (dlog_alpha of input gates,
// sample-noise output gates, bias gradients, NHWC channel sums), per-channel plane sums (NCHW),
// row dot products (rowsum(W * P) of the output/channel-gate identity), and the dot products of
// gathered columns / rows over an open set (csrc/l0_open.cuh). Float accumulation;
// deterministic (no atomics): column partials per row split are summed by the caller.
#include "l0_common.cuh"
#include "l0_kernels.h"

namespace l0k {

constexpr int kColX = 32;  // columns per block (one warp: coalesced row reads)
constexpr int kColY = 8;   // row lanes per block

template <typename T>
__global__ void col_reduce_kernel(const T* __restrict__ a, int64_t a_sr, int64_t a_sc, const T* __restrict__ b,
                                  int64_t b_sr, int64_t b_sc, const float* __restrict__ dz, int64_t dz_sr,
                                  int64_t rows_per_gate, int64_t R, int64_t C, float* __restrict__ partial) {
  __shared__ float acc_s[kColY][kColX + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColX + threadIdx.x;
  float acc = 0.0f;
  if (c < C) {
    const int64_t rstep = static_cast<int64_t>(gridDim.y) * kColY;
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kColY + threadIdx.y; r < R; r += rstep) {
      float p = to_float(a[r * a_sr + c * a_sc]);
      if (b != nullptr) p *= to_float(b[r * b_sr + c * b_sc]);
      if (dz != nullptr) p *= dz[(rows_per_gate == 1 ? r : r / rows_per_gate) * dz_sr + c];
      acc += p;
    }
  }
  acc_s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float s = 0.0f;
#pragma unroll
    for (int y = 0; y < kColY; ++y) s += acc_s[y][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * C + c] = s;
  }
}

template <typename T>
cudaError_t launch_col_reduce(const T* a, int64_t a_sr, int64_t a_sc, const T* b, int64_t b_sr, int64_t b_sc,
                              const float* dz, int64_t dz_sr, int64_t rows_per_gate, int64_t R, int64_t C,
                              int max_splits, float* partial, int* splits, cudaStream_t stream) {
  *splits = 0;
  if (C <= 0) return cudaSuccess;
  if (max_splits < 1 || rows_per_gate < 1) return cudaErrorInvalidValue;
  int64_t s = (R + kColY - 1) / kColY;
  if (s < 1) s = 1;  // R == 0 still writes zeros
  if (s > max_splits) s = max_splits;
  if (s > 65535) s = 65535;
  const int64_t gx = (C + kColX - 1) / kColX;
  if (gx > 2147483647LL) return cudaErrorInvalidValue;
  dim3 grid(static_cast<unsigned int>(gx), static_cast<unsigned int>(s));
  dim3 block(kColX, kColY);
  col_reduce_kernel<T><<<grid, block, 0, stream>>>(a, a_sr, a_sc, b, b_sr, b_sc, dz, dz_sr, rows_per_gate, R, C,
                                                   partial);
  *splits = static_cast<int>(s);
  return cudaGetLastError();
}

template <typename T>
__global__ void plane_reduce_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ dz,
                                    int64_t dz_sb, int64_t B, int64_t C, int64_t HW, float* __restrict__ out) {
  const int64_t c = blockIdx.x;
  float acc = 0.0f;
  for (int64_t bi = 0; bi < B; ++bi) {
    const int64_t base = (bi * C + c) * HW;
    float part = 0.0f;
    for (int64_t hw = threadIdx.x; hw < HW; hw += blockDim.x) {
      float p = to_float(a[base + hw]);
      if (b != nullptr) p *= to_float(b[base + hw]);
      part += p;
    }
    acc += dz != nullptr ? part * dz[bi * dz_sb + c] : part;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[c] = acc;
}

template <typename T>
cudaError_t launch_plane_reduce(const T* a, const T* b, const float* dz, int64_t dz_sb, int64_t B, int64_t C,
                                int64_t HW, float* out, cudaStream_t stream) {
  if (C <= 0) return cudaSuccess;
  if (C > 2147483647LL) return cudaErrorInvalidValue;
  plane_reduce_kernel<T><<<static_cast<unsigned int>(C), kThreads, 0, stream>>>(a, b, dz, dz_sb, B, C, HW, out);
  return cudaGetLastError();
}

template <typename T>
__global__ void row_dot_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t C, float* __restrict__ out) {
  const int64_t r = blockIdx.x;
  float acc = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) acc += to_float(a[r * C + c]) * to_float(b[r * C + c]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[r] = acc;
}

template <typename T>
cudaError_t launch_row_dot(const T* a, const T* b, int64_t R, int64_t C, float* out, cudaStream_t stream) {
  if (R <= 0) return cudaSuccess;
  if (R > 2147483647LL) return cudaErrorInvalidValue;
  row_dot_kernel<T><<<static_cast<unsigned int>(R), kThreads, 0, stream>>>(a, b, C, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gathered_dot(const T* a, int64_t a_so, int64_t a_si, const T* b, int64_t b_so, int64_t b_si,
                                const int64_t* idx, const int64_t* count, int64_t G, int64_t L, float* out,
                                cudaStream_t stream) {
  if (G <= 0) return cudaSuccess;
  if (open_set::grid(G) > 2147483647LL) return cudaErrorInvalidValue;
  gathered_dot_kernel<T><<<static_cast<unsigned int>(open_set::grid(G)), open_set::kThreads, 0, stream>>>(
      a, a_so, a_si, b, b_so, b_si, idx, count, G, L, out);
  return cudaGetLastError();
}

#define L0K_INST(T)                                                                                          \
  template cudaError_t launch_col_reduce<T>(const T*, int64_t, int64_t, const T*, int64_t, int64_t,           \
                                            const float*, int64_t, int64_t, int64_t, int64_t, int, float*,    \
                                            int*, cudaStream_t);                                              \
  template cudaError_t launch_plane_reduce<T>(const T*, const T*, const float*, int64_t, int64_t, int64_t,    \
                                              int64_t, float*, cudaStream_t);                                 \
  template cudaError_t launch_row_dot<T>(const T*, const T*, int64_t, int64_t, float*, cudaStream_t);         \
  template cudaError_t launch_gathered_dot<T>(const T*, int64_t, int64_t, const T*, int64_t, int64_t,         \
                                              const int64_t*, const int64_t*, int64_t, int64_t, float*,       \
                                              cudaStream_t);
L0K_INSTANTIATE_FOR_TYPES(L0K_INST)
#undef L0K_INST

}  // namespace l0k
