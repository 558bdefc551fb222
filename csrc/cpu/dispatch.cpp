// Runtime selection among the per-target builds of the dispatched kernels: the per-target
// declarations and one switch per kernel, generated from kernel_list.h.
#include "mmcore/cpu_features.h"
#include "mmcore/kernels.h"

namespace mmcore {

// void <target>::variant(const Params&) for every compiled target.
#define MMCORE_KERNEL(entry, variant, Params) void variant(const Params& p);
namespace baseline {
#include "mmcore/kernel_list.h"
}  // namespace baseline
#if defined(MMCORE_HAVE_TARGET_AVX2)
#define MMCORE_KERNEL(entry, variant, Params) void variant(const Params& p);
namespace avx2 {
#include "mmcore/kernel_list.h"
}  // namespace avx2
#endif
#if defined(MMCORE_HAVE_TARGET_AVX512)
#define MMCORE_KERNEL(entry, variant, Params) void variant(const Params& p);
namespace avx512 {
#include "mmcore/kernel_list.h"
}  // namespace avx512
#endif

// The switch cases of the targets compiled into this module (baseline is the default case).
#if defined(MMCORE_HAVE_TARGET_AVX512)
#define MMCORE_CASE_AVX512(variant) \
  case Isa::avx512: return avx512::variant(p);
#else
#define MMCORE_CASE_AVX512(variant)
#endif
#if defined(MMCORE_HAVE_TARGET_AVX2)
#define MMCORE_CASE_AVX2(variant) \
  case Isa::avx2: return avx2::variant(p);
#else
#define MMCORE_CASE_AVX2(variant)
#endif

#define MMCORE_KERNEL(entry, variant, Params) \
  void entry(const Params& p) {               \
    switch (active_isa()) {                   \
      MMCORE_CASE_AVX512(variant)             \
      MMCORE_CASE_AVX2(variant)               \
      default: return baseline::variant(p);   \
    }                                         \
  }
#include "mmcore/kernel_list.h"

#undef MMCORE_CASE_AVX512
#undef MMCORE_CASE_AVX2

}  // namespace mmcore
