// (d) The single-launch gated GEMM of l0_linear's forward (kernel in l0_gemm.cuh), float16 and bfloat16.
#include <cuda_runtime.h>

#include "l0_gemm.cuh"
#include "l0_kernels.h"

namespace l0k {

template <typename T>
cudaError_t launch_gated_gemm(const GatedGemmParams<T>& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0) return cudaSuccess;
  const int64_t grid_n = gemm::grid_cols(p.N), grid_m = gemm::grid_rows(p.M);
  if (grid_m > 65535 || grid_n > 0x7fffffff) return cudaErrorInvalidConfiguration;
  gated_gemm_kernel<T><<<dim3(static_cast<unsigned int>(grid_n), static_cast<unsigned int>(grid_m)), gemm::kThreads,
                         0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_gated_gemm<__half>(const GatedGemmParams<__half>&, cudaStream_t);
template cudaError_t launch_gated_gemm<__nv_bfloat16>(const GatedGemmParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace l0k
