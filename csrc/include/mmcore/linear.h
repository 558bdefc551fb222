// Framework-free description of the affine map y = x . W^T + b. No pybind11 here.
#pragma once
#include <cstdint>

namespace mmcore {

// Elementwise function applied to y after the bias (the MLP's activation, fused):
//   gelu        0.5 y (1 + erf(y / sqrt(2)))                  (torch.nn.functional.gelu)
//   gelu_tanh   0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))  (approximate="tanh")
//   quick_gelu  y * sigmoid(1.702 y)                           (CLIP)
//   relu        max(y, 0)                                      (NaN stays NaN)
enum class Activation : int { none = 0, gelu = 1, gelu_tanh = 2, quick_gelu = 3, relu = 4 };

// How W is stored: float32; IEEE float16 or bfloat16 bit patterns (uint16); or int8 with one
// float32 scale per output row (w[n, k] = q[n, k] * scale[n]). The kernel widens W to float32
// while packing it, so low-precision weights cost no float32 copy in memory.
enum class WeightKind : int { f32 = 0, f16 = 1, bf16 = 2, i8 = 3 };

// x (M, K) with row stride ldx (elements), W (N, K) with row stride ldw (the PyTorch
// nn.Linear layout), bias (N,) or null, y (M, N) with row stride ldy. K may be 0 (y = bias).
struct LinearParams {
  const float* x = nullptr;
  const void* w = nullptr;
  WeightKind w_kind = WeightKind::f32;
  const float* w_scale = nullptr;  // (N,) for WeightKind::i8
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t M = 0, N = 0, K = 0;
  int64_t ldx = 0, ldw = 0, ldy = 0;
  Activation activation = Activation::none;
  int num_threads = 1;
};

// Layer normalisation over the last axis: x (rows, D) with row stride ldx, y (rows, D)
// contiguous; y = (x - mean) / sqrt(var + eps) * weight + bias, with the mean and the (biased)
// variance of the row accumulated in double; weight / bias (D,) or null.
struct LayerNormParams {
  const float* x = nullptr;
  const float* weight = nullptr;
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t rows = 0, D = 0, ldx = 0;
  double eps = 1e-5;
  int num_threads = 1;
};

}  // namespace mmcore
