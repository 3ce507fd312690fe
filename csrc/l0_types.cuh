// float conversion of the storage types (float, __half, __nv_bfloat16), host and device. No PyTorch
// headers; the host side needs only CUDA's cuda_fp16.h / cuda_bf16.h (plain g++ can include them,
// which csrc/tests/ uses to run device code on the CPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "l0_philox.cuh"  // L0K_HD

#if defined(__CUDACC__)
#define L0K_DEV __device__ __forceinline__
#else
#define L0K_DEV inline
#endif

namespace l0k {

L0K_HD float to_float(float v) { return v; }
L0K_HD float to_float(__half v) { return __half2float(v); }
L0K_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> L0K_HD T from_float(float v);
template <> L0K_HD float from_float<float>(float v) { return v; }
template <> L0K_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> L0K_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace l0k
