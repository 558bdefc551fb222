// CPU feature detection and the instruction-set level the native kernels run at.
#pragma once
#include <string>
#include <vector>

namespace mmcore {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

// Highest level both compiled into this module and supported by the CPU and OS, capped by the
// environment variable MMCORE_ISA (baseline / avx2 / avx512) or by set_isa_cap().
Isa active_isa();
const char* isa_name(Isa isa);
// Levels compiled into this module, lowest first.
std::vector<std::string> compiled_isas();
// Feature flags of this CPU that matter to mmcore (e.g. "avx2", "fma", "avx512f").
std::vector<std::string> cpu_feature_list();
// Cap the level used from now on (for tests and benchmarks); returns false if not available.
bool set_isa_cap(const std::string& name);

}  // namespace mmcore
