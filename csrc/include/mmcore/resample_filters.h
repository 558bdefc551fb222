// The resampling filters of the resize kernels (Pillow's definitions), shared by the CPU and the
// CUDA code: support radius and weight of each filter, in double precision.
#pragma once
#include <cmath>

#include "mmcore/image.h"

namespace mmcore {
namespace resample {

inline double support(ResizeFilter f) {
  switch (f) {
    case ResizeFilter::bilinear: return 1.0;
    case ResizeFilter::bicubic: return 2.0;
    case ResizeFilter::lanczos: return 3.0;
    default: return 0.0;
  }
}

inline double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= 3.14159265358979323846;
  return std::sin(x) / x;
}

// Weight at distance x (in units of source pixels / filter scale). Bicubic uses a = -0.5.
inline double weight(ResizeFilter f, double x) {
  switch (f) {
    case ResizeFilter::bilinear: x = std::fabs(x); return x < 1.0 ? 1.0 - x : 0.0;
    case ResizeFilter::bicubic: {
      constexpr double a = -0.5;
      x = std::fabs(x);
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
      if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
      return 0.0;
    }
    case ResizeFilter::lanczos: return (x > -3.0 && x < 3.0) ? sinc(x) * sinc(x / 3.0) : 0.0;
    default: return 0.0;
  }
}

}  // namespace resample
}  // namespace mmcore
