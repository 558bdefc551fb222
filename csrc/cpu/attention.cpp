// Tiled online-softmax (flash-style) attention on the CPU.
//
// This file is compiled once per instruction-set target (baseline, AVX2, AVX-512) with
// MMCORE_TARGET naming the namespace; dispatch.cpp picks one at run time.
//
// Work decomposition: one task = (batch b, head h, chunk of up to kQueryChunk query rows).
// Inside a task the keys are walked in blocks of kKeyBlock. Each block of K is packed
// transposed (D x kKeyBlock) once and then reused by every query micro-tile of the chunk:
//   S  = Q_tile . K_block^T         register tile MR rows x (NV vectors of keys)
//   online softmax on S (running max m and sum l per row, base-2 exponentials)
//   O  = alpha * O + P . V_block    register tile MR rows x (NV vectors of value columns)
// Extra memory per thread: the packed query chunk, one K block, one V block (only when Dv is
// not a multiple of the vector width), one S tile and the chunk's O accumulator. No (Lq x Lk)
// matrix exists unless the caller asked for the weights, which are then written in place.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mmcore/attention.h"
#include "mmcore/dropout.h"
#include "mmcore/parallel.h"
#include "mmcore/simd.h"

#ifndef MMCORE_TARGET
#error "MMCORE_TARGET must name the instruction-set target of this translation unit"
#endif

namespace mmcore {
namespace MMCORE_TARGET {

using simd::kWidth;
using simd::vf;

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#if defined(__AVX512F__)
constexpr int MR = 6;  // query rows per register tile
constexpr int NV = 4;  // vectors per register tile row (64 keys / 64 value columns)
#elif defined(__AVX2__)
constexpr int MR = 6;
constexpr int NV = 2;
#else
constexpr int MR = 4;
constexpr int NV = 2;
#endif
constexpr int kPanel = kWidth * NV;  // keys per score micro-panel
constexpr int kKeyBlock = 128;       // keys per block; a multiple of every kPanel
constexpr int64_t kQueryChunk = 96;  // query rows per task at most
constexpr int64_t kDotRows = 3;    // chunks of at most this many rows skip the K packing
static_assert(kKeyBlock % kPanel == 0, "key block must hold whole panels");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// S[r, panel] = sum_d q[r, d] * kt[d, panel] for R rows and npanels panels of kPanel keys.
template <int R>
void score_tile(const float* __restrict q, int64_t D, const float* __restrict kt, int npanels,
                float* __restrict s) {
  for (int pn = 0; pn < npanels; ++pn) {
    const float* kp = kt + pn * kPanel;
    vf acc[R][NV];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[r][c] = vf{};
    for (int64_t d = 0; d < D; ++d) {
      vf kv[NV];
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) kv[c] = simd::load(kp + d * kKeyBlock + c * kWidth);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vf qb = simd::splat(q[r * D + d]);
#pragma GCC unroll 8
        for (int c = 0; c < NV; ++c) acc[r][c] += qb * kv[c];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) simd::store(s + r * kKeyBlock + pn * kPanel + c * kWidth, acc[r][c]);
  }
}

// Few query rows (decode-like): direct dot products over D beat packing K transposed.
void score_rows_dot(const float* __restrict q, int R, int64_t D, const float* __restrict kblk, int nvalid,
                    float* __restrict s) {
  const int64_t Dm = D / kWidth * kWidth;
  for (int j = 0; j < nvalid; ++j) {
    const float* kr = kblk + j * D;
    for (int r = 0; r < R; ++r) {
      const float* qr = q + r * D;
      vf acc = vf{};
      for (int64_t d = 0; d < Dm; d += kWidth) acc += simd::load(qr + d) * simd::load(kr + d);
      float t = simd::hsum(acc);
      for (int64_t d = Dm; d < D; ++d) t += qr[d] * kr[d];
      s[r * kKeyBlock + j] = t;
    }
  }
}

// o[r, cols] = alpha[r] * o[r, cols] + sum_j p[r, j] * v[j, cols] for NC vectors of columns.
template <int R, int NC>
void pv_block(const float* __restrict p, const float* __restrict alpha, const float* __restrict v,
              int64_t vstride, int nvalid, float* __restrict o, int64_t ostride) {
  vf acc[R][NC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const vf a = simd::splat(alpha[r]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[r][c] = simd::load(o + r * ostride + c * kWidth) * a;
  }
  for (int j = 0; j < nvalid; ++j) {
    vf vv[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) vv[c] = simd::load(v + j * vstride + c * kWidth);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf pb = simd::splat(p[r * kKeyBlock + j]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] += pb * vv[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) simd::store(o + r * ostride + c * kWidth, acc[r][c]);
}

template <int R>
void pv_tile(const float* p, const float* alpha, const float* v, int64_t vstride, int nvalid,
             float* o, int64_t Dvp) {
  int64_t c0 = 0;
  for (; c0 + kPanel <= Dvp; c0 += kPanel)
    pv_block<R, NV>(p, alpha, v + c0, vstride, nvalid, o + c0, Dvp);
  const int rest = static_cast<int>((Dvp - c0) / kWidth);
  switch (rest) {
    case 0: break;
    case 1: pv_block<R, 1>(p, alpha, v + c0, vstride, nvalid, o + c0, Dvp); break;
    case 2: pv_block<R, 2>(p, alpha, v + c0, vstride, nvalid, o + c0, Dvp); break;
    case 3: pv_block<R, 3>(p, alpha, v + c0, vstride, nvalid, o + c0, Dvp); break;
    default: break;
  }
}

void score_dispatch(int R, const float* qp, int64_t D, const float* kt, int npanels, float* s) {
  switch (R) {
    case 1: score_tile<1>(qp, D, kt, npanels, s); break;
    case 2: score_tile<2>(qp, D, kt, npanels, s); break;
    case 3: score_tile<3>(qp, D, kt, npanels, s); break;
    case 4: score_tile<4>(qp, D, kt, npanels, s); break;
    case 5: score_tile<5>(qp, D, kt, npanels, s); break;
    case 6: score_tile<6>(qp, D, kt, npanels, s); break;
    default: break;
  }
}

void pv_dispatch(int R, const float* p, const float* alpha, const float* v, int64_t vstride,
                 int nvalid, float* o, int64_t Dvp) {
  switch (R) {
    case 1: pv_tile<1>(p, alpha, v, vstride, nvalid, o, Dvp); break;
    case 2: pv_tile<2>(p, alpha, v, vstride, nvalid, o, Dvp); break;
    case 3: pv_tile<3>(p, alpha, v, vstride, nvalid, o, Dvp); break;
    case 4: pv_tile<4>(p, alpha, v, vstride, nvalid, o, Dvp); break;
    case 5: pv_tile<5>(p, alpha, v, vstride, nvalid, o, Dvp); break;
    case 6: pv_tile<6>(p, alpha, v, vstride, nvalid, o, Dvp); break;
    default: break;
  }
}

// Per-thread scratch, grown on demand and kept for the thread's lifetime.
struct Scratch {
  std::vector<float> qp, kt, vp, s, o, m, l, alpha;
  static Scratch& get() {
    thread_local Scratch sc;
    return sc;
  }
};

template <class T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Applies mask and bias (both indexed through element strides) to one score row in place.
void apply_mask_bias(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j0,
                     int nvalid, float* s) {
  if (p.bias) {
    const float* br = p.bias + b * p.bias_strides[0] + h * p.bias_strides[1] + i * p.bias_strides[2] +
                      j0 * p.bias_strides[3];
    const int64_t bs = p.bias_strides[3];
    // A finite bias stays finite in the base-2 domain (no overflow to -inf near -FLT_MAX).
    const float lo = -std::numeric_limits<float>::max();
    if (bs == 1) {
      for (int j = 0; j < nvalid; ++j) s[j] += br[j] == kNegInf ? kNegInf : std::max(br[j] * kLog2e, lo);
    } else {
      for (int j = 0; j < nvalid; ++j) {
        const float bj = br[j * bs];
        s[j] += bj == kNegInf ? kNegInf : std::max(bj * kLog2e, lo);
      }
    }
  }
  if (p.mask) {
    const uint8_t* mr = p.mask + b * p.mask_strides[0] + h * p.mask_strides[1] + i * p.mask_strides[2] +
                        j0 * p.mask_strides[3];
    const int64_t ms = p.mask_strides[3];
    if (ms == 1) {
      for (int j = 0; j < nvalid; ++j) s[j] = mr[j] ? s[j] : kNegInf;
    } else {
      for (int j = 0; j < nvalid; ++j) s[j] = mr[j * ms] ? s[j] : kNegInf;
    }
  }
}

// 2^(x[j] - m) * scale for j < n, in place; a scalar tail goes through a padded vector.
void exp2_shift_scale(float* x, int64_t n, float m, float scale) {
  const vf vm = simd::splat(m), vs = simd::splat(scale);
  int64_t j = 0;
  for (; j + kWidth <= n; j += kWidth) simd::store(x + j, simd::exp2(simd::load(x + j) - vm) * vs);
  if (j < n) {
    float tmp[kWidth];
    for (int t = 0; t < kWidth; ++t) tmp[t] = j + t < n ? x[j + t] : kNegInf;
    simd::store(tmp, simd::exp2(simd::load(tmp) - vm) * vs);
    for (int t = 0; j + t < n; ++t) x[j + t] = tmp[t];
  }
}

void run_task(const AttentionParams& p, int64_t task, int64_t nchunks, int64_t chunk_rows) {
  const int64_t bh = task / nchunks, chunk = task % nchunks;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t i0 = chunk * chunk_rows;
  const int64_t rows = std::min(chunk_rows, p.Lq - i0);
  const int64_t D = p.D, Dv = p.Dv, Lq = p.Lq, Lk = p.Lk;
  const int64_t Lkb = p.key_lengths ? p.key_lengths[b] : Lk;
  const int64_t Dvp = round_up(Dv, kWidth);
  const bool direct_v = (Dv == Dvp);

  const float* qb = p.q + (bh * Lq + i0) * D;
  const float* kb = p.k + bh * Lk * D;
  const float* vb = p.v + bh * Lk * Dv;

  Scratch& sc = Scratch::get();
  float* qp = grow(sc.qp, static_cast<size_t>(rows * D));
  const bool dot_path = rows <= kDotRows;
  float* kt = dot_path ? nullptr : grow(sc.kt, static_cast<size_t>(D * kKeyBlock));
  float* vp = direct_v ? nullptr : grow(sc.vp, static_cast<size_t>(kKeyBlock * Dvp));
  float* s = grow(sc.s, static_cast<size_t>(MR * kKeyBlock));
  float* o = grow(sc.o, static_cast<size_t>(rows * Dvp));
  float* m = grow(sc.m, static_cast<size_t>(rows));
  float* l = grow(sc.l, static_cast<size_t>(rows));
  float* alpha = grow(sc.alpha, static_cast<size_t>(MR));

  const float qscale = p.scale * kLog2e;  // scores live in the base-2 domain
  for (int64_t t = 0; t < rows * D; ++t) qp[t] = qb[t] * qscale;
  std::fill(o, o + rows * Dvp, 0.0f);
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);

  float* wrow0 = p.weights ? p.weights + (bh * Lq + i0) * Lk : nullptr;

  for (int64_t j0 = 0; j0 < Lkb; j0 += kKeyBlock) {
    const int nvalid = static_cast<int>(std::min<int64_t>(kKeyBlock, Lkb - j0));
    const int npanels = static_cast<int>((nvalid + kPanel - 1) / kPanel);
    const int ncols = npanels * kPanel;
    if (!dot_path) {
      // Pack K block transposed; columns past nvalid are zero.
      for (int j = 0; j < nvalid; ++j) {
        const float* kr = kb + (j0 + j) * D;
        for (int64_t d = 0; d < D; ++d) kt[d * kKeyBlock + j] = kr[d];
      }
      if (nvalid < ncols)
        for (int64_t d = 0; d < D; ++d) std::fill(kt + d * kKeyBlock + nvalid, kt + d * kKeyBlock + ncols, 0.0f);
    }
    const float* vblk;
    int64_t vstride;
    if (direct_v) {
      vblk = vb + j0 * Dv;
      vstride = Dv;
    } else {
      for (int j = 0; j < nvalid; ++j) {
        const float* vr = vb + (j0 + j) * Dv;
        float* dst = vp + j * Dvp;
        std::copy(vr, vr + Dv, dst);
        std::fill(dst + Dv, dst + Dvp, 0.0f);
      }
      vblk = vp;
      vstride = Dvp;
    }

    const int nround = static_cast<int>(round_up(nvalid, kWidth));
    for (int64_t r0 = 0; r0 < rows; r0 += MR) {
      const int R = static_cast<int>(std::min<int64_t>(MR, rows - r0));
      if (dot_path)
        score_rows_dot(qp + r0 * D, R, D, kb + j0 * D, nvalid, s);
      else
        score_dispatch(R, qp + r0 * D, D, kt, npanels, s);
      for (int r = 0; r < R; ++r) {
        const int64_t ri = r0 + r, i = i0 + ri;
        float* sr = s + r * kKeyBlock;
        if (p.mask || p.bias) apply_mask_bias(p, b, h, i, j0, nvalid, sr);
        for (int j = nvalid; j < nround; ++j) sr[j] = kNegInf;
        if (wrow0) std::copy(sr, sr + nvalid, wrow0 + ri * Lk + j0);
        vf vmx = simd::splat(kNegInf);
        for (int j = 0; j < nround; j += kWidth) vmx = simd::vmax_nan(vmx, simd::load(sr + j));
        // NaN is never hidden: a NaN score makes the running max, and so the row, NaN.
        const float bmax = simd::hmax(vmx);
        const float mnew = (bmax != bmax || m[ri] != m[ri]) ? std::numeric_limits<float>::quiet_NaN()
                                                              : std::max(m[ri], bmax);
        if (mnew == kNegInf) {  // nothing to attend to yet in this row
          alpha[r] = 1.0f;
          std::fill(sr, sr + nround, 0.0f);
          continue;
        }
        alpha[r] = std::exp2(m[ri] - mnew);
        const vf vm = simd::splat(mnew);
        vf vsum = vf{};
        for (int j = 0; j < nround; j += kWidth) {
          const vf e = simd::exp2(simd::load(sr + j) - vm);
          simd::store(sr + j, e);
          vsum += e;
        }
        l[ri] = l[ri] * alpha[r] + simd::hsum(vsum);
        m[ri] = mnew;
        if (p.dropout) {
          for (int j = 0; j < nvalid; ++j) {
            const bool keep = dropout_bits(p.seed, b, h, i, j0 + j) >= p.dropout_threshold;
            sr[j] = keep ? sr[j] * p.dropout_scale : 0.0f;
          }
        }
      }
      pv_dispatch(R, s, alpha, vblk, vstride, nvalid, o + r0 * Dvp, Dvp);
    }
  }

  // Normalize and write out, lse and (optionally) the weights.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const float inv = 1.0f / l[r];
    float* outr = p.out + (bh * Lq + i) * Dv;
    const float* orow = o + r * Dvp;
    if (l[r] > 0.0f || l[r] != l[r]) {
      for (int64_t c = 0; c < Dv; ++c) outr[c] = orow[c] * inv;
    } else {  // no key to attend to: zeros, whatever v holds
      std::fill(outr, outr + Dv, 0.0f);
    }
    if (p.lse) p.lse[bh * Lq + i] = (l[r] > 0.0f || l[r] != l[r]) ? (m[r] + std::log2(l[r])) * kLn2 : kNegInf;
    if (wrow0) {
      float* w = wrow0 + r * Lk;
      if (l[r] != l[r]) {  // a NaN score poisons the whole row, dropped entries included
        std::fill(w, w + Lkb, std::numeric_limits<float>::quiet_NaN());
      } else if (l[r] > 0.0f) {
        exp2_shift_scale(w, Lkb, m[r], inv);
        if (p.dropout) {
          for (int64_t j = 0; j < Lkb; ++j) {
            const bool keep = dropout_bits(p.seed, b, h, i, j) >= p.dropout_threshold;
            w[j] = keep ? w[j] * p.dropout_scale : 0.0f;
          }
        }
      } else {
        std::fill(w, w + Lkb, 0.0f);
      }
      std::fill(w + Lkb, w + Lk, 0.0f);
    }
  }
}

}  // namespace

void attention_f32(const AttentionParams& p) {
  if (p.B == 0 || p.H == 0 || p.Lq == 0) return;
  // Split the query rows of each head into chunks so that there are enough tasks for the
  // threads, but keep chunks long enough to amortize the packing of each key block.
  int64_t nchunks = (p.Lq + kQueryChunk - 1) / kQueryChunk;
  const int64_t bh = p.B * p.H;
  while (bh * nchunks < 2 * p.num_threads && p.Lq / (nchunks + 1) >= 2 * MR) ++nchunks;
  int64_t chunk_rows = (p.Lq + nchunks - 1) / nchunks;
  if (chunk_rows > MR) chunk_rows = round_up(chunk_rows, MR);
  nchunks = (p.Lq + chunk_rows - 1) / chunk_rows;
  parallel_for(bh * nchunks, p.num_threads,
               [&](int64_t task, int) { run_task(p, task, nchunks, chunk_rows); });
}

}  // namespace MMCORE_TARGET
}  // namespace mmcore
