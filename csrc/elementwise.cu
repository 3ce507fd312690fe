// (b) Gate scaling fused with the cast (x * z written once, dY * z, W * Z, P * z, P * W * dz) and
// (c) the channel epilogue (bias + output/channel gate, in place on the GEMM or cuDNN output,
// NCHW or NHWC). Four consecutive elements per thread; 8/16-byte vector accesses where the
// operands are contiguous and aligned; grid-stride.
#include "l0_common.cuh"
#include "l0_kernels.h"

namespace l0k {

template <typename T, bool kVec>
__global__ void scale_kernel(const T* __restrict__ a, int64_t a_sr, int64_t a_sc, const T* __restrict__ b,
                             int64_t b_sr, int64_t b_sc, const float* __restrict__ z, int64_t zs_r,
                             int64_t zs_c, int64_t R, int64_t C, T* __restrict__ out) {
  const int64_t numel = R * C;
  const int64_t nvec = (numel + 3) / 4;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += step) {
    const int64_t i0 = v * 4;
    if (kVec) {  // C % 4 == 0: the four elements share a row; a, b, out contiguous and aligned
      const int64_t r = i0 / C, c0 = i0 - r * C;
      const Vec4<T> av = reinterpret_cast<const Vec4<T>*>(a)[v];
      Vec4<T> bv;
      if (b != nullptr) bv = reinterpret_cast<const Vec4<T>*>(b)[v];
      Vec4<T> ov;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float p = to_float(av.v[j]);
        if (b != nullptr) p *= to_float(bv.v[j]);
        if (z != nullptr) p *= z[r * zs_r + (c0 + j) * zs_c];
        ov.v[j] = from_float<T>(p);
      }
      reinterpret_cast<Vec4<T>*>(out)[v] = ov;
    } else {
      int64_t r = i0 / C, c = i0 - r * C;
      for (int j = 0; j < 4 && i0 + j < numel; ++j) {
        float p = to_float(a[r * a_sr + c * a_sc]);
        if (b != nullptr) p *= to_float(b[r * b_sr + c * b_sc]);
        if (z != nullptr) p *= z[r * zs_r + c * zs_c];
        out[i0 + j] = from_float<T>(p);
        if (++c == C) { c = 0; ++r; }
      }
    }
  }
}

template <typename T>
cudaError_t launch_scale(const T* a, int64_t a_sr, int64_t a_sc, const T* b, int64_t b_sr, int64_t b_sc,
                         const float* z, int64_t zs_r, int64_t zs_c, int64_t R, int64_t C, T* out,
                         cudaStream_t stream) {
  if (R <= 0 || C <= 0) return cudaSuccess;
  const bool contiguous = (a_sc == 1 && (a_sr == C || R == 1)) &&
                          (b == nullptr || (b_sc == 1 && (b_sr == C || R == 1)));
  const bool vec = contiguous && C % 4 == 0 && aligned4(a) && aligned4(b) && aligned4(out);
  const unsigned int grid = grid_for((R * C + 3) / 4);
  if (vec) {
    scale_kernel<T, true><<<grid, kThreads, 0, stream>>>(a, a_sr, a_sc, b, b_sr, b_sc, z, zs_r, zs_c, R, C, out);
  } else {
    scale_kernel<T, false><<<grid, kThreads, 0, stream>>>(a, a_sr, a_sc, b, b_sr, b_sc, z, zs_r, zs_c, R, C, out);
  }
  return cudaGetLastError();
}

template <typename T, bool kVec>
__global__ void channel_epilogue_kernel(const T* in, T* out, const T* __restrict__ bias,
                                        const float* __restrict__ z, int64_t z_sb, int64_t B, int64_t C,
                                        int64_t HW, bool channels_last) {
  // `in` and `out` may alias (in place): no __restrict__ on them.
  const int64_t numel = B * C * HW;
  const int64_t nvec = (numel + 3) / 4;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += step) {
    const int64_t i0 = v * 4;
    Vec4<T> iv;
    if (kVec) iv = reinterpret_cast<const Vec4<T>*>(in)[v];
    Vec4<T> ov;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = i0 + j;
      if (!kVec && i >= numel) break;
      int64_t c, bi;
      if (channels_last) {
        c = i % C;
        bi = i / (HW * C);
      } else {
        const int64_t bc = i / HW;
        c = bc % C;
        bi = bc / C;
      }
      float y = to_float(kVec ? iv.v[j] : in[i]);
      if (bias != nullptr) y += to_float(bias[c]);
      if (z != nullptr) y *= z[bi * z_sb + c];
      if (kVec) {
        ov.v[j] = from_float<T>(y);
      } else {
        out[i] = from_float<T>(y);
      }
    }
    if (kVec) reinterpret_cast<Vec4<T>*>(out)[v] = ov;
  }
}

template <typename T>
cudaError_t launch_channel_epilogue(const T* in, T* out, const T* bias, const float* z, int64_t z_sb,
                                    int64_t B, int64_t C, int64_t HW, bool channels_last,
                                    cudaStream_t stream) {
  const int64_t numel = B * C * HW;
  if (numel <= 0) return cudaSuccess;
  const unsigned int grid = grid_for((numel + 3) / 4);
  if (numel % 4 == 0 && aligned4(in) && aligned4(out)) {
    channel_epilogue_kernel<T, true><<<grid, kThreads, 0, stream>>>(in, out, bias, z, z_sb, B, C, HW,
                                                                      channels_last);
  } else {
    channel_epilogue_kernel<T, false><<<grid, kThreads, 0, stream>>>(in, out, bias, z, z_sb, B, C, HW,
                                                                       channels_last);
  }
  return cudaGetLastError();
}

#define L0K_INST(T)                                                                                         \
  template cudaError_t launch_scale<T>(const T*, int64_t, int64_t, const T*, int64_t, int64_t, const float*, \
                                       int64_t, int64_t, int64_t, int64_t, T*, cudaStream_t);                \
  template cudaError_t launch_channel_epilogue<T>(const T*, T*, const T*, const float*, int64_t, int64_t,    \
                                                  int64_t, int64_t, bool, cudaStream_t);
L0K_INSTANTIATE_FOR_TYPES(L0K_INST)
#undef L0K_INST

}  // namespace l0k
