// Entry points of the CPU kernels; each picks the instruction-set variant at run time.
#pragma once
#include "mmcore/attention.h"
#include "mmcore/fusion.h"
#include "mmcore/image.h"
#include "mmcore/linear.h"
#include "mmcore/spectral.h"

namespace mmcore {

// Fills p.out (and p.weights / p.lse when set). Thread-safe; runs on p.num_threads threads.
void attention_cpu(const AttentionParams& p);

// Fills p.out with the short-time spectral features p describes. Runs on p.num_threads threads.
void spectral_cpu(const SpectralParams& p);

// Image kernels (see image.h). Batches run in parallel over images, or over row bands of one
// image when there are fewer images than threads. Sizes and indices are 64-bit; a source may
// repeat one row (stride 0). resize / preprocess throw SizeError (size_error.h) before any work
// when the filter tables of one axis would exceed 1 GiB (an antialiased downscale of hundreds of
// millions of pixels to a few). spectral_cpu throws it when the FFT scratch of one thread would
// exceed 2 GiB, linear_cpu when its packed weight panel would.
void resize_u8(const ImageView<const uint8_t>* srcs, const ImageView<uint8_t>* dsts, int64_t n, ResizeFilter f,
               bool antialias, int num_threads);
void resize_f32(const ImageView<const float>* srcs, const ImageView<float>* dsts, int64_t n, ResizeFilter f,
                bool antialias, int num_threads);
void preprocess_u8(const ImageView<const uint8_t>* srcs, int64_t n, const int64_t* geoms, int64_t crop_h,
                   int64_t crop_w, ResizeFilter f, bool antialias, const NormalizeSpec& norm, float* out,
                   int num_threads);
void normalize_u8(const uint8_t* src, float* dst, int64_t N, int64_t H, int64_t W, int64_t C, const float* mean,
                  const float* stdv, float scale, bool chw, int num_threads);
void normalize_f32(const float* src, float* dst, int64_t N, int64_t H, int64_t W, int64_t C, const float* mean,
                   const float* stdv, float scale, bool chw, int num_threads);
void patchify_f32(const float* src, float* dst, int64_t B, int64_t T, int64_t C, int64_t H, int64_t W, int64_t p,
                  int64_t tp, int num_threads);

// Fusion reductions (see fusion.h).
void masked_mean_cpu(const MaskedReduceParams& p);
void masked_max_cpu(const MaskedReduceParams& p);
void fuse_cpu(const FuseParams& p);

// y = x . W^T + b (see linear.h), on the library's thread pool.
void linear_cpu(const LinearParams& p);

// Layer normalisation over the last axis (see linear.h).
void layer_norm_cpu(const LayerNormParams& p);

}  // namespace mmcore
