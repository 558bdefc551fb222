// Framework-free description of the affine map y = x . W^T + b. No pybind11 here.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace mmcore {

// The arithmetic of a matrix product (mmcore.set_matmul_precision):
//   highest  float32 operands and sums: the exact default (quantized weights give the bits of
//            their dequantized float32 matrix)
//   bf16     operands rounded to bfloat16 (round to nearest even), products summed in float32
//   int8     activations quantized per row to uint8 with a zero point (dynamic), weights int8
//            with one scale per output row, products summed exactly in int32, then
//            y = float(acc) * (sx[m] * sw[n]) + bias[n]. Rule for the activations of row m:
//              lo = min(0, min x), hi = max(0, max x), sx = (hi - lo) / 255 (1 when 0 or
//              when 1 / sx overflows),
//              zp = clamp(rint(-lo / sx), 0, 255), a = clamp(rint(x / sx) + zp, 0, 255) - zp
//            (the divisions are products with 1 / sx in float32; a row holding inf or NaN gives
//            NaN outputs). Weights that are not int8 are quantized once: sw = max|w| / 127 (1 when
//            0 or when 1 / sw overflows), q = clamp(rint(w / sw), -127, 127). K is at most kInt8MaxK, so sums never
//            overflow.
enum class Precision : int { highest = 0, bf16 = 1, int8 = 2 };
constexpr int64_t kInt8MaxK = 65536;

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

// W (N, K) packed once into the layout that the matrix-product micro-kernels of every
// instruction-set target read, so that a packed weight stays valid when the target changes:
// strips of kSub = 16 output columns (one AVX-512 vector, two AVX2 ones), each stored whole, so
// that the rows of a strip lie side by side in memory (a wider stride would crowd a few L1
// sets); N padded to a multiple of kPanel = 64 columns (the widest task block):
//   float form (highest, bf16): f[s][k][kSub] = W[s * kSub + j, k] as float32 (bf16: rounded to
//     bfloat16); columns past N are zero
//   int form (int8): q[s][k / 2][kSub][2] = the int8 weights of column s * kSub + j at k and
//     k + 1 as int16 pairs (zero past K and N), and scale[n] per output column
struct PackedWeight {
  static constexpr int kPanel = 64;
  static constexpr int kSub = 16;
  int64_t N = 0, K = 0;
  Precision precision = Precision::highest;
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<float[], Free> f;
  std::unique_ptr<int16_t[], Free> q;
  size_t f_capacity = 0, q_capacity = 0;  // elements allocated (packing again reuses them)
  std::vector<float> scale;

  int64_t panels() const { return (N + kPanel - 1) / kPanel; }
  int64_t kpairs() const { return (K + 1) / 2; }
  size_t nbytes() const;
};

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
  Precision precision = Precision::highest;
  // When set, the weight to use, packed for `precision` (w, w_kind, w_scale, ldw are ignored).
  const PackedWeight* packed = nullptr;
  int num_threads = 1;
};

// Packs p.w (p.w_kind, p.w_scale, p.ldw; N, K) for p.precision on p.num_threads threads,
// reusing the buffers of `out` when they are large enough.
// Throws SizeError when the packed form would exceed 16 GiB.
void pack_weight(const LinearParams& p, PackedWeight& out);

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
