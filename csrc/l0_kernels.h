// Launchers of the l0kernels CUDA kernels: plain C++ (no PyTorch), raw pointers + element strides,
// explicitly instantiated for T in {float, __half, __nv_bfloat16}. Every launcher enqueues on
// `stream`, returns cudaSuccess for empty work, and otherwise returns cudaGetLastError() after its
// launch(es) so the caller (csrc/binding.cpp) can raise.
#pragma once

#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "l0_gate.cuh"
#include "l0_gemm.cuh"
#include "l0_gemv.cuh"
#include "l0_open.cuh"

namespace l0k {

// Gates for a noise tensor of `numel` elements, row-major, whose trailing dims are log_alpha's
// (`groups` elements): z[i] and (if dz != nullptr) dz[i] from log_alpha[i % groups] and offset i.
// Layouts: batch (G,), sample (M, G), weight (N, K) with groups = N*K. In eval (training=false)
// z_eval is written and seed is ignored (call it with numel == groups). Outputs are float32,
// contiguous, 16-byte aligned (vector stores). `seed`: device pointer to the 0-d int64 seed tensor
// (read in the kernel, load_seed of l0_gate.cuh; may be nullptr in eval).
template <typename T>
cudaError_t launch_gates(const T* log_alpha, int64_t numel, int64_t groups, const int64_t* seed, bool training,
                         GateConfig cfg, float* z, float* dz, cudaStream_t stream);

// Raw uniforms u_raw(seed, offsets[i]) (docs/design.md §2) for n int64 offsets (>= 0); for testing the stream.
cudaError_t launch_uniform(const int64_t* offsets, int64_t n, const int64_t* seed, float* out, cudaStream_t stream);

// out[r, c] = a[r, c] * (b ? b[r, c] : 1) * (z ? z[r * zs_r + c * zs_c] : 1), out contiguous (R, C).
// a and b have their own (row, col) element strides (any, including 0). With zs_r = 0, zs_c = 1:
// column gates (input gates, batch noise); zs_r = C, zs_c = 1: per-example / per-weight gates;
// zs_r = 1, zs_c = 0: row gates (dW of output gates). Products in float, one rounding to T.
template <typename T>
cudaError_t launch_scale(const T* a, int64_t a_sr, int64_t a_sc, const T* b, int64_t b_sr, int64_t b_sc,
                         const float* z, int64_t zs_r, int64_t zs_c, int64_t R, int64_t C, T* out,
                         cudaStream_t stream);

// Channel epilogue on a contiguous (B, C, HW) (channels_last = false) or (B, HW, C) (true) tensor:
// out[b, c, hw] = (in[b, c, hw] + (bias ? bias[c] : 0)) * (z ? z[b * z_sb + c] : 1).
// in == out is allowed (in place). Linear output gates: B = M, C = N, HW = 1.
template <typename T>
cudaError_t launch_channel_epilogue(const T* in, T* out, const T* bias, const float* z, int64_t z_sb,
                                    int64_t B, int64_t C, int64_t HW, bool channels_last,
                                    cudaStream_t stream);

// Column reduction of a (R, C) product: partial[s, c] = sum over rows r of split s of
//   a[r, c] * (b ? b[r, c] : 1) * (dz ? dz[(r / rows_per_gate) * dz_sr + c] : 1),
// a and b with their own strides. Returns the number of splits used through `splits`
// (partial must hold max_splits * C floats, the caller sums the rows). rows_per_gate > 0.
template <typename T>
cudaError_t launch_col_reduce(const T* a, int64_t a_sr, int64_t a_sc, const T* b, int64_t b_sr, int64_t b_sc,
                              const float* dz, int64_t dz_sr, int64_t rows_per_gate, int64_t R, int64_t C,
                              int max_splits, float* partial, int* splits, cudaStream_t stream);

// Plane reduction on a contiguous NCHW tensor viewed as (B, C, HW):
//   out[c] = sum_b (dz ? dz[b * dz_sb + c] : 1) * sum_hw a[b, c, hw] * (b_ ? b_[b, c, hw] : 1).
// out is float32 (C,), fully written (no prior zeroing needed).
template <typename T>
cudaError_t launch_plane_reduce(const T* a, const T* b, const float* dz, int64_t dz_sb, int64_t B, int64_t C,
                                int64_t HW, float* out, cudaStream_t stream);

// Row dot products of two contiguous (R, C) matrices: out[r] = sum_c a[r, c] * b[r, c] (float32).
template <typename T>
cudaError_t launch_row_dot(const T* a, const T* b, int64_t R, int64_t C, float* out, cudaStream_t stream);

// Dot products over an open set (csrc/l0_open.cuh): out[j] = sum_{i < L} a[idx[j] * a_so + i * a_si] *
// b[idx[j] * b_so + i * b_si] for j < *count (a device pointer: no host sync), 0 for count <= j < G.
template <typename T>
cudaError_t launch_gathered_dot(const T* a, int64_t a_so, int64_t a_si, const T* b, int64_t b_so, int64_t b_si,
                                const int64_t* idx, const int64_t* count, int64_t G, int64_t L, float* out,
                                cudaStream_t stream);

// The single-launch gated GEMM. M <= gemv::kMaxRows (16): the GEMV of l0_gemv.cuh, any T. Larger M:
// the tensor-core kernel of l0_gemm.cuh, T in {__half, __nv_bfloat16} only (float returns
// cudaErrorInvalidValue), sm_80+; cudaErrorInvalidConfiguration when M needs more than 65535 block
// rows (M > 8388480). The caller checks these first (binding.cpp check_gemm_kernel).
template <typename T>
cudaError_t launch_gated_gemm(const GatedGemmParams<T>& p, cudaStream_t stream);

}  // namespace l0k
