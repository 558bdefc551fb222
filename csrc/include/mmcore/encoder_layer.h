// Framework-free description of one pre-norm transformer encoder block. No pybind11 here.
#pragma once
#include <cstdint>

#include "mmcore/linear.h"

namespace mmcore {

// One weight matrix as linear_cpu reads it (see LinearParams).
struct WeightRef {
  const void* data = nullptr;
  WeightKind kind = WeightKind::f32;
  const float* scale = nullptr;          // int8 only
  int64_t ld = 0;                        // row stride in elements
  const PackedWeight* packed = nullptr;  // when set, used instead (packed for the call's precision)
};

// y = x + out_proj(MHA(LN1(x)));  y = y + W2 act(W1 LN2(y) + b1) + b2
// (torch.nn.TransformerEncoderLayer, norm_first=True, batch_first=True, eval mode).
// x, y (B, L, E) contiguous float32 (y may not alias x). Self-attention over keys
// j < key_lengths[b] (null: all L); a row with key_lengths[b] == 0 gets a zero attention output,
// as the Python layer gives. Biases and norm parameters may be null. scale = 1 / sqrt(E / H)
// / temperature.
struct EncoderLayerParams {
  const float* x = nullptr;
  float* y = nullptr;
  int64_t B = 0, L = 0, E = 0, H = 0, F = 0;
  const int64_t* key_lengths = nullptr;
  const float *ln1_w = nullptr, *ln1_b = nullptr, *ln2_w = nullptr, *ln2_b = nullptr;
  double eps1 = 1e-5, eps2 = 1e-5;
  WeightRef w_in, w_out, w1, w2;  // (3E, E), (E, E), (F, E), (E, F)
  const float *b_in = nullptr, *b_out = nullptr, *b1 = nullptr, *b2 = nullptr;
  Activation activation = Activation::gelu;
  float scale = 1.0f;
  Precision precision = Precision::highest;  // of the four linears and the attention
  int num_threads = 1;
};

// Runs the block with the library's kernels (layer_norm_cpu, linear_cpu, attention_cpu).
void encoder_layer_cpu(const EncoderLayerParams& p);

}  // namespace mmcore
