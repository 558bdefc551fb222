// Framework-free description of the fusion reductions. No pybind11 here.
#pragma once
#include <cstdint>

namespace mmcore {

// masked_mean / masked_max over the token axis: x (B, L, D) row-major, mask (B, L) uint8
// (1 = real token) or null (all real), out (B, D). A row without real tokens gives zeros.
struct MaskedReduceParams {
  const float* x = nullptr;
  const uint8_t* mask = nullptr;
  float* out = nullptr;
  int64_t B = 0, L = 0, D = 0;
  int num_threads = 1;
};

enum class FuseStrategy : int { concat = 0, mean = 1, sum = 2, max = 3, weighted = 4, attention = 5 };

// fuse over modalities: emb (B, M, D) row-major, present (B, M) uint8 or null (all present).
//   concat    out (B, M * D), absent modalities as zeros
//   mean      out (B, D), mean over present modalities (none present: zeros)
//   sum       out (B, D), sum over present
//   max       out (B, D), elementwise max over present (none present: zeros)
//   weighted  out (B, D) = sum_m w_m e_m with w = weights renormalized over the present
//             modalities (weights (B, M) or, with weights_per_batch false, (M,))
//   attention s_m = (query . e_m) / sqrt(D) over present modalities, w = softmax(s),
//             out (B, D) = sum_m w_m e_m; query (B, D) or, with query_per_batch false, (D,)
// out_weights (B, M) or null receives the weights of weighted / attention (absent: 0).
struct FuseParams {
  const float* emb = nullptr;
  const uint8_t* present = nullptr;
  const float* weights = nullptr;
  bool weights_per_batch = true;
  const float* query = nullptr;
  bool query_per_batch = true;
  float* out = nullptr;
  float* out_weights = nullptr;
  int64_t B = 0, M = 0, D = 0;
  FuseStrategy strategy = FuseStrategy::mean;
  int num_threads = 1;
};

}  // namespace mmcore
