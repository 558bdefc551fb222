// Host entry point of the CUDA attention kernel. Plain C++: no pybind11, no kernels here.
#pragma once

#include <cuda_runtime_api.h>

#include "mmcore/attention.h"

namespace mmcore {
namespace cuda {

// Storage type of q, k and v (all three share it). Everything else is float32 as documented in
// mmcore/attention.h. float16 and bfloat16 inputs are computed with float32 accumulation: on
// devices of compute capability 8.0 and newer, q @ k^T and p @ v run on tensor cores (mma.sync,
// half-precision operands, float32 accumulators, the probabilities rounded to the input type)
// when D <= 128, Dv <= 128 and neither weights nor dropout are requested; otherwise the inputs
// are widened to float32 when loaded and everything is computed in float32.
enum AttentionDtype : int { kAttentionFloat32 = 0, kAttentionFloat16 = 1, kAttentionBFloat16 = 2 };

// Queues one attention call on `stream` (all pointers are device pointers on the current
// device). When dtype is kAttentionFloat16 (kAttentionBFloat16), p.q, p.k and p.v point to
// __half (__nv_bfloat16) data.
// Returns nullptr on success, otherwise a message (valid until the next failing call on this
// host thread): "invalid argument: ..." for bad parameters, "CUDA error: ..." for runtime errors.
// Asynchronous: errors that happen while the kernel runs surface on a later synchronization.
const char* attention(const AttentionParams& p, int dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmcore
