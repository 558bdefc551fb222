// The register-tiled micro-kernel of the CPU matrix products (linear.cpp, attention.cpp): an
// R x NC tile of float32 vector accumulators, R rows by NC vectors of kWidth columns, updated
// with rank-1 steps
//   acc[r][c] += splat(a[r * a_row + k * a_k]) * b[k * ldb + c * kWidth],   k = 0, 1, ..., K - 1
// so every output element is one float32 sum over k in increasing order (one multiply-add per
// step, fused where the target has FMA). A caller picks how the tile starts (zero, a bias row,
// scaled earlier output) and where it is stored; the strides of `a` let the same code read A
// row-major (a_k = 1) or transposed (a_row = 1). For per-target kernel files only.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mmcore/simd.h"

namespace mmcore {
namespace MMCORE_TARGET {
namespace gemm {

using simd::kWidth;
using simd::vf;

// Largest tile of the target: kTileRows rows x kTileVecs vectors of accumulators leave enough
// registers for the row broadcasts and the loaded vectors (32 zmm, 16 ymm / xmm registers).
#if defined(__AVX512F__)
constexpr int kTileRows = 6;
constexpr int kTileVecs = 4;
#elif defined(__AVX2__)
constexpr int kTileRows = 6;
constexpr int kTileVecs = 2;
#else
constexpr int kTileRows = 4;
constexpr int kTileVecs = 2;
#endif

#define MMCORE_TILE_INLINE inline __attribute__((always_inline))

template <int R, int NC>
struct Tile {
  static_assert(R >= 1 && R <= kTileRows && NC >= 1 && NC <= kTileVecs, "tile beyond the target's registers");
  vf acc[R][NC];

  MMCORE_TILE_INLINE void zero() {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] = vf{};
  }

  // Every row starts as the same NC vectors (a bias row); null: zero.
  MMCORE_TILE_INLINE void broadcast_row(const float* __restrict row) {
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const vf b = row ? simd::load(row + c * kWidth) : vf{};
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][c] = b;
    }
  }

  // acc[r][c] = src[r * ld + c * kWidth] (resuming a sum stored earlier).
  MMCORE_TILE_INLINE void load(const float* __restrict src, int64_t ld) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] = simd::load(src + r * ld + c * kWidth);
  }

  // acc[r][c] = src[r * ld + c * kWidth] * scale[r] (rescaling a running sum).
  MMCORE_TILE_INLINE void load_scaled(const float* __restrict src, int64_t ld, const float* __restrict scale) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf s = simd::splat(scale[r]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] = simd::load(src + r * ld + c * kWidth) * s;
    }
  }

  // The K rank-1 updates described at the top of this file; vector c of row k of b is read at
  // b + k * ldb + c * vstride (vstride = kWidth: the NC vectors side by side).
  MMCORE_TILE_INLINE void multiply_add(const float* __restrict a, int64_t a_row, int64_t a_k, const float* __restrict b,
                                       int64_t ldb, int64_t K, int64_t vstride = kWidth) {
    for (int64_t k = 0; k < K; ++k) {
      vf bv[NC];
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) bv[c] = simd::load(b + k * ldb + c * vstride);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vf av = simd::splat(a[r * a_row + k * a_k]);
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) acc[r][c] += av * bv[c];
      }
    }
  }

  MMCORE_TILE_INLINE void store(float* __restrict dst, int64_t ld) const {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) simd::store(dst + r * ld + c * kWidth, acc[r][c]);
  }
};

// The integer twin of Tile for the int8 products: R x NC vectors of int32 accumulators, each
// lane one output column, updated two k at a time from int16 pairs (madd16):
//   acc[r][c] += a[r * lda + kp] (two int16: k = 2kp, 2kp + 1) . b[kp * ldb + c * vstride]
// where b holds, per lane, the two weights of that column at the same k pair. Exact in int32.
template <int R, int NC>
struct TileI {
  static_assert(R >= 1 && R <= kTileRows && NC >= 1 && NC <= kTileVecs, "tile beyond the target's registers");
  simd::vi acc[R][NC];

  MMCORE_TILE_INLINE void zero() {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] = simd::vi{};
  }

  // Partial sums kept between passes over k (int32, exact).
  MMCORE_TILE_INLINE void load(const int32_t* __restrict src, int64_t ld) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] = simd::loadi(src + r * ld + c * kWidth);
  }
  MMCORE_TILE_INLINE void store(int32_t* __restrict dst, int64_t ld) const {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) std::memcpy(dst + r * ld + c * kWidth, &acc[r][c], sizeof(simd::vi));
  }

  // Vector c of pair row kp of b is read at b + kp * ldb + c * vstride (int16 elements).
  MMCORE_TILE_INLINE void multiply_add(const int32_t* __restrict a, int64_t lda, const int16_t* __restrict b,
                                       int64_t ldb, int64_t KP, int64_t vstride) {
    for (int64_t kp = 0; kp < KP; ++kp) {
      simd::vi bv[NC];
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) bv[c] = simd::loadi(b + kp * ldb + c * vstride);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const simd::vi av = simd::splati(a[r * lda + kp]);
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) acc[r][c] += simd::madd16(av, bv[c]);
      }
    }
  }

  // dst[r, c] = float(acc[r][c]) * (rs[r] * cs[c]) + bias[c] (bias null: 0).
  MMCORE_TILE_INLINE void store_scaled(float* __restrict dst, int64_t ld, const float* __restrict rs,
                                       const float* __restrict cs, const float* __restrict bias) const {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf s = simd::splat(rs[r]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) {
        const vf y = __builtin_convertvector(acc[r][c], vf) * (s * simd::load(cs + c * kWidth));
        simd::store(dst + r * ld + c * kWidth, bias ? y + simd::load(bias + c * kWidth) : y);
      }
    }
  }
};

#undef MMCORE_TILE_INLINE

// Calls f(std::integral_constant<int, n>{}) for a run-time n in [1, N]; other n do nothing.
// Turns a row or vector count into the template argument of a Tile.
template <int N, class F>
inline void with_count(int n, F&& f) {
  if constexpr (N >= 1) {
    if (n == N) return f(std::integral_constant<int, N>{});
    with_count<N - 1>(n, f);
  }
}

}  // namespace gemm
}  // namespace MMCORE_TARGET
}  // namespace mmcore
