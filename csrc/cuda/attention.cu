// Scaled dot-product attention on CUDA with a tiled online softmax (flash-attention style).
//
// Two kernels: the float32 kernel below (any D and Dv; float16 and bfloat16 inputs are widened
// when loaded), and, for float16 / bfloat16 on sm_80 and newer with D, Dv <= 128 and neither
// weights nor dropout requested, a tensor-core kernel (mma.sync, see further down).
//
// Work decomposition
//   One thread block (4 warps) handles a tile of 16 query rows of one (b, h) and one chunk of at
//   most 32 * NC output columns (Dv > 256 is split over several blocks, each recomputing the
//   scores). Each warp owns 4 query rows. Keys are processed in tiles of 32, one key per lane:
//     1. scores: the key tile and the query tile are staged in shared memory 32 head dims at a
//        time (any D works), each lane accumulates the 4 dot products of its key;
//     2. online softmax in the log2 domain (scores pre-multiplied by scale * log2(e), exp2f);
//        the running row maximum is a warp reduction, the running sum stays per lane and is
//        reduced once at the end;
//     3. out += p @ V: each lane owns NC output columns per row, the value tile is staged in
//        shared memory and the 4 probabilities of a key are read back as one float4.
//   When weights are requested the block makes a second pass over the keys with the final row
//   maximum and sum and writes the normalized weights; nothing else materializes (Lq, Lk).
//
// Semantics (see mmcore/attention.h): mask (1 = may attend) and bias are read through element
// strides (0 = broadcast), keys at index >= key_lengths[b] are ignored, a row without any key to
// attend to gives out = 0, lse = -inf and weights = 0 (never NaN). Dropout keeps (b, h, i, j)
// iff dropout_bits(seed, b, h, i, j) >= threshold and scales kept weights by dropout_scale; lse
// is computed before dropout.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "attention_cuda.h"
#include "common.cuh"
#include "mmcore/dropout.h"

namespace mmcore {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kBlockRows = kWarps * kRowsPerWarp;  // query rows per block
constexpr int kKeyTile = 32;                       // keys per tile, one per lane
constexpr int kDimChunk = 32;                      // head dims staged per step
constexpr int kQStride = kBlockRows + 4;           // keeps float4 alignment, fewer bank conflicts
constexpr int kKStride = kDimChunk + 1;            // conflict-free column reads

// Everything the kernel needs: the call (q, k and v point to T, see attention_cuda.h) and the
// derived scale and launch geometry.
struct KernelArgs {
  AttentionParams p;
  float scale_log2;   // p.scale * log2(e)
  int64_t q_tiles;    // ceil(Lq / rows per block)
  int64_t dv_chunks;  // ceil(Dv / (32 * NC)), at least 1 (float32 kernel)
  int64_t total_blocks;
};

template <int NC>
struct SharedTiles {
  alignas(16) float q[kDimChunk][kQStride];  // [dim][row]: a warp's 4 rows are one float4
  float k[kKeyTile][kKStride];               // [key][dim]
  float v[kKeyTile][32 * NC];                // [key][output column of this chunk]
  float4 p[kWarps][kKeyTile];                // per warp: the 4 row probabilities of each key
};

// Raw (unscaled) dot products q_i . k_j for the warp's 4 rows and the lane's key j0 + lane.
// Also stages the value tile when load_v is set. Contains __syncthreads: call block-uniformly.
template <typename T, int NC>
__device__ __forceinline__ void tile_dots(const KernelArgs& a, SharedTiles<NC>& sm, const T* qb, const T* kb,
                                          const T* vb, int64_t row0, int64_t j0, int jn, bool load_v, int64_t dv0,
                                          int dvn, float (&s)[kRowsPerWarp]) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.0f;

  const int64_t n_chunks = a.p.D > 0 ? (a.p.D + kDimChunk - 1) / kDimChunk : 1;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t d0 = c * kDimChunk;
    __syncthreads();  // the previous users of the shared tiles are done
    if (load_v && c == 0) {
      constexpr int kVCols = 32 * NC;
      for (int e = tid; e < kKeyTile * kVCols; e += kThreads) {
        const int key = e / kVCols;
        const int col = e % kVCols;
        float x = 0.0f;
        if (key < jn && col < dvn) x = load_float(vb + (j0 + key) * a.p.Dv + dv0 + col);
        sm.v[key][col] = x;
      }
    }
    for (int e = tid; e < kBlockRows * kDimChunk; e += kThreads) {
      const int row = e / kDimChunk;
      const int dd = e % kDimChunk;
      float x = 0.0f;
      if (row0 + row < a.p.Lq && d0 + dd < a.p.D) x = load_float(qb + (row0 + row) * a.p.D + d0 + dd);
      sm.q[dd][row] = x;
    }
    for (int e = tid; e < kKeyTile * kDimChunk; e += kThreads) {
      const int key = e / kDimChunk;
      const int dd = e % kDimChunk;
      float x = 0.0f;
      if (key < jn && d0 + dd < a.p.D) x = load_float(kb + (j0 + key) * a.p.D + d0 + dd);
      sm.k[key][dd] = x;
    }
    __syncthreads();
#pragma unroll
    for (int dd = 0; dd < kDimChunk; ++dd) {
      const float kx = sm.k[lane][dd];
      const float4 qx = *reinterpret_cast<const float4*>(&sm.q[dd][warp * kRowsPerWarp]);
      s[0] = fmaf(qx.x, kx, s[0]);
      s[1] = fmaf(qx.y, kx, s[1]);
      s[2] = fmaf(qx.z, kx, s[2]);
      s[3] = fmaf(qx.w, kx, s[3]);
    }
  }
}

// Turns raw dot products into log2-domain scores: scale, bias, mask; -inf for keys outside the
// tile (lane >= jn) and rows outside the query range.
__device__ __forceinline__ void finish_scores(const KernelArgs& a, int64_t b, int64_t h, int64_t row0, int64_t j0,
                                              int jn, float (&s)[kRowsPerWarp]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t j = j0 + lane;
  const float neg_inf = -INFINITY;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = row0 + warp * kRowsPerWarp + r;
    float x = s[r] * a.scale_log2;
    if (lane >= jn || i >= a.p.Lq) {
      x = neg_inf;
    } else {
      if (a.p.bias != nullptr) {
        const int64_t* st = a.p.bias_strides;
        x = fmaf(__ldg(a.p.bias + b * st[0] + h * st[1] + i * st[2] + j * st[3]), kLog2e, x);
      }
      if (a.p.mask != nullptr) {
        const int64_t* st = a.p.mask_strides;
        if (__ldg(a.p.mask + b * st[0] + h * st[1] + i * st[2] + j * st[3]) == 0) x = neg_inf;
      }
    }
    s[r] = x;
  }
}

__device__ __forceinline__ bool dropout_keep(const KernelArgs& a, int64_t b, int64_t h, int64_t i, int64_t j) {
  return dropout_bits(a.p.seed, static_cast<uint64_t>(b), static_cast<uint64_t>(h), static_cast<uint64_t>(i),
                      static_cast<uint64_t>(j)) >= a.p.dropout_threshold;
}

template <typename T, int NC>
__device__ void attention_block(const KernelArgs& a, SharedTiles<NC>& sm, int64_t blk) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  const int64_t q_tile = blk % a.q_tiles;
  int64_t rest = blk / a.q_tiles;
  const int64_t chunk = rest % a.dv_chunks;
  rest /= a.dv_chunks;
  const int64_t h = rest % a.p.H;
  const int64_t b = rest / a.p.H;

  const int64_t row0 = q_tile * kBlockRows;
  const int64_t dv0 = chunk * (32 * NC);
  const int64_t dv_left = a.p.Dv - dv0;
  const int dvn = dv_left <= 0 ? 0 : (dv_left < 32 * NC ? static_cast<int>(dv_left) : 32 * NC);

  int64_t klen = a.p.Lk;
  if (a.p.key_lengths != nullptr) {
    klen = a.p.key_lengths[b];
    klen = klen < 0 ? 0 : (klen > a.p.Lk ? a.p.Lk : klen);
  }

  const int64_t bh = b * a.p.H + h;
  const T* qb = reinterpret_cast<const T*>(a.p.q) + bh * a.p.Lq * a.p.D;
  const T* kb = reinterpret_cast<const T*>(a.p.k) + bh * a.p.Lk * a.p.D;
  const T* vb = reinterpret_cast<const T*>(a.p.v) + bh * a.p.Lk * a.p.Dv;

  float m[kRowsPerWarp];  // running row maximum (log2 domain), uniform over the warp
  float l[kRowsPerWarp];  // this lane's share of the running row sum
  float acc[kRowsPerWarp][NC];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[r][c] = 0.0f;
  }

  const int64_t key_tiles = (klen + kKeyTile - 1) / kKeyTile;
  for (int64_t kt = 0; kt < key_tiles; ++kt) {
    const int64_t j0 = kt * kKeyTile;
    const int jn = static_cast<int>(klen - j0 < kKeyTile ? klen - j0 : kKeyTile);
    float s[kRowsPerWarp];
    tile_dots<T, NC>(a, sm, qb, kb, vb, row0, j0, jn, dvn > 0, dv0, dvn, s);
    finish_scores(a, b, h, row0, j0, jn, s);

    float pd[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float m_new = fmaxf(m[r], warp_max(s[r]));
      // A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
      // every exponent at exp2(-inf) = 0 rather than NaN.
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m[r] - m_use);
      float p = exp2f(s[r] - m_use);
      l[r] = fmaf(l[r], alpha, p);
#pragma unroll
      for (int c = 0; c < NC; ++c) acc[r][c] *= alpha;
      m[r] = m_new;
      if (a.p.dropout && p > 0.0f) {
        const int64_t i = row0 + warp * kRowsPerWarp + r;
        p = dropout_keep(a, b, h, i, j0 + lane) ? p * a.p.dropout_scale : 0.0f;
      }
      pd[r] = p;
    }

    if (dvn > 0) {
      sm.p[warp][lane] = make_float4(pd[0], pd[1], pd[2], pd[3]);
      __syncwarp();
      for (int j = 0; j < jn; ++j) {
        const float4 pj = sm.p[warp][j];
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const float vx = sm.v[j][lane + 32 * c];
          acc[0][c] = fmaf(pj.x, vx, acc[0][c]);
          acc[1][c] = fmaf(pj.y, vx, acc[1][c]);
          acc[2][c] = fmaf(pj.z, vx, acc[2][c]);
          acc[3][c] = fmaf(pj.w, vx, acc[3][c]);
        }
      }
      __syncwarp();
    }
  }

  float inv_l[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const float l_row = warp_sum(l[r]);
    // A row with any attendable key has m finite and l >= 1 (its maximum contributes exp2(0)).
    const bool live = m[r] != -INFINITY && l_row > 0.0f;
    inv_l[r] = live ? 1.0f / l_row : 0.0f;
    const int64_t i = row0 + warp * kRowsPerWarp + r;
    if (i < a.p.Lq) {
      float* o = a.p.out + (bh * a.p.Lq + i) * a.p.Dv + dv0;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int col = lane + 32 * c;
        // Explicit zero for dead rows: p = 0 times a non-finite value would still be NaN.
        if (col < dvn) o[col] = live ? acc[r][c] * inv_l[r] : 0.0f;
      }
      if (chunk == 0 && a.p.lse != nullptr && lane == 0) {
        a.p.lse[bh * a.p.Lq + i] = live ? fmaf(m[r], kLn2, logf(l_row)) : -INFINITY;
      }
    }
  }

  if (chunk != 0 || a.p.weights == nullptr) return;

  // Second pass: normalized, post-dropout weights for every key (zeros past key_lengths).
  const int64_t all_tiles = (a.p.Lk + kKeyTile - 1) / kKeyTile;
  for (int64_t kt = 0; kt < all_tiles; ++kt) {
    const int64_t j0 = kt * kKeyTile;
    float s[kRowsPerWarp];
    if (kt < key_tiles) {
      const int jn = static_cast<int>(klen - j0 < kKeyTile ? klen - j0 : kKeyTile);
      tile_dots<T, NC>(a, sm, qb, kb, vb, row0, j0, jn, false, dv0, dvn, s);
      finish_scores(a, b, h, row0, j0, jn, s);
    } else {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] = -INFINITY;
    }
    const int64_t j = j0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = row0 + warp * kRowsPerWarp + r;
      if (i < a.p.Lq && j < a.p.Lk) {
        float w = 0.0f;
        if (inv_l[r] > 0.0f && s[r] != -INFINITY) {
          w = exp2f(s[r] - m[r]) * inv_l[r];
          if (a.p.dropout) w = dropout_keep(a, b, h, i, j) ? w * a.p.dropout_scale : 0.0f;
        }
        a.p.weights[(bh * a.p.Lq + i) * a.p.Lk + j] = w;
      }
    }
  }
}

template <typename T, int NC>
__global__ void __launch_bounds__(kThreads, 4) attention_kernel(const KernelArgs a) {
  __shared__ SharedTiles<NC> sm;
  // The loop is uniform over the block, so the barriers inside stay legal.
  for (int64_t blk = blockIdx.x; blk < a.total_blocks; blk += gridDim.x) {
    attention_block<T, NC>(a, sm, blk);
  }
}

template <typename T, int NC>
const char* launch(KernelArgs a, cudaStream_t stream) {
  a.dv_chunks = a.p.Dv > 0 ? (a.p.Dv + 32 * NC - 1) / (32 * NC) : 1;
  a.total_blocks = a.p.B * a.p.H * a.dv_chunks * a.q_tiles;
  const int64_t max_grid = std::numeric_limits<int32_t>::max();
  const unsigned grid = static_cast<unsigned>(a.total_blocks < max_grid ? a.total_blocks : max_grid);
  attention_kernel<T, NC><<<grid, kThreads, 0, stream>>>(a);
  MMCORE_CUDA_TRY(cudaGetLastError(), "launching the attention kernel");
  return nullptr;
}

template <typename T>
const char* dispatch_columns(const KernelArgs& a, cudaStream_t stream) {
  if (a.p.Dv <= 64) return launch<T, 2>(a, stream);
  if (a.p.Dv <= 128) return launch<T, 4>(a, stream);
  return launch<T, 8>(a, stream);  // wider values are split into chunks of 256 columns
}

// ---- tensor-core path for float16 / bfloat16 (sm_80 and newer) -------------------------------
//
// One block of 4 warps owns 64 query rows of one (b, h); each warp owns 16 rows and runs the
// whole key loop on its own after the block has staged a tile of 32 keys (and their values) in
// shared memory. Head dims are zero-padded to 16 * KD (q, k) and 8 * NV (v) in shared memory, so
// any D <= 128 and Dv <= 128 work; padded dims add exact zeros. Per key tile and warp:
//   S (16 x 32)  = Q (16 x D) K^T             mma.m16n8k16, float32 accumulators
//   scores       = S * scale * log2(e) + bias * log2(e), -inf where masked / past key_lengths
//   online softmax in the log2 domain (row statistics shared by the 4 lanes of a quad)
//   O (16 x Dv) += P (16 x 32, rounded to T) V
// Fragment layouts are those of the PTX ISA for mma.m16n8k16 with .row.col operands: lane =
// 4 * g + t; A registers hold (g, 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..);
// B registers hold (k = 2t..2t+1, n = g) and (k = 2t + 8.., n = g); C holds (g, 2t), (g, 2t + 1),
// (g + 8, 2t), (g + 8, 2t + 1). The lower 16 bits of a register hold the lower index.

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaRows = kMmaWarps * 16;  // query rows per block
constexpr int kMmaKeys = 32;              // keys per tile

// Defined only where the tensor-core kernel has a body (device code for sm_80 and newer).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <typename T>
struct MmaTraits;

template <>
struct MmaTraits<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint32_t pack2(__half lo, __half hi) {
    const __half2 h = __halves2half2(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

template <>
struct MmaTraits<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint32_t pack2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    const __nv_bfloat162 h = __halves2bfloat162(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
#endif

// c += a (16 x 16, row) * b (16 x 8, col), float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  (void)c;
  (void)a;
  (void)b0;
  (void)b1;
#endif
}

// Copies rows [0, n_rows) x dims [0, n_cols) of a row-major (ld = n_cols) matrix into shared
// memory rows of `stride` elements, zero-filling up to `rows` x `cols`. Eight elements per step;
// `vec` says that rows start on 16-byte boundaries (n_cols % 8 == 0 and an aligned base).
template <typename T>
__device__ __forceinline__ void stage_tile(T* dst, int stride, int rows, int cols, const T* src, int64_t n_rows,
                                           int64_t n_cols, bool vec) {
  const int groups = cols / 8;
  for (int e = threadIdx.x; e < rows * groups; e += kMmaThreads) {
    const int r = e / groups;
    const int c0 = (e % groups) * 8;
    T* d = dst + r * stride + c0;
    if (r < n_rows && vec && c0 + 8 <= n_cols) {
      *reinterpret_cast<uint4*>(d) = __ldg(reinterpret_cast<const uint4*>(src + r * n_cols + c0));
    } else {
#pragma unroll
      for (int x = 0; x < 8; ++x) {
        const int c = c0 + x;
        d[x] = (r < n_rows && c < n_cols) ? src[r * n_cols + c] : T(0.0f);
      }
    }
  }
}

template <typename T, int KD, int NV>
struct MmaShared {
  static constexpr int kQK = 16 * KD + 8;  // row stride of q and k (elements): 16-byte rows
  static constexpr int kV = 8 * NV + 8;    // row stride of v
  alignas(16) T q[kMmaRows * kQK];
  alignas(16) T k[kMmaKeys * kQK];
  alignas(16) T v[kMmaKeys * kV];
};

template <typename T, int KD, int NV>
__global__ void __launch_bounds__(kMmaThreads) attention_mma_kernel(const KernelArgs a, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Sm = MmaShared<T, KD, NV>;
  __shared__ Sm sm;
  using Tr = MmaTraits<T>;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;

  for (int64_t blk = blockIdx.x; blk < a.total_blocks; blk += gridDim.x) {
    const int64_t q_tile = blk % a.q_tiles;
    const int64_t bh = blk / a.q_tiles;
    const int64_t h = bh % a.p.H;
    const int64_t b = bh / a.p.H;
    const int64_t row0 = q_tile * kMmaRows;

    int64_t klen = a.p.Lk;
    if (a.p.key_lengths != nullptr) {
      klen = a.p.key_lengths[b];
      klen = klen < 0 ? 0 : (klen > a.p.Lk ? a.p.Lk : klen);
    }
    const T* qb = reinterpret_cast<const T*>(a.p.q) + (bh * a.p.Lq + row0) * a.p.D;
    const T* kb = reinterpret_cast<const T*>(a.p.k) + bh * a.p.Lk * a.p.D;
    const T* vb = reinterpret_cast<const T*>(a.p.v) + bh * a.p.Lk * a.p.Dv;

    __syncthreads();  // the previous block's users of the shared tiles are done
    const int64_t q_rows = a.p.Lq - row0 < kMmaRows ? a.p.Lq - row0 : kMmaRows;
    stage_tile<T>(sm.q, Sm::kQK, kMmaRows, 16 * KD, qb, q_rows, a.p.D, vec);
    __syncthreads();

    // The warp's 16 query rows as A fragments, kept in registers for the whole key loop.
    uint32_t qa[KD][4];
    {
      const T* q0 = sm.q + (warp * 16 + g) * Sm::kQK + 2 * t;
      const T* q8 = q0 + 8 * Sm::kQK;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        qa[kk][0] = *reinterpret_cast<const uint32_t*>(q0 + 16 * kk);
        qa[kk][1] = *reinterpret_cast<const uint32_t*>(q8 + 16 * kk);
        qa[kk][2] = *reinterpret_cast<const uint32_t*>(q0 + 16 * kk + 8);
        qa[kk][3] = *reinterpret_cast<const uint32_t*>(q8 + 16 * kk + 8);
      }
    }

    // Rows g and g + 8 of the warp: index 0 and 1 below.
    int64_t rows[2];
    rows[0] = row0 + warp * 16 + g;
    rows[1] = rows[0] + 8;
    float m[2] = {-INFINITY, -INFINITY};  // running maximum (log2 domain), uniform over a quad
    float l[2] = {0.0f, 0.0f};            // this lane's share of the running sum
    float o[NV][4];
#pragma unroll
    for (int n = 0; n < NV; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

    const int64_t key_tiles = (klen + kMmaKeys - 1) / kMmaKeys;
    for (int64_t kt = 0; kt < key_tiles; ++kt) {
      const int64_t j0 = kt * kMmaKeys;
      const int64_t jn = klen - j0 < kMmaKeys ? klen - j0 : kMmaKeys;
      __syncthreads();
      stage_tile<T>(sm.k, Sm::kQK, kMmaKeys, 16 * KD, kb + j0 * a.p.D, jn, a.p.D, vec);
      stage_tile<T>(sm.v, Sm::kV, kMmaKeys, 8 * NV, vb + j0 * a.p.Dv, jn, a.p.Dv, vec);
      __syncthreads();

      // S = Q K^T: four 8-key column tiles.
      float s[4][4];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        const T* k0 = sm.k + (nt * 8 + g) * Sm::kQK + 2 * t;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
          const uint32_t b0 = *reinterpret_cast<const uint32_t*>(k0 + 16 * kk);
          const uint32_t b1 = *reinterpret_cast<const uint32_t*>(k0 + 16 * kk + 8);
          mma_16816<T>(s[nt], qa[kk], b0, b1);
        }
      }

      // Scores in the log2 domain with bias and masks; the row maxima of the tile.
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const int jj = nt * 8 + 2 * t + (e & 1);
          const int64_t i = rows[r];
          const int64_t j = j0 + jj;
          float x = s[nt][e] * a.scale_log2;
          if (jj >= jn || i >= a.p.Lq) {
            x = -INFINITY;
          } else {
            if (a.p.bias != nullptr) {
              const int64_t* st = a.p.bias_strides;
              x = fmaf(__ldg(a.p.bias + b * st[0] + h * st[1] + i * st[2] + j * st[3]), kLog2e, x);
            }
            if (a.p.mask != nullptr) {
              const int64_t* st = a.p.mask_strides;
              if (__ldg(a.p.mask + b * st[0] + h * st[1] + i * st[2] + j * st[3]) == 0) x = -INFINITY;
            }
          }
          s[nt][e] = x;
          mx[r] = fmaxf(mx[r], x);
        }
      }

      float alpha[2];
      float m_use[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullWarpMask, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullWarpMask, mx[r], 2));
        const float m_new = fmaxf(m[r], mx[r]);
        // A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
        // every exponent at exp2(-inf) = 0 rather than NaN.
        m_use[r] = m_new == -INFINITY ? 0.0f : m_new;
        alpha[r] = exp2f(m[r] - m_use[r]);
        m[r] = m_new;
        l[r] *= alpha[r];
      }
#pragma unroll
      for (int n = 0; n < NV; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const float p = exp2f(s[nt][e] - m_use[r]);
          l[r] += p;
          s[nt][e] = p;
        }
      }

      // O += P V: two k16 steps over the 32 keys of the tile.
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        uint32_t pa[4];
        pa[0] = Tr::pack(s[2 * ks][0], s[2 * ks][1]);
        pa[1] = Tr::pack(s[2 * ks][2], s[2 * ks][3]);
        pa[2] = Tr::pack(s[2 * ks + 1][0], s[2 * ks + 1][1]);
        pa[3] = Tr::pack(s[2 * ks + 1][2], s[2 * ks + 1][3]);
        const T* v0 = sm.v + (ks * 16 + 2 * t) * Sm::kV + g;
#pragma unroll
        for (int n = 0; n < NV; ++n) {
          const T* vc = v0 + 8 * n;
          const uint32_t b0 = Tr::pack2(vc[0], vc[Sm::kV]);
          const uint32_t b1 = Tr::pack2(vc[8 * Sm::kV], vc[9 * Sm::kV]);
          mma_16816<T>(o[n], pa, b0, b1);
        }
      }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l_row = l[r];
      l_row += __shfl_xor_sync(kFullWarpMask, l_row, 1);
      l_row += __shfl_xor_sync(kFullWarpMask, l_row, 2);
      const bool live = m[r] != -INFINITY && l_row > 0.0f;
      const float inv_l = live ? 1.0f / l_row : 0.0f;
      const int64_t i = rows[r];
      if (i < a.p.Lq) {
        float* out = a.p.out + (bh * a.p.Lq + i) * a.p.Dv;
#pragma unroll
        for (int n = 0; n < NV; ++n) {
          const int col = 8 * n + 2 * t;
          // Explicit zero for dead rows: p = 0 times a non-finite value would still be NaN.
          if (col < a.p.Dv) out[col] = live ? o[n][2 * r] * inv_l : 0.0f;
          if (col + 1 < a.p.Dv) out[col + 1] = live ? o[n][2 * r + 1] * inv_l : 0.0f;
        }
        if (a.p.lse != nullptr && t == 0) {
          a.p.lse[bh * a.p.Lq + i] = live ? fmaf(m[r], kLn2, logf(l_row)) : -INFINITY;
        }
      }
    }
  }
#else
  (void)a;
  (void)vec;
#endif
}

template <typename T, int KD, int NV>
const char* launch_mma(KernelArgs a, bool vec, cudaStream_t stream) {
  a.q_tiles = (a.p.Lq + kMmaRows - 1) / kMmaRows;
  a.total_blocks = a.p.B * a.p.H * a.q_tiles;
  const int64_t max_grid = std::numeric_limits<int32_t>::max();
  const unsigned grid = static_cast<unsigned>(a.total_blocks < max_grid ? a.total_blocks : max_grid);
  attention_mma_kernel<T, KD, NV><<<grid, kMmaThreads, 0, stream>>>(a, vec);
  MMCORE_CUDA_TRY(cudaGetLastError(), "launching the tensor-core attention kernel");
  return nullptr;
}

// The tensor-core path when it applies to this call on the current device, else nullptr with
// *used = false.
template <typename T>
const char* try_mma(const KernelArgs& a, bool* used, cudaStream_t stream) {
  *used = false;
  if (a.p.weights != nullptr || a.p.dropout || a.p.D > 128 || a.p.Dv > 128 || a.p.Lk == 0) return nullptr;
  int device = 0;
  int major = 0;
  MMCORE_CUDA_TRY(cudaGetDevice(&device), "querying the current device");
  MMCORE_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                  "querying the compute capability");
  if (major < 8) return nullptr;
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
  const bool vec = a.p.D % 8 == 0 && a.p.Dv % 8 == 0 && aligned(a.p.q) && aligned(a.p.k) && aligned(a.p.v);
  *used = true;
  if (a.p.D <= 64 && a.p.Dv <= 64) return launch_mma<T, 4, 8>(a, vec, stream);
  return launch_mma<T, 8, 16>(a, vec, stream);
}

const char* invalid(const std::string& what) { return set_error_message("invalid argument: " + what); }

}  // namespace

const char* attention(const AttentionParams& p, int dtype, cudaStream_t stream) {
  if (dtype != kAttentionFloat32 && dtype != kAttentionFloat16 && dtype != kAttentionBFloat16) {
    return invalid("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  }
  if (p.B < 0 || p.H < 0 || p.Lq < 0 || p.Lk < 0 || p.D < 0 || p.Dv < 0) {
    return invalid("negative size (B=" + std::to_string(p.B) + ", H=" + std::to_string(p.H) +
                   ", Lq=" + std::to_string(p.Lq) + ", Lk=" + std::to_string(p.Lk) + ", D=" + std::to_string(p.D) +
                   ", Dv=" + std::to_string(p.Dv) + ")");
  }
  if (p.B == 0 || p.H == 0 || p.Lq == 0) return nullptr;  // nothing to compute
  if (p.D > 0 && p.q == nullptr) return invalid("q is null");
  if (p.Lk > 0 && p.D > 0 && p.k == nullptr) return invalid("k is null");
  if (p.Lk > 0 && p.Dv > 0 && p.v == nullptr) return invalid("v is null");
  if (p.Dv > 0 && p.out == nullptr) return invalid("out is null");

  KernelArgs a{};
  a.p = p;
  if (p.Lk == 0) a.p.weights = nullptr;  // no key: the weights are an empty array
  a.scale_log2 = p.scale * kLog2e;
  a.q_tiles = (p.Lq + kBlockRows - 1) / kBlockRows;

  (void)cudaGetLastError();  // do not report an earlier, unrelated failure as ours
  if (dtype == kAttentionFloat16 || dtype == kAttentionBFloat16) {
    bool used = false;
    const char* err =
        dtype == kAttentionFloat16 ? try_mma<__half>(a, &used, stream) : try_mma<__nv_bfloat16>(a, &used, stream);
    if (err != nullptr || used) return err;
    if (dtype == kAttentionFloat16) return dispatch_columns<__half>(a, stream);
    return dispatch_columns<__nv_bfloat16>(a, stream);
  }
  return dispatch_columns<float>(a, stream);
}

}  // namespace cuda
}  // namespace mmcore
