// Fusion reductions on the CPU: masked mean / max over tokens, and the fusion of per-modality
// embeddings (concat, mean, sum, max, weighted, attention). Memory-bound: every input value is
// read once, with vector loads along D. Compiled once per instruction-set target.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "mmcore/fusion.h"
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

constexpr int64_t kChunk = 4096;  // floats of D per task in the token reductions (whole rows when possible)
// The mean's float32 partial sums (one per value of D) are flushed into float64 totals every
// kFlush real tokens, so the sum of any number of tokens stays within a few float32 ulps of the
// exact one (a float32 running sum stalls: 2^24 + 1 == 2^24) at no measurable cost.
constexpr int64_t kFlush = 32;

// Splits D into chunks so that B * chunks gives the threads enough tasks.
int64_t d_chunk(int64_t B, int64_t D, int threads) {
  int64_t chunk = std::min<int64_t>(D, kChunk);
  while (chunk > 2 * kWidth && B * ((D + chunk - 1) / chunk) < 4 * threads)
    chunk = (chunk / 2 + kWidth - 1) / kWidth * kWidth;
  return std::max<int64_t>(chunk, 1);
}

template <bool Max>
void masked_reduce(const MaskedReduceParams& p) {
  const int64_t B = p.B, L = p.L, D = p.D;
  if (B == 0 || D == 0) return;
  const int64_t chunk = d_chunk(B, D, p.num_threads);
  const int64_t nchunks = (D + chunk - 1) / chunk;
  parallel_for(B * nchunks, p.num_threads, [&](int64_t task, int) {
    const int64_t b = task / nchunks, d0 = (task % nchunks) * chunk;
    const int64_t n = std::min(chunk, D - d0);
    const uint8_t* m = p.mask ? p.mask + b * L : nullptr;
    float* out = p.out + b * D + d0;
    int64_t count = 0;
    for (int64_t l = 0; l < L; ++l) count += m ? (m[l] != 0) : 1;
    if (count == 0) {
      std::fill(out, out + n, 0.0f);
      return;
    }
    const float* xb = p.x + b * L * D + d0;
    // Stream the rows front to back, accumulating the chunk in a small buffer (L1-resident).
    thread_local std::vector<vf> acc_buf;
    thread_local std::vector<double> total_buf;
    const int64_t nvec = (n + kWidth - 1) / kWidth;
    if (static_cast<int64_t>(acc_buf.size()) < nvec) acc_buf.resize(nvec);
    vf* acc = acc_buf.data();
    const vf init = simd::splat(Max ? -std::numeric_limits<float>::infinity() : 0.0f);
    for (int64_t v = 0; v < nvec; ++v) acc[v] = init;
    double* total = nullptr;
    if constexpr (!Max) {
      if (static_cast<int64_t>(total_buf.size()) < nvec * kWidth) total_buf.resize(nvec * kWidth);
      total = total_buf.data();
      std::fill(total, total + nvec * kWidth, 0.0);
    }
    // Adds the float32 partial sums into the float64 totals and restarts them.
    auto flush = [&] {
      const float* a = reinterpret_cast<const float*>(acc);
      for (int64_t i = 0; i < nvec * kWidth; ++i) total[i] += static_cast<double>(a[i]);
      for (int64_t v = 0; v < nvec; ++v) acc[v] = vf{};
    };
    int64_t pending = 0;  // tokens in the float32 partial sums
    const int64_t nfull = n / kWidth;
    float tail[kWidth];
    for (int64_t l = 0; l < L; ++l) {
      if (m && !m[l]) continue;
      if constexpr (!Max) {
        if (pending == kFlush) {
          flush();
          pending = 0;
        }
        ++pending;
      }
      const float* r = xb + l * D;
      for (int64_t v = 0; v < nfull; ++v) {
        const vf x = simd::load(r + v * kWidth);
        acc[v] = Max ? simd::vmax_nan(acc[v], x) : acc[v] + x;
      }
      if (nfull < nvec) {  // partial vector at the end of the chunk
        for (int t = 0; t < kWidth; ++t) tail[t] = nfull * kWidth + t < n ? r[nfull * kWidth + t] : 0.0f;
        const vf x = simd::load(tail);
        acc[nfull] = Max ? simd::vmax_nan(acc[nfull], x) : acc[nfull] + x;
      }
    }
    if constexpr (!Max) {
      flush();
      // The mean of the float64 total, rounded once to float32.
      const double c = static_cast<double>(count);
      for (int64_t t = 0; t < n; ++t) out[t] = static_cast<float>(total[t] / c);
    } else {
      for (int64_t v = 0; v < nfull; ++v) simd::store(out + v * kWidth, acc[v]);
      if (nfull < nvec) {
        simd::store(tail, acc[nfull]);
        for (int64_t t = nfull * kWidth; t < n; ++t) out[t] = tail[t - nfull * kWidth];
      }
    }
  });
}

void fuse_row(const FuseParams& p, int64_t b) {
  const int64_t M = p.M, D = p.D;
  const float* e = p.emb + b * M * D;
  const uint8_t* pr = p.present ? p.present + b * M : nullptr;
  auto present = [&](int64_t m) { return pr == nullptr || pr[m] != 0; };
  if (p.strategy == FuseStrategy::concat) {
    float* out = p.out + b * M * D;
    for (int64_t m = 0; m < M; ++m) {
      if (present(m))
        std::memcpy(out + m * D, e + m * D, sizeof(float) * D);
      else
        std::fill(out + m * D, out + (m + 1) * D, 0.0f);
    }
    return;
  }
  float* out = p.out + b * D;
  // Per-modality coefficients of the weighted sum (or of the max / mean), 0 when absent.
  std::vector<float> w(static_cast<size_t>(M), 0.0f);
  int64_t count = 0;
  for (int64_t m = 0; m < M; ++m) count += present(m);
  if (count == 0) {
    std::fill(out, out + D, 0.0f);
    if (p.out_weights) std::fill(p.out_weights + b * M, p.out_weights + (b + 1) * M, 0.0f);
    return;
  }
  switch (p.strategy) {
    case FuseStrategy::mean:
    case FuseStrategy::sum: {
      const float c = p.strategy == FuseStrategy::mean ? 1.0f / static_cast<float>(count) : 1.0f;
      for (int64_t m = 0; m < M; ++m) w[m] = present(m) ? c : 0.0f;
      break;
    }
    case FuseStrategy::weighted: {
      const float* wi = p.weights + (p.weights_per_batch ? b * M : 0);
      double total = 0.0;
      for (int64_t m = 0; m < M; ++m)
        if (present(m)) total += wi[m];
      for (int64_t m = 0; m < M; ++m) w[m] = (present(m) && total != 0.0) ? static_cast<float>(wi[m] / total) : 0.0f;
      break;
    }
    case FuseStrategy::attention: {
      const float* q = p.query + (p.query_per_batch ? b * D : 0);
      const float scale = 1.0f / std::sqrt(static_cast<float>(D));
      std::vector<float> s(static_cast<size_t>(M));
      float mx = -std::numeric_limits<float>::infinity();
      bool nan = false;
      for (int64_t m = 0; m < M; ++m) {
        if (!present(m)) continue;
        const float* em = e + m * D;
        // float32 partial dot products over kDotChunk values, added into a float64 total
        constexpr int64_t kDotChunk = 64 * kWidth;
        const int64_t nv = D / kWidth * kWidth;
        double dot = 0.0;
        for (int64_t c0 = 0; c0 < nv; c0 += kDotChunk) {
          const int64_t c1 = std::min(nv, c0 + kDotChunk);
          vf acc = vf{};
          for (int64_t d = c0; d < c1; d += kWidth) acc += simd::load(q + d) * simd::load(em + d);
          dot += static_cast<double>(simd::hsum(acc));
        }
        float t = 0.0f;
        for (int64_t d = nv; d < D; ++d) t += q[d] * em[d];
        s[m] = static_cast<float>(dot + static_cast<double>(t)) * scale;
        if (s[m] != s[m]) nan = true;
        mx = std::max(mx, s[m]);
      }
      double z = 0.0;
      for (int64_t m = 0; m < M; ++m)
        if (present(m)) z += std::exp(static_cast<double>(s[m] - mx));
      for (int64_t m = 0; m < M; ++m) {
        if (!present(m)) continue;
        w[m] = nan ? std::numeric_limits<float>::quiet_NaN()
                   : static_cast<float>(std::exp(static_cast<double>(s[m] - mx)) / z);
      }
      break;
    }
    default: break;
  }
  if (p.strategy == FuseStrategy::max) {
    for (int64_t d = 0; d < D; d += kWidth) {
      const int64_t n = std::min<int64_t>(kWidth, D - d);
      if (n == kWidth) {
        vf a = simd::splat(-std::numeric_limits<float>::infinity());
        for (int64_t m = 0; m < M; ++m)
          if (present(m)) a = simd::vmax_nan(a, simd::load(e + m * D + d));
        simd::store(out + d, a);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          float a = -std::numeric_limits<float>::infinity();
          for (int64_t m = 0; m < M; ++m) {
            if (!present(m)) continue;
            const float v = e[m * D + d + i];
            a = (v > a || v != v) ? v : a;
          }
          out[d + i] = a;
        }
      }
    }
    return;
  }
  auto used = [&](int64_t m) { return w[m] != 0.0f || w[m] != w[m]; };  // NaN weights too
  if (M <= kFlush) {  // few modalities (the usual case): one float32 sum
    for (int64_t d = 0; d < D; d += kWidth) {
      const int64_t n = std::min<int64_t>(kWidth, D - d);
      if (n == kWidth) {
        vf a = vf{};
        for (int64_t m = 0; m < M; ++m)
          if (used(m)) a += simd::splat(w[m]) * simd::load(e + m * D + d);
        simd::store(out + d, a);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          float a = 0.0f;
          for (int64_t m = 0; m < M; ++m)
            if (used(m)) a += w[m] * e[m * D + d + i];
          out[d + i] = a;
        }
      }
    }
  } else {
    // float32 partial sums over kFlush modalities at a time, added into float64 totals.
    for (int64_t d = 0; d < D; d += kWidth) {
      const int64_t n = std::min<int64_t>(kWidth, D - d);
      double tot[kWidth] = {};
      for (int64_t m0 = 0; m0 < M; m0 += kFlush) {
        const int64_t m1 = std::min(M, m0 + kFlush);
        if (n == kWidth) {
          vf a = vf{};
          for (int64_t m = m0; m < m1; ++m)
            if (used(m)) a += simd::splat(w[m]) * simd::load(e + m * D + d);
          for (int i = 0; i < kWidth; ++i) tot[i] += static_cast<double>(a[i]);
        } else {
          for (int64_t i = 0; i < n; ++i) {
            float a = 0.0f;
            for (int64_t m = m0; m < m1; ++m)
              if (used(m)) a += w[m] * e[m * D + d + i];
            tot[i] += static_cast<double>(a);
          }
        }
      }
      for (int64_t i = 0; i < n; ++i) out[d + i] = static_cast<float>(tot[i]);
    }
  }
  if (p.out_weights) std::copy(w.begin(), w.end(), p.out_weights + b * M);
}

}  // namespace

void masked_mean_f32(const MaskedReduceParams& p) { masked_reduce<false>(p); }
void masked_max_f32(const MaskedReduceParams& p) { masked_reduce<true>(p); }

void fuse_f32(const FuseParams& p) {
  if (p.B == 0) return;
  const int64_t rows_per_task = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, p.M * p.D));
  const int64_t tasks = (p.B + rows_per_task - 1) / rows_per_task;
  parallel_for(tasks, p.num_threads, [&](int64_t t, int) {
    for (int64_t b = t * rows_per_task; b < std::min(p.B, (t + 1) * rows_per_task); ++b) fuse_row(p, b);
  });
}

}  // namespace MMCORE_TARGET
}  // namespace mmcore
