// (d) The single-launch gated GEMM of l0_linear's forward and of the eval plans: the tensor-core
// kernel of l0_gemm.cuh (float16 / bfloat16) for M > 16 rows, the GEMV of l0_gemv.cuh (every dtype)
// for 1-16 rows.
#include <type_traits>

#include <cuda_runtime.h>

#include "l0_gemm.cuh"
#include "l0_gemv.cuh"
#include "l0_kernels.h"

namespace l0k {

template <typename T, int MR>
cudaError_t launch_gemv_rows(const GatedGemmParams<T>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(gemv::grid_cols(p.N) + gemv::grid_idle_cols(p.n_idle)),
                  static_cast<unsigned int>(p.splits));
  if (p.mode == kGateIn || p.mode == kGateWeight) {
    gated_gemv_kernel<T, MR, true><<<grid, gemv::kThreads, 0, stream>>>(p);
  } else {
    gated_gemv_kernel<T, MR, false><<<grid, gemv::kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gated_gemm(const GatedGemmParams<T>& p, cudaStream_t stream) {
  if (p.M <= 0 || (p.N <= 0 && p.n_idle <= 0)) return cudaSuccess;
  if (p.M <= gemv::kMaxRows && !gemm::uses_open_set(p)) {
    if (gemv::grid_cols(p.N) + gemv::grid_idle_cols(p.n_idle) > 0x7fffffff || p.splits < 1 ||
        p.splits > gemv::kMaxSplits || (p.splits > 1 && (p.ws == nullptr || p.ws_count == nullptr))) {
      return cudaErrorInvalidConfiguration;
    }
    switch (gemv::row_bucket(p.M)) {
      case 1: return launch_gemv_rows<T, 1>(p, stream);
      case 2: return launch_gemv_rows<T, 2>(p, stream);
      case 4: return launch_gemv_rows<T, 4>(p, stream);
      case 8: return launch_gemv_rows<T, 8>(p, stream);
      default: return launch_gemv_rows<T, 16>(p, stream);
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    return cudaErrorInvalidValue;  // no float32 tensor-core kernel: the caller checks M first
  } else {
    const int64_t grid_n = gemm::grid_cols(p.N) + gemm::grid_idle_cols(p.n_idle), grid_m = gemm::grid_rows(p.M);
    if (grid_m > 65535 || grid_n > 0x7fffffff || p.splits < 1 || p.splits > gemm::kMaxSplits ||
        (p.splits > 1 && (p.ws == nullptr || p.ws_count == nullptr))) {
      return cudaErrorInvalidConfiguration;
    }
    gated_gemm_kernel<T><<<dim3(static_cast<unsigned int>(grid_n), static_cast<unsigned int>(grid_m),
                                static_cast<unsigned int>(p.splits)),
                           gemm::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
}

template cudaError_t launch_gated_gemm<float>(const GatedGemmParams<float>&, cudaStream_t);
template cudaError_t launch_gated_gemm<__half>(const GatedGemmParams<__half>&, cudaStream_t);
template cudaError_t launch_gated_gemm<__nv_bfloat16>(const GatedGemmParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace l0k
