// Host entry points of the CUDA image kernels: Pillow-convention resize, normalize, patchify and
// the fused preprocess (resize + crop + rescale + normalize [+ patchify]). Plain C++: no
// pybind11, no kernels here. Semantics: mmcore/image.h.
//
// Every entry point queues its work on `stream` and returns nullptr on success, otherwise a
// message (valid until the next failing call on this host thread): "invalid argument: ..." for
// bad parameters, "CUDA error: ..." for runtime errors. All data pointers are device pointers on
// the current device; the batch descriptions (ImageDesc arrays) live on the host. Asynchronous:
// errors that happen while the kernels run surface on a later synchronization.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "mmcore/image.h"

namespace mmcore {
namespace cuda {

// Storage type of the images of resize and normalize (preprocess reads uint8 only).
enum ImageDtype : int { kImageUint8 = 0, kImageFloat32 = 1 };

// Output layouts of normalize.
enum ImageLayout : int { kLayoutCHW = 0, kLayoutHWC = 1 };

// One image of a batched resize or preprocess. Images are (H, W, C) with the (W, C) part
// contiguous and rows `src_stride` elements apart (src_stride >= W * C); every image of a call
// has the same C and dtype, sizes may differ from image to image.
struct ImageDesc {
  const void* src = nullptr;
  int64_t H = 0, W = 0, src_stride = 0;
  // resize: the (OH, OW, C) output, rows dst_stride elements apart (dst_stride >= OW * C).
  // preprocess: OH, OW are the resized size (the full output grid); dst is unused.
  void* dst = nullptr;
  int64_t OH = 0, OW = 0, dst_stride = 0;
  // preprocess: origin of the crop window in the resized grid (may be negative or past the
  // edge; pixels outside the resized image are 0 before normalization).
  int64_t top = 0, left = 0;
};

// resize: each images[i].src resized to (OH, OW) into images[i].dst, in Pillow's pass order.
// uint8 images with C == 2 or 4 are filtered with premultiplied alpha (the last channel), as
// Pillow does for LA and RGBA (except with the nearest filter or an unchanged size).
struct ResizeBatch {
  const ImageDesc* images = nullptr;  // host array of `count` descriptions
  int64_t count = 0;
  int64_t C = 0;
  int dtype = kImageUint8;
  ResizeFilter filter = ResizeFilter::bicubic;
  bool antialias = true;
};

// preprocess: image i -> out + i * C * crop_h * crop_w, float32, laid out (C, crop_h, crop_w)
// when norm.patch == 0, else as (crop_h/p * crop_w/p, C * p * p) patches (row-major over the
// grid, each flattened (c, py, px)). norm.mean and norm.std are device arrays of C floats.
struct PreprocessBatch {
  const ImageDesc* images = nullptr;  // host array; src must be uint8
  int64_t count = 0;
  int64_t C = 0;
  int64_t crop_h = 0, crop_w = 0;
  ResizeFilter filter = ResizeFilter::bicubic;
  bool antialias = true;
  NormalizeSpec norm;
  float* out = nullptr;
};

// Resize and preprocess need a device workspace: the per-image records, the filter tables (built
// on the host in double precision and copied into the workspace with one cudaMemcpyAsync on
// `stream`) and the uint8 / float32 intermediate between the horizontal and the vertical pass.
// The *_workspace functions give its size in bytes for a batch (the data pointers may be null
// there); the workspace must stay allocated until the queued work has run (stream order) and be
// 16-byte aligned.
const char* resize_workspace(const ResizeBatch& p, size_t* bytes);
const char* resize(const ResizeBatch& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);

const char* preprocess_image_workspace(const PreprocessBatch& p, size_t* bytes);
const char* preprocess_image(const PreprocessBatch& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// normalize: src (N, H, W, C) contiguous uint8 or float32 -> dst float32 (N, C, H, W) or
// (N, H, W, C), value (x * scale - mean[c]) / std[c] with float32 roundings after each
// operation (no fused multiply-add).
struct NormalizeCall {
  const void* src = nullptr;
  int dtype = kImageUint8;
  float* dst = nullptr;
  int64_t N = 0, H = 0, W = 0, C = 0;
  const float* mean = nullptr;  // device, C values
  const float* std = nullptr;   // device, C values
  float scale = 1.0f / 255.0f;
  int layout = kLayoutCHW;
};
const char* normalize(const NormalizeCall& p, cudaStream_t stream);

// patchify: src float32 (B, T, C, H, W) contiguous -> dst float32 (B, (T/tp)(H/p)(W/p),
// C * tp * p * p), patches t-major then row-major over the grid, each flattened (c, t, py, px).
// T, H and W must be multiples of tp, p and p.
struct PatchifyCall {
  const float* src = nullptr;
  float* dst = nullptr;
  int64_t B = 0, T = 0, C = 0, H = 0, W = 0;
  int64_t patch = 1, temporal_patch = 1;
};
const char* patchify(const PatchifyCall& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmcore
