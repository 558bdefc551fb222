// Entry points of the CPU kernels; each picks the instruction-set variant at run time.
#pragma once
#include "mmcore/attention.h"
#include "mmcore/spectral.h"

namespace mmcore {

// Fills p.out (and p.weights / p.lse when set). Thread-safe; runs on p.num_threads threads.
void attention_cpu(const AttentionParams& p);

// Fills p.out with the short-time spectral features p describes. Runs on p.num_threads threads.
void spectral_cpu(const SpectralParams& p);

}  // namespace mmcore
