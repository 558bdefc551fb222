// AVX2 building blocks of the uint8 resize passes and the normalize of the fused preprocess
// (csrc/cpu/image.cpp), 256 bits wide, used by the AVX2 and the AVX-512 targets. Pillow's
// fixed-point sums of uint8 values v and 22-bit weights w are computed exactly on pmaddwd, which
// multiplies int16 pairs and adds the two products into an int32 lane:
// * horizontal pass, rows on the lanes: a value is held as the pair (v, 128 v), a weight as
//   (w & 127, w >> 7), and v (w & 127) + 128 v (w >> 7) = v w;
// * vertical pass, values on the lanes: two taps' values (v_k, v_k+1) against the pairs of
//   their high parts w >> 7 and of their low parts w & 127, 128 sum_hi + sum_lo = sum v w.
// Both need -2^22 <= w < 2^22 (w >> 7 fits int16), which image.cpp checks before using them.
// The sums are the same integers as Pillow's, so the rounding and clamping that follow are too.
#pragma once

#ifndef MMCORE_TARGET
#error "image_madd.h is for the per-target kernel files (MMCORE_TARGET must be defined)"
#endif

#if defined(__AVX2__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "mmcore/image.h"

namespace mmcore {
namespace MMCORE_TARGET {
namespace image_madd {

// Fraction bits of Pillow's fixed-point weights.
constexpr int kPrecisionBits = 22;
// Band values the horizontal pass transposes at once: outputs are taken in groups whose taps
// span at most this many values of a row (or one output), so the segment stays in the L2 cache.
constexpr int64_t kMaddSegment = 4096;

// One transposed value: 8 rows (lanes) of v + (v << 23), i.e. the int16 pairs (v, 128 v).
inline __m256i pair_lanes(__m128i eight_bytes) {
  const __m256i x = _mm256_cvtepu8_epi32(eight_bytes);
  return _mm256_add_epi32(x, _mm256_slli_epi32(x, 23));
}

// Values [i, i + 16) of 8 rows, transposed into B[0 .. 16) (a byte transpose, then widened).
inline void transpose16_u8(const uint8_t* const* rowp, int64_t i, __m256i* B) {
  __m128i a[8];
  for (int l = 0; l < 8; ++l) a[l] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rowp[l] + i));
  __m128i t[8], u[8];
  for (int p = 0; p < 4; ++p) {  // 16-bit units m: (row 2p, row 2p + 1) of value m
    t[2 * p] = _mm_unpacklo_epi8(a[2 * p], a[2 * p + 1]);
    t[2 * p + 1] = _mm_unpackhi_epi8(a[2 * p], a[2 * p + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // 32-bit units m: rows 4h .. 4h + 3 of value m
    const __m128i* s = t + 4 * h;
    u[4 * h + 0] = _mm_unpacklo_epi16(s[0], s[2]);  // values 0..3
    u[4 * h + 1] = _mm_unpackhi_epi16(s[0], s[2]);  // 4..7
    u[4 * h + 2] = _mm_unpacklo_epi16(s[1], s[3]);  // 8..11
    u[4 * h + 3] = _mm_unpackhi_epi16(s[1], s[3]);  // 12..15
  }
  for (int q = 0; q < 4; ++q) {  // 64-bit units: rows 0 .. 7 of one value
    const __m128i lo = _mm_unpacklo_epi32(u[q], u[4 + q]), hi = _mm_unpackhi_epi32(u[q], u[4 + q]);
    B[4 * q + 0] = pair_lanes(lo);
    B[4 * q + 1] = pair_lanes(_mm_unpackhi_epi64(lo, lo));
    B[4 * q + 2] = pair_lanes(hi);
    B[4 * q + 3] = pair_lanes(_mm_unpackhi_epi64(hi, hi));
  }
}

// Rows 0..nr-1 of 8 outputs: O[m] holds output m of rows 0..7 (lanes), already shifted; row l
// gets clamp(O[m][l], 0, 255) for m < 8 at out + l * stride (saturating packs clamp).
inline void store8_u8(const __m256i* O, int nr, uint8_t* out, int64_t stride) {
  const __m256i a = _mm256_packs_epi32(O[0], O[1]), b = _mm256_packs_epi32(O[2], O[3]);
  const __m256i c = _mm256_packs_epi32(O[4], O[5]), d = _mm256_packs_epi32(O[6], O[7]);
  // Per 128-bit half (rows 0-3, rows 4-7): bytes m * 4 + r -> r * 4 + m.
  const __m256i perm = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13,
                                        2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i e = _mm256_shuffle_epi8(_mm256_packus_epi16(a, b), perm);  // outputs 0..3
  const __m256i f = _mm256_shuffle_epi8(_mm256_packus_epi16(c, d), perm);  // outputs 4..7
  const __m256i lo = _mm256_unpacklo_epi32(e, f), hi = _mm256_unpackhi_epi32(e, f);
  // lo: rows 0, 1 | 4, 5; hi: rows 2, 3 | 6, 7 (8 bytes each).
  const __m128i r01 = _mm256_castsi256_si128(lo), r45 = _mm256_extracti128_si256(lo, 1);
  const __m128i r23 = _mm256_castsi256_si128(hi), r67 = _mm256_extracti128_si256(hi, 1);
  if (nr == 8) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), r01);
    _mm_storeh_pd(reinterpret_cast<double*>(out + stride), _mm_castsi128_pd(r01));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 2 * stride), r23);
    _mm_storeh_pd(reinterpret_cast<double*>(out + 3 * stride), _mm_castsi128_pd(r23));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 4 * stride), r45);
    _mm_storeh_pd(reinterpret_cast<double*>(out + 5 * stride), _mm_castsi128_pd(r45));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 6 * stride), r67);
    _mm_storeh_pd(reinterpret_cast<double*>(out + 7 * stride), _mm_castsi128_pd(r67));
    return;
  }
  alignas(16) uint8_t rows[8][8];
  _mm_store_si128(reinterpret_cast<__m128i*>(rows[0]), r01);
  _mm_store_si128(reinterpret_cast<__m128i*>(rows[2]), r23);
  _mm_store_si128(reinterpret_cast<__m128i*>(rows[4]), r45);
  _mm_store_si128(reinterpret_cast<__m128i*>(rows[6]), r67);
  for (int l = 0; l < nr; ++l) std::memcpy(out + l * stride, rows[l], 8);
}

// The multiply-adds of outputs [j0, j1) over the transposed segment B (which starts at
// column xlo; taps of output j: start[j], count[j], weights wp + j * ksize as packed_taps
// packs them): O[j * C + c] = the shifted sum of output j, channel c, rows on the lanes.
template <int kC>
void madd_outputs(const __m256i* B, int64_t xlo, const int64_t* start, const int64_t* count, int64_t ksize,
                  const int32_t* wp, int64_t j0, int64_t j1, int64_t C, __m256i* O) {
  const int64_t cc = kC > 0 ? kC : C;
  const __m256i half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  for (int64_t j = j0; j < j1; ++j) {
    const __m256i* s = B + (start[j] - xlo) * cc;
    const int32_t* w = wp + j * ksize;
    const int64_t cnt = count[j];
    if constexpr (kC == 3) {
      // Written out in assembly: GCC keeps the sums of the intrinsics loop in two registers
      // each and copies them every step, which costs about a third of this loop's speed.
      __m256i a0 = half, a1 = half, a2 = half, wv, m;
      const __m256i* p = s;
      const int32_t* wk = w;
      if (cnt > 0) {
        const __m256i* const end = s + 3 * cnt;
        __asm__(
            "1:\n\t"
            "vpbroadcastd (%[w]), %[wv]\n\t"
            "vpmaddwd (%[p]), %[wv], %[m]\n\t"
            "vpaddd %[m], %[a0], %[a0]\n\t"
            "vpmaddwd 32(%[p]), %[wv], %[m]\n\t"
            "vpaddd %[m], %[a1], %[a1]\n\t"
            "vpmaddwd 64(%[p]), %[wv], %[m]\n\t"
            "vpaddd %[m], %[a2], %[a2]\n\t"
            "add $4, %[w]\n\t"
            "add $96, %[p]\n\t"
            "cmp %[p], %[end]\n\t"
            "jne 1b"
            : [p] "+r"(p), [w] "+r"(wk), [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [wv] "=&x"(wv), [m] "=&x"(m)
            : [end] "r"(end)
            : "cc", "memory");
      }
      O[j * 3 + 0] = _mm256_srai_epi32(a0, kPrecisionBits);
      O[j * 3 + 1] = _mm256_srai_epi32(a1, kPrecisionBits);
      O[j * 3 + 2] = _mm256_srai_epi32(a2, kPrecisionBits);
    } else if constexpr (kC > 0) {
      // Two taps per step into two sets of sums (more independent additions in flight).
      __m256i acc[kC], acc2[kC];
      for (int c = 0; c < kC; ++c) acc[c] = half, acc2[c] = _mm256_setzero_si256();
      int64_t k = 0;
      for (; k + 2 <= cnt; k += 2) {
        const __m256i w0 = _mm256_set1_epi32(w[k]), w1 = _mm256_set1_epi32(w[k + 1]);
        for (int c = 0; c < kC; ++c) {
          acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(s[k * kC + c], w0));
          acc2[c] = _mm256_add_epi32(acc2[c], _mm256_madd_epi16(s[(k + 1) * kC + c], w1));
        }
      }
      if (k < cnt) {
        const __m256i w0 = _mm256_set1_epi32(w[k]);
        for (int c = 0; c < kC; ++c) acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(s[k * kC + c], w0));
      }
      for (int c = 0; c < kC; ++c) O[j * kC + c] = _mm256_srai_epi32(_mm256_add_epi32(acc[c], acc2[c]), kPrecisionBits);
    } else {
      for (int64_t c = 0; c < cc; ++c) {
        __m256i acc = half;
        for (int64_t k = 0; k < cnt; ++k)
          acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s[k * cc + c], _mm256_set1_epi32(w[k])));
        O[j * cc + c] = _mm256_srai_epi32(acc, kPrecisionBits);
      }
    }
  }
}

// Vertical pass of one output row on pmaddwd: taps in pairs (k, k + 1) with the values of the
// two rows interleaved as int16 pairs, one sum over the high parts of the weights and one over
// the low parts: 128 sum(v (w >> 7)) + sum(v (w & 127)) = sum(v w), exactly; then Pillow's
// rounding and clamping. wh, wl: the (cnt + 1) / 2 pairs of taps (paired_taps in image.cpp);
// w: the plain weights (for the values after the last multiple of 32).
inline void vpass_row_madd(const uint8_t* const* rows, const int32_t* wh, const int32_t* wl, const int32_t* w,
                           int64_t cnt, int64_t len, uint8_t* out) {
  const int64_t np = (cnt + 1) / 2;
  const __m256i zero = _mm256_setzero_si256(), half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m256i h[4], l[4];
    for (int q = 0; q < 4; ++q) h[q] = l[q] = zero;
    for (int64_t p = 0; p < np; ++p) {
      const uint8_t* ra = rows[2 * p];
      const uint8_t* rb = 2 * p + 1 < cnt ? rows[2 * p + 1] : ra;
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra + i));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + i));
      const __m256i ab_lo = _mm256_unpacklo_epi8(a, b), ab_hi = _mm256_unpackhi_epi8(a, b);
      // Values 0-3 | 16-19, 4-7 | 20-23, 8-11 | 24-27, 12-15 | 28-31 (per 128-bit half).
      const __m256i v[4] = {_mm256_unpacklo_epi8(ab_lo, zero), _mm256_unpackhi_epi8(ab_lo, zero),
                            _mm256_unpacklo_epi8(ab_hi, zero), _mm256_unpackhi_epi8(ab_hi, zero)};
      const __m256i ph = _mm256_set1_epi32(wh[p]), pl = _mm256_set1_epi32(wl[p]);
      for (int q = 0; q < 4; ++q) {
        h[q] = _mm256_add_epi32(h[q], _mm256_madd_epi16(v[q], ph));
        l[q] = _mm256_add_epi32(l[q], _mm256_madd_epi16(v[q], pl));
      }
    }
    __m256i r[4];
    for (int q = 0; q < 4; ++q)
      r[q] =
          _mm256_srai_epi32(_mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(h[q], 7), l[q]), half), kPrecisionBits);
    // The packs undo the unpacks' order within each half; saturation is the clamp to 0..255.
    const __m256i x = _mm256_packs_epi32(r[0], r[1]), y = _mm256_packs_epi32(r[2], r[3]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_packus_epi16(x, y));
  }
  for (; i < len; ++i) {
    int32_t acc = 1 << (kPrecisionBits - 1);
    for (int64_t k = 0; k < cnt; ++k) acc += static_cast<int32_t>(rows[k][i]) * w[k];
    out[i] = static_cast<uint8_t>(std::clamp(acc >> kPrecisionBits, 0, 255));
  }
}

// Rescale + normalize of one row of nx RGB pixels into the three planes d[0..2]:
// (v * scale - mean[c]) / std[c] with the same float32 operations as the table of
// preprocess_u8, so the same numbers. Returns the pixels done (a multiple of 8).
inline int64_t normalize_row_rgb(const uint8_t* row, int64_t nx, const NormalizeSpec& norm, float* const* d) {
  __m128i lo_idx[3], hi_idx[3];
  for (int c = 0; c < 3; ++c) {
    alignas(16) int8_t lo[16], hi[16];
    for (int p = 0; p < 16; ++p) {
      const int b = 3 * p + c;  // byte of pixel p (p < 8), channel c
      lo[p] = static_cast<int8_t>(p < 8 && b < 16 ? b : -1);
      hi[p] = static_cast<int8_t>(p < 8 && b >= 16 ? b - 16 : -1);
    }
    lo_idx[c] = _mm_load_si128(reinterpret_cast<const __m128i*>(lo));
    hi_idx[c] = _mm_load_si128(reinterpret_cast<const __m128i*>(hi));
  }
  const __m256 scale = _mm256_set1_ps(norm.scale);
  int64_t x = 0;
  for (; x + 8 <= nx; x += 8) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 3 * x));
    const __m128i hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 3 * x + 16));
    for (int c = 0; c < 3; ++c) {
      const __m128i v = _mm_or_si128(_mm_shuffle_epi8(lo, lo_idx[c]), _mm_shuffle_epi8(hi, hi_idx[c]));
      const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
      const __m256 y = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(f, scale), _mm256_set1_ps(norm.mean[c])),
                                     _mm256_set1_ps(norm.std[c]));
      _mm256_storeu_ps(d[c] + x, y);
    }
  }
  return x;
}

}  // namespace image_madd
}  // namespace MMCORE_TARGET
}  // namespace mmcore
#endif
