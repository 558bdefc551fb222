// Framework-free description of the affine map y = x . W^T + b. No pybind11 here.
#pragma once
#include <cstdint>

namespace mmcore {

// x (M, K) with row stride ldx (elements), W (N, K) with row stride ldw (the PyTorch
// nn.Linear layout), bias (N,) or null, y (M, N) with row stride ldy. K may be 0 (y = bias).
struct LinearParams {
  const float* x = nullptr;
  const float* w = nullptr;
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t M = 0, N = 0, K = 0;
  int64_t ldx = 0, ldw = 0, ldy = 0;
  int num_threads = 1;
};

}  // namespace mmcore
