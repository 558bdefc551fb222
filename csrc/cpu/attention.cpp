// Tiled online-softmax (flash-style) attention on the CPU.
//
// This file is compiled once per instruction-set target (baseline, AVX2, AVX-512) with
// MMCORE_TARGET naming the namespace; dispatch.cpp picks one at run time.
//
// Work decomposition: one task = (batch b, head h, chunk of query rows). The chunk's queries are
// packed once, transposed and pre-scaled (Q^T: D x rows), so that queries lie along the vector
// lanes. Keys are walked in blocks of kKeyBlock straight from the input (no packing of K):
//   S^T = K_block . Q^T              register tile: MR keys x NQ vectors of queries
//   online softmax down the key axis (vertical vector ops: one running max / sum per lane)
//   O  = alpha * O + P . V_block    register tile: MR queries x NV vectors of value columns
// Extra memory per thread: the packed query chunk, one S^T tile (kKeyBlock x one query group),
// one V block (only when Dv is not a multiple of the vector width) and the chunk's O
// accumulator. No (Lq x Lk) matrix exists unless the caller asked for the weights, which are
// then written in place.
//
// Batch invariance: every score is one float32 sum over d in increasing order (S^T tile lanes),
// whatever the number of query rows in the chunk, so a query row gives the same bits alone, in
// a longer padded batch or split across any number of threads (a separate dot-product path for
// short chunks, which summed in another order, made results depend on the padding).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "mmcore/attention.h"
#include "mmcore/dropout.h"
#include "mmcore/gemm_tile.h"
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

constexpr int MR = gemm::kTileRows;   // rows of a register tile (keys in S^T, queries in P.V)
constexpr int NV = gemm::kTileVecs;   // vectors per register tile row
constexpr int kGroup = kWidth * NV;   // queries per S^T tile (one query group)
constexpr int kKeyBlock = 128;        // keys per block
constexpr int64_t kQueryChunk = 256;  // query rows per task at most

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// S^T for keys [0, nkeys) of a block and nq query vectors:
// st[j, :] = sum_d k[j, d] * qt[d, :] (register tiles of R <= MR keys x nq vectors).
void score_block(const float* k, int64_t D, int nkeys, const float* qt, int64_t ldq, int nq, float* st) {
  for (int j = 0; j < nkeys; j += MR) {
    const int R = std::min(MR, nkeys - j);
    gemm::with_count<MR>(R, [&](auto rows) {
      gemm::with_count<NV>(nq, [&](auto vecs) {
        gemm::Tile<decltype(rows)::value, decltype(vecs)::value> t;
        t.zero();
        t.multiply_add(k + j * D, D, 1, qt, ldq, D);
        t.store(st + j * kGroup, kGroup);
      });
    });
  }
}

// o[r, cols] = alpha[r] * o[r, cols] + sum_j p[j, r] * v[j, cols] for R <= MR query rows and
// all Dvp columns (register tiles of NV vectors, then the remaining vectors); p is the S^T tile
// (row stride kGroup) after the softmax.
void pv_rows(int R, const float* p, const float* alpha, const float* v, int64_t vstride, int nkeys, float* o,
             int64_t Dvp) {
  gemm::with_count<MR>(R, [&](auto rows) {
    constexpr int kR = decltype(rows)::value;
    auto block = [&](auto vecs, int64_t c0) {
      gemm::Tile<kR, decltype(vecs)::value> t;
      t.load_scaled(o + c0, Dvp, alpha);
      t.multiply_add(p, 1, kGroup, v + c0, vstride, nkeys);
      t.store(o + c0, Dvp);
    };
    int64_t c0 = 0;
    for (; c0 + kGroup <= Dvp; c0 += kGroup) block(std::integral_constant<int, NV>{}, c0);
    gemm::with_count<NV - 1>(static_cast<int>((Dvp - c0) / kWidth), [&](auto vecs) { block(vecs, c0); });
  });
}

// Per-thread scratch, grown on demand and kept for the thread's lifetime.
struct Scratch {
  std::vector<float> qt, vp, st, o, m, l, alpha;
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

// Adds the bias and applies the mask of query row i to column c of an S^T tile.
void apply_mask_bias(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j0, int nkeys, float* col) {
  if (p.bias) {
    const float* br =
        p.bias + b * p.bias_strides[0] + h * p.bias_strides[1] + i * p.bias_strides[2] + j0 * p.bias_strides[3];
    const int64_t bs = p.bias_strides[3];
    // A finite bias stays finite in the base-2 domain (no overflow to -inf near -FLT_MAX).
    const float lo = -std::numeric_limits<float>::max();
    for (int j = 0; j < nkeys; ++j) {
      const float bj = br[j * bs];
      col[j * kGroup] += bj == kNegInf ? kNegInf : std::max(bj * kLog2e, lo);
    }
  }
  if (p.mask) {
    const uint8_t* mr =
        p.mask + b * p.mask_strides[0] + h * p.mask_strides[1] + i * p.mask_strides[2] + j0 * p.mask_strides[3];
    const int64_t ms = p.mask_strides[3];
    for (int j = 0; j < nkeys; ++j)
      if (!mr[j * ms]) col[j * kGroup] = kNegInf;
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

// Online-softmax update of one query vector (kWidth queries, lanes) over nkeys rows of an S^T
// tile column: running max m, sum l, rescale factor alpha; the tile becomes exp2(s - m).
void softmax_update(float* col, int nkeys, float* m, float* l, float* alpha) {
  vf vmx = simd::splat(kNegInf);
  for (int j = 0; j < nkeys; ++j) vmx = simd::vmax_nan(vmx, simd::load(col + j * kGroup));
  const vf mold = simd::load(m);
  const vf mnew = simd::vmax_nan(mold, vmx);  // NaN wins: a NaN score poisons its row
  const simd::vi empty = mnew == simd::splat(kNegInf);
  const vf msafe = empty ? simd::splat(0.0f) : mnew;
  const vf a = simd::exp2(mold - msafe);  // mold = -inf gives 0; both -inf: 0 (O and l are 0)
  vf sum = vf{};
  for (int j = 0; j < nkeys; ++j) {
    const vf e = simd::exp2(simd::load(col + j * kGroup) - msafe);
    simd::store(col + j * kGroup, e);
    sum += e;
  }
  simd::store(l, simd::load(l) * a + sum);
  simd::store(m, mnew);
  simd::store(alpha, a);
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
  const int64_t rows_pad = round_up(rows, kWidth);

  const float* qb = p.q + (bh * Lq + i0) * D;
  const float* kb = p.k + bh * Lk * D;
  const float* vb = p.v + bh * Lk * Dv;

  Scratch& sc = Scratch::get();
  float* qt = grow(sc.qt, static_cast<size_t>(rows_pad * D));
  float* vp = direct_v ? nullptr : grow(sc.vp, static_cast<size_t>(kKeyBlock * Dvp));
  float* st = grow(sc.st, static_cast<size_t>(kKeyBlock * kGroup));
  float* o = grow(sc.o, static_cast<size_t>(rows * Dvp));
  float* m = grow(sc.m, static_cast<size_t>(rows_pad));
  float* l = grow(sc.l, static_cast<size_t>(rows_pad));
  float* alpha = grow(sc.alpha, static_cast<size_t>(kGroup));

  // Queries scaled into the base-2 domain and transposed (queries along the lanes).
  const float qscale = p.scale * kLog2e;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) qt[d * rows_pad + r] = qb[r * D + d] * qscale;
  for (int64_t d = 0; d < D; ++d) std::fill(qt + d * rows_pad + rows, qt + (d + 1) * rows_pad, 0.0f);
  std::fill(o, o + rows * Dvp, 0.0f);
  std::fill(m, m + rows_pad, kNegInf);
  std::fill(l, l + rows_pad, 0.0f);

  float* wrow0 = p.weights ? p.weights + (bh * Lq + i0) * Lk : nullptr;
  const bool masked = p.mask || p.bias;

  for (int64_t j0 = 0; j0 < Lkb; j0 += kKeyBlock) {
    const int nkeys = static_cast<int>(std::min<int64_t>(kKeyBlock, Lkb - j0));
    const float* kblk = kb + j0 * D;
    const float* vblk;
    int64_t vstride;
    if (direct_v) {
      vblk = vb + j0 * Dv;
      vstride = Dv;
    } else {
      for (int j = 0; j < nkeys; ++j) {
        const float* vr = vb + (j0 + j) * Dv;
        float* dst = vp + j * Dvp;
        std::copy(vr, vr + Dv, dst);
        std::fill(dst + Dv, dst + Dvp, 0.0f);
      }
      vblk = vp;
      vstride = Dvp;
    }

    for (int64_t g0 = 0; g0 < rows; g0 += kGroup) {
      const int nq = static_cast<int>(std::min<int64_t>(kGroup, rows_pad - g0) / kWidth);  // vectors
      const int nreal = static_cast<int>(std::min<int64_t>(kGroup, rows - g0));            // queries
      score_block(kblk, D, nkeys, qt + g0, rows_pad, nq, st);
      for (int r = 0; r < nreal; ++r) {
        const int64_t i = i0 + g0 + r;
        if (masked) apply_mask_bias(p, b, h, i, j0, nkeys, st + r);
        if (wrow0) {
          float* w = wrow0 + (g0 + r) * Lk + j0;
          for (int j = 0; j < nkeys; ++j) w[j] = st[j * kGroup + r];
        }
      }
      for (int c = 0; c < nq; ++c)
        softmax_update(st + c * kWidth, nkeys, m + g0 + c * kWidth, l + g0 + c * kWidth, alpha + c * kWidth);
      if (p.dropout) {
        for (int j = 0; j < nkeys; ++j)
          for (int r = 0; r < nreal; ++r) {
            const bool keep = dropout_bits(p.seed, b, h, i0 + g0 + r, j0 + j) >= p.dropout_threshold;
            float& x = st[j * kGroup + r];
            x = keep ? x * p.dropout_scale : 0.0f;
          }
      }
      for (int r0 = 0; r0 < nreal; r0 += MR) {
        const int R = std::min(MR, nreal - r0);
        pv_rows(R, st + r0, alpha + r0, vblk, vstride, nkeys, o + (g0 + r0) * Dvp, Dvp);
      }
    }
  }

  // Normalize and write out, lse and (optionally) the weights.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const bool nan_row = l[r] != l[r];
    const bool live = nan_row || l[r] > 0.0f;
    const float inv = 1.0f / l[r];
    float* outr = p.out + (bh * Lq + i) * Dv;
    const float* orow = o + r * Dvp;
    if (live) {
      for (int64_t c = 0; c < Dv; ++c) outr[c] = orow[c] * inv;
    } else {  // no key to attend to: zeros, whatever v holds
      std::fill(outr, outr + Dv, 0.0f);
    }
    if (p.lse) p.lse[bh * Lq + i] = live ? (m[r] + std::log2(l[r])) * kLn2 : kNegInf;
    if (wrow0) {
      float* w = wrow0 + r * Lk;
      if (nan_row) {  // a NaN score poisons the whole row, dropped entries included
        std::fill(w, w + Lkb, std::numeric_limits<float>::quiet_NaN());
      } else if (live) {
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
  // threads, but keep chunks long enough to fill whole query groups.
  int64_t nchunks = (p.Lq + kQueryChunk - 1) / kQueryChunk;
  const int64_t bh = p.B * p.H;
  while (bh * nchunks < 2 * p.num_threads && p.Lq / (nchunks + 1) >= kGroup) ++nchunks;
  int64_t chunk_rows = (p.Lq + nchunks - 1) / nchunks;
  if (chunk_rows > kWidth) chunk_rows = round_up(chunk_rows, kWidth);
  nchunks = (p.Lq + chunk_rows - 1) / chunk_rows;
  parallel_for(bh * nchunks, p.num_threads, [&](int64_t task, int) { run_task(p, task, nchunks, chunk_rows); });
}

}  // namespace MMCORE_TARGET
}  // namespace mmcore
