// Host entry point of the CUDA short-time spectral kernel (STFT / power / mel / log-mel / Kaldi
// fbank). Plain C++: no pybind11, no kernels here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mmcore/spectral.h"

namespace mmcore {
namespace cuda {

// Largest n_fft the CUDA kernel accepts. A frame lives in shared memory, so the device's
// per-block shared memory can lower this further (about 7200 on sm_75, which has 64 KiB).
constexpr int64_t kSpectralMaxFft = 8192;

// Queues one spectral call on `stream` with the semantics documented in mmcore/spectral.h. All
// pointers are device pointers on the current device; p.num_threads is ignored. A null window
// means a rectangular window (all ones). For SpectralKind::complex_stft, p.out holds
// interleaved (re, im) float pairs.
// Returns nullptr on success, otherwise a message (valid until the next failing call on this
// host thread): "invalid argument: ..." for bad parameters, "CUDA error: ..." for runtime errors.
// Asynchronous: errors that happen while the kernels run surface on a later synchronization.
const char* spectral(const SpectralParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmcore
