// Counter-based Gaussian noise for dithering: a pure function of (seed, signal, frame, t), so
// every backend adds the same noise. Keep in sync with mmcore/kernels/numba/spectral.py and
// tests/reference.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "mmcore/dropout.h"

namespace mmcore {

// Domain separator: dither bits never coincide with dropout bits of the same seed.
constexpr uint64_t kDitherDomain = 0x64697468ULL;  // "dith"

// Standard normal sample: Box-Muller, sqrt(-2 ln u1) cos(2 pi u2), on two 24-bit uniforms
// u = (bits + 0.5) / 2^24 with the bits dropout_bits(seed, kDitherDomain, signal, frame, 2 t)
// and dropout_bits(seed, kDitherDomain, signal, frame, 2 t + 1), computed in double.
MMCORE_HD double dither_normal(uint64_t seed, uint64_t signal, uint64_t frame, uint64_t t) {
  const double u1 =
      (static_cast<double>(dropout_bits(seed, kDitherDomain, signal, frame, 2 * t)) + 0.5) * (1.0 / 16777216.0);
  const double u2 =
      (static_cast<double>(dropout_bits(seed, kDitherDomain, signal, frame, 2 * t + 1)) + 0.5) * (1.0 / 16777216.0);
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

}  // namespace mmcore
