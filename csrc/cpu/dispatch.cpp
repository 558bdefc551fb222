// Runtime selection among the per-target builds of the dispatched kernels.
#include "mmcore/cpu_features.h"
#include "mmcore/kernels.h"

namespace mmcore {

#define MMCORE_DECLARE_TARGET(target) \
  namespace target {                  \
  void attention_f32(const AttentionParams& p); \
  void spectral_f32(const SpectralParams& p);   \
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

}  // namespace mmcore
