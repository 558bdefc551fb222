// Framework-free description of one attention call. No pybind11, no Python here.
#pragma once
#include <cstdint>

namespace mmcore {

// All tensors are float32 and row-major contiguous unless a stride array says otherwise.
//   q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv), out (B, H, Lq, Dv)
//   weights (B, H, Lq, Lk) or null, lse (B, H, Lq) or null
//   mask (uint8, 1 = may attend) and bias (float32) are read through element strides over
//   (B, H, Lq, Lk); a broadcast dimension has stride 0. Either may be null.
//   key_lengths (B,) or null: keys at index >= key_lengths[b] are ignored.
// scale already includes 1 / temperature. Dropout keeps weight (b, h, i, j) iff
// dropout_bits(seed, b, h, i, j) >= dropout_threshold (a 24-bit integer, see dropout.h),
// and kept weights are multiplied by dropout_scale = 1 / (1 - p).
struct AttentionParams {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* out = nullptr;
  float* weights = nullptr;
  float* lse = nullptr;
  const uint8_t* mask = nullptr;
  int64_t mask_strides[4] = {0, 0, 0, 0};
  const float* bias = nullptr;
  int64_t bias_strides[4] = {0, 0, 0, 0};
  const int64_t* key_lengths = nullptr;
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, D = 0, Dv = 0;
  float scale = 1.0f;
  bool dropout = false;
  uint64_t seed = 0;
  uint32_t dropout_threshold = 0;
  float dropout_scale = 1.0f;
  // Matmul precision "bf16": q, k and v are rounded to bfloat16 (round to nearest even) as they
  // are read, and the softmax numerators P are rounded to bfloat16 before P . V (after dropout
  // scaled them; P is relative to the running maximum of the online softmax); scores, the
  // softmax statistics (the row sums take the unrounded P), the weights and all sums stay float32.
  bool bf16 = false;
  int num_threads = 1;
};

}  // namespace mmcore
