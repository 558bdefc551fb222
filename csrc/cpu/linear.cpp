// y = x . W^T + b on the CPU, without BLAS (so that no second thread pool competes with the
// library's own).
//
// This file is compiled once per instruction-set target (baseline, AVX2, AVX-512) with
// MMCORE_TARGET naming the namespace; dispatch.cpp picks one at run time.
//
// One task = (a chunk of at most kRowChunk rows, a block of kCols output columns). The task
// packs its block of W transposed (K x kCols, columns along the vector lanes) into thread-local
// scratch, then walks its rows in register tiles of MR rows x NV vectors (gemm_tile.h):
//   acc[r][c] = b[cols] + sum_k x[r, k] * Wt[k, cols]
// Each output element is one sum over k in increasing order, accumulated in float32 (with
// fused multiply-adds where the target has them), then the optional activation.
//
// Also here: layer normalisation over rows (the other per-token step of a transformer block).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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
constexpr int kCols = kWidth * NV;        // output columns per task block
constexpr int64_t kRowChunk = 192;        // rows per task at most
constexpr int64_t kSerialWork = 1 << 18;  // multiply-adds below which one thread does it all

// R rows x nvec vectors of columns (R <= MR, nvec <= NV):
// out[r, c] = bias[c] + sum_k x[r, k] * wt[k, c].
void rows_block(int R, int nvec, const float* x, int64_t ldx, const float* wt, const float* bias, int64_t K, float* out,
                int64_t ldo) {
  gemm::with_count<MR>(R, [&](auto rows) {
    gemm::with_count<NV>(nvec, [&](auto vecs) {
      gemm::Tile<decltype(rows)::value, decltype(vecs)::value> t;
      t.broadcast_row(bias);
      t.multiply_add(x, ldx, 1, wt, kCols, K);
      t.store(out, ldo);
    });
  });
}

// The activation on n floats in place (scalar libm: exact to float rounding, as PyTorch's
// CPU kernels; the GEMM before it dominates).
void activate(float* y, int64_t n, Activation act) {
  switch (act) {
    case Activation::gelu:
      for (int64_t i = 0; i < n; ++i) y[i] = 0.5f * y[i] * (1.0f + std::erf(y[i] * 0.70710678118654752f));
      break;
    case Activation::gelu_tanh:
      for (int64_t i = 0; i < n; ++i) {
        const float v = y[i];
        y[i] = 0.5f * v * (1.0f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
      }
      break;
    case Activation::quick_gelu:
      for (int64_t i = 0; i < n; ++i) y[i] = y[i] / (1.0f + std::exp(-1.702f * y[i]));
      break;
    case Activation::relu:
      for (int64_t i = 0; i < n; ++i) y[i] = y[i] < 0.0f ? 0.0f : y[i];
      break;
    default: break;
  }
}

struct Scratch {
  std::vector<float> wt, bias, out;
  static Scratch& get() {
    thread_local Scratch sc;
    return sc;
  }
};

// IEEE binary16 bits -> float (exact: normals, subnormals, zeros, inf, NaN).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <class Load>
void pack(const LinearParams& p, int64_t col0, int64_t ncols, int64_t padded, float* wt, Load load) {
  for (int64_t k = 0; k < p.K; ++k) {
    float* dst = wt + k * kCols;
    for (int64_t j = 0; j < ncols; ++j) dst[j] = load(p.w, (col0 + j) * p.ldw + k);
    for (int64_t j = ncols; j < padded; ++j) dst[j] = 0.0f;
  }
}

void run_task(const LinearParams& p, int64_t row0, int64_t rows, int64_t col0) {
  const int64_t ncols = std::min<int64_t>(kCols, p.N - col0);
  const int nvec = static_cast<int>((ncols + kWidth - 1) / kWidth);
  const int64_t padded = static_cast<int64_t>(nvec) * kWidth;
  Scratch& sc = Scratch::get();
  if (sc.wt.size() < static_cast<size_t>(p.K * kCols)) sc.wt.resize(static_cast<size_t>(p.K * kCols));
  float* wt = sc.wt.data();
  // pack W[col0 : col0 + ncols, :] transposed, widened to float32; padding columns are zero
  switch (p.w_kind) {
    case WeightKind::f16:
      pack(p, col0, ncols, padded, wt,
           [](const void* w, int64_t i) { return half_to_float(static_cast<const uint16_t*>(w)[i]); });
      break;
    case WeightKind::bf16:
      pack(p, col0, ncols, padded, wt,
           [](const void* w, int64_t i) { return bf16_to_float(static_cast<const uint16_t*>(w)[i]); });
      break;
    case WeightKind::i8: {
      const float* sc = p.w_scale;
      for (int64_t k = 0; k < p.K; ++k) {
        float* dst = wt + k * kCols;
        const int8_t* q = static_cast<const int8_t*>(p.w);
        for (int64_t j = 0; j < ncols; ++j) dst[j] = static_cast<float>(q[(col0 + j) * p.ldw + k]) * sc[col0 + j];
        for (int64_t j = ncols; j < padded; ++j) dst[j] = 0.0f;
      }
      break;
    }
    default: pack(p, col0, ncols, padded, wt, [](const void* w, int64_t i) { return static_cast<const float*>(w)[i]; });
  }
  const float* bias = nullptr;
  if (p.bias) {
    sc.bias.assign(static_cast<size_t>(padded), 0.0f);
    std::memcpy(sc.bias.data(), p.bias + col0, static_cast<size_t>(ncols) * sizeof(float));
    bias = sc.bias.data();
  }
  const bool direct = ncols == padded;  // whole vectors: store straight into y
  if (!direct && sc.out.size() < static_cast<size_t>(MR * padded)) sc.out.resize(static_cast<size_t>(MR * padded));
  for (int64_t r = 0; r < rows; r += MR) {
    const int R = static_cast<int>(std::min<int64_t>(MR, rows - r));
    const float* xr = p.x + (row0 + r) * p.ldx;
    float* yr = p.y + (row0 + r) * p.ldy + col0;
    if (direct) {
      rows_block(R, nvec, xr, p.ldx, wt, bias, p.K, yr, p.ldy);
    } else {
      rows_block(R, nvec, xr, p.ldx, wt, bias, p.K, sc.out.data(), padded);
      for (int i = 0; i < R; ++i)
        std::memcpy(yr + i * p.ldy, sc.out.data() + i * padded, static_cast<size_t>(ncols) * sizeof(float));
    }
    if (p.activation != Activation::none)
      for (int i = 0; i < R; ++i) activate(yr + i * p.ldy, ncols, p.activation);
  }
}

}  // namespace

void linear_f32(const LinearParams& p) {
  if (p.M <= 0 || p.N <= 0) return;
  {
    // Each thread packs a (K, kCols) float32 panel of W; a K beyond the budget raises SizeError.
    constexpr double kMaxPanelBytes = 2.0 * 1024.0 * 1024.0 * 1024.0;
    const double bytes = static_cast<double>(p.K) * kCols * sizeof(float);
    if (bytes > kMaxPanelBytes)
      throw SizeError("K = " + std::to_string(p.K) + " needs " + bytes_str(bytes) +
                      " of packed weights per thread (limit " + bytes_str(kMaxPanelBytes) + ")");
  }
  const int64_t col_blocks = (p.N + kCols - 1) / kCols;
  const int64_t row_chunks = (p.M + kRowChunk - 1) / kRowChunk;
  const int64_t work = p.M * p.N * std::max<int64_t>(p.K, 1);
  // split rows finer when there are few tasks, so that every thread gets some
  int64_t chunk = kRowChunk;
  if (p.num_threads > 1 && row_chunks * col_blocks < 2 * p.num_threads) {
    const int64_t want = (2 * p.num_threads + col_blocks - 1) / col_blocks;
    chunk = std::max<int64_t>(MR, (p.M + want - 1) / want);
    chunk = (chunk + MR - 1) / MR * MR;
  }
  const int64_t nchunks = (p.M + chunk - 1) / chunk;
  const int threads = work < kSerialWork ? 1 : p.num_threads;
  parallel_for(nchunks * col_blocks, threads, [&](int64_t t, int) {
    const int64_t ci = t / col_blocks, bi = t % col_blocks;
    const int64_t row0 = ci * chunk;
    run_task(p, row0, std::min(chunk, p.M - row0), bi * kCols);
  });
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
