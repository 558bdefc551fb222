// Framework-free descriptions of the image kernels: resize, normalize, patchify and the fused
// preprocess (resize + crop + rescale + normalize [+ patchify]). No pybind11 here.
#pragma once
#include <cstdint>

namespace mmcore {

enum class ResizeFilter : int { nearest = 0, bilinear = 1, bicubic = 2, lanczos = 3 };

// One image, HWC, row-major, rows `stride` elements apart (stride >= W * C).
template <class T>
struct ImageView {
  T* data = nullptr;
  int64_t H = 0, W = 0, C = 0, stride = 0;
};

// Separable resize with Pillow's conventions: output pixel centres map to
// in = (out + 0.5) * scale with scale = in_size / out_size; when antialiasing and
// downscaling, the filter support widens by the scale; the weights of each output pixel are
// normalized to sum to 1. uint8 images are filtered horizontally first into a uint8
// intermediate, then vertically, in 22-bit fixed point with rounding and clamping (as Pillow).
// float32 images use the same weights in float arithmetic, no clamping.
// Only output rows [y0, y0 + out_h) and columns [x0, x0 + out_w) of the full (OH, OW) output
// grid are computed (a crop fused into the resize).
struct ResizeGeometry {
  int64_t OH = 0, OW = 0;  // full output grid
  int64_t y0 = 0, x0 = 0;  // crop origin within the output grid
  int64_t out_h = 0, out_w = 0;
  ResizeFilter filter = ResizeFilter::bicubic;
  bool antialias = true;
};

// Writes of the fused preprocess: value = (resized_u8 * scale - mean[c]) / std[c] as float32,
// laid out CHW (patch == 0) or as patches (patch > 0): (num_patches, C * patch * patch) with
// patches row-major over the grid and each patch flattened (c, py, px).
struct NormalizeSpec {
  const float* mean = nullptr;  // C values
  const float* std = nullptr;   // C values
  float scale = 1.0f / 255.0f;
  int64_t patch = 0;
};

// One call of the batched resize: srcs[i] is resized into dsts[i] (its H, W give the output
// size), i < n. Sources may repeat one row (stride 0). Batches run in parallel over images, or
// over row bands of one image when there are fewer images than threads.
template <class T>
struct ResizeParams {
  const ImageView<const T>* srcs = nullptr;
  const ImageView<T>* dsts = nullptr;
  int64_t n = 0;
  ResizeFilter filter = ResizeFilter::bicubic;
  bool antialias = true;
  int num_threads = 1;
};

// One call of the fused preprocess of n uint8 images: image i is resized to
// (geoms[4 i], geoms[4 i + 1]), cropped to (crop_h, crop_w) at offset (geoms[4 i + 2],
// geoms[4 i + 3]) (zeros outside the resized image) and normalized by `norm` into
// out + i * C * crop_h * crop_w (layout as NormalizeSpec says). All images have the same C.
struct PreprocessParams {
  const ImageView<const uint8_t>* srcs = nullptr;
  int64_t n = 0;
  const int64_t* geoms = nullptr;
  int64_t crop_h = 0, crop_w = 0;
  ResizeFilter filter = ResizeFilter::bicubic;
  bool antialias = true;
  NormalizeSpec norm;
  float* out = nullptr;
  int num_threads = 1;
};

// dst = (src * scale - mean[c]) / std[c] for a contiguous (N, H, W, C) batch, into a
// contiguous float32 dst laid out (N, C, H, W) when chw, else (N, H, W, C).
template <class T>
struct NormalizeParams {
  const T* src = nullptr;
  float* dst = nullptr;
  int64_t N = 0, H = 0, W = 0, C = 0;
  const float* mean = nullptr;  // C values
  const float* std = nullptr;   // C values
  float scale = 1.0f;
  bool chw = true;
  int num_threads = 1;
};

// Patch split of a contiguous (B, T, C, H, W) array into dst (B, T/tp * H/p * W/p,
// C * tp * p * p) with p = patch, tp = temporal_patch (T, H, W multiples of them): patches
// t-major then row-major, each flattened (c, t, py, px).
struct PatchifyParams {
  const float* src = nullptr;
  float* dst = nullptr;
  int64_t B = 0, T = 0, C = 0, H = 0, W = 0;
  int64_t patch = 1, temporal_patch = 1;
  int num_threads = 1;
};

}  // namespace mmcore
