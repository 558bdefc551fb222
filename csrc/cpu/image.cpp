// Image kernels on the CPU: Pillow-convention resize, normalize, patchify and the fused
// preprocess (resize + center crop + rescale + normalize [+ patchify] in one pass).
//
// Compiled once per instruction-set target (see attention.cpp); the inner loops are written so
// that the compiler vectorizes them for the target (the vertical pass runs along a whole row).
// With AVX2 the uint8 passes and the normalize run on the intrinsics of image_madd.h instead.
//
// Resize follows Pillow's two-pass scheme: weights per output pixel from the filter, widened by
// the scale when downscaling with antialiasing and normalized to sum 1; uint8 images go through
// a horizontal pass into a uint8 intermediate and then a vertical pass, both in 22-bit fixed
// point with rounding and clamping. Only the rows and columns a crop needs are computed.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mmcore/image.h"
#include "mmcore/image_madd.h"
#include "mmcore/parallel.h"
#include "mmcore/resample_filters.h"
#include "mmcore/simd.h"
#include "mmcore/size_error.h"

#ifndef MMCORE_TARGET
#error "MMCORE_TARGET must name the instruction-set target of this translation unit"
#endif

namespace mmcore {
namespace MMCORE_TARGET {

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;
#if defined(__AVX2__)
using namespace image_madd;
static_assert(image_madd::kPrecisionBits == kPrecisionBits);
#endif

// Memory budgets of the scratch a resize needs beyond its input and output: the filter tables
// of one axis (n * ksize weights) and the transposed row segment of the horizontal uint8 pass.
// A resize that needs more (an antialiased downscale of an axis of hundreds of millions of
// pixels to a few) raises SizeError instead of exhausting memory.
constexpr double kMaxTapBytes = 1024.0 * 1024.0 * 1024.0;
constexpr double kMaxBandBytes = 1024.0 * 1024.0 * 1024.0;
// Values of a row the horizontal uint8 pass transposes at once (outputs are taken in groups
// whose taps fit; rows up to this many values go in one piece, as before).
constexpr int64_t kSegment = int64_t{1} << 16;
// Pillow's nearest filter walks the source coordinate by repeated addition; beyond Pillow's
// int32 sizes the coordinate is computed directly, (i + 0.5) * scale, instead of walking there.
constexpr int64_t kNearestWalk = int64_t{1} << 31;

// Taps of output indices [o0, o0 + n) of a resize from in_size to out_size along one axis.
// Sizes and indices are 64-bit: an axis may exceed 2^31 pixels.
struct Taps {
  int64_t ksize = 0;
  std::vector<int64_t> start, count;  // per output index
  std::vector<int32_t> wi;            // fixed point, n * ksize
  std::vector<float> wf;              // float, n * ksize
};

// Most taps per output a resize builds tables for; wider kernels (an antialiased ratio of about
// 2^29 and more) raise SizeError before the count is converted to an integer.
constexpr double kMaxTaps = 2147483648.0;
// Memory budget of the intermediate image between the two passes of a band of output rows
// (the vertical-first order runs its outputs in bands that fit).
constexpr double kMaxInterBytes = 64.0 * 1024.0 * 1024.0;

// Taps per output of a resize from in_size to out_size, as a double (exact below 2^53).
double taps_ksize_d(int64_t in_size, int64_t out_size, ResizeFilter f, bool antialias) {
  if (f == ResizeFilter::nearest) return 1.0;
  double filterscale = static_cast<double>(in_size) / static_cast<double>(out_size);
  if (filterscale < 1.0 || !antialias) filterscale = 1.0;
  return std::ceil(resample::support(f) * filterscale) * 2.0 + 1.0;
}

std::string too_many_taps(int64_t in_size, int64_t out_size, const char* axis, bool aa, double ks) {
  char taps[32];
  std::snprintf(taps, sizeof(taps), "%.3g", ks);
  return "resizing " + std::to_string(in_size) + " " + axis + " to " + std::to_string(out_size) +
         (aa ? " with antialiasing" : "") + " needs " + taps + " taps per output (limit 2^31); " +
         "resize in several smaller steps, or pass antialias=False or filter='nearest'";
}

// Taps per output of a resize from in_size to out_size (the table width of make_taps).
int64_t taps_ksize(int64_t in_size, int64_t out_size, ResizeFilter f, bool antialias) {
  const double ks = taps_ksize_d(in_size, out_size, f, antialias);
  if (!(ks <= kMaxTaps)) throw SizeError(too_many_taps(in_size, out_size, "pixels", antialias, ks));
  return static_cast<int64_t>(ks);
}

// Throws SizeError when the scratch of resizing (H, W, C) to (RH, RW), computing n_rows x
// n_cols outputs, exceeds the budgets above.
void check_resize_scratch(int64_t H, int64_t W, int64_t C, int64_t RH, int64_t RW, int64_t n_rows, int64_t n_cols,
                          ResizeFilter f, bool aa, bool u8) {
  const char* axes[2] = {"rows", "columns"};
  const int64_t in[2] = {H, W}, out[2] = {RH, RW}, n[2] = {n_rows, n_cols};
  for (int a = 0; a < 2; ++a) {
    if (in[a] == out[a] && f != ResizeFilter::nearest) continue;
    // In double: the table of a kernel of 2^31 taps and more is over the budget anyway, and
    // the integer count of ~1e19 taps would overflow.
    const double ks = taps_ksize_d(in[a], out[a], f, aa);
    const double table = ks * static_cast<double>(n[a]) * (sizeof(int32_t) + sizeof(float));
    const double band = a == 1 && u8 ? ks * static_cast<double>(C) * sizeof(simd::vi) : 0.0;
    if (table > kMaxTapBytes || band > kMaxBandBytes) {
      throw SizeError("resizing " + std::to_string(in[a]) + " " + axes[a] + " to " + std::to_string(out[a]) +
                      (aa ? " with antialiasing" : "") + " needs " + bytes_str(std::max(table, band)) +
                      " of filter tables (limit " + bytes_str(kMaxTapBytes) +
                      "); resize in several smaller steps, or pass antialias=False or filter='nearest'");
    }
  }
}

Taps make_taps(int64_t in_size, int64_t out_size, int64_t o0, int64_t n, ResizeFilter f, bool antialias) {
  Taps t;
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  t.start.resize(n);
  t.count.resize(n);
  if (f == ResizeFilter::nearest) {
    t.ksize = 1;
    t.wi.assign(n, 1 << kPrecisionBits);
    t.wf.assign(n, 1.0f);
    // Pillow's nearest resize walks the source coordinate by repeated addition from 0.5 * scale
    // (not (i + 0.5) * scale), which decides the ties; do the same within Pillow's sizes.
    // The choice depends on the output size only, never on the window [o0, o0 + n).
    const bool walk = out_size <= kNearestWalk;
    double xo = 0.5 * scale;
    for (int64_t i = walk ? 0 : o0; i < o0 + n; ++i, xo += scale) {
      if (i < o0) continue;
      const double x = walk ? xo : (static_cast<double>(i) + 0.5) * scale;
      const int64_t src = x < 0.0 ? 0 : (x >= static_cast<double>(in_size) ? in_size - 1 : static_cast<int64_t>(x));
      t.start[i - o0] = std::min<int64_t>(src, in_size - 1);
      t.count[i - o0] = 1;
    }
    return t;
  }
  double filterscale = scale;
  if (filterscale < 1.0 || !antialias) filterscale = 1.0;
  const double support = resample::support(f) * filterscale;
  t.ksize = taps_ksize(in_size, out_size, f, antialias);
  t.wi.assign(n * t.ksize, 0);
  t.wf.assign(n * t.ksize, 0.0f);
  std::vector<double> k(t.ksize);
  const double ss = 1.0 / filterscale;
  for (int64_t i = 0; i < n; ++i) {
    const double center = (static_cast<double>(o0 + i) + 0.5) * scale;
    int64_t xmin = static_cast<int64_t>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int64_t xmax = static_cast<int64_t>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    if (xmax > t.ksize) xmax = t.ksize;
    double ww = 0.0;
    for (int64_t x = 0; x < xmax; ++x) {
      const double w = resample::weight(f, (static_cast<double>(x + xmin) - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int64_t x = 0; x < xmax; ++x) {
      const double w = ww != 0.0 ? k[x] / ww : 0.0;
      t.wf[i * t.ksize + x] = static_cast<float>(w);
      const double fx = w * static_cast<double>(1 << kPrecisionBits);
      t.wi[i * t.ksize + x] = static_cast<int32_t>(w < 0 ? -0.5 + fx : 0.5 + fx);
    }
    t.start[i] = xmin;
    t.count[i] = std::max<int64_t>(xmax, 0);
  }
  return t;
}

template <class T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

using simd::kWidth;
using simd::vf;
using simd::vi;
typedef uint8_t vu8 __attribute__((vector_size(kWidth)));

inline vi load_u8(const uint8_t* p) {
  vu8 b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, vi);
}
inline void store_u8(uint8_t* p, vi v) {
  const vu8 b = __builtin_convertvector(v, vu8);
  std::memcpy(p, &b, sizeof(b));
}
inline void transpose_i32(vi* r) { simd::transpose(reinterpret_cast<vf*>(r)); }

// Horizontal pass of kWidth rows at once (rows on the SIMD lanes): the band is transposed so
// that one value of every row sits in one vector, the taps become broadcast multiply-adds with
// exactly Pillow's fixed-point arithmetic, and the result is transposed back.
// Outputs are taken in groups whose taps span at most kSegment values of a row (or one output),
// so the transposed segment stays bounded however wide the row is.
// Rows y0 .. y0 + nr - 1 of src (nr <= kWidth) -> out rows 0 .. nr - 1 (out_stride apart).
void hpass_band_u8(const ImageView<const uint8_t>& src, int64_t y0, int nr, const Taps& t, int64_t n, uint8_t* out,
                   int64_t out_stride, std::vector<vi>& bbuf, std::vector<vi>& obuf) {
  const int64_t C = src.C;
  vi* O = grow(obuf, static_cast<size_t>(n * C));
  const uint8_t* rows[kWidth];
  for (int l = 0; l < kWidth; ++l) rows[l] = src.data + (y0 + std::min(l, nr - 1)) * src.stride;
  const vi half = vi{} + (1 << (kPrecisionBits - 1));
  const vi zero = vi{}, top = vi{} + 255;
  for (int64_t j0 = 0, j1 = 0; j0 < n; j0 = j1) {
    // Outputs [j0, j1) read columns [xlo, xhi).
    int64_t xlo = t.start[j0], xhi = t.start[j0] + t.count[j0];
    for (j1 = j0 + 1; j1 < n; ++j1) {
      const int64_t lo = std::min(xlo, t.start[j1]), hi = std::max(xhi, t.start[j1] + t.count[j1]);
      if ((hi - lo) * C > kSegment) break;
      xlo = lo;
      xhi = hi;
    }
    const int64_t seg = (xhi - xlo) * C;  // values per row the taps read
    vi* B = grow(bbuf, static_cast<size_t>(seg));
    const uint8_t* rowp[kWidth];
    for (int l = 0; l < kWidth; ++l) rowp[l] = rows[l] + xlo * C;
    int64_t i = 0;
    for (; i + kWidth <= seg; i += kWidth) {
      vi tile[kWidth];
      for (int l = 0; l < kWidth; ++l) tile[l] = load_u8(rowp[l] + i);
      transpose_i32(tile);
      for (int l = 0; l < kWidth; ++l) B[i + l] = tile[l];
    }
    for (; i < seg; ++i)
      for (int l = 0; l < kWidth; ++l) B[i][l] = rowp[l][i];
    for (int64_t j = j0; j < j1; ++j) {
      const vi* src_j = B + (t.start[j] - xlo) * C;
      const int32_t* w = t.wi.data() + j * t.ksize;
      const int64_t cnt = t.count[j];
      for (int64_t c = 0; c < C; ++c) {
        vi acc = half;
        for (int64_t k = 0; k < cnt; ++k) acc += src_j[k * C + c] * w[k];
        acc >>= kPrecisionBits;
        acc = acc < zero ? zero : acc;
        acc = acc > top ? top : acc;
        O[j * C + c] = acc;
      }
    }
  }
  const int64_t olen = n * C;
  int64_t o = 0;
  for (; o + kWidth <= olen; o += kWidth) {
    vi tile[kWidth];
    for (int l = 0; l < kWidth; ++l) tile[l] = O[o + l];
    transpose_i32(tile);
    for (int l = 0; l < nr; ++l) store_u8(out + l * out_stride + o, tile[l]);
  }
  for (; o < olen; ++o)
    for (int l = 0; l < nr; ++l) out[l * out_stride + o] = static_cast<uint8_t>(O[o][l]);
}

#if defined(__AVX2__)
// The uint8 passes on pmaddwd (image_madd.h): the same sums as hpass_band_u8 and vpass_row_u8.
// Their weight tables add 4 bytes per tap to the budgeted ones; beyond this many taps (64 MB of
// them) the passes above run instead, so the budget of check_resize_scratch still holds.
constexpr size_t kMaxMaddTaps = size_t{1} << 24;

// Weights of t packed for the pmaddwd pass, (w & 127) | (w >> 7) << 16; false (and wp left
// empty) when a weight lies outside [-2^22, 2^22) (a tap of weight 1, as the nearest filter
// or an upscale landing on a source pixel has).
bool packed_taps(const Taps& t, std::vector<int32_t>* wp) {
  wp->clear();
  if (t.wi.size() > kMaxMaddTaps) return false;
  for (const int32_t w : t.wi)
    if (w < -(1 << kPrecisionBits) || w >= (1 << kPrecisionBits)) return false;
  wp->resize(t.wi.size());
  for (size_t i = 0; i < t.wi.size(); ++i) {
    const int32_t w = t.wi[i];
    (*wp)[i] = static_cast<int32_t>(static_cast<uint32_t>(w & 127) | (static_cast<uint32_t>(w >> 7) << 16));
  }
  return true;
}

// hpass_band_u8 on pmaddwd: rows y0 .. y0 + nr - 1 of src (nr <= 8) -> out rows 0 .. nr - 1.
void hpass_band_madd(const ImageView<const uint8_t>& src, int64_t y0, int nr, const Taps& t, const int32_t* wp,
                     int64_t n, uint8_t* out, int64_t out_stride, std::vector<vi>& bbuf, std::vector<vi>& obuf) {
  const int64_t C = src.C;
  __m256i* O = reinterpret_cast<__m256i*>(grow(obuf, static_cast<size_t>(n * C)));
  const uint8_t* rows[8];
  for (int l = 0; l < 8; ++l) rows[l] = src.data + (y0 + std::min(l, nr - 1)) * src.stride;
  for (int64_t j0 = 0, j1 = 0; j0 < n; j0 = j1) {
    int64_t xlo = t.start[j0], xhi = t.start[j0] + t.count[j0];
    for (j1 = j0 + 1; j1 < n; ++j1) {
      const int64_t lo = std::min(xlo, t.start[j1]), hi = std::max(xhi, t.start[j1] + t.count[j1]);
      if ((hi - lo) * C > kMaddSegment) break;
      xlo = lo;
      xhi = hi;
    }
    const int64_t seg = (xhi - xlo) * C;
    __m256i* B = reinterpret_cast<__m256i*>(grow(bbuf, static_cast<size_t>(seg)));
    const uint8_t* rowp[8];
    for (int l = 0; l < 8; ++l) rowp[l] = rows[l] + xlo * C;
    int64_t i = 0;
    for (; i + 16 <= seg; i += 16) transpose16_u8(rowp, i, B + i);
    for (; i < seg; ++i) {
      alignas(16) uint8_t col[16] = {};
      for (int l = 0; l < 8; ++l) col[l] = rowp[l][i];
      B[i] = pair_lanes(_mm_load_si128(reinterpret_cast<const __m128i*>(col)));
    }
    switch (C) {
      case 1: madd_outputs<1>(B, xlo, t.start.data(), t.count.data(), t.ksize, wp, j0, j1, C, O); break;
      case 3: madd_outputs<3>(B, xlo, t.start.data(), t.count.data(), t.ksize, wp, j0, j1, C, O); break;
      case 4: madd_outputs<4>(B, xlo, t.start.data(), t.count.data(), t.ksize, wp, j0, j1, C, O); break;
      default: madd_outputs<0>(B, xlo, t.start.data(), t.count.data(), t.ksize, wp, j0, j1, C, O);
    }
  }
  const int64_t olen = n * C;
  int64_t o = 0;
  for (; o + 8 <= olen; o += 8) store8_u8(O + o, nr, out + o, out_stride);
  for (; o < olen; ++o) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), O[o]);
    for (int l = 0; l < nr; ++l) out[l * out_stride + o] = static_cast<uint8_t>(std::clamp(lanes[l], 0, 255));
  }
}

// Weights of t as pmaddwd pairs of taps (k, k + 1) for the vertical pass: per output,
// (cnt + 1) / 2 pairs of the high parts w >> 7 into wh and of the low parts w & 127 into wl
// (a missing second tap weighs 0); false when a weight lies outside [-2^22, 2^22).
bool paired_taps(const Taps& t, std::vector<int32_t>* wh, std::vector<int32_t>* wl) {
  if (t.wi.size() > kMaxMaddTaps) return false;
  for (const int32_t w : t.wi)
    if (w < -(1 << kPrecisionBits) || w >= (1 << kPrecisionBits)) return false;
  const int64_t n = static_cast<int64_t>(t.count.size()), np = (t.ksize + 1) / 2;
  wh->assign(static_cast<size_t>(n * np), 0);
  wl->assign(static_cast<size_t>(n * np), 0);
  auto pair = [](int32_t a, int32_t b) {
    return static_cast<int32_t>((static_cast<uint32_t>(a) & 0xffffu) | (static_cast<uint32_t>(b) << 16));
  };
  for (int64_t j = 0; j < n; ++j)
    for (int64_t k = 0; k < t.count[j]; k += 2) {
      const int32_t a = t.wi[j * t.ksize + k], b = k + 1 < t.count[j] ? t.wi[j * t.ksize + k + 1] : 0;
      (*wh)[j * np + k / 2] = pair(a >> 7, b >> 7);
      (*wl)[j * np + k / 2] = pair(a & 127, b & 127);
    }
  return true;
}

#endif

void hpass_row_f32(const float* in, const Taps& t, int64_t n, int64_t C, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float* src = in + t.start[j] * C;
    const float* w = t.wf.data() + j * t.ksize;
    const int64_t cnt = t.count[j];
    for (int64_t c = 0; c < C; ++c) {
      float acc = 0.0f;
      for (int64_t x = 0; x < cnt; ++x) acc += src[x * C + c] * w[x];
      out[j * C + c] = acc;
    }
  }
}

// Vertical pass of one output row over a row of `len` interleaved values: rows[k] points at
// the k-th input row of the taps.
void vpass_row_u8(const uint8_t* const* rows, const int32_t* w, int64_t cnt, int64_t len, int32_t* acc, uint8_t* out) {
  for (int64_t i = 0; i < len; ++i) acc[i] = 1 << (kPrecisionBits - 1);
  for (int64_t k = 0; k < cnt; ++k) {
    const uint8_t* r = rows[k];
    const int32_t wk = w[k];
    for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<int32_t>(r[i]) * wk;
  }
  for (int64_t i = 0; i < len; ++i) out[i] = clip8(acc[i]);
}

void vpass_row_f32(const float* const* rows, const float* w, int64_t cnt, int64_t len, float* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = 0.0f;
  for (int64_t k = 0; k < cnt; ++k) {
    const float* r = rows[k];
    const float wk = w[k];
    for (int64_t i = 0; i < len; ++i) out[i] += r[i] * wk;
  }
}

// Rows [r0, r1) of the intermediate the vertical taps need.
void needed_rows(const Taps& v, int64_t* r0, int64_t* r1) {
  int64_t lo = INT64_MAX, hi = 0;
  for (size_t i = 0; i < v.start.size(); ++i) {
    if (v.count[i] == 0) continue;
    lo = std::min<int64_t>(lo, v.start[i]);
    hi = std::max<int64_t>(hi, v.start[i] + v.count[i]);
  }
  if (lo > hi) lo = hi = 0;
  *r0 = lo;
  *r1 = hi;
}

struct Scratch {
  std::vector<uint8_t> tmp8;
  std::vector<float> tmpf, rowf;
  std::vector<int32_t> acc;
  std::vector<uint8_t> row8;
  std::vector<vi> band_in, band_out;
  static Scratch& get() {
    thread_local Scratch sc;
    return sc;
  }
};

// True when every output copies one input value (the nearest filter: one tap of weight 1,
// and Pillow's (v * 2^22 + 2^21) >> 22 is v).
bool copy_taps(const Taps& t) {
  if (t.ksize != 1) return false;
  for (size_t i = 0; i < t.count.size(); ++i)
    if (t.count[i] != 1 || t.wi[i] != (1 << kPrecisionBits)) return false;
  return true;
}

// Horizontal pass of rows [row0, row0 + nrows) of `in` with taps th (columns relative to in),
// n outputs per row, into out (rows out_stride apart).
template <class T>
void hpass_rows(const ImageView<const T>& in, int64_t row0, int64_t nrows, const Taps& th, int64_t n, T* out,
                int64_t out_stride, int threads) {
  if (nrows <= 0) return;
  if constexpr (std::is_same<T, uint8_t>::value) {
    if (copy_taps(th)) {
      const int64_t C = in.C, band = std::max<int64_t>(8, nrows / (4 * std::max(threads, 1)) + 1);
      parallel_for((nrows + band - 1) / band, threads, [&](int64_t b, int) {
        for (int64_t y = b * band; y < std::min(nrows, (b + 1) * band); ++y) {
          const uint8_t* r = in.data + (row0 + y) * in.stride;
          uint8_t* o = out + y * out_stride;
          for (int64_t j = 0; j < n; ++j)
            for (int64_t c = 0; c < C; ++c) o[j * C + c] = r[th.start[j] * C + c];
        }
      });
      return;
    }
#if defined(__AVX2__)
    std::vector<int32_t> wp;
    if (packed_taps(th, &wp)) {  // bands of 8 rows (one AVX2 vector), also for the AVX-512 target
      parallel_for((nrows + 7) / 8, threads, [&](int64_t b, int) {
        Scratch& sc = Scratch::get();
        const int nr = static_cast<int>(std::min<int64_t>(8, nrows - b * 8));
        hpass_band_madd(in, row0 + b * 8, nr, th, wp.data(), n, out + b * 8 * out_stride, out_stride, sc.band_in,
                        sc.band_out);
      });
      return;
    }
#endif
    parallel_for((nrows + kWidth - 1) / kWidth, threads, [&](int64_t b, int) {
      Scratch& sc = Scratch::get();
      const int nr = static_cast<int>(std::min<int64_t>(kWidth, nrows - b * kWidth));
      hpass_band_u8(in, row0 + b * kWidth, nr, th, n, out + b * kWidth * out_stride, out_stride, sc.band_in,
                    sc.band_out);
    });
  } else {
    const int64_t band = std::max<int64_t>(8, nrows / (4 * std::max(threads, 1)) + 1);
    parallel_for((nrows + band - 1) / band, threads, [&](int64_t b, int) {
      for (int64_t y = b * band; y < std::min(nrows, (b + 1) * band); ++y)
        hpass_row_f32(in.data + (row0 + y) * in.stride, th, n, in.C, out + y * out_stride);
    });
  }
}

// Vertical pass: output row i (< ny) = taps tv[i] over rows of `in` (tap rows are shifted by
// -in_row0), values [v0, v0 + len) of each row, into out (rows out_stride apart).
template <class T>
void vpass_rows(const T* in, int64_t in_stride, int64_t in_row0, const Taps& tv, int64_t ny, int64_t v0, int64_t len,
                T* out, int64_t out_stride, int threads) {
  if (ny <= 0) return;
  const int64_t band = std::max<int64_t>(4, ny / (4 * std::max(threads, 1)) + 1);
  if (std::is_same<T, uint8_t>::value && copy_taps(tv)) {
    parallel_for((ny + band - 1) / band, threads, [&](int64_t b, int) {
      for (int64_t y = b * band; y < std::min(ny, (b + 1) * band); ++y)
        std::memcpy(out + y * out_stride, in + (tv.start[y] - in_row0) * in_stride + v0, sizeof(T) * len);
    });
    return;
  }
  [[maybe_unused]] bool madd = false;
  std::vector<int32_t> wh, wl;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, uint8_t>::value) madd = paired_taps(tv, &wh, &wl);
#endif
  parallel_for((ny + band - 1) / band, threads, [&](int64_t b, int) {
    Scratch& sc = Scratch::get();
    std::vector<const T*> rows(static_cast<size_t>(tv.ksize));
    for (int64_t y = b * band; y < std::min(ny, (b + 1) * band); ++y) {
      const int64_t cnt = tv.count[y];
      for (int64_t k = 0; k < cnt; ++k) rows[k] = in + (tv.start[y] + k - in_row0) * in_stride + v0;
      if constexpr (std::is_same<T, uint8_t>::value) {
#if defined(__AVX2__)
        if (madd) {
          const int64_t np = (tv.ksize + 1) / 2;
          vpass_row_madd(rows.data(), wh.data() + y * np, wl.data() + y * np, tv.wi.data() + y * tv.ksize, cnt, len,
                         out + y * out_stride);
          continue;
        }
#endif
        int32_t* acc = grow(sc.acc, static_cast<size_t>(len));
        vpass_row_u8(rows.data(), tv.wi.data() + y * tv.ksize, cnt, len, acc, out + y * out_stride);
      } else {
        vpass_row_f32(rows.data(), tv.wf.data() + y * tv.ksize, cnt, len, out + y * out_stride);
      }
    }
  });
}

// Columns [lo, hi) of the input that taps t read.
void tap_span(const Taps& t, int64_t* lo, int64_t* hi) { needed_rows(t, lo, hi); }

Taps shifted(Taps t, int64_t by) {
  for (auto& s0 : t.start) s0 -= by;
  return t;
}

// Rows [ya, ya + ny) x columns [xa, xa + nx) of src resized to (RH, RW) with Pillow's passes,
// into out (rows out_stride elements apart). Pillow 13 and later run the vertical pass first
// when the height shrinks much more than the width (RH < H and H - RH > 2 (W - RW)); earlier
// versions always start with the horizontal pass. This follows the newer order.
template <class T>
void resize_region(const ImageView<const T>& src, int64_t RH, int64_t RW, int64_t ya, int64_t ny, int64_t xa,
                   int64_t nx, ResizeFilter f, bool aa, T* out, int64_t out_stride, int threads) {
  const int64_t C = src.C;
  if (ny <= 0 || nx <= 0) return;
  const bool need_h = RW != src.W || f == ResizeFilter::nearest;
  const bool need_v = RH != src.H || f == ResizeFilter::nearest;
  const Taps th = need_h ? make_taps(src.W, RW, xa, nx, f, aa) : Taps{};
  const Taps tv = need_v ? make_taps(src.H, RH, ya, ny, f, aa) : Taps{};
  if (!need_h && !need_v) {
    for (int64_t y = 0; y < ny; ++y)
      std::memcpy(out + y * out_stride, src.data + (ya + y) * src.stride + xa * C, sizeof(T) * nx * C);
    return;
  }
  if (!need_v) {
    hpass_rows(src, ya, ny, th, nx, out, out_stride, threads);
    return;
  }
  if (!need_h) {
    vpass_rows(src.data, src.stride, 0, tv, ny, xa * C, nx * C, out, out_stride, threads);
    return;
  }
  const bool vertical_first = RH < src.H && (src.H - RH) > 2 * (src.W - RW);
  std::vector<T> inter;
  if (!vertical_first) {
    int64_t r0, r1;
    needed_rows(tv, &r0, &r1);
    const int64_t rowlen = nx * C;
    if (src.stride == 0) {
      // One row repeated (a broadcast view): the horizontal pass of that row stands for all
      // r1 - r0 rows, and the vertical pass reads it with stride 0, which gives the same
      // numbers without an intermediate of the whole (possibly huge) source height.
      inter.resize(static_cast<size_t>(rowlen));
      hpass_rows(src, r0, 1, th, nx, inter.data(), rowlen, threads);
      vpass_rows(inter.data(), int64_t{0}, r0, tv, ny, 0, rowlen, out, out_stride, threads);
      return;
    }
    inter.resize(static_cast<size_t>((r1 - r0) * rowlen));
    hpass_rows(src, r0, r1 - r0, th, nx, inter.data(), rowlen, threads);
    vpass_rows(inter.data(), rowlen, r0, tv, ny, 0, rowlen, out, out_stride, threads);
  } else {
    int64_t c0, c1;
    tap_span(th, &c0, &c1);
    const int64_t rowlen = (c1 - c0) * C;
    const Taps ths = shifted(th, c0);
    // Output rows in bands whose intermediate (band x rowlen) fits kMaxInterBytes: the
    // vertical pass of a band of outputs does not depend on the other bands.
    const double row_bytes = static_cast<double>(rowlen) * sizeof(T);
    const int64_t band =
        std::max<int64_t>(1, static_cast<int64_t>(std::min(static_cast<double>(ny), kMaxInterBytes / row_bytes)));
    inter.resize(static_cast<size_t>(band * rowlen));
    for (int64_t y0 = 0; y0 < ny; y0 += band) {
      const int64_t nb = std::min(band, ny - y0);
      Taps tb;
      tb.ksize = tv.ksize;
      tb.start.assign(tv.start.begin() + y0, tv.start.begin() + y0 + nb);
      tb.count.assign(tv.count.begin() + y0, tv.count.begin() + y0 + nb);
      if (!tv.wi.empty()) tb.wi.assign(tv.wi.begin() + y0 * tv.ksize, tv.wi.begin() + (y0 + nb) * tv.ksize);
      if (!tv.wf.empty()) tb.wf.assign(tv.wf.begin() + y0 * tv.ksize, tv.wf.begin() + (y0 + nb) * tv.ksize);
      vpass_rows(src.data, src.stride, 0, tb, nb, c0 * C, rowlen, inter.data(), rowlen, threads);
      ImageView<const T> mid;
      mid.data = inter.data();
      mid.H = nb;
      mid.W = c1 - c0;
      mid.C = C;
      mid.stride = rowlen;
      hpass_rows(mid, 0, nb, ths, nx, out + y0 * out_stride, out_stride, threads);
    }
  }
}

template <class T>
void resize_one(const ImageView<const T>& src, const ImageView<T>& dst, ResizeFilter f, bool aa, int threads) {
  resize_region(src, dst.H, dst.W, 0, dst.H, 0, dst.W, f, aa, dst.data, dst.stride, threads);
}

// The fused preprocess of one image into out (C, crop_h, crop_w) or patches.
void preprocess_one(const ImageView<const uint8_t>& src, const int64_t* geom, int64_t crop_h, int64_t crop_w,
                    ResizeFilter f, bool aa, const float* lut, const NormalizeSpec& norm, float* out, int threads) {
  const int64_t C = src.C, patch = norm.patch;
  const int64_t RH = geom[0], RW = geom[1], top = geom[2], left = geom[3];
  // The part of the crop window that lies inside the resized image.
  const int64_t ya = std::max<int64_t>(top, 0), yb = std::min<int64_t>(top + crop_h, RH);
  const int64_t xa = std::max<int64_t>(left, 0), xb = std::min<int64_t>(left + crop_w, RW);
  const int64_t plane = crop_h * crop_w;
  auto index = [&](int64_t y, int64_t x, int64_t c) -> int64_t {  // y, x within the crop
    if (patch == 0) return c * plane + y * crop_w + x;
    const int64_t gw = crop_w / patch;
    const int64_t pi = (y / patch) * gw + x / patch;
    return pi * (C * patch * patch) + c * patch * patch + (y % patch) * patch + (x % patch);
  };
  // Zero pixels (normalized) wherever the crop falls outside the resized image.
  if (ya > top || yb < top + crop_h || xa > left || xb < left + crop_w) {
    for (int64_t y = 0; y < crop_h; ++y)
      for (int64_t x = 0; x < crop_w; ++x) {
        const int64_t ry = top + y, rx = left + x;
        if (ry >= ya && ry < yb && rx >= xa && rx < xb) continue;
        for (int64_t c = 0; c < C; ++c) out[index(y, x, c)] = lut[c * 256];
      }
  }
  if (ya >= yb || xa >= xb) return;
  const int64_t nx = xb - xa, ny = yb - ya, rowlen = nx * C;
  std::vector<uint8_t> px(static_cast<size_t>(ny * rowlen));
  resize_region(src, RH, RW, ya, ny, xa, nx, f, aa, px.data(), rowlen, threads);
  // Rescale + normalize through the per-channel table, written CHW or as patches.
  const int64_t band = std::max<int64_t>(8, ny / (4 * std::max(threads, 1)) + 1);
  parallel_for((ny + band - 1) / band, threads, [&](int64_t b, int) {
    for (int64_t yy = b * band; yy < std::min(ny, (b + 1) * band); ++yy) {
      const uint8_t* row = px.data() + yy * rowlen;
      const int64_t y = ya + yy - top;
      if (patch == 0) {
        int64_t x0 = 0;
#if defined(__AVX2__)
        if (C == 3) {
          float* d[3];
          for (int c = 0; c < 3; ++c) d[c] = out + c * plane + y * crop_w + (xa - left);
          x0 = normalize_row_rgb(row, nx, norm, d);
        }
#endif
        for (int64_t c = 0; c < C; ++c) {
          float* __restrict dstrow = out + c * plane + y * crop_w + (xa - left);
          const float* __restrict l = lut + c * 256;
          const uint8_t* __restrict src = row + c;
          for (int64_t x = x0; x < nx; ++x) dstrow[x] = l[src[x * C]];
        }
      } else {
        for (int64_t x = 0; x < nx; ++x)
          for (int64_t c = 0; c < C; ++c) out[index(y, xa + x - left, c)] = lut[c * 256 + row[x * C + c]];
      }
    }
  });
}

// Pillow filters RGBA images with premultiplied alpha ("RGBa"): premultiply with rounding
// (v * a + 128 + ((v * a + 128) >> 8)) >> 8, resize, then divide by alpha again
// (v * 255 / a, truncated and clamped; alpha 0 or 255 leaves v as it is).
// A source whose rows are one row repeated (stride 0) is premultiplied once and stays repeated.
void premultiply(const ImageView<const uint8_t>& src, std::vector<uint8_t>& buf, ImageView<const uint8_t>* view) {
  const int64_t H = src.stride == 0 ? 1 : src.H;
  buf.resize(static_cast<size_t>(H * src.W * 4));
  for (int64_t y = 0; y < H; ++y) {
    const uint8_t* in = src.data + y * src.stride;
    uint8_t* out = buf.data() + y * src.W * 4;
    for (int64_t x = 0; x < src.W; ++x) {
      const uint32_t a = in[4 * x + 3];
      for (int c = 0; c < 3; ++c) {
        const uint32_t t = in[4 * x + c] * a + 128;
        out[4 * x + c] = static_cast<uint8_t>((t + (t >> 8)) >> 8);
      }
      out[4 * x + 3] = static_cast<uint8_t>(a);
    }
  }
  *view = src;
  view->data = buf.data();
  view->stride = src.stride == 0 ? 0 : src.W * 4;
}

void unpremultiply(const ImageView<uint8_t>& img) {
  for (int64_t y = 0; y < img.H; ++y) {
    uint8_t* p = img.data + y * img.stride;
    for (int64_t x = 0; x < img.W; ++x) {
      const uint32_t a = p[4 * x + 3];
      if (a == 0 || a == 255) continue;
      for (int c = 0; c < 3; ++c) {
        const uint32_t v = (255u * p[4 * x + c]) / a;
        p[4 * x + c] = static_cast<uint8_t>(v > 255 ? 255 : v);
      }
    }
  }
}

void resize_rgba_aware(const ImageView<const uint8_t>& src, const ImageView<uint8_t>& dst, ResizeFilter f, bool aa,
                       int threads) {
  // Same size: Pillow returns a copy, without the (lossy) premultiplication round trip.
  const bool same = src.H == dst.H && src.W == dst.W;
  if (src.C != 4 || f == ResizeFilter::nearest || same) return resize_one(src, dst, f, aa, threads);
  std::vector<uint8_t> buf;
  ImageView<const uint8_t> pre;
  premultiply(src, buf, &pre);
  resize_one(pre, dst, f, aa, threads);
  unpremultiply(dst);
}

}  // namespace

namespace {

// One resize call over a batch: every image's scratch is checked first, then images run in
// parallel (one thread each) when there are enough of them, else one at a time on all threads.
// `one` resizes one image: uint8 images go through the RGBA-aware path, float ones directly.
template <typename T, typename One>
void resize_batch(const ResizeParams<T>& p, bool is_u8, One one) {
  const auto* srcs = p.srcs;
  const auto* dsts = p.dsts;
  const int64_t n = p.n;
  const int num_threads = p.num_threads;
  for (int64_t i = 0; i < n; ++i)
    check_resize_scratch(srcs[i].H, srcs[i].W, srcs[i].C, dsts[i].H, dsts[i].W, dsts[i].H, dsts[i].W, p.filter,
                         p.antialias, is_u8);
  if (n >= num_threads && n > 1) {
    parallel_for(n, num_threads, [&](int64_t i, int) { one(srcs[i], dsts[i], p.filter, p.antialias, 1); });
  } else {
    for (int64_t i = 0; i < n; ++i) one(srcs[i], dsts[i], p.filter, p.antialias, num_threads);
  }
}

}  // namespace

void resize_u8(const ResizeParams<uint8_t>& p) {
  resize_batch(p, true, [](const auto& src, const auto& dst, ResizeFilter f, bool aa, int threads) {
    resize_rgba_aware(src, dst, f, aa, threads);
  });
}

void resize_f32(const ResizeParams<float>& p) {
  resize_batch(p, false, [](const auto& src, const auto& dst, ResizeFilter f, bool aa, int threads) {
    resize_one(src, dst, f, aa, threads);
  });
}

void preprocess_u8(const PreprocessParams& p) {
  const auto* srcs = p.srcs;
  const int64_t n = p.n;
  const int64_t* geoms = p.geoms;
  const int64_t crop_h = p.crop_h, crop_w = p.crop_w;
  const ResizeFilter f = p.filter;
  const bool antialias = p.antialias;
  const NormalizeSpec& norm = p.norm;
  float* out = p.out;
  const int num_threads = p.num_threads;
  if (n == 0) return;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* g = geoms + 4 * i;
    check_resize_scratch(srcs[i].H, srcs[i].W, srcs[i].C, g[0], g[1], std::min(crop_h, g[0]), std::min(crop_w, g[1]), f,
                         antialias, true);
  }
  const int64_t C = srcs[0].C;
  // value(c, v) = (v * scale - mean[c]) / std[c], one float32 rounding as a table.
  std::vector<float> lut(static_cast<size_t>(C * 256));
  for (int64_t c = 0; c < C; ++c)
    for (int v = 0; v < 256; ++v) lut[c * 256 + v] = (static_cast<float>(v) * norm.scale - norm.mean[c]) / norm.std[c];
  const int64_t per_image = C * crop_h * crop_w;
  if (n >= num_threads && n > 1) {
    parallel_for(n, num_threads, [&](int64_t i, int) {
      preprocess_one(srcs[i], geoms + 4 * i, crop_h, crop_w, f, antialias, lut.data(), norm, out + i * per_image, 1);
    });
  } else {
    for (int64_t i = 0; i < n; ++i)
      preprocess_one(srcs[i], geoms + 4 * i, crop_h, crop_w, f, antialias, lut.data(), norm, out + i * per_image,
                     num_threads);
  }
}

template <class T>
void normalize_impl(const T* src, float* dst, int64_t N, int64_t H, int64_t W, int64_t C, const float* mean,
                    const float* stdv, float scale, bool chw, int num_threads) {
  const int64_t rows = N * H;
  std::vector<float> mul(C), add(C);
  for (int64_t c = 0; c < C; ++c) {
    mul[c] = scale / stdv[c];
    add[c] = -mean[c] / stdv[c];
  }
  parallel_for((rows + 15) / 16, num_threads, [&](int64_t b, int) {
    for (int64_t r = b * 16; r < std::min(rows, (b + 1) * 16); ++r) {
      const int64_t n = r / H, y = r % H;
      const T* in = src + r * W * C;
      if (chw) {
        for (int64_t c = 0; c < C; ++c) {
          float* o = dst + ((n * C + c) * H + y) * W;
          for (int64_t x = 0; x < W; ++x) o[x] = (static_cast<float>(in[x * C + c]) * scale - mean[c]) / stdv[c];
        }
      } else {
        float* o = dst + r * W * C;
        for (int64_t x = 0; x < W; ++x)
          for (int64_t c = 0; c < C; ++c)
            o[x * C + c] = (static_cast<float>(in[x * C + c]) * scale - mean[c]) / stdv[c];
      }
    }
  });
}

void normalize_u8(const NormalizeParams<uint8_t>& p) {
  normalize_impl(p.src, p.dst, p.N, p.H, p.W, p.C, p.mean, p.std, p.scale, p.chw, p.num_threads);
}

void normalize_f32(const NormalizeParams<float>& p) {
  normalize_impl(p.src, p.dst, p.N, p.H, p.W, p.C, p.mean, p.std, p.scale, p.chw, p.num_threads);
}

void patchify_f32(const PatchifyParams& params) {
  const float* src = params.src;
  float* dst = params.dst;
  const int64_t B = params.B, T = params.T, C = params.C, H = params.H, W = params.W;
  const int64_t p = params.patch, tp = params.temporal_patch;
  const int num_threads = params.num_threads;
  const int64_t gt = T / tp, gh = H / p, gw = W / p;
  const int64_t psize = C * tp * p * p;
  const int64_t npatch = gt * gh * gw;
  // One task per (batch, temporal group, patch row): copies rows of p contiguous values.
  parallel_for(B * gt * gh, num_threads, [&](int64_t task, int) {
    const int64_t b = task / (gt * gh), rem = task % (gt * gh);
    const int64_t t0 = rem / gh, py = rem % gh;
    for (int64_t px = 0; px < gw; ++px) {
      float* o = dst + (b * npatch + (t0 * gh + py) * gw + px) * psize;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < tp; ++t)
          for (int64_t y = 0; y < p; ++y) {
            const float* in = src + (((b * T + t0 * tp + t) * C + c) * H + py * p + y) * W + px * p;
            std::memcpy(o, in, sizeof(float) * p);
            o += p;
          }
    }
  });
}

}  // namespace MMCORE_TARGET
}  // namespace mmcore
