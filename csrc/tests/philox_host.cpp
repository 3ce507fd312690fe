// Host check of csrc/l0_philox.cuh and csrc/l0_gate.cuh, compiled with g++ (no CUDA).
// Usage: philox_host BETA GAMMA ZETA EPS < lines "seed offset log_alpha"
// Prints per line: "u_bits_hex u z dz z_eval dz_eval" (floats with 9 significant digits).
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "l0_gate.cuh"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s BETA GAMMA ZETA EPS < 'seed offset log_alpha' lines\n", argv[0]);
    return 2;
  }
  const l0k::GateConfig cfg{std::strtof(argv[1], nullptr), std::strtof(argv[2], nullptr),
                            std::strtof(argv[3], nullptr), std::strtof(argv[4], nullptr)};
  unsigned long long seed = 0, offset = 0;
  float la = 0.f;
  while (std::scanf("%llu %llu %f", &seed, &offset, &la) == 3) {
    const float u = l0k::philox_uniform(seed, offset);
    uint32_t bits;
    std::memcpy(&bits, &u, sizeof bits);
    float z, dz, ze, dze;
    l0k::gate_from_uniform(la, u, cfg, &z, &dz);
    l0k::gate_eval(la, cfg, &ze, &dze);
    std::printf("%08" PRIx32 " %.9g %.9g %.9g %.9g %.9g\n", bits, u, z, dz, ze, dze);
  }
  return 0;
}
