// Hard-concrete gate math of docs/design.md §1 in float: the one CUDA C++ copy of the formulas.
// Host and device (qualifiers from l0_philox.cuh's L0K_HD); no PyTorch headers.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "l0_philox.cuh"

namespace l0k {

struct GateConfig {
  float beta;   // temperature, > 0
  float gamma;  // stretch lower end, < 0
  float zeta;   // stretch upper end, > 1
  float eps;    // uniform clamp
};

L0K_HD float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// NaN test on the bits: the CPU kernels are built with -ffinite-math-only (their loops only vectorize
// with it: 13 ms vs 180 ms for 1M training gates), which folds isnan(v) and v != v to false; an integer
// compare survives it and still vectorizes.
L0K_HD bool isnan_(float v) {
#if defined(__CUDA_ARCH__)
  return isnan(v);
#else
  uint32_t b;
  memcpy(&b, &v, sizeof b);
  return (b & 0x7fffffffu) > 0x7f800000u;
#endif
}

// clamp(v, 0, 1) that keeps a NaN, as torch.clamp (the float64 reference) does: fminf/fmaxf alone turn
// a NaN gate into 0 and hide a diverged log_alpha.
L0K_HD float clamp01_(float v) { return isnan_(v) ? v : fminf(1.0f, fmaxf(0.0f, v)); }

// The derivative's mask: 0 < s_bar < 1, or a NaN (whose derivative is NaN: NaN in, NaN out, as the float64
// reference), tested on the bits whatever -ffinite-math-only does to the compares.
L0K_HD bool inside01_(float v) { return isnan_(v) || (v > 0.0f && v < 1.0f); }

// Training gate from a raw uniform: z = clamp(s * (zeta - gamma) + gamma, 0, 1) and
// dz/dlog_alpha = (zeta - gamma) * s * (1 - s) / beta where 0 < s_bar < 1, else 0.
// Non-finite log_alpha (docs/design.md §6): NaN gives z = dz = NaN; +inf gives z = 1, -inf z = 0, dz = 0.
L0K_HD void gate_from_uniform(float log_alpha, float u_raw, const GateConfig& c, float* z, float* dz) {
  const float u = fminf(fmaxf(u_raw, c.eps), 1.0f - c.eps);
  const float s = sigmoidf_((logf(u) - log1pf(-u) + log_alpha) / c.beta);
  const float s_bar = s * (c.zeta - c.gamma) + c.gamma;
  *z = clamp01_(s_bar);
  if (dz != nullptr) {
    *dz = inside01_(s_bar) ? s * (1.0f - s) * ((c.zeta - c.gamma) / c.beta) : 0.0f;
  }
}

// Deterministic test-time gate z_eval = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)
// and its derivative (0 where clamped, boundaries included).
L0K_HD void gate_eval(float log_alpha, const GateConfig& c, float* z, float* dz) {
  const float s = sigmoidf_(log_alpha);
  const float s_bar = s * (c.zeta - c.gamma) + c.gamma;
  *z = clamp01_(s_bar);
  if (dz != nullptr) {
    *dz = inside01_(s_bar) ? s * (1.0f - s) * (c.zeta - c.gamma) : 0.0f;
  }
}

// The key of a seed tensor (docs/design.md §10): kernels read the seed from device memory (a 0-d int64
// tensor; drawn on the device, it needs no host sync, and a CUDA graph replay reads the new value), and
// take its low 63 bits. nullptr (eval, no gates) gives 0.
L0K_HD uint64_t load_seed(const int64_t* seed) {
  return seed != nullptr ? static_cast<uint64_t>(*seed) & 0x7FFFFFFFFFFFFFFFull : 0ull;
}

// Gate for noise-tensor element i (row-major offset, docs/design.md §2) with parameter log_alpha.
L0K_HD void gate_at(float log_alpha, uint64_t seed, uint64_t i, bool training, const GateConfig& c,
                    float* z, float* dz) {
  if (training) {
    gate_from_uniform(log_alpha, philox_uniform(seed, i), c, z, dz);
  } else {
    gate_eval(log_alpha, c, z, dz);
  }
}

}  // namespace l0k
