// Image kernels on CUDA: Pillow-convention separable resize, normalize, patchify and the fused
// preprocess (resize + crop + rescale + normalize [+ patchify]).
//
// Resize plan
//   The filter taps of every output column and row are built on the host in double precision
//   with Pillow's formulas (support widened by the scale when antialiasing a downscale, weights
//   normalized to sum 1, 22-bit fixed point for uint8). Axes that several images share (same
//   input size, output size and window) get one table. The per-image records and the tables go
//   to the caller's workspace with one cudaMemcpyAsync; the intermediate of every image lives
//   there too. The pass order is Pillow's: horizontal first, unless the height shrinks by more
//   than twice as many pixels as the width (then vertical first).
//
// Work decomposition
//   Two launches of one kernel per call (first pass, second pass), one thread per output pixel of
//   the pass with all channels of the pixel in registers (C = 1, 3 and 4 are specialized; other
//   channel counts loop over the channels), images along gridDim.y and pixels along gridDim.x
//   (grid-stride loops in both). The first pass filters the source rows (or columns) the window
//   needs into the intermediate; the second filters the intermediate into the window and stores
//   it: in the image's own type (resize), or as (v * scale - mean) / std in CHW planes or patches
//   (preprocess). An output index outside the resized image has no taps and gives 0. A thread's
//   taps run along a row or down a column; neighbouring threads hold neighbouring pixels, so the
//   loads of a warp fall into a few cache lines. An axis that keeps its size (and a filter other
//   than nearest) gets the identity table.
//
// uint8 arithmetic is Pillow's: int32 accumulators start at 2^21, add pixel * weight, then
// >> 22 and clamp to [0, 255]; the intermediate is uint8. LA and RGBA (C == 2, 4) resizes
// premultiply the colours by alpha (the last channel) on load and divide them again on store, as
// Pillow's resize does.
// float32 images use float weights and float accumulators, no clamping.
//
// normalize and patchify are gathers with one thread per pixel (normalize) or per output
// element (patchify, with multiply-shift division by the loop-invariant sizes).

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "common.cuh"
#include "image_cuda.h"
#include "mmcore/resample_filters.h"

namespace mmcore {
namespace cuda {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = int64_t{1} << 16;  // larger problems loop inside the kernels
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
// Source sizes, resized sizes and crop origins may exceed 2^31 (tap starts and shifts are
// 64-bit); they stay below 2^62 so that sums of them cannot overflow. Output grids and
// intermediates of one image stay below 2^31 values (32-bit pixel indices in the kernels).
constexpr int64_t kMaxSize = int64_t{1} << 62;
// Pillow's nearest filter walks the source coordinate by repeated addition; beyond Pillow's
// int32 sizes the coordinate is computed directly, (i + 0.5) * scale.
constexpr int64_t kNearestWalk = int64_t{1} << 31;
// int32 entries of one output index in a table: (start low, start high, taps, 0), as an int4.
constexpr int64_t kEntryInts = 4;

// How the second pass stores a pixel.
enum OutMode : int {
  kOutImage = 0,    // the image's own type, (rows, cols, C) rows out_stride apart
  kOutCHW = 1,      // normalized float32 (C, rows, cols)
  kOutPatches = 2,  // normalized float32 (rows/p * cols/p, C * p * p)
};

// PassJob::flags (uint8 LA and RGBA resizes, as Pillow's "La" / "RGBa" round trip).
constexpr int32_t kPremultiplyOnLoad = 1;     // first pass: colours times alpha
constexpr int32_t kUnpremultiplyOnStore = 2;  // second pass: colours divided by alpha

// One filtering pass of one image: output pixel (i, j) of the (rows, cols) grid is the sum over
// the taps k of weight[t][k] * in[row][col], with t = j, row = i + row_shift and
// col = start[t] + k + col_shift for a horizontal pass, t = i, row = start[t] + k + row_shift and
// col = j + col_shift for a vertical one. The table at int32 offset `tab` of PassArgs::tables
// holds one int4 (start low 32 bits, start high 32 bits, taps, 0) per output index t, then ks
// weights per t (int32 fixed point or float bits). Starts and shifts are 64-bit: a source axis
// may be longer than 2^31.
struct PassJob {
  const void* in;
  void* out;           // first pass: contiguous (rows, cols, C); second pass: see OutMode
  int64_t in_stride;   // elements between input rows
  int64_t out_stride;  // elements between output rows (first pass and kOutImage*)
  int64_t row_shift, col_shift;
  int32_t rows, cols;
  int32_t tab, ks;
  int32_t horizontal;
  int32_t flags;
};

// Both passes of one image; the first writes the intermediate the second reads.
struct Job {
  PassJob pass[2];
};

struct PassArgs {
  const Job* jobs;
  const int32_t* tables;
  int64_t count;
  int C;
  int pass;  // 0 or 1
  int mode;  // OutMode of the second pass
  int patch;
  float scale;
  const float* mean;
  const float* stdv;
};

// ---- device helpers ---------------------------------------------------------------------------

__device__ __forceinline__ uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Pillow's premultiplication of a colour by alpha with rounding.
__device__ __forceinline__ int32_t premultiply(int32_t v, int32_t alpha) {
  const int32_t t = v * alpha + 128;
  return (t + (t >> 8)) >> 8;
}

__device__ __forceinline__ uint8_t unpremultiply(uint8_t v, uint32_t alpha) {
  const uint32_t u = (255u * v) / alpha;
  return static_cast<uint8_t>(u > 255u ? 255u : u);
}

// (v * scale - mean[c]) / std[c], rounded after every operation (no contraction into an FMA).
__device__ __forceinline__ float normalized(const PassArgs& a, float v, int c) {
  return __fdiv_rn(__fsub_rn(__fmul_rn(v, a.scale), __ldg(a.mean + c)), __ldg(a.stdv + c));
}

template <typename T>
struct Accum;
template <>
struct Accum<uint8_t> {
  using type = int32_t;
  static __device__ __forceinline__ int32_t init() { return 1 << (kPrecisionBits - 1); }
  static __device__ __forceinline__ int32_t load_weight(const int32_t* w) { return __ldg(w); }
  static __device__ __forceinline__ int32_t mac(int32_t acc, uint8_t v, int32_t w) {
    return acc + static_cast<int32_t>(v) * w;
  }
  static __device__ __forceinline__ uint8_t finish(int32_t acc) { return clip8(acc); }
};
template <>
struct Accum<float> {
  using type = float;
  static __device__ __forceinline__ float init() { return 0.0f; }
  static __device__ __forceinline__ float load_weight(const int32_t* w) { return __int_as_float(__ldg(w)); }
  static __device__ __forceinline__ float mac(float acc, float v, float w) { return fmaf(v, w, acc); }
  static __device__ __forceinline__ float finish(float acc) { return acc; }
};

// Store of the second pass.
template <typename T>
__device__ __forceinline__ void store_value(const PassArgs& a, const PassJob& job, int32_t i, int32_t j, int c, int C,
                                            T v) {
  if (a.mode == kOutImage) {
    static_cast<T*>(job.out)[static_cast<int64_t>(i) * job.out_stride + static_cast<int64_t>(j) * C + c] = v;
    return;
  }
  float* out = static_cast<float*>(job.out);
  const float f = normalized(a, static_cast<float>(v), c);
  if (a.mode == kOutCHW) {
    out[(static_cast<int64_t>(c) * job.rows + i) * job.cols + j] = f;
  } else {
    const int32_t p = a.patch;
    const int32_t gy = i / p, py = i - gy * p;
    const int32_t gx = j / p, px = j - gx * p;
    const int64_t q = static_cast<int64_t>(gy) * (job.cols / p) + gx;
    out[((q * C + c) * p + py) * p + px] = f;
  }
}

// ---- one separable pass -----------------------------------------------------------------------

// kFinal: the second pass (stores by a.mode); otherwise the first pass (stores the
// intermediate). kPremul: the variant for uint8 LA / RGBA (alpha last), which honours the job's
// flags.
template <typename T, int kC, bool kPremul, bool kFinal>
__global__ void __launch_bounds__(kThreads) pass_kernel(const PassArgs a) {
  using A = Accum<T>;
  using Acc = typename A::type;
  const int C = kC > 0 ? kC : a.C;
  for (int64_t n = blockIdx.y; n < a.count; n += gridDim.y) {
    const PassJob job = a.jobs[n].pass[a.pass];
    const int64_t total = static_cast<int64_t>(job.rows) * job.cols;
    const int32_t entries = job.horizontal ? job.cols : job.rows;
    const int4* bounds = reinterpret_cast<const int4*>(a.tables + job.tab);
    const int32_t* weights = a.tables + job.tab + kEntryInts * static_cast<int64_t>(entries);
    const T* src = static_cast<const T*>(job.in);
    const int64_t step = job.horizontal ? C : job.in_stride;  // between taps
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < total;
         p += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int32_t i = static_cast<int32_t>(p) / job.cols;
      const int32_t j = static_cast<int32_t>(p) - i * job.cols;
      const int32_t t = job.horizontal ? j : i;
      const int4 entry = __ldg(bounds + t);
      const int64_t start = static_cast<int64_t>((static_cast<uint64_t>(static_cast<uint32_t>(entry.y)) << 32) |
                                                 static_cast<uint32_t>(entry.x));
      const int2 sc = make_int2(0, entry.z);  // sc.y: taps
      const int32_t* w = weights + static_cast<int64_t>(t) * job.ks;
      const int64_t row = (job.horizontal ? static_cast<int64_t>(i) : start) + job.row_shift;
      const int64_t col = (job.horizontal ? start : static_cast<int64_t>(j)) + job.col_shift;
      // Not dereferenced when the output index has no taps (sc.y == 0).
      const T* in = src + row * job.in_stride + col * C;
      if constexpr (kC > 0) {
        Acc acc[kC];
#pragma unroll
        for (int c = 0; c < kC; ++c) acc[c] = A::init();
        bool plain = true;
        if constexpr (kPremul) {
          if (job.flags & kPremultiplyOnLoad) {
            plain = false;
            for (int k = 0; k < sc.y; ++k) {
              const int32_t wk = A::load_weight(w + k);
              const T* px = in + static_cast<int64_t>(k) * step;
              const int32_t alpha = px[kC - 1];
#pragma unroll
              for (int c = 0; c < kC - 1; ++c) acc[c] += premultiply(px[c], alpha) * wk;
              acc[kC - 1] += alpha * wk;
            }
          }
        }
        if (plain) {
          for (int k = 0; k < sc.y; ++k) {
            const auto wk = A::load_weight(w + k);
            const T* px = in + static_cast<int64_t>(k) * step;
#pragma unroll
            for (int c = 0; c < kC; ++c) acc[c] = A::mac(acc[c], px[c], wk);
          }
        }
        T v[kC];
#pragma unroll
        for (int c = 0; c < kC; ++c) v[c] = A::finish(acc[c]);
        if constexpr (kFinal) {
          if constexpr (kPremul) {
            if (job.flags & kUnpremultiplyOnStore) {
              const uint32_t alpha = v[kC - 1];
              if (alpha != 0 && alpha != 255) {
#pragma unroll
                for (int c = 0; c < kC - 1; ++c) v[c] = unpremultiply(v[c], alpha);
              }
            }
          }
#pragma unroll
          for (int c = 0; c < kC; ++c) store_value<T>(a, job, i, j, c, kC, v[c]);
        } else {
          T* out = static_cast<T*>(job.out) + p * kC;
#pragma unroll
          for (int c = 0; c < kC; ++c) out[c] = v[c];
        }
      } else {
        for (int c = 0; c < C; ++c) {
          Acc acc = A::init();
          for (int k = 0; k < sc.y; ++k) {
            acc = A::mac(acc, in[static_cast<int64_t>(k) * step + c], A::load_weight(w + k));
          }
          const T v = A::finish(acc);
          if constexpr (kFinal) {
            store_value<T>(a, job, i, j, c, C, v);
          } else {
            static_cast<T*>(job.out)[p * C + c] = v;
          }
        }
      }
    }
  }
}

// ---- normalize ----------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const T* __restrict__ src, float* __restrict__ dst, int64_t N, int64_t HW, int C,
                     const float* __restrict__ mean, const float* __restrict__ stdv, float scale, bool chw) {
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const T* img = src + n * HW * C;
    float* out = dst + n * HW * C;
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < HW;
         p += static_cast<int64_t>(gridDim.x) * kThreads) {
      const T* in = img + p * C;
      for (int c = 0; c < C; ++c) {
        const float v = static_cast<float>(in[c]);
        const float f = __fdiv_rn(__fsub_rn(__fmul_rn(v, scale), __ldg(mean + c)), __ldg(stdv + c));
        if (chw) {
          out[static_cast<int64_t>(c) * HW + p] = f;
        } else {
          out[p * C + c] = f;
        }
      }
    }
  }
}

// ---- patchify -----------------------------------------------------------------------------------

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 by a multiply and a shift (the round-up method:
// m = floor(2^32 (2^s - d) / d) + 1 with s = ceil(log2 d), n / d = (umulhi(n, m) + n) >> s).
struct FastDiv {
  uint32_t d, m, s;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    s = 0;
    while ((uint64_t{1} << s) < divisor) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

struct PatchArgs {
  const float* src;
  float* dst;
  int64_t slabs;       // B * T / tp
  int64_t slab_elems;  // (H/p) * (W/p) * psize, outputs per (b, temporal group)
  int64_t T, C, H, W;
  int64_t tp, gt;
  FastDiv psize, p, tpd, gw;
};

__global__ void __launch_bounds__(kThreads) patchify_kernel(const PatchArgs a) {
  const uint32_t p = a.p.d;
  for (int64_t slab = blockIdx.y; slab < a.slabs; slab += gridDim.y) {
    const int64_t b = slab / a.gt;
    const int64_t tg = slab - b * a.gt;
    const float* src = a.src + (b * a.T + tg * a.tp) * a.C * a.H * a.W;
    float* dst = a.dst + slab * a.slab_elems;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < a.slab_elems;
         e += static_cast<int64_t>(gridDim.x) * kThreads) {
      const uint32_t ue = static_cast<uint32_t>(e);
      const uint32_t q = a.psize.div(ue);
      const uint32_t j = ue - q * a.psize.d;  // (c, t, py, px) within the patch
      const uint32_t j1 = a.p.div(j);
      const uint32_t px = j - j1 * p;
      const uint32_t j2 = a.p.div(j1);
      const uint32_t py = j1 - j2 * p;
      const uint32_t c = a.tpd.div(j2);
      const uint32_t t = j2 - c * a.tpd.d;
      const uint32_t gy = a.gw.div(q);
      const uint32_t gx = q - gy * a.gw.d;
      const int64_t plane = (static_cast<int64_t>(t) * a.C + c) * a.H;
      dst[e] = __ldg(src + (plane + static_cast<int64_t>(gy) * p + py) * a.W + static_cast<int64_t>(gx) * p + px);
    }
  }
}

// ---- host: filter tables ----------------------------------------------------------------------

const char* invalid(const std::string& what) { return set_error_message("invalid argument: " + what); }

std::string str(int64_t v) { return std::to_string(v); }

struct AxisEntry {
  int32_t offset = 0;      // int32 index of the table
  int32_t ks = 0;          // weights per output index
  int64_t lo = 0, hi = 0;  // input indices the taps touch: [lo, hi) (0, 0 when none)
};

// Tables of the axes of one call, shared by every image with the same axis.
class TableSet {
 public:
  TableSet(ResizeFilter f, bool antialias, bool fixed, bool with_weights)
      : f_(f), antialias_(antialias), fixed_(fixed), with_weights_(with_weights) {}

  // Taps of the output indices [o0, o0 + n) of a resize from in_size to out_size along one
  // axis; indices outside [0, out_size) get no taps.
  const char* add(int64_t in_size, int64_t out_size, int64_t o0, int64_t n, AxisEntry* entry) {
    const std::array<int64_t, 4> key{in_size, out_size, o0, n};
    const auto found = placed_.find(key);
    if (found != placed_.end()) {
      *entry = found->second;
      return nullptr;
    }
    const bool identity = in_size == out_size && f_ != ResizeFilter::nearest;
    const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
    int64_t ks = 1;
    double filterscale = 1.0;
    double support = 0.0;
    if (!identity && f_ != ResizeFilter::nearest) {
      filterscale = (antialias_ && scale > 1.0) ? scale : 1.0;
      support = resample::support(f_) * filterscale;
      // In double first: past a ratio of about 1.5e18 the integer product would overflow.
      const double ksd = std::ceil(support) * 2.0 + 1.0;
      if (!(ksd <= static_cast<double>(kInt32Max))) {
        return invalid("the filter tables of this resize exceed 2^31 taps per output (output size " + str(out_size) +
                       " from " + str(in_size) + ")");
      }
      ks = static_cast<int64_t>(ksd);
    }
    while (data_.size() % kEntryInts != 0) data_.push_back(0);  // int4 alignment of the entries
    const int64_t offset = static_cast<int64_t>(data_.size());
    if (ks > kInt32Max || n > (kInt32Max - offset) / (ks + kEntryInts)) {
      return invalid("the filter tables of this resize exceed 2^31 entries (output size " + str(out_size) + " from " +
                     str(in_size) + ")");
    }
    data_.resize(static_cast<size_t>(offset + n * (ks + kEntryInts)), 0);
    int32_t* bounds = data_.data() + offset;
    int32_t* weights = bounds + kEntryInts * n;
    auto set_entry = [bounds](int64_t j, int64_t start, int64_t taps) {
      const uint64_t u = static_cast<uint64_t>(start);
      bounds[kEntryInts * j] = static_cast<int32_t>(static_cast<uint32_t>(u & 0xffffffffu));
      bounds[kEntryInts * j + 1] = static_cast<int32_t>(static_cast<uint32_t>(u >> 32));
      bounds[kEntryInts * j + 2] = static_cast<int32_t>(taps);
    };
    const int32_t one_fixed = 1 << kPrecisionBits;
    int32_t one_float;
    {
      const float f1 = 1.0f;
      std::memcpy(&one_float, &f1, sizeof(f1));
    }
    const int32_t one = fixed_ ? one_fixed : one_float;

    if (identity) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = o0 + j;
        if (i < 0 || i >= out_size) continue;
        set_entry(j, i, 1);
        weights[j] = one;
      }
    } else if (f_ == ResizeFilter::nearest) {
      // Pillow walks the source coordinate by repeated addition from 0.5 * scale, which decides
      // the ties; do the same within Pillow's sizes (and clamp to the last pixel).
      // The choice depends on the output size only (as on the CPU), never on the window.
      const int64_t end = std::min(out_size, o0 + n);
      const bool walk = out_size <= kNearestWalk;
      double x = 0.5 * scale;
      for (int64_t i = walk ? 0 : std::max<int64_t>(o0, 0); i < end; ++i, x += scale) {
        if (i < o0) continue;
        const double xi = walk ? x : (static_cast<double>(i) + 0.5) * scale;
        const int64_t s = xi < 0.0 ? 0 : (xi >= static_cast<double>(in_size) ? in_size - 1 : static_cast<int64_t>(xi));
        const int64_t j = i - o0;
        set_entry(j, std::min(s, in_size - 1), 1);
        weights[j] = one;
      }
    } else {
      std::vector<double> k(static_cast<size_t>(ks));
      const double ss = 1.0 / filterscale;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = o0 + j;
        if (i < 0 || i >= out_size) continue;
        const double center = (static_cast<double>(i) + 0.5) * scale;
        int64_t xmin = static_cast<int64_t>(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int64_t xmax = static_cast<int64_t>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        if (xmax > ks) xmax = ks;
        if (xmax < 0) xmax = 0;
        set_entry(j, xmin, xmax);
        if (!with_weights_) continue;
        double ww = 0.0;
        for (int64_t x = 0; x < xmax; ++x) {
          const double w = resample::weight(f_, (static_cast<double>(x + xmin) - center + 0.5) * ss);
          k[static_cast<size_t>(x)] = w;
          ww += w;
        }
        int32_t* wj = weights + j * ks;
        for (int64_t x = 0; x < xmax; ++x) {
          const double w = ww != 0.0 ? k[static_cast<size_t>(x)] / ww : 0.0;
          if (fixed_) {
            const double fx = w * static_cast<double>(one_fixed);
            wj[x] = static_cast<int32_t>(w < 0 ? -0.5 + fx : 0.5 + fx);
          } else {
            const float wf = static_cast<float>(w);
            std::memcpy(wj + x, &wf, sizeof(wf));
          }
        }
      }
    }

    AxisEntry e;
    e.offset = static_cast<int32_t>(offset);
    e.ks = static_cast<int32_t>(ks);
    int64_t lo = std::numeric_limits<int64_t>::max();
    int64_t hi = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t taps = bounds[kEntryInts * j + 2];
      if (taps == 0) continue;
      const int64_t start =
          static_cast<int64_t>((static_cast<uint64_t>(static_cast<uint32_t>(bounds[kEntryInts * j + 1])) << 32) |
                               static_cast<uint32_t>(bounds[kEntryInts * j]));
      lo = std::min<int64_t>(lo, start);
      hi = std::max<int64_t>(hi, start + taps);
    }
    if (lo > hi) lo = hi = 0;
    e.lo = lo;
    e.hi = hi;
    placed_.emplace(key, e);
    *entry = e;
    return nullptr;
  }

  const std::vector<int32_t>& data() const { return data_; }

 private:
  ResizeFilter f_;
  bool antialias_, fixed_, with_weights_;
  std::vector<int32_t> data_;
  std::map<std::array<int64_t, 4>, AxisEntry> placed_;
};

// ---- host: plan of a resize or preprocess call -----------------------------------------------

constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

struct Plan {
  std::vector<Job> jobs;
  std::vector<size_t> mid_offsets;  // bytes from the start of the intermediates
  size_t tables_at = 0;             // bytes from the start of the workspace
  size_t mids_at = 0;
  size_t total = 0;
  int64_t max_pixels[2] = {0, 0};  // largest output grid of each pass
};

bool valid_filter(ResizeFilter f) {
  const int v = static_cast<int>(f);
  return v >= 0 && v <= 3;
}

// Pillow (13 and later) runs the vertical pass first when the height shrinks by more than twice
// as many pixels as the width does, and the horizontal pass first otherwise. The order changes
// the uint8 results (the intermediate is rounded), so it is part of the semantics.
bool vertical_first(int64_t H, int64_t W, int64_t OH, int64_t OW) { return OH < H && H - OH > 2 * (W - OW); }

// Shared by resize (preprocess == false: the window is the whole output) and preprocess.
// Pointers are checked only when `launch` is set (a workspace query passes none).
const char* make_plan(const ImageDesc* images, int64_t count, int64_t C, size_t elem, bool preprocess, int64_t crop_h,
                      int64_t crop_w, bool launch, TableSet* tables, Plan* plan) {
  plan->jobs.assign(static_cast<size_t>(count), Job{});
  plan->mid_offsets.assign(static_cast<size_t>(count), 0);
  size_t mid_bytes = 0;
  for (int64_t i = 0; i < count; ++i) {
    const ImageDesc& d = images[i];
    const std::string which = "image " + str(i) + ": ";
    if (d.H < 0 || d.W < 0 || d.OH < 0 || d.OW < 0) return invalid(which + "negative size");
    if (d.H > kMaxSize || d.W > kMaxSize || d.OH > kMaxSize || d.OW > kMaxSize) {
      return invalid(which + "sizes must be below 2^62");
    }
    const int64_t out_h = preprocess ? crop_h : d.OH;
    const int64_t out_w = preprocess ? crop_w : d.OW;
    Job& job = plan->jobs[static_cast<size_t>(i)];
    if (out_h == 0 || out_w == 0) continue;  // nothing to write for this image (empty grids)
    if (out_h > kInt32Max || out_w > kInt32Max || out_h * out_w > kInt32Max) {
      return invalid(which + "the output has 2^31 pixels or more");
    }
    if (preprocess && (d.OH < 1 || d.OW < 1)) {
      return invalid(which + "the resized size must be at least 1 x 1, got " + str(d.OH) + " x " + str(d.OW));
    }
    if (d.H == 0 || d.W == 0) return invalid(which + "empty source image");
    if (launch && d.src == nullptr) return invalid(which + "src is null");
    if (d.W > kMaxSize / C || d.OW > kMaxSize / C) return invalid(which + "W * C must be below 2^62");
    // A source stride of 0 repeats one row (a broadcast view): fine to read.
    if (d.H > 1 && d.src_stride != 0 && (d.src_stride < 0 || d.src_stride < d.W * C)) {
      return invalid(which + "src_stride " + str(d.src_stride) + " < W * C = " + str(d.W * C));
    }
    if (!preprocess) {
      if (launch && d.dst == nullptr) return invalid(which + "dst is null");
      if (d.OH > 1 && d.dst_stride < d.OW * C) {
        return invalid(which + "dst_stride " + str(d.dst_stride) + " < OW * C = " + str(d.OW * C));
      }
    }
    const int64_t top = preprocess ? d.top : 0;
    const int64_t left = preprocess ? d.left : 0;
    if (top < -kMaxSize || top > kMaxSize || left < -kMaxSize || left > kMaxSize) {
      return invalid(which + "crop origin out of range");
    }
    // A window that misses the resized image along one axis gets a table without taps for the
    // other axis too (every index past the edge): the first pass then has nothing to compute
    // and the second writes zeros.
    const bool no_columns = left >= d.OW || left + out_w <= 0;
    const bool no_rows = top >= d.OH || top + out_h <= 0;
    AxisEntry h, v;
    const char* err = tables->add(d.W, d.OW, no_rows ? d.OW : left, out_w, &h);
    if (err != nullptr) return err;
    err = tables->add(d.H, d.OH, no_columns ? d.OH : top, out_h, &v);
    if (err != nullptr) return err;

    const int64_t src_stride = d.H > 1 ? d.src_stride : d.W * C;
    PassJob& first = job.pass[0];
    PassJob& second = job.pass[1];
    first.in = d.src;
    first.in_stride = src_stride;
    second.out = d.dst;  // preprocess: set by the caller
    second.out_stride = d.OH > 1 ? d.dst_stride : d.OW * C;
    second.rows = static_cast<int32_t>(out_h);
    second.cols = static_cast<int32_t>(out_w);
    int64_t mid_rows, mid_cols;
    if (vertical_first(d.H, d.W, d.OH, d.OW)) {
      // Source columns [h.lo, h.hi) of the window's rows, then along the rows.
      mid_rows = out_h;
      mid_cols = h.hi - h.lo;
      first.horizontal = 0;
      first.tab = v.offset;
      first.ks = v.ks;
      first.col_shift = h.lo;
      second.horizontal = 1;
      second.tab = h.offset;
      second.ks = h.ks;
      second.col_shift = -h.lo;
    } else {
      // Source rows [v.lo, v.hi) along the window's columns, then down the columns.
      mid_rows = v.hi - v.lo;
      mid_cols = out_w;
      first.horizontal = 1;
      first.tab = h.offset;
      first.ks = h.ks;
      first.row_shift = v.lo;
      second.horizontal = 0;
      second.tab = v.offset;
      second.ks = v.ks;
      second.row_shift = -v.lo;
    }
    if (mid_rows > kInt32Max || mid_cols > kInt32Max || (mid_rows > 0 && mid_cols > kInt32Max / C / mid_rows)) {
      return invalid(which + "the intermediate has 2^31 values or more");
    }
    first.rows = static_cast<int32_t>(mid_rows);
    first.cols = static_cast<int32_t>(mid_cols);
    first.out_stride = mid_cols * C;
    second.in_stride = mid_cols * C;
    plan->mid_offsets[static_cast<size_t>(i)] = mid_bytes;
    mid_bytes += align_up(static_cast<size_t>(mid_rows * mid_cols * C) * elem, 16);
    plan->max_pixels[0] = std::max(plan->max_pixels[0], mid_rows * mid_cols);
    plan->max_pixels[1] = std::max(plan->max_pixels[1], out_h * out_w);
  }
  plan->tables_at = align_up(sizeof(Job) * static_cast<size_t>(count), 256);
  plan->mids_at = align_up(plan->tables_at + sizeof(int32_t) * tables->data().size(), 256);
  plan->total = plan->mids_at + mid_bytes;
  return nullptr;
}

dim3 grid_for(int64_t per_image, int64_t images) {
  int64_t bx = (per_image + kThreads - 1) / kThreads;
  bx = std::max<int64_t>(1, std::min(bx, kMaxGridX));
  const int64_t by = std::max<int64_t>(1, std::min(images, kMaxGridY));
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by), 1);
}

template <typename T, int kC, bool kPremul>
const char* launch_pair(PassArgs a, const Plan& plan, cudaStream_t stream) {
  if (plan.max_pixels[0] > 0) {
    a.pass = 0;
    pass_kernel<T, kC, kPremul, false><<<grid_for(plan.max_pixels[0], a.count), kThreads, 0, stream>>>(a);
    MMCORE_CUDA_TRY(cudaGetLastError(), "launching the first resize pass");
  }
  if (plan.max_pixels[1] > 0) {
    a.pass = 1;
    pass_kernel<T, kC, kPremul, true><<<grid_for(plan.max_pixels[1], a.count), kThreads, 0, stream>>>(a);
    MMCORE_CUDA_TRY(cudaGetLastError(), "launching the second resize pass");
  }
  return nullptr;
}

template <typename T>
const char* launch_passes(const PassArgs& a, const Plan& plan, bool premultiplied, cudaStream_t stream) {
  switch (a.C) {
    case 1: return launch_pair<T, 1, false>(a, plan, stream);
    case 2:
      if constexpr (sizeof(T) == 1) {
        if (premultiplied) return launch_pair<T, 2, true>(a, plan, stream);
      }
      return launch_pair<T, 0, false>(a, plan, stream);
    case 3: return launch_pair<T, 3, false>(a, plan, stream);
    case 4:
      if constexpr (sizeof(T) == 1) {
        if (premultiplied) return launch_pair<T, 4, true>(a, plan, stream);
      }
      return launch_pair<T, 4, false>(a, plan, stream);
    default: return launch_pair<T, 0, false>(a, plan, stream);
  }
}

// Copies the records and tables into the workspace and points the records at their
// intermediates. The host buffer is pageable: cudaMemcpyAsync has consumed it when it returns.
const char* upload(Plan& plan, const TableSet& tables, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (workspace == nullptr) return invalid("workspace is null");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) {
    return invalid("workspace must be 16-byte aligned");
  }
  if (workspace_bytes < plan.total) {
    return invalid("workspace of " + std::to_string(workspace_bytes) + " bytes is too small, " +
                   std::to_string(plan.total) + " needed");
  }
  char* base = static_cast<char*>(workspace);
  for (size_t i = 0; i < plan.jobs.size(); ++i) {
    void* mid = base + plan.mids_at + plan.mid_offsets[i];
    plan.jobs[i].pass[0].out = mid;
    plan.jobs[i].pass[1].in = mid;
  }
  std::vector<char> host(plan.mids_at, 0);
  std::memcpy(host.data(), plan.jobs.data(), sizeof(Job) * plan.jobs.size());
  std::memcpy(host.data() + plan.tables_at, tables.data().data(), sizeof(int32_t) * tables.data().size());
  MMCORE_CUDA_TRY(cudaMemcpyAsync(base, host.data(), host.size(), cudaMemcpyHostToDevice, stream),
                  "copying the resize tables to the device");
  return nullptr;
}

const char* check_resize(const ResizeBatch& p) {
  if (p.count < 0) return invalid("negative image count");
  if (p.count > 0 && p.images == nullptr) return invalid("images is null");
  if (p.C < 1 || p.C > kInt32Max) return invalid("C must lie in [1, 2^31), got " + str(p.C));
  if (p.dtype != kImageUint8 && p.dtype != kImageFloat32) {
    return invalid("dtype must be 0 (uint8) or 1 (float32), got " + str(p.dtype));
  }
  if (!valid_filter(p.filter)) return invalid("unknown filter " + str(static_cast<int>(p.filter)));
  return nullptr;
}

const char* check_preprocess(const PreprocessBatch& p) {
  if (p.count < 0) return invalid("negative image count");
  if (p.count > 0 && p.images == nullptr) return invalid("images is null");
  if (p.C < 1 || p.C > kInt32Max) return invalid("C must lie in [1, 2^31), got " + str(p.C));
  if (!valid_filter(p.filter)) return invalid("unknown filter " + str(static_cast<int>(p.filter)));
  if (p.crop_h < 1 || p.crop_w < 1 || p.crop_h > kInt32Max || p.crop_w > kInt32Max) {
    return invalid("crop sizes must lie in [1, 2^31), got " + str(p.crop_h) + " x " + str(p.crop_w));
  }
  if (p.norm.patch < 0 || p.norm.patch > kInt32Max) return invalid("negative patch size");
  if (p.norm.patch > 0 && (p.crop_h % p.norm.patch != 0 || p.crop_w % p.norm.patch != 0)) {
    return invalid("the crop " + str(p.crop_h) + " x " + str(p.crop_w) + " is not a multiple of the patch size " +
                   str(p.norm.patch));
  }
  return nullptr;
}

}  // namespace

// ---- entry points -----------------------------------------------------------------------------

const char* resize_workspace(const ResizeBatch& p, size_t* bytes) {
  if (bytes == nullptr) return invalid("bytes is null");
  *bytes = 0;
  if (const char* err = check_resize(p)) return err;
  if (p.count == 0) return nullptr;
  TableSet tables(p.filter, p.antialias, p.dtype == kImageUint8, false);
  Plan plan;
  const size_t elem = p.dtype == kImageUint8 ? 1 : 4;
  if (const char* err = make_plan(p.images, p.count, p.C, elem, false, 0, 0, false, &tables, &plan)) {
    return err;
  }
  *bytes = plan.total;
  return nullptr;
}

const char* resize(const ResizeBatch& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (const char* err = check_resize(p)) return err;
  if (p.count == 0) return nullptr;
  const bool u8 = p.dtype == kImageUint8;
  TableSet tables(p.filter, p.antialias, u8, true);
  Plan plan;
  if (const char* err = make_plan(p.images, p.count, p.C, u8 ? 1 : 4, false, 0, 0, true, &tables, &plan)) {
    return err;
  }
  if (plan.max_pixels[1] == 0) return nullptr;  // every output is empty
  // Pillow resizes LA and RGBA through premultiplied "La" / "RGBa" (not with nearest, and not at
  // all when the size does not change: that is a plain copy).
  bool premultiplied = false;
  if (u8 && (p.C == 2 || p.C == 4) && p.filter != ResizeFilter::nearest) {
    for (int64_t i = 0; i < p.count; ++i) {
      const ImageDesc& d = p.images[i];
      if (d.H == d.OH && d.W == d.OW) continue;
      plan.jobs[static_cast<size_t>(i)].pass[0].flags = kPremultiplyOnLoad;
      plan.jobs[static_cast<size_t>(i)].pass[1].flags = kUnpremultiplyOnStore;
      premultiplied = true;
    }
  }
  (void)cudaGetLastError();  // do not report an earlier, unrelated failure as ours
  if (const char* err = upload(plan, tables, workspace, workspace_bytes, stream)) return err;
  PassArgs a{};
  a.jobs = static_cast<const Job*>(workspace);
  a.tables = reinterpret_cast<const int32_t*>(static_cast<const char*>(workspace) + plan.tables_at);
  a.count = p.count;
  a.C = static_cast<int>(p.C);
  a.mode = kOutImage;
  if (u8) return launch_passes<uint8_t>(a, plan, premultiplied, stream);
  return launch_passes<float>(a, plan, false, stream);
}

const char* preprocess_image_workspace(const PreprocessBatch& p, size_t* bytes) {
  if (bytes == nullptr) return invalid("bytes is null");
  *bytes = 0;
  if (const char* err = check_preprocess(p)) return err;
  if (p.count == 0) return nullptr;
  TableSet tables(p.filter, p.antialias, true, false);
  Plan plan;
  if (const char* err = make_plan(p.images, p.count, p.C, 1, true, p.crop_h, p.crop_w, false, &tables, &plan)) {
    return err;
  }
  *bytes = plan.total;
  return nullptr;
}

const char* preprocess_image(const PreprocessBatch& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (const char* err = check_preprocess(p)) return err;
  if (p.count == 0) return nullptr;
  if (p.out == nullptr) return invalid("out is null");
  if (p.norm.mean == nullptr || p.norm.std == nullptr) return invalid("mean and std are required");
  TableSet tables(p.filter, p.antialias, true, true);
  Plan plan;
  if (const char* err = make_plan(p.images, p.count, p.C, 1, true, p.crop_h, p.crop_w, true, &tables, &plan)) {
    return err;
  }
  // make_plan checked crop_h * crop_w < 2^31, and C < 2^31.
  const int64_t per_image = p.C * p.crop_h * p.crop_w;
  if (p.count > std::numeric_limits<int64_t>::max() / per_image) {
    return invalid("the output size overflows");
  }
  for (int64_t i = 0; i < p.count; ++i) {
    plan.jobs[static_cast<size_t>(i)].pass[1].out = p.out + i * per_image;
  }
  (void)cudaGetLastError();  // do not report an earlier, unrelated failure as ours
  if (const char* err = upload(plan, tables, workspace, workspace_bytes, stream)) return err;
  PassArgs a{};
  a.jobs = static_cast<const Job*>(workspace);
  a.tables = reinterpret_cast<const int32_t*>(static_cast<const char*>(workspace) + plan.tables_at);
  a.count = p.count;
  a.C = static_cast<int>(p.C);
  a.mode = p.norm.patch > 0 ? kOutPatches : kOutCHW;
  a.patch = static_cast<int>(p.norm.patch);
  a.scale = p.norm.scale;
  a.mean = p.norm.mean;
  a.stdv = p.norm.std;
  return launch_passes<uint8_t>(a, plan, false, stream);
}

const char* normalize(const NormalizeCall& p, cudaStream_t stream) {
  if (p.N < 0 || p.H < 0 || p.W < 0 || p.C < 0) {
    return invalid("negative size (N=" + str(p.N) + ", H=" + str(p.H) + ", W=" + str(p.W) + ", C=" + str(p.C) + ")");
  }
  if (p.dtype != kImageUint8 && p.dtype != kImageFloat32) {
    return invalid("dtype must be 0 (uint8) or 1 (float32), got " + str(p.dtype));
  }
  if (p.layout != kLayoutCHW && p.layout != kLayoutHWC) {
    return invalid("layout must be 0 (chw) or 1 (hwc), got " + str(p.layout));
  }
  if (p.N == 0 || p.H == 0 || p.W == 0 || p.C == 0) return nullptr;
  if (p.C > kInt32Max) return invalid("C must be below 2^31");
  if (p.H > std::numeric_limits<int64_t>::max() / p.W || p.H * p.W > std::numeric_limits<int64_t>::max() / p.C / p.N) {
    return invalid("the image size overflows");
  }
  if (p.src == nullptr || p.dst == nullptr) return invalid("src and dst are required");
  if (p.mean == nullptr || p.std == nullptr) return invalid("mean and std are required");
  const int64_t HW = p.H * p.W;
  const dim3 grid = grid_for(HW, p.N);
  const bool chw = p.layout == kLayoutCHW;
  const int C = static_cast<int>(p.C);
  (void)cudaGetLastError();  // do not report an earlier, unrelated failure as ours
  if (p.dtype == kImageUint8) {
    normalize_kernel<uint8_t><<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(p.src), p.dst, p.N, HW, C,
                                                             p.mean, p.std, p.scale, chw);
  } else {
    normalize_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(p.src), p.dst, p.N, HW, C, p.mean,
                                                           p.std, p.scale, chw);
  }
  MMCORE_CUDA_TRY(cudaGetLastError(), "launching the normalize kernel");
  return nullptr;
}

const char* patchify(const PatchifyCall& p, cudaStream_t stream) {
  if (p.B < 0 || p.T < 0 || p.C < 0 || p.H < 0 || p.W < 0) {
    return invalid("negative size (B=" + str(p.B) + ", T=" + str(p.T) + ", C=" + str(p.C) + ", H=" + str(p.H) +
                   ", W=" + str(p.W) + ")");
  }
  if (p.patch < 1 || p.temporal_patch < 1 || p.patch > kInt32Max || p.temporal_patch > kInt32Max) {
    return invalid("patch sizes must be >= 1, got patch=" + str(p.patch) + ", temporal_patch=" + str(p.temporal_patch));
  }
  if (p.H % p.patch != 0 || p.W % p.patch != 0 || p.T % p.temporal_patch != 0) {
    return invalid("(T, H, W) = (" + str(p.T) + ", " + str(p.H) + ", " + str(p.W) +
                   ") is not a multiple of (temporal_patch, patch, patch) = (" + str(p.temporal_patch) + ", " +
                   str(p.patch) + ", " + str(p.patch) + ")");
  }
  if (p.B == 0 || p.T == 0 || p.C == 0 || p.H == 0 || p.W == 0) return nullptr;
  if (p.src == nullptr || p.dst == nullptr) return invalid("src and dst are required");
  // Outputs of one (b, temporal group): C * tp * H * W values, indexed in 32 bits.
  const int64_t tp = p.temporal_patch;
  if (p.C > kInt32Max / tp || p.H > kInt32Max / p.W || p.C * tp > kInt32Max / (p.H * p.W)) {
    return invalid("C * temporal_patch * H * W must be below 2^31");
  }
  PatchArgs a{};
  a.src = p.src;
  a.dst = p.dst;
  a.gt = p.T / tp;
  a.slabs = p.B * a.gt;
  a.slab_elems = p.C * tp * p.H * p.W;
  a.T = p.T;
  a.C = p.C;
  a.H = p.H;
  a.W = p.W;
  a.tp = tp;
  a.psize = FastDiv(static_cast<uint32_t>(p.C * tp * p.patch * p.patch));
  a.p = FastDiv(static_cast<uint32_t>(p.patch));
  a.tpd = FastDiv(static_cast<uint32_t>(tp));
  a.gw = FastDiv(static_cast<uint32_t>(p.W / p.patch));
  (void)cudaGetLastError();  // do not report an earlier, unrelated failure as ours
  patchify_kernel<<<grid_for(a.slab_elems, a.slabs), kThreads, 0, stream>>>(a);
  MMCORE_CUDA_TRY(cudaGetLastError(), "launching the patchify kernel");
  return nullptr;
}

}  // namespace cuda
}  // namespace mmcore
