// The dropout mask is a pure function of (seed, b, h, i, j) so that every backend (C++, CUDA,
// Numba, the NumPy reference) draws the same mask. Keep this in sync with
// mmcore/kernels/numba/dropout.py and tests/reference.py.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MMCORE_HD __host__ __device__ __forceinline__
#else
#define MMCORE_HD inline
#endif

namespace mmcore {

MMCORE_HD uint64_t splitmix64_mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// 24 random bits for element (b, h, i, j).
MMCORE_HD uint32_t dropout_bits(uint64_t seed, uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
  const uint64_t golden = 0x9e3779b97f4a7c15ULL;
  uint64_t x = splitmix64_mix(seed + golden);
  x = splitmix64_mix(x + b * golden);
  x = splitmix64_mix(x + h * golden);
  x = splitmix64_mix(x + i * golden);
  x = splitmix64_mix(x + j * golden);
  return static_cast<uint32_t>(x >> 40);
}

}  // namespace mmcore
