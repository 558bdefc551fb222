// Portable SIMD vectors on GCC/Clang vector extensions. The width follows the instruction set
// the including file is compiled for (one object per target, see CMakeLists.txt), so one kernel
// source serves baseline, AVX2 and AVX-512. Everything lives in namespace
// mmcore::<target>::simd so that the per-target definitions never meet at link time.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifndef MMCORE_TARGET
#error "simd.h is for the per-target kernel files (MMCORE_TARGET must be defined)"
#endif

namespace mmcore {
namespace MMCORE_TARGET {
namespace simd {

#if defined(__AVX512F__)
constexpr int kWidth = 16;
#elif defined(__AVX2__) || defined(__AVX__)
constexpr int kWidth = 8;
#else
constexpr int kWidth = 4;
#endif

typedef float vf __attribute__((vector_size(kWidth * 4)));
typedef int32_t vi __attribute__((vector_size(kWidth * 4)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return x - vf{}; }  // x - 0 is exact, so this folds to a broadcast
inline vi loadi(const void* p) {
  vi v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vi splati(int32_t x) { return x - vi{}; }

// Every int32 lane of a and b read as two int16 halves: lo(a) * lo(b) + hi(a) * hi(b), exact
// in int32 (pmaddwd).
inline vi madd16(vi a, vi b) {
#if defined(__AVX512BW__)
  return (vi)_mm512_madd_epi16((__m512i)a, (__m512i)b);
#elif defined(__AVX2__)
  return (vi)_mm256_madd_epi16((__m256i)a, (__m256i)b);
#elif defined(__SSE2__)
  return (vi)_mm_madd_epi16((__m128i)a, (__m128i)b);
#else
  vi r;
  for (int i = 0; i < kWidth; ++i) {
    const int32_t x = a[i], y = b[i];
    r[i] = static_cast<int16_t>(x & 0xffff) * static_cast<int16_t>(y & 0xffff) +
           static_cast<int16_t>(static_cast<uint32_t>(x) >> 16) * static_cast<int16_t>(static_cast<uint32_t>(y) >> 16);
  }
  return r;
#endif
}

// Round to the nearest integer, ties to even (as rintf in the default rounding mode).
inline vf rint(vf x) {
#if defined(__AVX512F__)
  return (vf)_mm512_mask_roundscale_ps((__m512)x, 0xffff, (__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__AVX__)
  return (vf)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  vf r;
  for (int i = 0; i < kWidth; ++i) r[i] = __builtin_rintf(x[i]);
  return r;
#endif
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }

typedef float v4f __attribute__((vector_size(16)));

// Folds the lanes of v down to 4 with op (halving with whole-register shuffles).
template <class Op>
inline v4f fold4(vf v, Op op) {
#if defined(__AVX512F__)
  typedef float v8f __attribute__((vector_size(32)));
  v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  v8f b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v8f c = op(a, b);
  return op(__builtin_shufflevector(c, c, 0, 1, 2, 3), __builtin_shufflevector(c, c, 4, 5, 6, 7));
#elif defined(__AVX2__) || defined(__AVX__)
  return op(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7));
#else
  (void)op;
  return v;
#endif
}

struct AddOp {
  template <class V>
  V operator()(V a, V b) const {
    return a + b;
  }
};
struct MaxOp {
  template <class V>
  V operator()(V a, V b) const {
    return a > b ? a : b;
  }
};
// Maximum that lets NaN win, so that a NaN lane is never hidden.
struct MaxNanOp {
  template <class V>
  V operator()(V a, V b) const {
    return ((b > a) | (b != b)) ? b : a;
  }
};
inline vf vmax_nan(vf a, vf b) { return MaxNanOp{}(a, b); }

inline float hsum(vf v) {
  v4f x = fold4(v, AddOp{});
  x = x + __builtin_shufflevector(x, x, 2, 3, 0, 1);
  x = x + __builtin_shufflevector(x, x, 1, 0, 3, 2);
  return x[0];
}
// Horizontal maximum; NaN if any lane is NaN.
inline float hmax(vf v) {
  MaxNanOp op;
  v4f x = fold4(v, op);
  x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1));
  x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2));
  return x[0];
}

// 2^x for float lanes: round-to-nearest range reduction and a degree-6 polynomial on
// [-0.5, 0.5] (relative error about 2e-7). x < -126 gives exactly 0 (so exp2(-inf) = 0);
// x is clamped at 127; NaN stays NaN.
inline vf exp2(vf x) {
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf x_in = x;
  const vi is_nan = x != x;
  const vi underflow = x < splat(-126.0f);
  x = vmin(vmax(x, splat(-126.0f)), splat(127.0f));
  x = is_nan ? splat(0.0f) : x;
  vf shifted = x + magic;
  vf n = shifted - magic;
  vf f = x - n;
  vf p = splat(1.5403530393381606e-4f);
  p = p * f + splat(1.3333558146428443e-3f);
  p = p * f + splat(9.6181291076284772e-3f);
  p = p * f + splat(5.5504108664821580e-2f);
  p = p * f + splat(2.4022650695910071e-1f);
  p = p * f + splat(6.9314718055994531e-1f);
  p = p * f + splat(1.0f);
  vi ni = (vi)shifted - 0x4B400000;
  vi bits = (vi)p + (ni << 23);
  bits &= ~underflow;
  return is_nan ? x_in : (vf)bits;
}

// log2(x) for positive, finite, normal lanes: exponent plus ln of the mantissa in
// [sqrt(1/2), sqrt(2)) from the atanh series (relative error about 1e-7).
inline vf log2(vf x) {
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 127;
  vf m = (vf)((bits & 0x007fffff) | 0x3f800000);  // mantissa in [1, 2)
  const vi big = m > splat(1.41421356237f);
  m = big ? m * splat(0.5f) : m;
  e -= big;  // big lanes are -1
  const vf t = (m - splat(1.0f)) / (m + splat(1.0f));
  const vf t2 = t * t;
  vf p = splat(2.0f / 9.0f);
  p = p * t2 + splat(2.0f / 7.0f);
  p = p * t2 + splat(2.0f / 5.0f);
  p = p * t2 + splat(2.0f / 3.0f);
  p = p * t2 + splat(2.0f);
  return __builtin_convertvector(e, vf) + (p * t) * splat(1.4426950408889634f);
}

inline vf sqrt(vf x) {
  vf r;
  for (int i = 0; i < kWidth; ++i) r[i] = __builtin_sqrtf(x[i]);
  return r;
}

// In-register transpose of kWidth vectors (a kWidth x kWidth tile): one round per bit swaps
// that bit of the row index with the same bit of the lane index.
template <int D, size_t... L>
inline vf transpose_lo(vf a, vf b, std::index_sequence<L...>) {
  return __builtin_shufflevector(a, b, ((L & D) == 0 ? static_cast<int>(L) : static_cast<int>(kWidth + L - D))...);
}
template <int D, size_t... L>
inline vf transpose_hi(vf a, vf b, std::index_sequence<L...>) {
  return __builtin_shufflevector(a, b, ((L & D) == 0 ? static_cast<int>(L + D) : static_cast<int>(kWidth + L))...);
}
template <int D>
inline void transpose_round(vf* r) {
  for (int i = 0; i < kWidth; ++i) {
    if ((i & D) != 0) continue;
    const vf a = r[i], b = r[i + D];
    r[i] = transpose_lo<D>(a, b, std::make_index_sequence<kWidth>{});
    r[i + D] = transpose_hi<D>(a, b, std::make_index_sequence<kWidth>{});
  }
}
inline void transpose(vf* r) {
  if constexpr (kWidth >= 16) transpose_round<8>(r);
  if constexpr (kWidth >= 8) transpose_round<4>(r);
  transpose_round<2>(r);
  transpose_round<1>(r);
}

}  // namespace simd
}  // namespace MMCORE_TARGET
}  // namespace mmcore
