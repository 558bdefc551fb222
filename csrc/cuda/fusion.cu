// Fusion reductions on CUDA: masked mean / max over the token axis and the six strategies of
// fuse over modalities.
//
// Work decomposition
//   masked_mean / masked_max: one block of 256 threads per (batch row b, chunk of columns). The
//   block is G x R threads (G a power of two, at most 32): the G threads of a row group own G
//   consecutive column vectors (float4 when D is a multiple of 4 and the pointers are 16-byte
//   aligned, single floats otherwise), the R = 256 / G row groups stride over the L tokens, four
//   rows in flight per thread. A warp therefore reads whole 128..512-byte row segments, and rows
//   whose mask byte is 0 are never loaded. The R partial results (and token counts) of a column
//   are combined by a tree in shared memory. G shrinks (down to 8) when B * chunks would leave
//   the device idle, which multiplies the number of blocks.
//   fuse, "mean" / "sum" / "max" / "weighted": one thread per (b, column vector), consecutive
//   threads on consecutive columns (coalesced over D, across batch rows too when D is small);
//   the thread loops over the M modalities, skipping absent ones. "weighted" renormalizes the
//   present weights per thread (M loads from cache) and the threads of a row write its
//   out_weights entries.
//   fuse, "concat": the output has the layout of emb, so it is a copy that writes zeros for
//   absent modalities (a plain device-to-device copy when every modality is present).
//   fuse, "attention": one block per batch row: a block reduction per present modality gives
//   the score (query . e_m) / sqrt(D), then a block-wide softmax over the present scores in
//   shared memory, then the weighted sum over the columns.
//
// Semantics: mmcore/fusion.h, with the choices listed in fusion_cuda.h. Sums run in float32
// partials that are flushed into float64 totals every kFlush terms (the tree of the masked mean
// and the mean's division too are float64), so sums over any number of tokens or modalities stay
// within a few float32 ulps of the exact sum (a float32 running sum stalls at 2^24); divisions
// and sqrtf are IEEE-rounded and expf is the accurate library function (no fast-math
// intrinsics).

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "fusion_cuda.h"

namespace mmcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowUnroll = 4;  // token rows in flight per thread (masked reductions)
constexpr int kMinGroup = 8;   // smallest column group (8 x float4 = 128 bytes)
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxFlatBlocks = int64_t{1} << 16;  // larger problems loop inside the kernels
constexpr int kFlush = 32;                            // float32 terms per float64 flush of the sums

// ---- device helpers ---------------------------------------------------------------------------

template <int V>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[V]) {
  if constexpr (V == 4) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = f.x;
    v[1] = f.y;
    v[2] = f.z;
    v[3] = f.w;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = __ldg(p + k);
  }
}

template <int V>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[V]) {
  if constexpr (V == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = v[k];
  }
}

// Maximum that propagates NaN (np.max / np.maximum semantics).
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ bool is_set(const uint8_t* flags, int64_t i) {
  return flags == nullptr || __ldg(flags + i) != 0;
}

// Sum / maximum over the block; every thread gets the result. Contains __syncthreads: call
// block-uniformly. `scratch` holds kWarps floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // earlier readers of scratch are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < kWarps ? scratch[lane] : 0.0f);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < kWarps ? scratch[lane] : -INFINITY);
}

// ---- masked mean / max over tokens ------------------------------------------------------------

struct MaskedArgs {
  const float* x;
  const uint8_t* mask;  // null: every token is real
  float* out;
  int64_t B, L, D;
  int64_t chunks;  // column chunks per batch row (G * V columns each)
};

template <int V, bool kMax>
__device__ __forceinline__ void combine(float (&acc)[V], const float (&v)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = kMax ? max_nan(acc[k], v[k]) : acc[k] + v[k];
}

// Adds the float32 partial sums into the float64 totals and restarts them.
template <int V>
__device__ __forceinline__ void flush(float (&acc)[V], double (&tot)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    tot[k] += static_cast<double>(acc[k]);
    acc[k] = 0.0f;
  }
}

// blockDim = (G, R) with G * R == kThreads, both powers of two.
template <int V, bool kMax>
__global__ void __launch_bounds__(kThreads) masked_reduce_kernel(const MaskedArgs a) {
  // max: float; mean: the float64 totals
  using Tot = typename std::conditional<kMax, float, double>::type;
  __shared__ Tot red[kThreads * V];
  __shared__ int64_t cnt[kThreads];
  const int G = static_cast<int>(blockDim.x);
  const int R = static_cast<int>(blockDim.y);
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int tid = ty * G + tx;
  const float identity = kMax ? -INFINITY : 0.0f;

  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const uint8_t* mb = a.mask != nullptr ? a.mask + b * a.L : nullptr;
    for (int64_t chunk = blockIdx.x; chunk < a.chunks; chunk += gridDim.x) {
      const int64_t col = (chunk * G + tx) * V;
      const bool active = col < a.D;
      // Only dereferenced by active threads.
      const float* xb = a.x + b * a.L * a.D + (active ? col : 0);
      float acc[V];
      double tot[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc[k] = identity;
        tot[k] = 0.0;
      }
      int64_t n = 0;
      int pending = 0;  // rows in the float32 partial sums (mean)

      int64_t l = ty;
      for (; l + (kRowUnroll - 1) * static_cast<int64_t>(R) < a.L; l += kRowUnroll * R) {
        bool ok[kRowUnroll];
#pragma unroll
        for (int u = 0; u < kRowUnroll; ++u) {
          ok[u] = is_set(mb, l + static_cast<int64_t>(u) * R);
          n += ok[u] ? 1 : 0;
        }
        if (active) {
          float v[kRowUnroll][V];
#pragma unroll
          for (int u = 0; u < kRowUnroll; ++u) {
            if (ok[u]) {
              load_vec<V>(xb + (l + static_cast<int64_t>(u) * R) * a.D, v[u]);
            } else {
#pragma unroll
              for (int k = 0; k < V; ++k) v[u][k] = identity;
            }
          }
#pragma unroll
          for (int u = 0; u < kRowUnroll; ++u) combine<V, kMax>(acc, v[u]);
          if constexpr (!kMax) {
            pending += kRowUnroll;
            if (pending >= kFlush) {
              flush<V>(acc, tot);
              pending = 0;
            }
          }
        }
      }
      for (; l < a.L; l += R) {
        if (!is_set(mb, l)) continue;
        ++n;
        if (active) {
          float v[V];
          load_vec<V>(xb + l * a.D, v);
          combine<V, kMax>(acc, v);
          if constexpr (!kMax) {
            if (++pending >= kFlush) {
              flush<V>(acc, tot);
              pending = 0;
            }
          }
        }
      }
      if constexpr (!kMax) flush<V>(acc, tot);

      // Tree over the row groups; row group 0 ends with the totals of its columns.
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if constexpr (kMax)
          red[tid * V + k] = acc[k];
        else
          red[tid * V + k] = tot[k];
      }
      cnt[tid] = n;
      for (int s = R >> 1; s > 0; s >>= 1) {
        __syncthreads();
        if (ty < s) {
          const int o = tid + s * G;
          if constexpr (kMax) {
            float v[V];
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = red[o * V + k];
            combine<V, kMax>(acc, v);
#pragma unroll
            for (int k = 0; k < V; ++k) red[tid * V + k] = acc[k];
          } else {
#pragma unroll
            for (int k = 0; k < V; ++k) {
              tot[k] += red[o * V + k];
              red[tid * V + k] = tot[k];
            }
          }
          n += cnt[o];
          cnt[tid] = n;
        }
      }
      if (ty == 0 && active) {
        float r[V];
        if (n == 0) {
#pragma unroll
          for (int k = 0; k < V; ++k) r[k] = 0.0f;  // no real token: zeros, never NaN
        } else if (kMax) {
#pragma unroll
          for (int k = 0; k < V; ++k) r[k] = acc[k];
        } else {
          const double count = static_cast<double>(n);
#pragma unroll
          for (int k = 0; k < V; ++k) r[k] = static_cast<float>(tot[k] / count);
        }
        store_vec<V>(a.out + b * a.D + col, r);
      }
      __syncthreads();  // red and cnt are reused by the next (b, chunk)
    }
  }
}

// ---- fuse ---------------------------------------------------------------------------------------

struct FuseArgs {
  const float* emb;
  const uint8_t* present;  // null: every modality is present
  const float* weights;
  int64_t weights_stride;  // M when weights are (B, M), 0 when they are (M,)
  const float* query;
  int64_t query_stride;  // D when the query is (B, D), 0 when it is (D,)
  float* out;
  float* out_weights;
  int64_t B, M, D;
  int64_t Dv;     // column vectors per row: D / V
  int64_t slots;  // threads per batch row of the flat kernels: max(Dv, 1)
  int64_t total;  // threads of the flat kernels
};

// "mean", "sum", "max" and "weighted": one thread per (b, column vector).
template <int V, int kStrategy>
__global__ void __launch_bounds__(kThreads) fuse_reduce_kernel(const FuseArgs a) {
  constexpr bool kMax = kStrategy == static_cast<int>(FuseStrategy::max);
  constexpr bool kWeighted = kStrategy == static_cast<int>(FuseStrategy::weighted);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < a.total;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = t / a.slots;
    const int64_t dv = t - b * a.slots;
    const bool has_col = dv < a.Dv;
    const uint8_t* pres = a.present != nullptr ? a.present + b * a.M : nullptr;
    const float* e = a.emb + b * a.M * a.D + (has_col ? dv * V : 0);
    float acc[V];
    double tot[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc[k] = kMax ? -INFINITY : 0.0f;
      tot[k] = 0.0;
    }
    int pending = 0;  // terms in the float32 partial sums (not max)

    if constexpr (kWeighted) {
      const float* w = a.weights + b * a.weights_stride;
      double total64 = 0.0;
      for (int64_t m = 0; m < a.M; ++m) {
        if (is_set(pres, m)) total64 += __ldg(w + m);
      }
      const float total = static_cast<float>(total64);
      // Present weights summing to 0 (or no present modality): zeros, never NaN.
      const bool usable = total != 0.0f;
      if (a.out_weights != nullptr) {
        for (int64_t m = dv; m < a.M; m += a.slots) {
          a.out_weights[b * a.M + m] = (usable && is_set(pres, m)) ? __ldg(w + m) / total : 0.0f;
        }
      }
      if (has_col && usable) {
#pragma unroll 4
        for (int64_t m = 0; m < a.M; ++m) {
          if (!is_set(pres, m)) continue;
          const float wm = __ldg(w + m) / total;
          float v[V];
          load_vec<V>(e + m * a.D, v);
#pragma unroll
          for (int k = 0; k < V; ++k) acc[k] = fmaf(wm, v[k], acc[k]);
          if (++pending == kFlush) {
            flush<V>(acc, tot);
            pending = 0;
          }
        }
        flush<V>(acc, tot);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = static_cast<float>(tot[k]);
      }
    } else {
      if (!has_col) continue;
      int64_t n = 0;
#pragma unroll 4
      for (int64_t m = 0; m < a.M; ++m) {
        if (!is_set(pres, m)) continue;
        ++n;
        float v[V];
        load_vec<V>(e + m * a.D, v);
        combine<V, kMax>(acc, v);
        if constexpr (!kMax) {
          if (++pending == kFlush) {
            flush<V>(acc, tot);
            pending = 0;
          }
        }
      }
      if constexpr (!kMax) flush<V>(acc, tot);
      if (n == 0) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = 0.0f;  // none present: zeros
      } else if constexpr (kStrategy == static_cast<int>(FuseStrategy::mean)) {
        const double count = static_cast<double>(n);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = static_cast<float>(tot[k] / count);
      } else if constexpr (!kMax) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = static_cast<float>(tot[k]);
      }
    }
    if (has_col) store_vec<V>(a.out + b * a.D + dv * V, acc);
  }
}

// "concat": out (B, M * D) has emb's layout; one thread per (b, m, column vector).
template <int V>
__global__ void __launch_bounds__(kThreads) fuse_concat_kernel(const FuseArgs a) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < a.total;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = t / a.Dv;  // b * M + m
    float v[V];
    if (is_set(a.present, row)) {
      load_vec<V>(a.emb + t * V, v);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = 0.0f;
    }
    store_vec<V>(a.out + t * V, v);
  }
}

// "attention": one block per batch row. Dynamic shared memory: M floats (scores, then weights).
template <int V>
__global__ void __launch_bounds__(kThreads) fuse_attention_kernel(const FuseArgs a) {
  extern __shared__ float w_sh[];
  __shared__ float scratch[kWarps];
  const int tid = static_cast<int>(threadIdx.x);
  const float root_d = sqrtf(static_cast<float>(a.D));

  for (int64_t b = blockIdx.x; b < a.B; b += gridDim.x) {
    const uint8_t* pres = a.present != nullptr ? a.present + b * a.M : nullptr;
    const float* e = a.emb + b * a.M * a.D;
    const float* q = a.query + b * a.query_stride;

    // Scores of the present modalities (the branch is uniform over the block).
    for (int64_t m = 0; m < a.M; ++m) {
      if (!is_set(pres, m)) continue;
      const float* em = e + m * a.D;
      float part = 0.0f;
      for (int64_t dv = tid; dv < a.Dv; dv += kThreads) {
        float qv[V], ev[V];
        load_vec<V>(q + dv * V, qv);
        load_vec<V>(em + dv * V, ev);
#pragma unroll
        for (int k = 0; k < V; ++k) part = fmaf(qv[k], ev[k], part);
      }
      const float dot = block_sum(part, scratch);
      if (tid == 0) w_sh[m] = a.D > 0 ? dot / root_d : 0.0f;
    }
    __syncthreads();

    // Softmax over the present scores.
    float mx = -INFINITY;
    int any = 0;
    for (int64_t m = tid; m < a.M; m += kThreads) {
      if (!is_set(pres, m)) continue;
      any = 1;
      mx = fmaxf(mx, w_sh[m]);
    }
    const int n_present = __syncthreads_count(any);
    mx = block_max(mx, scratch);
    if (n_present == 0) {
      // No present modality: zeros, never NaN.
      for (int64_t dv = tid; dv < a.Dv; dv += kThreads) {
        float z[V];
#pragma unroll
        for (int k = 0; k < V; ++k) z[k] = 0.0f;
        store_vec<V>(a.out + b * a.D + dv * V, z);
      }
      if (a.out_weights != nullptr) {
        for (int64_t m = tid; m < a.M; m += kThreads) a.out_weights[b * a.M + m] = 0.0f;
      }
      continue;  // block-uniform; w_sh was not written after the last barrier
    }
    float sum = 0.0f;
    for (int64_t m = tid; m < a.M; m += kThreads) {
      float ex = 0.0f;
      if (is_set(pres, m)) {
        ex = expf(w_sh[m] - mx);
        sum += ex;
      }
      w_sh[m] = ex;
    }
    sum = block_sum(sum, scratch);  // its barriers also publish w_sh
    for (int64_t m = tid; m < a.M; m += kThreads) {
      // Absent modalities keep weight 0 even when a NaN score makes the sum NaN.
      const float w = is_set(pres, m) ? w_sh[m] / sum : 0.0f;
      w_sh[m] = w;
      if (a.out_weights != nullptr) a.out_weights[b * a.M + m] = w;
    }
    __syncthreads();

    // out = sum over the present modalities of w_m e_m.
    for (int64_t dv = tid; dv < a.Dv; dv += kThreads) {
      float acc[V];
      double tot[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc[k] = 0.0f;
        tot[k] = 0.0;
      }
      int pending = 0;
      for (int64_t m = 0; m < a.M; ++m) {
        if (!is_set(pres, m)) continue;
        const float w = w_sh[m];
        float v[V];
        load_vec<V>(e + m * a.D + dv * V, v);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = fmaf(w, v[k], acc[k]);
        if (++pending == kFlush) {
          flush<V>(acc, tot);
          pending = 0;
        }
      }
      flush<V>(acc, tot);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = static_cast<float>(tot[k]);
      store_vec<V>(a.out + b * a.D + dv * V, acc);
    }
    __syncthreads();  // w_sh is rewritten for the next batch row
  }
}

// ---- host ---------------------------------------------------------------------------------------

const char* invalid(const std::string& what) { return set_error_message("invalid argument: " + what); }

std::string str(int64_t v) { return std::to_string(v); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// a * b * c without overflowing int64 (all non-negative).
bool product_fits(int64_t a, int64_t b, int64_t c) {
  const int64_t lim = std::numeric_limits<int64_t>::max();
  if (a == 0 || b == 0 || c == 0) return true;
  if (a > lim / b) return false;
  return a * b <= lim / c;
}

unsigned flat_grid(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > kMaxFlatBlocks) blocks = kMaxFlatBlocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

const char* multiprocessors(int* count) {
  int device = 0;
  MMCORE_CUDA_TRY(cudaGetDevice(&device), "querying the current device");
  MMCORE_CUDA_TRY(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device),
                  "querying the multiprocessor count");
  if (*count < 1) *count = 1;
  return nullptr;
}

template <int V, bool kMax>
const char* launch_masked(const MaskedArgs& base, int sm_count, cudaStream_t stream) {
  MaskedArgs a = base;
  const int64_t Dv = a.D / V;
  int G = 1;
  while (G < 32 && G < Dv) G <<= 1;
  // Narrower column chunks (more blocks) while the grid would not fill the device.
  const int64_t target = static_cast<int64_t>(sm_count) * 4;
  while (G > kMinGroup && a.B * ((Dv + G - 1) / G) < target) G >>= 1;
  a.chunks = (Dv + G - 1) / G;
  const dim3 block(static_cast<unsigned>(G), static_cast<unsigned>(kThreads / G), 1);
  const dim3 grid(static_cast<unsigned>(a.chunks < kMaxGridX ? a.chunks : kMaxGridX),
                  static_cast<unsigned>(a.B < kMaxGridY ? a.B : kMaxGridY), 1);
  masked_reduce_kernel<V, kMax><<<grid, block, 0, stream>>>(a);
  MMCORE_CUDA_TRY(cudaGetLastError(), kMax ? "launching the masked_max kernel" : "launching the masked_mean kernel");
  return nullptr;
}

template <bool kMax>
const char* masked_reduce(const MaskedReduceParams& p, cudaStream_t stream) {
  if (p.B < 0 || p.L < 0 || p.D < 0) {
    return invalid("negative size (B=" + str(p.B) + ", L=" + str(p.L) + ", D=" + str(p.D) + ")");
  }
  if (!product_fits(p.B, p.L, p.D)) return invalid("B * L * D overflows");
  if (p.B == 0 || p.D == 0) return nullptr;
  if (p.out == nullptr) return invalid("out is null");
  if (p.L > 0 && p.x == nullptr) return invalid("x is null");
  MaskedArgs a{};
  a.x = p.x;
  a.mask = p.mask;
  a.out = p.out;
  a.B = p.B;
  a.L = p.L;
  a.D = p.D;
  (void)cudaGetLastError();  // do not report an earlier, unrelated failure as ours
  int sm_count = 1;
  if (const char* err = multiprocessors(&sm_count)) return err;
  const bool vec4 = p.D % 4 == 0 && aligned16(p.out) && (p.L == 0 || aligned16(p.x));
  return vec4 ? launch_masked<4, kMax>(a, sm_count, stream) : launch_masked<1, kMax>(a, sm_count, stream);
}

template <int V>
const char* launch_fuse(FuseArgs a, FuseStrategy s, cudaStream_t stream) {
  a.Dv = a.D / V;
  switch (s) {
    case FuseStrategy::concat: {
      a.total = a.B * a.M * a.Dv;
      if (a.total == 0) return nullptr;
      fuse_concat_kernel<V><<<flat_grid(a.total), kThreads, 0, stream>>>(a);
      break;
    }
    case FuseStrategy::attention: {
      const int64_t grid = a.B < kMaxGridX ? a.B : kMaxGridX;
      const size_t smem = sizeof(float) * static_cast<size_t>(a.M);
      fuse_attention_kernel<V><<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(a);
      break;
    }
    default: {
      a.slots = a.Dv > 0 ? a.Dv : 1;
      a.total = a.B * a.slots;
      const unsigned grid = flat_grid(a.total);
      switch (s) {
        case FuseStrategy::mean:
          fuse_reduce_kernel<V, static_cast<int>(FuseStrategy::mean)><<<grid, kThreads, 0, stream>>>(a);
          break;
        case FuseStrategy::sum:
          fuse_reduce_kernel<V, static_cast<int>(FuseStrategy::sum)><<<grid, kThreads, 0, stream>>>(a);
          break;
        case FuseStrategy::max:
          fuse_reduce_kernel<V, static_cast<int>(FuseStrategy::max)><<<grid, kThreads, 0, stream>>>(a);
          break;
        default:
          fuse_reduce_kernel<V, static_cast<int>(FuseStrategy::weighted)><<<grid, kThreads, 0, stream>>>(a);
          break;
      }
      break;
    }
  }
  MMCORE_CUDA_TRY(cudaGetLastError(), "launching the fuse kernel");
  return nullptr;
}

const char* strategy_name(FuseStrategy s) {
  switch (s) {
    case FuseStrategy::concat: return "concat";
    case FuseStrategy::mean: return "mean";
    case FuseStrategy::sum: return "sum";
    case FuseStrategy::max: return "max";
    case FuseStrategy::weighted: return "weighted";
    case FuseStrategy::attention: return "attention";
  }
  return "?";
}

}  // namespace

// ---- entry points -----------------------------------------------------------------------------

const char* masked_mean(const MaskedReduceParams& p, cudaStream_t stream) { return masked_reduce<false>(p, stream); }

const char* masked_max(const MaskedReduceParams& p, cudaStream_t stream) { return masked_reduce<true>(p, stream); }

const char* fuse(const FuseParams& p, cudaStream_t stream) {
  const int strategy = static_cast<int>(p.strategy);
  if (strategy < 0 || strategy > static_cast<int>(FuseStrategy::attention)) {
    return invalid("unknown strategy " + str(strategy) + " (0 concat, 1 mean, 2 sum, 3 max, 4 weighted, 5 attention)");
  }
  const FuseStrategy s = p.strategy;
  if (p.B < 0 || p.M < 0 || p.D < 0) {
    return invalid("negative size (B=" + str(p.B) + ", M=" + str(p.M) + ", D=" + str(p.D) + ")");
  }
  if (!product_fits(p.B, p.M, p.D)) return invalid("B * M * D overflows");
  if (s == FuseStrategy::attention && p.M > kFuseAttentionMaxModalities) {
    return invalid("the attention strategy takes at most " + str(kFuseAttentionMaxModalities) +
                   " modalities, got M=" + str(p.M));
  }
  if (p.B == 0) return nullptr;
  const bool has_weights = s == FuseStrategy::weighted || s == FuseStrategy::attention;
  const bool writes_out = p.D > 0 && (s != FuseStrategy::concat || p.M > 0);
  const bool writes_weights = has_weights && p.out_weights != nullptr && p.M > 0;
  if (!writes_out && !writes_weights) return nullptr;
  const std::string which = std::string(" (strategy ") + strategy_name(s) + ")";
  if (writes_out && p.out == nullptr) return invalid("out is null" + which);
  if (p.M > 0 && p.D > 0 && p.emb == nullptr) return invalid("emb is null" + which);
  if (s == FuseStrategy::weighted && p.M > 0 && p.weights == nullptr) {
    return invalid("weights are required" + which);
  }
  if (s == FuseStrategy::attention && p.M > 0 && p.D > 0 && p.query == nullptr) {
    return invalid("query is required" + which);
  }

  FuseArgs a{};
  a.emb = p.emb;
  a.present = p.present;
  a.weights = p.weights;
  a.weights_stride = p.weights_per_batch ? p.M : 0;
  a.query = p.query;
  a.query_stride = p.query_per_batch ? p.D : 0;
  a.out = p.out;
  a.out_weights = has_weights ? p.out_weights : nullptr;  // the others leave it untouched
  a.B = p.B;
  a.M = p.M;
  a.D = p.D;
  (void)cudaGetLastError();  // do not report an earlier, unrelated failure as ours

  if (s == FuseStrategy::concat && p.present == nullptr) {
    const size_t bytes = sizeof(float) * static_cast<size_t>(p.B * p.M * p.D);
    MMCORE_CUDA_TRY(cudaMemcpyAsync(p.out, p.emb, bytes, cudaMemcpyDeviceToDevice, stream),
                    "copying the concatenated embeddings");
    return nullptr;
  }
  bool vec4 = p.D % 4 == 0;
  if (p.M > 0 && p.D > 0) vec4 = vec4 && aligned16(p.emb);
  if (writes_out) vec4 = vec4 && aligned16(p.out);
  if (s == FuseStrategy::attention && p.M > 0 && p.D > 0) {
    // Every query row starts 16-byte aligned too when D % 4 == 0.
    vec4 = vec4 && aligned16(p.query);
  }
  return vec4 ? launch_fuse<4>(a, s, stream) : launch_fuse<1>(a, s, stream);
}

}  // namespace cuda
}  // namespace mmcore
