// The dispatched CPU kernels, one line each:
//
//   MMCORE_KERNEL(entry, variant, Params)
//
//   entry    the public function void mmcore::entry(const Params&) (declared in kernels.h,
//            defined in dispatch.cpp): it calls the variant of the active instruction set
//   variant  void mmcore::<target>::variant(const Params&), defined once per target by a file of
//            MMCORE_DISPATCHED_SOURCES (CMakeLists.txt) compiled with MMCORE_TARGET = <target>
//   Params   the framework-free description of one call (attention.h, spectral.h, image.h,
//            fusion.h, linear.h)
//
// This list is the only place a kernel's signature is written: kernels.h turns it into the
// public declarations, dispatch.cpp into the per-target declarations and the dispatch
// switches. A file that includes it defines MMCORE_KERNEL first; the list undefines it at the
// end. There is deliberately no include guard.
#ifndef MMCORE_KERNEL
#error "define MMCORE_KERNEL(entry, variant, Params) before including mmcore/kernel_list.h"
#endif

// Fills p.out (and p.weights / p.lse when set). Thread-safe; runs on p.num_threads threads.
MMCORE_KERNEL(attention_cpu, attention_f32, AttentionParams)

// Fills p.out with the short-time spectral features p describes. Throws SizeError
// (size_error.h) when the FFT scratch of one thread would exceed 2 GiB.
MMCORE_KERNEL(spectral_cpu, spectral_f32, SpectralParams)

// Image kernels (image.h). Sizes and indices are 64-bit. resize and preprocess throw SizeError
// before any work when the filter tables of one axis would exceed 1 GiB (an antialiased
// downscale of hundreds of millions of pixels to a few).
MMCORE_KERNEL(resize_u8_cpu, resize_u8, ResizeParams<uint8_t>)
MMCORE_KERNEL(resize_f32_cpu, resize_f32, ResizeParams<float>)
MMCORE_KERNEL(preprocess_u8_cpu, preprocess_u8, PreprocessParams)
MMCORE_KERNEL(normalize_u8_cpu, normalize_u8, NormalizeParams<uint8_t>)
MMCORE_KERNEL(normalize_f32_cpu, normalize_f32, NormalizeParams<float>)
MMCORE_KERNEL(patchify_f32_cpu, patchify_f32, PatchifyParams)

// Fusion reductions (fusion.h).
MMCORE_KERNEL(masked_mean_cpu, masked_mean_f32, MaskedReduceParams)
MMCORE_KERNEL(masked_max_cpu, masked_max_f32, MaskedReduceParams)
MMCORE_KERNEL(fuse_cpu, fuse_f32, FuseParams)

// y = x . W^T + b (linear.h), on the library's thread pool. Throws SizeError when the packed
// weight panel of one thread would exceed 2 GiB.
MMCORE_KERNEL(linear_cpu, linear_f32, LinearParams)

// Layer normalisation over the last axis (linear.h).
MMCORE_KERNEL(layer_norm_cpu, layer_norm_f32, LayerNormParams)

#undef MMCORE_KERNEL
