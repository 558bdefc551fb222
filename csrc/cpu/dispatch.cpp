// Runtime selection among the per-target builds of the dispatched kernels.
#include "mmcore/cpu_features.h"
#include "mmcore/kernels.h"

namespace mmcore {

#define MMCORE_DECLARE_TARGET(target) \
  namespace target {                  \
  void attention_f32(const AttentionParams& p); \
  void spectral_f32(const SpectralParams& p);   \
  void resize_u8(const ImageView<const uint8_t>*, const ImageView<uint8_t>*, int64_t, ResizeFilter, bool, int); \
  void resize_f32(const ImageView<const float>*, const ImageView<float>*, int64_t, ResizeFilter, bool, int);    \
  void preprocess_u8(const ImageView<const uint8_t>*, int64_t, const int64_t*, int64_t, int64_t, ResizeFilter, \
                     bool, const NormalizeSpec&, float*, int);                                                \
  void normalize_u8(const uint8_t*, float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,   \
                    float, bool, int);                                                                         \
  void normalize_f32(const float*, float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,    \
                     float, bool, int);                                                                        \
  void patchify_f32(const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int); \
  void masked_mean_f32(const MaskedReduceParams&);                                                          \
  void masked_max_f32(const MaskedReduceParams&);                                                           \
  void fuse_f32(const FuseParams&);                                                                         \
  void linear_f32(const LinearParams&);                                                                     \
  void layer_norm_f32(const LayerNormParams&);                                                              \
  }
MMCORE_DECLARE_TARGET(baseline)
#if defined(MMCORE_HAVE_TARGET_AVX2)
MMCORE_DECLARE_TARGET(avx2)
#endif
#if defined(MMCORE_HAVE_TARGET_AVX512)
MMCORE_DECLARE_TARGET(avx512)
#endif
#undef MMCORE_DECLARE_TARGET

void attention_cpu(const AttentionParams& p) {
  switch (active_isa()) {
#if defined(MMCORE_HAVE_TARGET_AVX512)
    case Isa::avx512: return avx512::attention_f32(p);
#endif
#if defined(MMCORE_HAVE_TARGET_AVX2)
    case Isa::avx2: return avx2::attention_f32(p);
#endif
    default: return baseline::attention_f32(p);
  }
}

void spectral_cpu(const SpectralParams& p) {
  switch (active_isa()) {
#if defined(MMCORE_HAVE_TARGET_AVX512)
    case Isa::avx512: return avx512::spectral_f32(p);
#endif
#if defined(MMCORE_HAVE_TARGET_AVX2)
    case Isa::avx2: return avx2::spectral_f32(p);
#endif
    default: return baseline::spectral_f32(p);
  }
}

// Forwards a call to the variant of the active instruction set.
#if defined(MMCORE_HAVE_TARGET_AVX512) && defined(MMCORE_HAVE_TARGET_AVX2)
#define MMCORE_DISPATCH(fn, ...)                                  \
  switch (active_isa()) {                                         \
    case Isa::avx512: return avx512::fn(__VA_ARGS__);             \
    case Isa::avx2: return avx2::fn(__VA_ARGS__);                 \
    default: return baseline::fn(__VA_ARGS__);                    \
  }
#else
#define MMCORE_DISPATCH(fn, ...) return baseline::fn(__VA_ARGS__);
#endif

void resize_u8(const ImageView<const uint8_t>* srcs, const ImageView<uint8_t>* dsts, int64_t n, ResizeFilter f,
               bool antialias, int num_threads) {
  MMCORE_DISPATCH(resize_u8, srcs, dsts, n, f, antialias, num_threads)
}
void resize_f32(const ImageView<const float>* srcs, const ImageView<float>* dsts, int64_t n, ResizeFilter f,
                bool antialias, int num_threads) {
  MMCORE_DISPATCH(resize_f32, srcs, dsts, n, f, antialias, num_threads)
}
void preprocess_u8(const ImageView<const uint8_t>* srcs, int64_t n, const int64_t* geoms, int64_t crop_h,
                   int64_t crop_w, ResizeFilter f, bool antialias, const NormalizeSpec& norm, float* out,
                   int num_threads) {
  MMCORE_DISPATCH(preprocess_u8, srcs, n, geoms, crop_h, crop_w, f, antialias, norm, out, num_threads)
}
void normalize_u8(const uint8_t* src, float* dst, int64_t N, int64_t H, int64_t W, int64_t C, const float* mean,
                  const float* stdv, float scale, bool chw, int num_threads) {
  MMCORE_DISPATCH(normalize_u8, src, dst, N, H, W, C, mean, stdv, scale, chw, num_threads)
}
void normalize_f32(const float* src, float* dst, int64_t N, int64_t H, int64_t W, int64_t C, const float* mean,
                   const float* stdv, float scale, bool chw, int num_threads) {
  MMCORE_DISPATCH(normalize_f32, src, dst, N, H, W, C, mean, stdv, scale, chw, num_threads)
}
void patchify_f32(const float* src, float* dst, int64_t B, int64_t T, int64_t C, int64_t H, int64_t W, int64_t p,
                  int64_t tp, int num_threads) {
  MMCORE_DISPATCH(patchify_f32, src, dst, B, T, C, H, W, p, tp, num_threads)
}
void masked_mean_cpu(const MaskedReduceParams& p) { MMCORE_DISPATCH(masked_mean_f32, p) }
void masked_max_cpu(const MaskedReduceParams& p) { MMCORE_DISPATCH(masked_max_f32, p) }
void fuse_cpu(const FuseParams& p) { MMCORE_DISPATCH(fuse_f32, p) }
void linear_cpu(const LinearParams& p) { MMCORE_DISPATCH(linear_f32, p) }
void layer_norm_cpu(const LayerNormParams& p) { MMCORE_DISPATCH(layer_norm_f32, p) }
#undef MMCORE_DISPATCH

}  // namespace mmcore
