// Entry points of the CPU kernels; each picks the instruction-set variant at run time.
#pragma once
#include "mmcore/attention.h"

namespace mmcore {

// Fills p.out (and p.weights / p.lse when set). Thread-safe; runs on p.num_threads threads.
void attention_cpu(const AttentionParams& p);

}  // namespace mmcore
