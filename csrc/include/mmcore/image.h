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
  int64_t OH = 0, OW = 0;     // full output grid
  int64_t y0 = 0, x0 = 0;     // crop origin within the output grid
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

}  // namespace mmcore
