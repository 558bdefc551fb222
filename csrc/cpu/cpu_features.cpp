#include "mmcore/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace mmcore {
namespace {

struct Features {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false;
  // Arithmetic extensions reported for information (no kernel requires them yet).
  bool avx512_bf16 = false, avx512_vnni = false, avx_vnni = false, amx_tile = false;
};

Features detect() {
  Features f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx512_vnni = f.avx512f && (c >> 11) & 1u;
    f.amx_tile = (d >> 24) & 1u;
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) {
    f.avx512_bf16 = f.avx512f && (a >> 5) & 1u;
    f.avx_vnni = f.avx2 && (a >> 4) & 1u;
  }
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

bool compiled(Isa isa) {
  switch (isa) {
    case Isa::baseline: return true;
#if defined(MMCORE_HAVE_TARGET_AVX2)
    case Isa::avx2: return true;
#endif
#if defined(MMCORE_HAVE_TARGET_AVX512)
    case Isa::avx512: return true;
#endif
    default: return false;
  }
}

bool supported(Isa isa) {
  const Features& f = features();
  switch (isa) {
    case Isa::baseline: return true;
    case Isa::avx2: return f.avx2 && f.fma && f.f16c;
    case Isa::avx512: return f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl && f.avx2 && f.fma;
  }
  return false;
}

bool parse(const char* s, Isa* out) {
  if (!s) return false;
  if (!std::strcmp(s, "baseline")) {
    *out = Isa::baseline;
    return true;
  }
  if (!std::strcmp(s, "avx2")) {
    *out = Isa::avx2;
    return true;
  }
  if (!std::strcmp(s, "avx512")) {
    *out = Isa::avx512;
    return true;
  }
  return false;
}

Isa best_available(Isa cap) {
  for (int level = static_cast<int>(cap); level > 0; --level) {
    Isa isa = static_cast<Isa>(level);
    if (compiled(isa) && supported(isa)) return isa;
  }
  return Isa::baseline;
}

std::atomic<int> g_active{-1};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    default: return "baseline";
  }
}

Isa active_isa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    Isa cap = Isa::avx512;
    Isa env;
    if (parse(std::getenv("MMCORE_ISA"), &env)) cap = env;
    v = static_cast<int>(best_available(cap));
    g_active.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

bool set_isa_cap(const std::string& name) {
  Isa cap;
  if (!parse(name.c_str(), &cap)) return false;
  Isa got = best_available(cap);
  g_active.store(static_cast<int>(got), std::memory_order_relaxed);
  return got == cap;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512})
    if (compiled(isa)) out.emplace_back(isa_name(isa));
  return out;
}

std::vector<std::string> cpu_feature_list() {
  const Features& f = features();
  std::vector<std::string> out;
  if (f.avx2) out.emplace_back("avx2");
  if (f.fma) out.emplace_back("fma");
  if (f.f16c) out.emplace_back("f16c");
  if (f.avx512f) out.emplace_back("avx512f");
  if (f.avx512bw) out.emplace_back("avx512bw");
  if (f.avx512dq) out.emplace_back("avx512dq");
  if (f.avx512vl) out.emplace_back("avx512vl");
  if (f.avx512_bf16) out.emplace_back("avx512_bf16");
  if (f.avx512_vnni) out.emplace_back("avx512_vnni");
  if (f.avx_vnni) out.emplace_back("avx_vnni");
  if (f.amx_tile) out.emplace_back("amx_tile");
  return out;
}

}  // namespace mmcore
