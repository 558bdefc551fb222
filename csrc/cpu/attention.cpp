// Tiled online-softmax (flash-style) attention on the CPU.
//
// This file is compiled once per instruction-set target (baseline, AVX2, AVX-512) with
// MMCORE_TARGET naming the namespace; dispatch.cpp picks one at run time.
//
// Work decomposition: one task = (batch b, head h, chunk of query rows). The chunk's queries are
// packed once, transposed and pre-scaled, in groups of kGroup queries (per group a D x kGroup
// block, queries along the vector lanes). Keys are walked in blocks of kKeyBlock, read in place
// (float32) or from a per-thread copy rounded to bfloat16 ("bf16"); per query group:
//   S^T = K_block . Q^T              register tile: MR keys x NV vectors of queries
//   online softmax down the key axis (vertical vector ops: one running max / sum per lane)
//   O^T = alpha * O^T + V_block^T . P^T   register tile: MR value columns x NV vectors of queries
// so the softmax numerators P never leave the S^T tile layout, and O^T is kept per group
// (Dv x kGroup) until the chunk is done, then normalized and written out row by row.
// Extra memory per thread: the packed query chunk, one S^T tile (kKeyBlock x kGroup), the
// chunk's O^T accumulator and, under "bf16", the rounded K and V blocks. No (Lq x Lk) matrix
// exists unless the caller asked for the weights, which are then written in place.
//
// Batch invariance: every score is one float32 sum over d in increasing order (S^T tile lanes),
// the softmax statistics and O are updated once per key block of kKeyBlock keys in the same
// order, and each output element is one float32 sum over the keys of a block, whatever the
// number of query rows in the chunk or the group; so a query row gives the same bits alone, in a
// longer padded batch or split across any number of threads (a separate dot-product path for
// short chunks, which summed in another order, made results depend on the padding). The key axis
// is never split between tasks: merging partial (max, sum, O) states of key ranges would round
// differently from one pass over the keys, so only the query rows are split (down to one query
// group per task when there are few heads).

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
using simd::vi;

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

constexpr int MR = gemm::kTileRows;    // rows of a register tile (keys in S^T, value columns in O^T)
constexpr int NV = gemm::kTileVecs;    // vectors per register tile row
constexpr int kGroup = kWidth * NV;    // queries per group (the lanes of one register tile row)
constexpr int kKeyBlock = 128;         // keys per block (fixes the order of the float32 sums)
constexpr int64_t kQueryChunk = 256;   // query rows per task at most
constexpr int kTasksPerThread = 8;     // tasks per thread wanted (smaller chunks down to one group)
constexpr int64_t kMinChunkBf16 = 64;  // query rows per task at least under "bf16" (see below)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// bfloat16 rounding of float lanes (nearest, ties to even), widened back to float: NaN stays a
// quiet NaN, values beyond the largest bfloat16 become infinite.
inline vf round_bf16(vf x) {
  typedef uint32_t vu __attribute__((vector_size(kWidth * 4)));
  const vu bits = (vu)x;
  const vu r = x != x ? bits | 0x00400000u : bits + 0x7fffu + ((bits >> 16) & 1u);
  return (vf)(r & 0xffff0000u);
}

// round_bf16 for the softmax numerators P (in [0, 1], or scaled by dropout): without the NaN
// case, which can turn a NaN into a number; a NaN P only occurs in a row whose sum l is NaN,
// and the output of that row is NaN whatever P . V holds.
inline vf round_bf16_p(vf x) {
  typedef uint32_t vu __attribute__((vector_size(kWidth * 4)));
  const vu bits = (vu)x;
  return (vf)((bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u);
}

// dst[0, n) = bf16(src[0, n)).
void round_bf16_row(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) simd::store(dst + i, round_bf16(simd::load(src + i)));
  if (i < n) {
    float tmp[kWidth] = {};
    std::copy(src + i, src + n, tmp);
    simd::store(tmp, round_bf16(simd::load(tmp)));
    std::copy(tmp, tmp + (n - i), dst + i);
  }
}

// Rows of the next register tile when rem rows are left: MR, but the last two tiles split what
// is left evenly (7 = 4 + 3 rather than 6 + 1: a tile of few rows waits on the multiply-add
// latency).
inline int tile_rows(int rem) { return rem <= MR ? rem : rem < 2 * MR ? (rem + 1) / 2 : MR; }

// score_block and pv_group are kept out of line: inlined into run_task, GCC kept loop
// invariants of the softmax in vector registers and spilled a tile accumulator to the stack
// inside the multiply-add loop, which halved their speed.

// S^T for keys [0, nkeys) of a block (rows of k, stride ldk) and the nq query vectors of a group
// (qt: D x kGroup): st[j, :] = sum_d k[j, d] * qt[d, :]. With colmax, also the running maximum
// (NaN wins) of every query lane over the keys, in key order.
template <bool kMax>
__attribute__((noinline)) void score_block(const float* k, int64_t ldk, int64_t D, int nkeys, const float* qt, int nq,
                                           float* st, vf* colmax) {
  gemm::with_count<NV>(nq, [&](auto vecs) {
    constexpr int kV = decltype(vecs)::value;
    vf mx[kV];
    if constexpr (kMax)
      for (int c = 0; c < kV; ++c) mx[c] = simd::splat(kNegInf);
    for (int j = 0, R; j < nkeys; j += R) {
      R = tile_rows(nkeys - j);
      gemm::with_count<MR>(R, [&](auto rows) {
        constexpr int kR = decltype(rows)::value;
        gemm::Tile<kR, kV> t;
        t.zero();
        t.multiply_add(k + j * ldk, ldk, 1, qt, kGroup, D);
        t.store(st + j * kGroup, kGroup);
        if constexpr (kMax) {
#pragma GCC unroll 8
          for (int r = 0; r < kR; ++r)
#pragma GCC unroll 8
            for (int c = 0; c < kV; ++c) mx[c] = simd::vmax_nan(mx[c], t.acc[r][c]);
        }
      });
    }
    if constexpr (kMax)
      for (int c = 0; c < kV; ++c) colmax[c] = mx[c];
  });
}

// O^T = alpha * O^T + V^T . P^T for the nq query vectors of a group: og[c, :] (Dv x kGroup) over
// value columns c, p the S^T tile after the softmax (row stride kGroup), v the value block (row
// stride ldv). Each element is alpha * o plus one float32 sum over the keys in order.
__attribute__((noinline)) void pv_group(const float* p, int nq, const float* alpha, const float* v, int64_t ldv,
                                        int nkeys, float* og, int64_t Dv) {
  gemm::with_count<NV>(nq, [&](auto vecs) {
    constexpr int kV = decltype(vecs)::value;
    vf a[kV];
    for (int c = 0; c < kV; ++c) a[c] = simd::load(alpha + c * kWidth);
    for (int64_t c0 = 0, R; c0 < Dv; c0 += R) {
      R = tile_rows(static_cast<int>(std::min<int64_t>(2 * MR, Dv - c0)));
      gemm::with_count<MR>(static_cast<int>(R), [&](auto rows) {
        constexpr int kR = decltype(rows)::value;
        gemm::Tile<kR, kV> t;
        float* o = og + c0 * kGroup;
#pragma GCC unroll 8
        for (int r = 0; r < kR; ++r)
#pragma GCC unroll 8
          for (int c = 0; c < kV; ++c) t.acc[r][c] = simd::load(o + r * kGroup + c * kWidth) * a[c];
        t.multiply_add(v + c0, 1, ldv, p, kGroup, nkeys);
        t.store(o, kGroup);
      });
    }
  });
}

// Per-thread scratch, grown on demand and kept for the thread's lifetime.
struct Scratch {
  std::vector<float> qt, qrow, kr, vr, st, o, m, l, alpha;
  static Scratch& get() {
    thread_local Scratch sc;
    return sc;
  }
};

// n floats of v, grown on demand, starting on a 64-byte boundary (the register tiles load whole
// vectors from the packed queries, the S^T tile and O^T; a vector split across two cache lines
// costs a second access).
float* grow(std::vector<float>& v, size_t n) {
  constexpr size_t kAlign = 64 / sizeof(float);
  if (v.size() < n + kAlign) v.resize(n + kAlign);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(v.data());
  return v.data() + (kAlign - addr / sizeof(float) % kAlign) % kAlign;
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
// tile column whose maximum is vmx: running max m, sum l, rescale factor alpha; the tile becomes
// exp2(s - m) (rounded to bfloat16 with kRound; the sum l takes the unrounded values).
template <bool kRound>
void softmax_update(float* col, int nkeys, vf vmx, float* m, float* l, float* alpha) {
  const vf mold = simd::load(m);
  const vf mnew = simd::vmax_nan(mold, vmx);  // NaN wins: a NaN score poisons its row
  const vi empty = mnew == simd::splat(kNegInf);
  const vf msafe = empty ? simd::splat(0.0f) : mnew;
  const vf a = simd::exp2(mold - msafe);  // mold = -inf gives 0; both -inf: 0 (O and l are 0)
  vf sum = vf{};
  for (int j = 0; j < nkeys; ++j) {
    const vf e = simd::exp2(simd::load(col + j * kGroup) - msafe);
    simd::store(col + j * kGroup, kRound ? round_bf16_p(e) : e);
    sum += e;
  }
  simd::store(l, simd::load(l) * a + sum);
  simd::store(m, mnew);
  simd::store(alpha, a);
}

vf column_max(const float* col, int nkeys) {
  vf vmx = simd::splat(kNegInf);
  for (int j = 0; j < nkeys; ++j) vmx = simd::vmax_nan(vmx, simd::load(col + j * kGroup));
  return vmx;
}

void run_task(const AttentionParams& p, int64_t task, int64_t nchunks, int64_t chunk_rows) {
  const int64_t bh = task / nchunks, chunk = task % nchunks;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t i0 = chunk * chunk_rows;
  const int64_t rows = std::min(chunk_rows, p.Lq - i0);
  const int64_t D = p.D, Dv = p.Dv, Lq = p.Lq, Lk = p.Lk;
  const int64_t Lkb = p.key_lengths ? p.key_lengths[b] : Lk;
  const int64_t ngroups = (rows + kGroup - 1) / kGroup;
  const int64_t rows_pad = ngroups * kGroup;

  const float* qb = p.q + (bh * Lq + i0) * D;
  const float* kb = p.k + bh * Lk * D;
  const float* vb = p.v + bh * Lk * Dv;

  Scratch& sc = Scratch::get();
  float* qt = grow(sc.qt, static_cast<size_t>(rows_pad * D));
  float* qrow = p.bf16 ? grow(sc.qrow, static_cast<size_t>(D)) : nullptr;
  float* kr = p.bf16 ? grow(sc.kr, static_cast<size_t>(kKeyBlock * D)) : nullptr;
  float* vr = p.bf16 ? grow(sc.vr, static_cast<size_t>(kKeyBlock * Dv)) : nullptr;
  float* st = grow(sc.st, static_cast<size_t>(kKeyBlock * kGroup));
  float* o = grow(sc.o, static_cast<size_t>(rows_pad * Dv));
  float* m = grow(sc.m, static_cast<size_t>(rows_pad));
  float* l = grow(sc.l, static_cast<size_t>(rows_pad));
  float* alpha = grow(sc.alpha, static_cast<size_t>(kGroup));

  // Queries scaled into the base-2 domain and transposed per group (queries along the lanes);
  // the lanes past the last query are zero.
  const float qscale = p.scale * kLog2e;
  for (int64_t g = 0; g < ngroups; ++g) {
    float* qg = qt + g * D * kGroup;
    const int64_t n = std::min<int64_t>(kGroup, rows - g * kGroup);
    for (int64_t r = 0; r < n; ++r) {
      const float* qr = qb + (g * kGroup + r) * D;
      if (p.bf16) {
        round_bf16_row(qr, D, qrow);
        qr = qrow;
      }
      for (int64_t d = 0; d < D; ++d) qg[d * kGroup + r] = qr[d] * qscale;
    }
    for (int64_t d = 0; d < D; ++d) std::fill(qg + d * kGroup + n, qg + (d + 1) * kGroup, 0.0f);
  }
  std::fill(o, o + rows_pad * Dv, 0.0f);
  std::fill(m, m + rows_pad, kNegInf);
  std::fill(l, l + rows_pad, 0.0f);

  float* wrow0 = p.weights ? p.weights + (bh * Lq + i0) * Lk : nullptr;
  const bool masked = p.mask || p.bias;

  for (int64_t j0 = 0; j0 < Lkb; j0 += kKeyBlock) {
    const int nkeys = static_cast<int>(std::min<int64_t>(kKeyBlock, Lkb - j0));
    const float* kblk = kb + j0 * D;
    const float* vblk = vb + j0 * Dv;
    if (p.bf16) {
      round_bf16_row(kblk, nkeys * D, kr);
      round_bf16_row(vblk, nkeys * Dv, vr);
      kblk = kr;
      vblk = vr;
    }

    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t g0 = g * kGroup;
      const int nreal = static_cast<int>(std::min<int64_t>(kGroup, rows - g0));  // queries
      const int nq = (nreal + kWidth - 1) / kWidth;                              // vectors
      vf colmax[NV];
      if (masked) {
        score_block<false>(kblk, D, D, nkeys, qt + g * D * kGroup, nq, st, colmax);
      } else {
        score_block<true>(kblk, D, D, nkeys, qt + g * D * kGroup, nq, st, colmax);
      }
      for (int r = 0; r < nreal; ++r) {
        const int64_t i = i0 + g0 + r;
        if (masked) apply_mask_bias(p, b, h, i, j0, nkeys, st + r);
        if (wrow0) {
          float* w = wrow0 + (g0 + r) * Lk + j0;
          for (int j = 0; j < nkeys; ++j) w[j] = st[j * kGroup + r];
        }
      }
      const bool round_now = p.bf16 && !p.dropout;
      for (int c = 0; c < nq; ++c) {
        float* col = st + c * kWidth;
        const vf vmx = masked ? column_max(col, nkeys) : colmax[c];
        if (round_now) {
          softmax_update<true>(col, nkeys, vmx, m + g0 + c * kWidth, l + g0 + c * kWidth, alpha + c * kWidth);
        } else {
          softmax_update<false>(col, nkeys, vmx, m + g0 + c * kWidth, l + g0 + c * kWidth, alpha + c * kWidth);
        }
      }
      if (p.dropout) {
        for (int j = 0; j < nkeys; ++j) {
          float* x = st + j * kGroup;
          for (int r = 0; r < nreal; ++r) {
            const bool keep = dropout_bits(p.seed, b, h, i0 + g0 + r, j0 + j) >= p.dropout_threshold;
            x[r] = keep ? x[r] * p.dropout_scale : 0.0f;
          }
          if (p.bf16)
            for (int c = 0; c < nq; ++c) simd::store(x + c * kWidth, round_bf16_p(simd::load(x + c * kWidth)));
        }
      }
      pv_group(st, nq, alpha, vblk, Dv, nkeys, o + g0 * Dv, Dv);
    }
  }

  // Normalize and write out, lse and (optionally) the weights.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const bool nan_row = l[r] != l[r];
    const bool live = nan_row || l[r] > 0.0f;
    const float inv = 1.0f / l[r];
    float* outr = p.out + (bh * Lq + i) * Dv;
    const float* oc = o + (r / kGroup) * kGroup * Dv + r % kGroup;  // column r of its group's O^T
    if (live) {
      for (int64_t c = 0; c < Dv; ++c) outr[c] = oc[c * kGroup] * inv;
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
  // Split the query rows of each head into chunks of whole query groups, at most kQueryChunk
  // rows, and into smaller chunks (down to one group) while there are fewer than
  // kTasksPerThread tasks per thread, so that a thread that starts late or is descheduled leaves
  // little work to the others. Smaller chunks cost next to nothing in float32 (the keys are read
  // per query group anyway); under "bf16" every task rounds the keys and values it reads, so its
  // chunks keep at least kMinChunkBf16 rows. Results do not depend on the split (see the top of
  // this file).
  const int64_t bh = p.B * p.H;
  const int64_t groups = (p.Lq + kGroup - 1) / kGroup;
  const int64_t max_chunks = p.bf16 ? std::max<int64_t>(1, p.Lq / kMinChunkBf16) : groups;
  int64_t nchunks = (groups + kQueryChunk / kGroup - 1) / (kQueryChunk / kGroup);
  while (bh * nchunks < kTasksPerThread * p.num_threads && nchunks < max_chunks) ++nchunks;
  const int64_t chunk_groups = (groups + nchunks - 1) / nchunks;
  const int64_t chunk_rows = chunk_groups * kGroup;
  nchunks = (p.Lq + chunk_rows - 1) / chunk_rows;
  parallel_for(bh * nchunks, p.num_threads, [&](int64_t task, int) { run_task(p, task, nchunks, chunk_rows); });
}

}  // namespace MMCORE_TARGET
}  // namespace mmcore
