// A thread-level CUDA emulator for host C++ (g++ -std=c++20 -pthread): enough of CUDA to run the
// device code of csrc/l0_gemm.cuh and csrc/l0_gemv.cuh on the CPU in tests (tests/test_cuda_emu.py).
//
// * One OS thread per CUDA thread, one block at a time; threadIdx / blockIdx are thread_local.
// * __syncthreads() and __syncwarp() are std::barrier waits over the block / the warp, so a missing
//   barrier shows up as wrong results or, under -fsanitize=thread, as a reported race.
// * __shared__ is function-static storage: shared by the threads of a block, reused by the next one.
// * __shfl_xor_sync goes through a per-warp exchange array between two warp barriers; atomicAdd /
//   atomicExch are std::atomic_ref operations; __threadfence is a no-op (blocks run one at a time).
// * nvcuda::wmma fragments hold the whole 16 x 16 tile. Lane 0 of the warp performs each
//   warp-collective load / mma / store for the warp (the other lanes' fragments are never read:
//   stores come from lane 0 too), and loads and stores check the real API's rules: 256-bit aligned
//   pointers and a leading dimension that is a multiple of 16 bytes.
// Include this before the device headers; nothing here is used by the extension itself.
#pragma once

#define L0K_CUDA_EMU 1

#include <array>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// CUDA's host_defines.h (through cuda_fp16.h) gives these attribute meanings for host compilers.
#undef __global__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct EmuDim {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;
inline thread_local std::barrier<>* emu_warp_barrier = nullptr;

inline thread_local std::array<uint64_t, 32>* emu_warp_slots = nullptr;
inline thread_local unsigned emu_warp_lanes = 32;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_barrier->arrive_and_wait(); }

[[noreturn]] inline void emu_fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::abort();
}

// Device-scope atomics and fences (blocks run one at a time here; threads of a block do race).
template <typename T>
T atomicAdd(T* address, T v) {
  return std::atomic_ref<T>(*address).fetch_add(v);
}
template <typename T>
T atomicExch(T* address, T v) {
  return std::atomic_ref<T>(*address).exchange(v);
}
// Orders a thread's writes for other blocks; blocks run one after the other here, and inside a block
// the barriers order the threads (and ThreadSanitizer does not support fences), so: nothing.
inline void __threadfence() {}

// The value of `v` held by lane (this lane ^ lane_mask); every lane of the warp must call it.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "cuda_emu: shuffles of at most 8 bytes");
  const unsigned lane = threadIdx.x % 32, src = lane ^ static_cast<unsigned>(lane_mask);
  if (mask != 0xffffffffu || width != 32 || emu_warp_lanes != 32 || src >= 32) {
    emu_fail("__shfl_xor_sync: only full warps, full masks and width 32");
  }
  std::memcpy(&(*emu_warp_slots)[lane], &v, sizeof(T));
  __syncwarp();
  T out;
  std::memcpy(&out, &(*emu_warp_slots)[src], sizeof(T));
  __syncwarp();  // the slots are reused by the next shuffle
  return out;
}

// kernel(args...) over a 3-D grid of 1-D blocks of `threads` threads, one block at a time (x fastest).
template <typename Kernel, typename... Args>
void emu_launch3(unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned threads, Kernel kernel,
                 const Args&... args) {
  gridDim = EmuDim{grid_x, grid_y, grid_z};
  blockDim = EmuDim{threads, 1, 1};
  for (unsigned bz = 0; bz < grid_z; ++bz)
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      std::barrier<> block(threads);
      std::vector<std::unique_ptr<std::barrier<>>> warps;
      std::vector<std::array<uint64_t, 32>> slots((threads + 31) / 32);
      for (unsigned w = 0; w * 32 < threads; ++w) {
        const unsigned lanes = threads - w * 32 < 32 ? threads - w * 32 : 32;
        warps.push_back(std::make_unique<std::barrier<>>(lanes));
      }
      emu_block_barrier = &block;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          threadIdx = EmuDim{t, 0, 0};
          blockIdx = EmuDim{bx, by, bz};
          emu_warp_barrier = warps[t / 32].get();
          emu_warp_slots = &slots[t / 32];
          emu_warp_lanes = threads - (t / 32) * 32 < 32 ? threads - (t / 32) * 32 : 32;
          kernel(args...);
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}

// kernel(args...) over a 2-D grid.
template <typename Kernel, typename... Args>
void emu_launch(unsigned grid_x, unsigned grid_y, unsigned threads, Kernel kernel, const Args&... args) {
  emu_launch3(grid_x, grid_y, 1, threads, kernel, args...);
}

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_emu: only 16x16x16 fragments");
  float v[16 * 16];  // a: (m, k), b: (k, n), accumulator: (m, n), row-major
};

inline bool emu_lane0() { return threadIdx.x % 32 == 0; }

template <typename T>
inline void emu_check(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu_fail("wmma pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) emu_fail("wmma ldm not a multiple of 16 bytes");
}

template <typename Use, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float value) {
  for (float& e : f.v) e = value;
}

template <typename T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  if (!emu_lane0()) return;
  emu_check(p, ldm);
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) f.v[i * 16 + k] = static_cast<float>(p[i * ldm + k]);
}

template <typename T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  if (!emu_lane0()) return;
  emu_check(p, ldm);
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 16; ++j) f.v[k * 16 + j] = static_cast<float>(p[k + j * ldm]);
}

template <typename T>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!emu_lane0()) return;
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.v[i * 16 + k] * b.v[k * 16 + j];
      out[i * 16 + j] = s;
    }
  for (int e = 0; e < 16 * 16; ++e) d.v[e] = out[e];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (!emu_lane0()) return;
  emu_check(p, ldm);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      const float v = f.v[i * 16 + j];
      if (layout == mem_row_major) p[i * ldm + j] = v; else p[i + j * ldm] = v;
    }
}

}  // namespace wmma
}  // namespace nvcuda
