// Reductions over an open set (training over the open features, l0kernels/_active.py): the dot
// products of gathered columns (input gates) or rows (output gates) of two matrices, e.g. W and dW
// for dlog_alpha = dz * sum(W * P) with dW = z * P, for the open count read from device memory.
// Closed features get 0 and their data is never read. Launcher: csrc/reduce.cu (launch_gathered_dot
// in l0_kernels.h). Device code without PyTorch headers (csrc/tests/cuda_emu.h runs it on the CPU).
#pragma once

#include <stdint.h>

#include "l0_types.cuh"

namespace l0k {
namespace open_set {

constexpr int kThreads = 256;                // 8 warps
constexpr int kFeaturesPerBlock = kThreads / 32;  // one feature per warp
L0K_HD int64_t grid(int64_t features) { return (features + kFeaturesPerBlock - 1) / kFeaturesPerBlock; }

}  // namespace open_set

#if defined(__CUDACC__) || defined(L0K_CUDA_EMU)
// out[j] = sum_{i < L} a[idx[j] * a_so + i * a_si] * b[idx[j] * b_so + i * b_si] for j < min(G, *count),
// out[j] = 0 for the other j < G (float accumulation; lanes stride over i, a warp shuffle sums them).
template <typename T>
__global__ void __launch_bounds__(open_set::kThreads)
    gathered_dot_kernel(const T* a, int64_t a_so, int64_t a_si, const T* b, int64_t b_so, int64_t b_si,
                        const int64_t* idx, const int64_t* count, int64_t G, int64_t L, float* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * open_set::kFeaturesPerBlock + warp;
  const int64_t open = *count < 0 ? 0 : (*count < G ? *count : G);
  float acc = 0.0f;
  if (j < open) {
    const int64_t f = idx[j];
    for (int64_t i = lane; i < L; i += 32) acc += to_float(a[f * a_so + i * a_si]) * to_float(b[f * b_so + i * b_si]);
  }
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0 && j < G) out[j] = acc;
}
#endif

}  // namespace l0k
