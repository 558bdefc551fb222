// Host entry points of the CUDA fusion reductions: masked mean / max over the token axis and the
// fusion of modality embeddings. Plain C++: no pybind11, no kernels here. Semantics:
// mmcore/fusion.h.
//
// Every entry point queues its work on `stream` and returns nullptr on success, otherwise a
// message (valid until the next failing call on this host thread): "invalid argument: ..." for
// bad parameters, "CUDA error: ..." for runtime errors. All pointers are device pointers on the
// current device; num_threads is ignored. Outputs must not overlap inputs. Asynchronous: errors
// that happen while the kernels run surface on a later synchronization.
//
// Choices where mmcore/fusion.h is silent:
//   * mask / present bytes are read as "nonzero = real / present";
//   * masked_max and the "max" strategy propagate NaN (np.max semantics); rows without any real
//     token (modalities without any present one) still give zeros;
//   * "weighted" whose present weights sum to exactly 0 gives out = 0 and weights 0 (like no
//     present modality); otherwise the weights w_m / sum_present(w) are used as they are
//     (negative weights are not rejected here);
//   * "attention" with D == 0 gives every present modality the score 0 (uniform weights);
//   * out_weights is written only by "weighted" and "attention"; the other strategies leave it
//     untouched.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mmcore/fusion.h"

namespace mmcore {
namespace cuda {

// Largest M that the "attention" strategy accepts (the scores of one batch row live in shared
// memory). The other strategies take any M.
constexpr int64_t kFuseAttentionMaxModalities = 8192;

// out (B, D) = mean of the rows of x (B, L, D) whose mask byte is nonzero; zeros when none is.
const char* masked_mean(const MaskedReduceParams& p, cudaStream_t stream);

// out (B, D) = elementwise maximum over those rows; zeros when none is.
const char* masked_max(const MaskedReduceParams& p, cudaStream_t stream);

// One fuse call with the strategy p.strategy (all six of mmcore::FuseStrategy).
const char* fuse(const FuseParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmcore
