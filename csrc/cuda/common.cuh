// Helpers shared by the CUDA kernels: error reporting, warp reductions and typed loads.
// No pybind11 here; the kernels stay framework-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace mmcore {
namespace cuda {

// ---- error reporting --------------------------------------------------------------------------
// Entry points return nullptr on success or a message that stays valid until the next failing
// call on the same host thread.

inline const char* set_error_message(const std::string& message) {
  static thread_local std::string buffer;
  buffer = message;
  return buffer.c_str();
}

inline const char* cuda_error_message(cudaError_t err, const char* what) {
  std::string msg = "CUDA error: ";
  msg += cudaGetErrorName(err);
  msg += ": ";
  msg += cudaGetErrorString(err);
  if (what != nullptr && *what != '\0') {
    msg += " (";
    msg += what;
    msg += ")";
  }
  return set_error_message(msg);
}

// Returns the message from the enclosing function when `expr` does not give cudaSuccess.
#define MMCORE_CUDA_TRY(expr, what)                                   \
  do {                                                                \
    const cudaError_t mmcore_err_ = (expr);                           \
    if (mmcore_err_ != cudaSuccess) {                                 \
      (void)cudaGetLastError();                                       \
      return ::mmcore::cuda::cuda_error_message(mmcore_err_, (what)); \
    }                                                                 \
  } while (0)

// ---- device helpers ---------------------------------------------------------------------------

constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(kFullWarpMask, x, offset));
  }
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(kFullWarpMask, x, offset);
  }
  return x;
}

// Element loads that widen the storage type to float32.
__device__ __forceinline__ float load_float(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }

}  // namespace cuda
}  // namespace mmcore
