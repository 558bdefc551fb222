// Entry points of the CPU kernels; each picks the instruction-set variant at run time. The
// kernels and their documentation are listed in kernel_list.h.
#pragma once
#include <cstdint>

#include "mmcore/attention.h"
#include "mmcore/fusion.h"
#include "mmcore/image.h"
#include "mmcore/linear.h"
#include "mmcore/spectral.h"

namespace mmcore {

#define MMCORE_KERNEL(entry, variant, Params) void entry(const Params& p);
#include "mmcore/kernel_list.h"

}  // namespace mmcore
