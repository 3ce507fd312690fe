// Device helpers shared by the .cu files (float conversions in l0_types.cuh): 4-wide vectors,
// block reduction, grid sizing. No PyTorch headers.
#pragma once

#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "l0_types.cuh"

namespace l0k {

// Four consecutive elements, loaded/stored as one 8- or 16-byte access.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
inline bool aligned4(const T* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `work` items at kThreads per block (capped; loops cover the rest).
inline unsigned int grid_for(int64_t work) {
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > 8192) blocks = 8192;
  return static_cast<unsigned int>(blocks);
}

// Sum of `v` over a block of kThreads threads; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0f;
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

}  // namespace l0k

#define L0K_INSTANTIATE_FOR_TYPES(MACRO) \
  MACRO(float)                           \
  MACRO(__half)                          \
  MACRO(__nv_bfloat16)
