// Philox4x32-10 exactly as Triton's tl.rand (docs/design.md §2): the one CUDA C++ copy of the stream.
//
// Usable from device code (nvcc) and from plain host C++ (g++): the qualifiers are behind L0K_HD.
// u_raw(seed, i): key (seed lo, seed hi), counter (i lo, i hi, 0, 0); ten rounds; word c0 mapped to
// [0, 1) by tl.rand's int-to-uniform conversion.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define L0K_HD __host__ __device__ __forceinline__
#else
#define L0K_HD inline
#endif

namespace l0k {

constexpr uint32_t kPhiloxA = 0xD2511F53u;
constexpr uint32_t kPhiloxB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

L0K_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// First output word of Philox4x32-10 for key = seed, counter = (offset, 0, 0).
L0K_HD uint32_t philox_c0(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0u, c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t n0 = mulhi32(kPhiloxB, c2) ^ c1 ^ k0;
    const uint32_t n2 = mulhi32(kPhiloxA, c0) ^ c3 ^ k1;
    const uint32_t n1 = kPhiloxB * c2;
    const uint32_t n3 = kPhiloxA * c0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// tl.rand's conversion: bitcast to int32, ~x if negative, float32(x) * 4.6566127342e-10f.
L0K_HD float uint_to_uniform(uint32_t c) {
  int32_t x = static_cast<int32_t>(c);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// u_raw(seed, i) of docs/design.md §2.
L0K_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  return uint_to_uniform(philox_c0(seed, offset));
}

}  // namespace l0k
