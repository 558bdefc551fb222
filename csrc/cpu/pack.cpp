// Packing of linear weights into the panels of PackedWeight (linear.h): once per call for a
// plain weight, once per weight for a packed one. Compiled once (the layout does not depend on
// the instruction-set target; the micro-kernels of every target read it).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "mmcore/float_bits.h"
#include "mmcore/linear.h"
#include "mmcore/parallel.h"
#include "mmcore/size_error.h"

namespace mmcore {

size_t PackedWeight::nbytes() const {
  const size_t n = static_cast<size_t>(panels()) * kPanel;
  if (precision == Precision::int8)
    return n * static_cast<size_t>(kpairs()) * 2 * sizeof(int16_t) + scale.size() * sizeof(float);
  return n * static_cast<size_t>(K) * sizeof(float);
}

namespace {

// Row n of W as float32 (the dequantized value for float16, bfloat16 and int8 weights).
void row_values(const LinearParams& p, int64_t n, float* out) {
  const int64_t off = n * p.ldw;
  switch (p.w_kind) {
    case WeightKind::f16: {
      const uint16_t* w = static_cast<const uint16_t*>(p.w) + off;
      for (int64_t k = 0; k < p.K; ++k) out[k] = half_to_float(w[k]);
      break;
    }
    case WeightKind::bf16: {
      const uint16_t* w = static_cast<const uint16_t*>(p.w) + off;
      for (int64_t k = 0; k < p.K; ++k) out[k] = bf16_to_float(w[k]);
      break;
    }
    case WeightKind::i8: {
      const int8_t* w = static_cast<const int8_t*>(p.w) + off;
      const float s = p.w_scale[n];
      for (int64_t k = 0; k < p.K; ++k) out[k] = static_cast<float>(w[k]) * s;
      break;
    }
    default:
      if (p.K) std::memcpy(out, static_cast<const float*>(p.w) + off, static_cast<size_t>(p.K) * sizeof(float));
  }
}

// Row n of W as int8 values and its scale: as stored for int8 weights, else quantized
// symmetrically (linear.h).
float row_int8(const LinearParams& p, int64_t n, std::vector<float>& vals, int8_t* q) {
  if (p.w_kind == WeightKind::i8) {
    if (p.K) std::memcpy(q, static_cast<const int8_t*>(p.w) + n * p.ldw, static_cast<size_t>(p.K));
    return p.w_scale[n];
  }
  vals.resize(static_cast<size_t>(p.K));
  row_values(p, n, vals.data());
  float amax = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < p.K; ++k) {
    const float v = vals[static_cast<size_t>(k)];
    finite = finite && std::isfinite(v);
    amax = std::max(amax, std::fabs(v));
  }
  if (!finite) {
    std::memset(q, 0, static_cast<size_t>(p.K));
    return std::numeric_limits<float>::quiet_NaN();
  }
  float s = amax / 127.0f;
  if (s == 0.0f || !std::isfinite(1.0f / s)) s = 1.0f;  // 0, or 1 / s overflows
  const float inv = 1.0f / s;
  for (int64_t k = 0; k < p.K; ++k) {
    const float r = std::nearbyint(vals[static_cast<size_t>(k)] * inv);
    q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
  }
  return s;
}

// Makes buf hold at least count elements (64-byte aligned), keeping it when it already does.
template <class T>
void reserve(std::unique_ptr<T[], PackedWeight::Free>& buf, size_t& capacity, size_t count) {
  count = std::max<size_t>(count, 1);
  if (buf && capacity >= count) return;
  buf.reset();
  const size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
  void* ptr = std::aligned_alloc(64, bytes);
  if (!ptr) throw std::bad_alloc();
  buf.reset(static_cast<T*>(ptr));
  capacity = count;
}

}  // namespace

void pack_weight(const LinearParams& p, PackedWeight& out) {
  constexpr int64_t P = PackedWeight::kPanel;
  out.N = p.N;
  out.K = p.K;
  out.precision = p.precision;
  const int64_t panels = out.panels();
  const bool int8 = p.precision == Precision::int8;
  const double bytes = static_cast<double>(panels) * P *
                       (int8 ? static_cast<double>(out.kpairs()) * 2 * sizeof(int16_t) : p.K * sizeof(float));
  constexpr double kMaxBytes = 16.0 * 1024.0 * 1024.0 * 1024.0;
  if (bytes > kMaxBytes)
    throw SizeError("packing a (" + std::to_string(p.N) + ", " + std::to_string(p.K) + ") weight needs " +
                    bytes_str(bytes) + " (limit " + bytes_str(kMaxBytes) + ")");
  const int threads = static_cast<double>(p.N) * p.K < (1 << 16) ? 1 : p.num_threads;
  if (int8) {
    const int64_t KP = out.kpairs();
    reserve(out.q, out.q_capacity, static_cast<size_t>(panels * KP * P * 2));
    out.scale.assign(static_cast<size_t>(p.N), 0.0f);
    int16_t* q = out.q.get();
    float* scale = out.scale.data();
    parallel_for(panels, threads, [&](int64_t pi, int) {
      std::vector<float> vals;
      std::vector<int8_t> row(static_cast<size_t>(p.K));
      constexpr int64_t S = PackedWeight::kSub;
      for (int64_t j = 0; j < P; ++j) {
        const int64_t n = pi * P + j;
        int16_t* dst = q + ((pi * (P / S) + j / S) * KP * S + j % S) * 2;  // strip of column n
        if (n < p.N) {
          scale[n] = row_int8(p, n, vals, row.data());
          for (int64_t k = 0; k < 2 * KP; ++k) dst[(k >> 1) * S * 2 + (k & 1)] = k < p.K ? row[k] : 0;
        } else {
          for (int64_t k = 0; k < 2 * KP; ++k) dst[(k >> 1) * S * 2 + (k & 1)] = 0;
        }
      }
    });
    return;
  }
  reserve(out.f, out.f_capacity, static_cast<size_t>(panels * p.K * P));
  float* f = out.f.get();
  const bool bf16 = p.precision == Precision::bf16;
  parallel_for(panels, threads, [&](int64_t pi, int) {
    // the panel's rows, row-major, then transposed strip by strip, 16 k at a time (the 1 KiB
    // being written stays in L1)
    const int64_t nrows = std::min<int64_t>(P, p.N - pi * P);
    std::vector<float> rows(static_cast<size_t>(nrows * p.K));
    for (int64_t j = 0; j < nrows; ++j) {
      float* row = rows.data() + j * p.K;
      row_values(p, pi * P + j, row);
      if (bf16)
        for (int64_t k = 0; k < p.K; ++k) row[k] = round_bf16(row[k]);
    }
    constexpr int64_t S = PackedWeight::kSub;
    constexpr int64_t kb = 16;
    for (int64_t s0 = 0; s0 < P; s0 += S) {
      float* dst = f + (pi * P + s0) * p.K;  // strip of columns pi * P + s0 ...
      for (int64_t k0 = 0; k0 < p.K; k0 += kb) {
        const int64_t k1 = std::min(p.K, k0 + kb);
        for (int64_t j = s0; j < s0 + S; ++j) {
          if (j < nrows) {
            const float* src = rows.data() + j * p.K;
            for (int64_t k = k0; k < k1; ++k) dst[k * S + (j - s0)] = src[k];
          } else {
            for (int64_t k = k0; k < k1; ++k) dst[k * S + (j - s0)] = 0.0f;
          }
        }
      }
    }
  });
}

}  // namespace mmcore
