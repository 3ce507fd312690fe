// (a) Gate sampling for every noise layout: z and optionally dz, four gates per thread with one
// 16-byte store each, grid-stride.
#include "l0_common.cuh"
#include "l0_kernels.h"

namespace l0k {

template <typename T>
__global__ void gates_kernel(const T* __restrict__ log_alpha, int64_t numel, int64_t groups,
                             const int64_t* __restrict__ seed_ptr, bool training, GateConfig cfg, float* __restrict__ z,
                             float* __restrict__ dz) {
  const uint64_t seed = training ? load_seed(seed_ptr) : 0;
  const int64_t nvec = (numel + 3) / 4;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += step) {
    const int64_t i0 = v * 4;
    float zz[4] = {0.f, 0.f, 0.f, 0.f}, dd[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t g = i0 % groups;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (i0 + j < numel) {
        gate_at(to_float(log_alpha[g]), seed, static_cast<uint64_t>(i0 + j), training, cfg, &zz[j],
                dz != nullptr ? &dd[j] : nullptr);
      }
      if (++g == groups) g = 0;
    }
    if (i0 + 3 < numel) {
      reinterpret_cast<float4*>(z)[v] = make_float4(zz[0], zz[1], zz[2], zz[3]);
      if (dz != nullptr) reinterpret_cast<float4*>(dz)[v] = make_float4(dd[0], dd[1], dd[2], dd[3]);
    } else {
      for (int j = 0; j < 4 && i0 + j < numel; ++j) {
        z[i0 + j] = zz[j];
        if (dz != nullptr) dz[i0 + j] = dd[j];
      }
    }
  }
}

template <typename T>
cudaError_t launch_gates(const T* log_alpha, int64_t numel, int64_t groups, const int64_t* seed, bool training,
                         GateConfig cfg, float* z, float* dz, cudaStream_t stream) {
  if (numel <= 0 || groups <= 0) return cudaSuccess;
  gates_kernel<T><<<grid_for((numel + 3) / 4), kThreads, 0, stream>>>(log_alpha, numel, groups, seed, training,
                                                                         cfg, z, dz);
  return cudaGetLastError();
}

__global__ void uniform_kernel(const int64_t* __restrict__ offsets, int64_t n, const int64_t* __restrict__ seed_ptr,
                               float* __restrict__ out) {
  const uint64_t seed = load_seed(seed_ptr);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    out[i] = philox_uniform(seed, static_cast<uint64_t>(offsets[i]));
  }
}

cudaError_t launch_uniform(const int64_t* offsets, int64_t n, const int64_t* seed, float* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  uniform_kernel<<<grid_for(n), kThreads, 0, stream>>>(offsets, n, seed, out);
  return cudaGetLastError();
}

#define L0K_INST(T)                                                                                       \
  template cudaError_t launch_gates<T>(const T*, int64_t, int64_t, const int64_t*, bool, GateConfig, float*,  \
                                       float*, cudaStream_t);
L0K_INSTANTIATE_FOR_TYPES(L0K_INST)
#undef L0K_INST

}  // namespace l0k
