// y = x . W^T + b on the CPU, without BLAS (so that no second thread pool competes with the
// library's own).
//
// This file is compiled once per instruction-set target (baseline, AVX2, AVX-512) with
// MMCORE_TARGET naming the namespace; dispatch.cpp picks one at run time.
//
// W is read from its packed form (PackedWeight, linear.h): packed once per weight by the caller
// (mmcore.ops.PackedWeight, the model's layers) or, for a plain weight, once per call before the
// products start. One task = (a chunk of at most kRowChunk rows, a block of kCols output
// columns inside one 64-column panel, read from the 16-column strips of the packed form); it walks its rows in register
// tiles of MR rows x NV vectors (gemm_tile.h):
//   highest, bf16  acc[r][c] = b[cols] + sum_k x[r, k] * Wt[k, cols]   (float32, k increasing)
//   int8           acc[r][c] = sum_k a[r, k] * q[cols, k]              (int32, exact), then
//                  y = float(acc) * (sx[r] * sw[cols]) + b[cols]
// then the optional activation. Under "bf16" the rows of x are rounded to bfloat16 once per call
// (the weights were rounded while packing); under "int8" they are quantized per row once per
// call (the rule is in linear.h).
//
// Also here: layer normalisation over rows (the other per-token step of a transformer block).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "mmcore/float_bits.h"
#include "mmcore/gemm_tile.h"
#include "mmcore/linear.h"
#include "mmcore/parallel.h"
#include "mmcore/simd.h"
#include "mmcore/size_error.h"

#ifndef MMCORE_TARGET
#error "MMCORE_TARGET must name the instruction-set target of this translation unit"
#endif

namespace mmcore {
namespace MMCORE_TARGET {

using simd::kWidth;
using simd::vf;

namespace {

constexpr int MR = gemm::kTileRows;
constexpr int NV = gemm::kTileVecs;
constexpr int kCols = kWidth * NV;  // output columns per task block
constexpr int64_t kPanel = PackedWeight::kPanel;
constexpr int64_t kSub = PackedWeight::kSub;
static_assert(kPanel % kCols == 0, "a task block must lie inside one panel");
static_assert(kWidth == kSub || (kCols <= kSub && kSub % kCols == 0),
              "a vector spans one strip, or a block fits in one");
// The step between the vectors of a tile in the packed weight: the next strip when a vector is a
// whole strip (AVX-512), else the next kWidth columns of the same strip.
constexpr bool kVectorPerStrip = kWidth == kSub;
constexpr int64_t kRowChunk = 192;        // rows per task at most
constexpr int64_t kKBlock = 384;          // k per pass over a task's rows (float32)
constexpr int64_t kSerialWork = 1 << 18;  // multiply-adds below which one thread does it all

// x * sigmoid(c x) = x / (1 + 2^(-c log2(e) x)), lanes of x.
inline vf x_sigmoid(vf x, float c) {
  return x / (simd::splat(1.0f) + simd::exp2(x * simd::splat(-c * 1.4426950408889634f)));
}

// 0.5 x (1 + erf(x / sqrt(2))) with erf from Abramowitz & Stegun 7.1.26 (absolute error below
// 1.5e-7; the form PyTorch's vectorized CPU kernels use), 1 + erf taken without cancellation
// for negative x.
inline vf gelu_erf(vf x) {
  const vf z = x * simd::splat(0.70710678118654752f);
  const vf a = z < vf{} ? -z : z;
  const vf t = simd::splat(1.0f) / (simd::splat(1.0f) + simd::splat(0.3275911f) * a);
  vf poly = simd::splat(1.061405429f);
  poly = poly * t + simd::splat(-1.453152027f);
  poly = poly * t + simd::splat(1.421413741f);
  poly = poly * t + simd::splat(-0.284496736f);
  poly = poly * t + simd::splat(0.254829592f);
  const vf tail = poly * t * simd::exp2(-(a * a) * simd::splat(1.4426950408889634f));  // 1 - erf(|z|)
  return simd::splat(0.5f) * x * (z < vf{} ? tail : simd::splat(2.0f) - tail);
}

template <class F>
void map_lanes(float* y, int64_t n, F f) {
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) simd::store(y + i, f(simd::load(y + i)));
  if (i < n) {
    float tmp[kWidth] = {};
    for (int64_t j = i; j < n; ++j) tmp[j - i] = y[j];
    simd::store(tmp, f(simd::load(tmp)));
    for (int64_t j = i; j < n; ++j) y[j] = tmp[j - i];
  }
}

// The activation on n floats in place, vectorized: GELU through the erf above, its tanh form
// as x sigmoid(2u) (the same function as 0.5 x (1 + tanh u), without cancellation), and CLIP's
// x sigmoid(1.702 x) through the vector exp2 of simd.h (relative error about 2e-7).
void activate(float* y, int64_t n, Activation act) {
  switch (act) {
    case Activation::gelu: map_lanes(y, n, gelu_erf); break;
    case Activation::gelu_tanh:
      map_lanes(y, n, [](vf v) {
        const vf u2 =
            v * (simd::splat(2 * 0.79788456080286536f) + simd::splat(2 * 0.79788456080286536f * 0.044715f) * v * v);
        return v / (simd::splat(1.0f) + simd::exp2(-u2 * simd::splat(1.4426950408889634f)));
      });
      break;
    case Activation::quick_gelu: map_lanes(y, n, [](vf v) { return x_sigmoid(v, 1.702f); }); break;
    case Activation::relu:
      for (int64_t i = 0; i < n; ++i) y[i] = y[i] < 0.0f ? 0.0f : y[i];
      break;
    default: break;
  }
}

struct Scratch {
  std::vector<float> bias, scale, out;
  std::vector<int32_t> iacc;
  static Scratch& get() {
    thread_local Scratch sc;
    return sc;
  }
};

// The operands of one call: the packed weight and x as the tiles read it.
struct Operands {
  const PackedWeight* w = nullptr;
  const float* x = nullptr;  // highest, bf16 (bf16: rounded copy)
  int64_t ldx = 0;
  const int32_t* a = nullptr;  // int8: quantized rows, int16 pairs (kpairs per row)
  const float* sx = nullptr;   // int8: row scales
};

// Quantizes row x (K values) into KP int16 pairs; returns its scale (linear.h).
float quantize_row(const float* x, int64_t K, int64_t KP, int32_t* a) {
  constexpr float kMax = std::numeric_limits<float>::max();
  vf vlo = vf{}, vhi = vf{};
  simd::vi bad = simd::vi{};
  int64_t k = 0;
  for (; k + kWidth <= K; k += kWidth) {
    const vf v = simd::load(x + k);
    vlo = simd::vmin(vlo, v);
    vhi = simd::vmax(vhi, v);
    bad |= !((v < vf{} ? -v : v) <= simd::splat(kMax));
  }
  float lo = -simd::hmax(-vlo), hi = simd::hmax(vhi);
  bool finite = true;
  for (int i = 0; i < kWidth; ++i) finite = finite && bad[i] == 0;
  for (; k < K; ++k) {
    finite = finite && std::fabs(x[k]) <= kMax;
    lo = std::min(lo, x[k]);
    hi = std::max(hi, x[k]);
  }
  if (!finite) {
    std::memset(a, 0, static_cast<size_t>(KP) * sizeof(int32_t));
    return std::numeric_limits<float>::quiet_NaN();
  }
  float s = (hi - lo) / 255.0f;
  if (s == 0.0f || !std::isfinite(1.0f / s)) s = 1.0f;  // 0, or a range so small 1 / s overflows
  const float inv = 1.0f / s;
  const float zp = std::min(255.0f, std::max(0.0f, __builtin_rintf(-lo * inv)));
  // a[k] = clamp(rint(x[k] * inv) + zp, 0, 255) - zp, written as int16 (pairs of k)
  typedef int16_t vs __attribute__((vector_size(kWidth * 2)));
  char* out = reinterpret_cast<char*>(a);
  if (K % 2) a[KP - 1] = 0;
  const vf vinv = simd::splat(inv), vzp = simd::splat(zp), v255 = simd::splat(255.0f);
  for (k = 0; k + kWidth <= K; k += kWidth) {
    const vf r = simd::vmin(simd::vmax(simd::rint(simd::load(x + k) * vinv) + vzp, vf{}), v255) - vzp;
    const vs q = __builtin_convertvector(__builtin_convertvector(r, simd::vi), vs);
    std::memcpy(out + 2 * k, &q, sizeof(q));
  }
  for (; k < K; ++k) {
    const int16_t q = static_cast<int16_t>(std::min(255.0f, std::max(0.0f, __builtin_rintf(x[k] * inv) + zp)) - zp);
    std::memcpy(out + 2 * k, &q, sizeof(q));
  }
  return s;
}

void run_task(const LinearParams& p, const Operands& ops, int64_t row0, int64_t rows, int64_t col0) {
  const int64_t ncols = std::min<int64_t>(kCols, p.N - col0);
  const int nvec = static_cast<int>((ncols + kWidth - 1) / kWidth);
  const int64_t padded = static_cast<int64_t>(nvec) * kWidth;
  const int64_t strip = col0 / kSub, off = col0 % kSub;
  const PackedWeight& w = *ops.w;
  const bool int8 = w.precision == Precision::int8;
  Scratch& sc = Scratch::get();
  const float* bias = nullptr;
  if (p.bias) {
    sc.bias.assign(static_cast<size_t>(padded), 0.0f);
    std::memcpy(sc.bias.data(), p.bias + col0, static_cast<size_t>(ncols) * sizeof(float));
    bias = sc.bias.data();
  }
  const float* cscale = nullptr;
  if (int8) {
    sc.scale.assign(static_cast<size_t>(padded), 0.0f);
    std::memcpy(sc.scale.data(), w.scale.data() + col0, static_cast<size_t>(ncols) * sizeof(float));
    cscale = sc.scale.data();
  }
  // whole vectors: sums go straight into y; else into scratch rows of `padded` columns
  const bool direct = ncols == padded;
  if (!direct && sc.out.size() < static_cast<size_t>(rows * padded)) sc.out.resize(static_cast<size_t>(rows * padded));
  const int64_t KP = w.kpairs();
  const float* wf = int8 ? nullptr : w.f.get() + strip * p.K * kSub + off;
  const int16_t* wq = int8 ? w.q.get() + (strip * KP * kSub + off) * 2 : nullptr;
  const int64_t fstride = kVectorPerStrip ? p.K * kSub : kWidth;
  const int64_t qstride = kVectorPerStrip ? KP * kSub * 2 : 2 * kWidth;
  // k in blocks (kKBlock values, kKBlock / 2 int8 pairs), so that the block of the weight panel
  // stays in L1 while every row tile of the task passes over it; float32 partial sums wait in y
  // (exact: float32 stores), int32 ones in scratch.
  const int64_t kdepth = int8 ? KP : p.K;
  const int64_t kstep = int8 ? kKBlock / 2 : kKBlock;
  const int64_t kblock = kdepth <= kstep + kstep / 3 ? std::max<int64_t>(kdepth, 1) : kstep;
  int32_t* iacc = nullptr;
  if (int8 && kblock < kdepth) {
    if (sc.iacc.size() < static_cast<size_t>(rows * padded)) sc.iacc.resize(static_cast<size_t>(rows * padded));
    iacc = sc.iacc.data();
  }
  for (int64_t k0 = 0; k0 < std::max<int64_t>(kdepth, 1); k0 += kblock) {
    const int64_t kl = std::min(kblock, kdepth - k0);
    const bool first = k0 == 0, last = k0 + kblock >= kdepth;
    for (int64_t r = 0; r < rows; r += MR) {
      const int R = static_cast<int>(std::min<int64_t>(MR, rows - r));
      float* yr = p.y + (row0 + r) * p.ldy + col0;
      float* dst = direct ? yr : sc.out.data() + r * padded;
      const int64_t ldd = direct ? p.ldy : padded;
      gemm::with_count<MR>(R, [&](auto nr) {
        gemm::with_count<NV>(nvec, [&](auto nv) {
          constexpr int kR = decltype(nr)::value, kV = decltype(nv)::value;
          if (int8) {
            gemm::TileI<kR, kV> t;
            if (first)
              t.zero();
            else
              t.load(iacc + r * padded, padded);
            t.multiply_add(ops.a + (row0 + r) * KP + k0, KP, wq + k0 * kSub * 2, kSub * 2, kl, qstride);
            if (last)
              t.store_scaled(dst, ldd, ops.sx + row0 + r, cscale, bias);
            else
              t.store(iacc + r * padded, padded);
          } else {
            gemm::Tile<kR, kV> t;
            if (first)
              t.broadcast_row(bias);
            else
              t.load(dst, ldd);
            t.multiply_add(ops.x + (row0 + r) * ops.ldx + k0, ops.ldx, 1, wf + k0 * kSub, kSub, kl, fstride);
            t.store(dst, ldd);
          }
        });
      });
      if (!last) continue;
      if (!direct)
        for (int i = 0; i < R; ++i)
          std::memcpy(yr + i * p.ldy, dst + i * padded, static_cast<size_t>(ncols) * sizeof(float));
      if (p.activation != Activation::none)
        for (int i = 0; i < R; ++i) activate(yr + i * p.ldy, ncols, p.activation);
    }
  }
}

}  // namespace

void linear_f32(const LinearParams& p) {
  if (p.M <= 0 || p.N <= 0) return;
  const int64_t work = p.M * p.N * std::max<int64_t>(p.K, 1);
  const int threads = work < kSerialWork ? 1 : p.num_threads;
  // Per calling thread, kept between calls: the packed form of a plain weight and the prepared
  // rows of x (fresh allocations of this size would cost a page fault per 4 KiB every call).
  struct CallScratch {
    PackedWeight w;
    std::vector<float> xr, sx;
    std::vector<int32_t> a;
  };
  thread_local CallScratch cs;
  Operands ops;
  ops.w = p.packed;
  if (!ops.w) {
    LinearParams pp = p;
    pp.num_threads = threads;
    pack_weight(pp, cs.w);
    ops.w = &cs.w;
  }
  const PackedWeight& w = *ops.w;
  if (w.N != p.N || w.K != p.K || w.precision != p.precision)
    throw std::invalid_argument("the packed weight does not match the call (shape or precision)");
  std::vector<float>& xr = cs.xr;
  std::vector<float>& sx = cs.sx;
  std::vector<int32_t>& a = cs.a;
  const int64_t row_tasks = std::max<int64_t>(1, std::min<int64_t>(p.M, 4 * threads));
  const int64_t rows_per = (p.M + row_tasks - 1) / row_tasks;
  if (p.precision == Precision::int8) {
    const int64_t KP = w.kpairs();
    a.resize(static_cast<size_t>(p.M * KP));
    sx.resize(static_cast<size_t>(p.M));
    parallel_for(row_tasks, threads, [&](int64_t t, int) {
      for (int64_t m = t * rows_per; m < std::min(p.M, (t + 1) * rows_per); ++m)
        sx[static_cast<size_t>(m)] = quantize_row(p.x + m * p.ldx, p.K, KP, a.data() + m * KP);
    });
    ops.a = a.data();
    ops.sx = sx.data();
  } else if (p.precision == Precision::bf16) {
    xr.resize(static_cast<size_t>(p.M * p.K));
    parallel_for(row_tasks, threads, [&](int64_t t, int) {
      for (int64_t m = t * rows_per; m < std::min(p.M, (t + 1) * rows_per); ++m)
        for (int64_t k = 0; k < p.K; ++k) xr[static_cast<size_t>(m * p.K + k)] = round_bf16(p.x[m * p.ldx + k]);
    });
    ops.x = xr.data();
    ops.ldx = p.K;
  } else {
    ops.x = p.x;
    ops.ldx = p.ldx;
  }
  const int64_t col_blocks = (p.N + kCols - 1) / kCols;
  const int64_t row_chunks = (p.M + kRowChunk - 1) / kRowChunk;
  // rows split evenly into chunks of at most kRowChunk (197 rows: 102 + 95, not 192 + 5), and
  // finer when there are few tasks, so that every thread gets some
  int64_t chunk = ((p.M + row_chunks - 1) / row_chunks + MR - 1) / MR * MR;
  if (p.num_threads > 1 && row_chunks * col_blocks < 2 * p.num_threads) {
    const int64_t want = (2 * p.num_threads + col_blocks - 1) / col_blocks;
    chunk = std::max<int64_t>(MR, (p.M + want - 1) / want);
    chunk = (chunk + MR - 1) / MR * MR;
  }
  const int64_t nchunks = (p.M + chunk - 1) / chunk;
  parallel_for(nchunks * col_blocks, threads, [&](int64_t t, int) {
    const int64_t ci = t / col_blocks, bi = t % col_blocks;
    const int64_t row0 = ci * chunk;
    run_task(p, ops, row0, std::min(chunk, p.M - row0), bi * kCols);
  });
  // a thread keeps at most 64 MiB of packed weight and 64 MiB of prepared rows between calls
  constexpr size_t kKeep = size_t{64} << 20;
  if (cs.w.f_capacity * sizeof(float) + cs.w.q_capacity * sizeof(int16_t) > kKeep) cs.w = PackedWeight();
  if ((cs.xr.capacity() + cs.sx.capacity()) * sizeof(float) + cs.a.capacity() * sizeof(int32_t) > kKeep) {
    cs.xr = std::vector<float>();
    cs.sx = std::vector<float>();
    cs.a = std::vector<int32_t>();
  }
}

void layer_norm_f32(const LayerNormParams& p) {
  if (p.rows <= 0 || p.D <= 0) return;
  const int64_t D = p.D;
  const int64_t per_task = std::max<int64_t>(1, (1 << 15) / D);
  const int64_t ntasks = (p.rows + per_task - 1) / per_task;
  const int threads = p.rows * D < (1 << 16) ? 1 : p.num_threads;
  parallel_for(ntasks, threads, [&](int64_t t, int) {
    const int64_t r1 = std::min(p.rows, (t + 1) * per_task);
    for (int64_t r = t * per_task; r < r1; ++r) {
      const float* x = p.x + r * p.ldx;
      float* y = p.y + r * D;
      double sum = 0.0;
      for (int64_t i = 0; i < D; ++i) sum += x[i];
      const double mean = sum / static_cast<double>(D);
      double ss = 0.0;
      for (int64_t i = 0; i < D; ++i) {
        const double c = x[i] - mean;
        ss += c * c;
      }
      const double inv = 1.0 / std::sqrt(ss / static_cast<double>(D) + p.eps);
      const float m = static_cast<float>(mean), s = static_cast<float>(inv);
      if (p.weight && p.bias) {
        for (int64_t i = 0; i < D; ++i) y[i] = (x[i] - m) * s * p.weight[i] + p.bias[i];
      } else if (p.weight) {
        for (int64_t i = 0; i < D; ++i) y[i] = (x[i] - m) * s * p.weight[i];
      } else {
        for (int64_t i = 0; i < D; ++i) y[i] = (x[i] - m) * s;
      }
    }
  });
}

}  // namespace MMCORE_TARGET
}  // namespace mmcore
