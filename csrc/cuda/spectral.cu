// Short-time spectra on CUDA: framing, dither, DC removal, pre-emphasis and window, an FFT per
// frame, then a complex, power or mel output with an optional log and Whisper's normalization.
//
// Work decomposition
//   One block of 256 threads owns a group of up to 16 consecutive frames of one signal (about
//   2048 complex points in all) and loops over such groups (a persistent grid sized to the
//   device). Every frame of the group is transformed in shared memory:
//     * an even n_fft is a complex FFT of M = n_fft / 2 points over the packed pairs
//       (s[2m], s[2m + 1]) followed by the usual split into the spectrum of the real frame; an
//       odd n_fft is a complex FFT of M = n_fft points with zero imaginary parts;
//     * the FFT is an in-place mixed-radix decimation-in-time transform. Samples are written
//       straight to their digit-reversed position while the frame is assembled, then one pass
//       per radix runs: 4, 2, 3 and 5 have dedicated butterflies (one thread per butterfly);
//       any other prime radix is a direct DFT of that length, one output per thread, read and
//       written back in rounds of whole butterflies so that the update stays in place;
//     * twiddles come from a table of w^k = e^{-2 pi i k / n_fft} for k <= n_fft / 2, computed
//       by every block in double precision (sincospi) and rounded once to float; the other half
//       of the circle is w^k = conj(w^(n_fft - k)).
//   The power spectrum of a frame overwrites its own FFT buffer, so the mel projection reads it
//   from shared memory. Output writes are ordered frame-fastest so that neighbouring threads
//   write neighbouring addresses. Whisper's normalization is a second kernel with one block per
//   signal: a maximum reduction over that signal's whole output, then an in-place update.
//
// Semantics: see mmcore/spectral.h. Dither, DC removal and pre-emphasis are applied to the
// frame_length samples of a frame in Kaldi's order before the window; the DC mean is summed in
// double precision. Every value is accumulated in float32 otherwise. NaN propagates through the
// log floor and the Whisper maximum (NumPy's np.maximum semantics).

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "common.cuh"
#include "mmcore/dither.h"
#include "spectral_cuda.h"

namespace mmcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTargetPoints = 2048;  // complex points per block (frames * M)
constexpr int kMaxFrames = 16;       // frames per block
constexpr int kMaxStages = 16;       // radices of M <= 8191: at most 8
constexpr int kScratchBytes = 256;   // kMaxFrames doubles (partial sums) + kMaxFrames floats
// Outputs per thread of the direct-DFT stage: 1 covers prime radices up to kThreads; the wide
// variant covers any prime up to kSpectralMaxFft.
constexpr int kWideOut = static_cast<int>((kSpectralMaxFft + kThreads - 1) / kThreads);
constexpr int kNormThreads = 512;

struct Args {
  const float* x;
  const float* window;  // null: rectangular
  float* out;
  const int32_t* mel_start;
  const int32_t* mel_len;
  const int64_t* mel_offset;
  const float* mel_weights;
  int64_t T, n_frames, hop, pad_left;
  int64_t groups;       // frame groups per signal
  int64_t total_items;  // n_signals * groups
  uint64_t seed;
  int n_fft, half_n, M;  // half_n = n_fft / 2; M = FFT length (n_fft / 2 when packed)
  int frame_length, frame_offset;
  int frames_per_block;
  int n_bins, n_mels;
  int kind, log_mode;
  int n_stages;
  int radix[kMaxStages];                          // in execution order; the first stage combines length-1 transforms
  int table_offset, scratch_offset, perm_offset;  // bytes from the start of shared memory
  float dither, preemph, power, log_floor;
  bool reflect, packed, remove_dc;
};

// ---- small helpers -----------------------------------------------------------------------------

__device__ __forceinline__ float2 cadd(float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); }
__device__ __forceinline__ float2 csub(float2 a, float2 b) { return make_float2(a.x - b.x, a.y - b.y); }
__device__ __forceinline__ float2 cscale(float2 a, float s) { return make_float2(a.x * s, a.y * s); }
__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
  return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}

// w^e = e^{-2 pi i e / n_fft} for 0 <= e < n_fft.
__device__ __forceinline__ float2 twiddle(const float2* table, int e, int n, int half_n) {
  if (e <= half_n) return table[e];
  const float2 w = table[n - e];
  return make_float2(w.x, -w.y);
}

// max(a, b) that returns NaN when either is NaN (np.maximum).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ double warp_sum_double(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullWarpMask, x, offset);
  return x;
}

__device__ __forceinline__ float warp_nan_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = nan_max(x, __shfl_xor_sync(kFullWarpMask, x, offset));
  }
  return x;
}

// Sample t of frame `frame` of signal `sig` before DC removal, pre-emphasis and window:
// s(base + t) extended by the pad mode, plus dither.
__device__ __forceinline__ float frame_sample(const Args& a, const float* xs, int64_t sig, int64_t frame, int64_t base,
                                              int t) {
  int64_t i = base + t;
  float v = 0.0f;
  if (i >= 0 && i < a.T) {
    v = __ldg(xs + i);
  } else if (a.reflect && a.T > 0) {
    if (a.T == 1) {
      i = 0;
    } else {
      const int64_t period = 2 * (a.T - 1);
      i %= period;
      if (i < 0) i += period;
      if (i >= a.T) i = period - i;
    }
    v = __ldg(xs + i);
  }
  if (a.dither != 0.0f) {
    v += a.dither * static_cast<float>(dither_normal(a.seed, static_cast<uint64_t>(sig), static_cast<uint64_t>(frame),
                                                     static_cast<uint64_t>(t)));
  }
  return v;
}

// ---- per-block tables ----------------------------------------------------------------------

// Twiddle table (k <= n_fft / 2) and the digit-reversal permutation of the M-point FFT:
// perm[u] is where input u must be stored so that the stages below leave X in natural order.
__device__ void build_tables(const Args& a, float2* table, uint16_t* perm) {
  const int tid = threadIdx.x;
  for (int k = tid; k <= a.half_n; k += kThreads) {
    double s, c;
    sincospi(2.0 * static_cast<double>(k) / static_cast<double>(a.n_fft), &s, &c);
    table[k] = make_float2(static_cast<float>(c), static_cast<float>(-s));
  }
  for (int u = tid; u < a.M; u += kThreads) {
    int rem = u;
    int stride = a.M;
    int pos = 0;
    for (int s = a.n_stages - 1; s >= 0; --s) {
      const int r = a.radix[s];
      stride /= r;
      pos += (rem % r) * stride;
      rem /= r;
    }
    perm[u] = static_cast<uint16_t>(pos);
  }
}

// ---- framing ---------------------------------------------------------------------------------

// Writes the FFT input of frames f0 .. f0 + nf - 1 of signal `sig` into buf (nf * M points, in
// digit-reversed order). Contains __syncthreads when remove_dc is set: call block-uniformly.
__device__ void assemble_frames(const Args& a, float2* buf, const uint16_t* perm, char* scratch, int64_t sig,
                                int64_t f0, int nf) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const float* xs = a.x + sig * a.T;
  double* partial = reinterpret_cast<double*>(scratch);                           // kMaxFrames
  float* mean = reinterpret_cast<float*>(scratch + kMaxFrames * sizeof(double));  // kMaxFrames

  if (a.remove_dc) {
    // wpf warps share a frame when there are fewer frames than warps; the partial sums are
    // combined in a fixed order, so the mean does not depend on scheduling.
    const int wpf = nf >= kWarps ? 1 : kWarps / nf;
    const int concurrent = kWarps / wpf;
    const int group = warp / wpf;
    const int sub = warp - group * wpf;
    for (int fi = group; fi < nf; fi += concurrent) {
      const int64_t f = f0 + fi;
      const int64_t base = f * a.hop - a.pad_left + a.frame_offset;
      double acc = 0.0;
      for (int t = sub * 32 + lane; t < a.frame_length; t += wpf * 32) {
        acc += static_cast<double>(frame_sample(a, xs, sig, f, base, t));
      }
      acc = warp_sum_double(acc);
      if (lane == 0) partial[fi * wpf + sub] = acc;
    }
    __syncthreads();
    if (tid < nf) {
      double s = 0.0;
      for (int w = 0; w < wpf; ++w) s += partial[tid * wpf + w];
      mean[tid] = static_cast<float>(s / static_cast<double>(a.frame_length));
    }
    __syncthreads();
  }

  const int n = a.n_fft;
  const int total = nf * n;
  float* bufs = reinterpret_cast<float*>(buf);
  for (int e = tid; e < total; e += kThreads) {
    const int fi = e / n;
    const int u = e - fi * n;  // position in the n_fft-point frame
    const int t = u - a.frame_offset;
    float v = 0.0f;
    if (t >= 0 && t < a.frame_length) {
      const int64_t f = f0 + fi;
      const int64_t base = f * a.hop - a.pad_left + a.frame_offset;
      const float dc = a.remove_dc ? mean[fi] : 0.0f;
      v = frame_sample(a, xs, sig, f, base, t) - dc;
      if (a.preemph != 0.0f) {
        // Pre-emphasis reads the previous sample as it was before pre-emphasis; sample 0 uses
        // itself (Kaldi).
        const float prev = t > 0 ? frame_sample(a, xs, sig, f, base, t - 1) - dc : v;
        v -= a.preemph * prev;
      }
      if (a.window != nullptr) v *= __ldg(a.window + t);
    }
    float* fb = bufs + 2 * static_cast<int64_t>(fi) * a.M;
    if (a.packed) {
      fb[2 * perm[u >> 1] + (u & 1)] = v;
    } else {
      const int p = perm[u];
      fb[2 * p] = v;
      fb[2 * p + 1] = 0.0f;
    }
  }
}

// ---- FFT -------------------------------------------------------------------------------------

// Butterflies: p points at the first of r inputs spaced L apart; e1 is the twiddle exponent of
// input 1 (input q is multiplied by w^(q * e1) before the r-point DFT).

__device__ __forceinline__ void butterfly2(float2* p, int L, const float2* table, int e1, int n, int hn) {
  const float2 b0 = p[0];
  const float2 b1 = cmul(p[L], twiddle(table, e1, n, hn));
  p[0] = cadd(b0, b1);
  p[L] = csub(b0, b1);
}

__device__ __forceinline__ void butterfly3(float2* p, int L, const float2* table, int e1, int n, int hn) {
  constexpr float kSin60 = 0.8660254037844386f;
  const float2 b0 = p[0];
  const float2 b1 = cmul(p[L], twiddle(table, e1, n, hn));
  const float2 b2 = cmul(p[2 * L], twiddle(table, 2 * e1, n, hn));
  const float2 t = cadd(b1, b2);
  const float2 d = cscale(csub(b1, b2), kSin60);
  const float2 m = make_float2(b0.x - 0.5f * t.x, b0.y - 0.5f * t.y);
  p[0] = cadd(b0, t);
  p[L] = make_float2(m.x + d.y, m.y - d.x);      // m - i d
  p[2 * L] = make_float2(m.x - d.y, m.y + d.x);  // m + i d
}

__device__ __forceinline__ void butterfly4(float2* p, int L, const float2* table, int e1, int n, int hn) {
  const float2 b0 = p[0];
  const float2 b1 = cmul(p[L], twiddle(table, e1, n, hn));
  const float2 b2 = cmul(p[2 * L], twiddle(table, 2 * e1, n, hn));
  const float2 b3 = cmul(p[3 * L], twiddle(table, 3 * e1, n, hn));
  const float2 t0 = cadd(b0, b2);
  const float2 t1 = csub(b0, b2);
  const float2 t2 = cadd(b1, b3);
  const float2 t3 = csub(b1, b3);
  p[0] = cadd(t0, t2);
  p[L] = make_float2(t1.x + t3.y, t1.y - t3.x);  // t1 - i t3
  p[2 * L] = csub(t0, t2);
  p[3 * L] = make_float2(t1.x - t3.y, t1.y + t3.x);  // t1 + i t3
}

__device__ __forceinline__ void butterfly5(float2* p, int L, const float2* table, int e1, int n, int hn) {
  constexpr float kC1 = 0.30901699437494745f;  // cos(2 pi / 5)
  constexpr float kC2 = -0.8090169943749475f;  // cos(4 pi / 5)
  constexpr float kS1 = 0.9510565162951535f;   // sin(2 pi / 5)
  constexpr float kS2 = 0.5877852522924731f;   // sin(4 pi / 5)
  const float2 b0 = p[0];
  const float2 b1 = cmul(p[L], twiddle(table, e1, n, hn));
  const float2 b2 = cmul(p[2 * L], twiddle(table, 2 * e1, n, hn));
  const float2 b3 = cmul(p[3 * L], twiddle(table, 3 * e1, n, hn));
  const float2 b4 = cmul(p[4 * L], twiddle(table, 4 * e1, n, hn));
  const float2 t1 = cadd(b1, b4);
  const float2 t2 = cadd(b2, b3);
  const float2 d1 = csub(b1, b4);
  const float2 d2 = csub(b2, b3);
  const float2 a1 = make_float2(b0.x + kC1 * t1.x + kC2 * t2.x, b0.y + kC1 * t1.y + kC2 * t2.y);
  const float2 a2 = make_float2(b0.x + kC2 * t1.x + kC1 * t2.x, b0.y + kC2 * t1.y + kC1 * t2.y);
  const float2 s1 = make_float2(kS1 * d1.x + kS2 * d2.x, kS1 * d1.y + kS2 * d2.y);
  const float2 s2 = make_float2(kS2 * d1.x - kS1 * d2.x, kS2 * d1.y - kS1 * d2.y);
  p[0] = cadd(b0, cadd(t1, t2));
  p[L] = make_float2(a1.x + s1.y, a1.y - s1.x);      // a1 - i s1
  p[4 * L] = make_float2(a1.x - s1.y, a1.y + s1.x);  // a1 + i s1
  p[2 * L] = make_float2(a2.x + s2.y, a2.y - s2.x);  // a2 - i s2
  p[3 * L] = make_float2(a2.x - s2.y, a2.y + s2.x);  // a2 + i s2
}

// A stage of prime radix R > 5 as a direct R-point DFT per butterfly. Each butterfly gets
// ceil(R / K) threads that compute K outputs each (K = ceil(R / kThreads) <= kMaxOut); the
// outputs are held in registers until every butterfly of the round has read its inputs.
// Contains __syncthreads: call block-uniformly.
template <int kMaxOut>
__device__ void generic_stage(const Args& a, float2* buf, const float2* table, int nf, int R, int L) {
  const int tid = threadIdx.x;
  const int n = a.n_fft;
  const int hn = a.half_n;
  const int M = a.M;
  const int LR = L * R;
  const int tstride = n / LR;
  const int rstride = n / R;
  const int per_frame = M / R;
  const int total = nf * per_frame;
  const int K = (R + kThreads - 1) / kThreads;
  const int per_butterfly = (R + K - 1) / K;
  const int per_round = kThreads / per_butterfly;
  const int bl = tid / per_butterfly;
  const int sub = tid - bl * per_butterfly;

  for (int c0 = 0; c0 < total; c0 += per_round) {
    const int b = c0 + bl;
    const bool active = bl < per_round && b < total;
    float2 o[kMaxOut];
    float2* p = buf;
    if (active) {
      const int fi = b / per_frame;
      const int r = b - fi * per_frame;
      const int g = r / L;
      const int j = r - g * L;
      p = buf + fi * M + g * LR + j;
#pragma unroll
      for (int i = 0; i < kMaxOut; ++i) {
        const int k2 = sub + i * per_butterfly;
        o[i] = make_float2(0.0f, 0.0f);
        if (i < K && k2 < R) {
          // Input q is multiplied by w^(q (j tstride + k2 rstride)); the step is < n. Terms are
          // summed in runs of kRun so that long (large prime) sums keep their accuracy.
          constexpr int kRun = 32;
          const int step = j * tstride + k2 * rstride;
          int e = 0;
          float2 acc = make_float2(0.0f, 0.0f);
          for (int q0 = 0; q0 < R; q0 += kRun) {
            const int q1 = q0 + kRun < R ? q0 + kRun : R;
            float2 run = make_float2(0.0f, 0.0f);
            for (int q = q0; q < q1; ++q) {
              const float2 w = twiddle(table, e, n, hn);
              const float2 v = p[q * L];
              run.x += v.x * w.x - v.y * w.y;
              run.y += v.x * w.y + v.y * w.x;
              e += step;
              if (e >= n) e -= n;
            }
            acc = cadd(acc, run);
          }
          o[i] = acc;
        }
      }
    }
    __syncthreads();
    if (active) {
#pragma unroll
      for (int i = 0; i < kMaxOut; ++i) {
        const int k2 = sub + i * per_butterfly;
        if (i < K && k2 < R) p[k2 * L] = o[i];
      }
    }
    __syncthreads();
  }
}

// In-place FFT of the nf frames in buf (input in digit-reversed order, output natural).
// Ends with a barrier after every stage: call block-uniformly.
template <int kMaxOut>
__device__ void fft_frames(const Args& a, float2* buf, const float2* table, int nf) {
  const int tid = threadIdx.x;
  const int n = a.n_fft;
  const int hn = a.half_n;
  const int M = a.M;
  int L = 1;
  for (int s = 0; s < a.n_stages; ++s) {
    const int R = a.radix[s];
    const int LR = L * R;
    if (R <= 5) {
      const int tstride = n / LR;
      const int per_frame = M / R;
      const int total = nf * per_frame;
      for (int b = tid; b < total; b += kThreads) {
        const int fi = b / per_frame;
        const int r = b - fi * per_frame;
        const int g = r / L;
        const int j = r - g * L;
        float2* p = buf + fi * M + g * LR + j;
        const int e1 = j * tstride;
        if (R == 4) {
          butterfly4(p, L, table, e1, n, hn);
        } else if (R == 2) {
          butterfly2(p, L, table, e1, n, hn);
        } else if (R == 3) {
          butterfly3(p, L, table, e1, n, hn);
        } else {
          butterfly5(p, L, table, e1, n, hn);
        }
      }
      __syncthreads();
    } else {
      generic_stage<kMaxOut>(a, buf, table, nf, R, L);
    }
    L = LR;
  }
}

// ---- outputs ---------------------------------------------------------------------------------

__device__ __forceinline__ float spectral_power(const Args& a, float2 X) {
  const float m2 = X.x * X.x + X.y * X.y;
  if (a.power == 2.0f) return m2;
  if (a.power == 1.0f) return sqrtf(m2);
  return powf(m2, 0.5f * a.power);
}

__device__ __forceinline__ float apply_log(const Args& a, float y) {
  if (a.log_mode == static_cast<int>(LogMode::log10)) return log10f(nan_max(y, a.log_floor));
  if (a.log_mode == static_cast<int>(LogMode::ln)) return logf(nan_max(y, a.log_floor));
  return y;
}

// Splits the FFT of every frame into the spectrum X[0 .. n_fft / 2] and writes it (complex),
// its power (power) or stores the power in place for the mel projection (mel).
__device__ void write_spectra(const Args& a, float2* buf, const float2* table, int64_t sig, int64_t f0, int nf) {
  const int tid = threadIdx.x;
  const int M = a.M;
  // Packed: the thread for k also produces bin M - k (k = 0 gives bins 0 and M = n_fft / 2).
  const int count = a.packed ? M / 2 + 1 : a.n_bins;
  const int total = nf * count;
  const int64_t row_stride = a.n_frames;
  for (int e = tid; e < total; e += kThreads) {
    const int k = e / nf;
    const int fi = e - k * nf;  // frame-fastest: neighbouring threads write neighbouring frames
    float2* fb = buf + fi * M;
    const int64_t f = f0 + fi;
    float2 X0;
    float2 X1 = make_float2(0.0f, 0.0f);
    int bin1 = -1;
    if (a.packed) {
      // Z = FFT(s_even + i s_odd): E = (Z[k] + conj Z[M-k]) / 2, O = (Z[k] - conj Z[M-k]) / 2i,
      // X[k] = E + w^k O and X[M - k] = conj(E - w^k O).
      const int km = k == 0 ? 0 : M - k;
      const float2 zk = fb[k];
      const float2 zm = fb[km];
      const float2 E = make_float2(0.5f * (zk.x + zm.x), 0.5f * (zk.y - zm.y));
      const float2 O = make_float2(0.5f * (zk.y + zm.y), -0.5f * (zk.x - zm.x));
      const float2 wO = cmul(table[k], O);
      X0 = cadd(E, wO);
      X1 = make_float2(E.x - wO.x, wO.y - E.y);
      bin1 = M - k;
      if (bin1 == k) bin1 = -1;
    } else {
      X0 = fb[k];
    }

    if (a.kind == static_cast<int>(SpectralKind::complex_stft)) {
      float2* out = reinterpret_cast<float2*>(a.out) + sig * a.n_bins * row_stride + f;
      out[k * row_stride] = X0;
      if (bin1 >= 0) out[bin1 * row_stride] = X1;
    } else if (a.kind == static_cast<int>(SpectralKind::power)) {
      float* out = a.out + sig * a.n_bins * row_stride + f;
      out[k * row_stride] = apply_log(a, spectral_power(a, X0));
      if (bin1 >= 0) out[bin1 * row_stride] = apply_log(a, spectral_power(a, X1));
    } else {
      // Every thread overwrites only the slots it has read: bin b sits in fb[b].x, except bin M
      // of a packed frame, which sits in fb[0].y.
      const float p0 = spectral_power(a, X0);
      if (a.packed && k == 0) {
        fb[0] = make_float2(p0, spectral_power(a, X1));
      } else {
        fb[k].x = p0;
        if (bin1 >= 0) fb[bin1].x = spectral_power(a, X1);
      }
    }
  }
}

__device__ void project_mel(const Args& a, const float2* buf, int64_t sig, int64_t f0, int nf) {
  const int tid = threadIdx.x;
  const int M = a.M;
  const int total = nf * a.n_mels;
  const int64_t row_stride = a.n_frames;
  for (int e = tid; e < total; e += kThreads) {
    const int m = e / nf;
    const int fi = e - m * nf;
    const float2* fb = buf + fi * M;
    const int start = __ldg(a.mel_start + m);
    const int len = __ldg(a.mel_len + m);
    const int64_t off = __ldg(a.mel_offset + m);
    // Bins outside the spectrum contribute nothing (the host layer rejects such filters).
    const int lo = start > 0 ? start : 0;
    const int64_t end = static_cast<int64_t>(start) + len;
    const int hi = end < a.n_bins ? static_cast<int>(end) : a.n_bins;
    float acc = 0.0f;
    for (int b = lo; b < hi; ++b) {
      const float pw = (a.packed && b == M) ? fb[0].y : fb[b].x;
      acc += __ldg(a.mel_weights + off + (b - start)) * pw;
    }
    a.out[(sig * a.n_mels + m) * row_stride + f0 + fi] = apply_log(a, acc);
  }
}

// ---- kernels ---------------------------------------------------------------------------------

// The wide variant (prime radices > kThreads) keeps kMaxOut outputs per thread in registers and
// may use all of them; the common variant stays within 64 registers for 4 resident blocks.
template <int kMaxOut>
__global__ void __launch_bounds__(kThreads, kMaxOut == 1 ? 4 : 1) spectral_kernel(const Args a) {
  extern __shared__ float4 spectral_smem[];
  char* base = reinterpret_cast<char*>(spectral_smem);
  float2* buf = reinterpret_cast<float2*>(base);
  float2* table = reinterpret_cast<float2*>(base + a.table_offset);
  char* scratch = base + a.scratch_offset;
  uint16_t* perm = reinterpret_cast<uint16_t*>(base + a.perm_offset);

  build_tables(a, table, perm);
  __syncthreads();

  const int F = a.frames_per_block;
  // The loop is uniform over the block, so the barriers inside stay legal.
  for (int64_t item = blockIdx.x; item < a.total_items; item += gridDim.x) {
    const int64_t sig = item / a.groups;
    const int64_t f0 = (item - sig * a.groups) * F;
    const int64_t left = a.n_frames - f0;
    const int nf = left < F ? static_cast<int>(left) : F;

    assemble_frames(a, buf, perm, scratch, sig, f0, nf);
    __syncthreads();
    fft_frames<kMaxOut>(a, buf, table, nf);
    write_spectra(a, buf, table, sig, f0, nf);
    if (a.kind == static_cast<int>(SpectralKind::mel)) {
      __syncthreads();
      project_mel(a, buf, sig, f0, nf);
    }
    __syncthreads();  // the next group overwrites buf
  }
}

// y = (max(y, max_all(y) - 8) + 4) / 4 over each signal's per_signal values.
__global__ void __launch_bounds__(kNormThreads) whisper_norm_kernel(float* out, int64_t n_signals, int64_t per_signal) {
  __shared__ float partial[kNormThreads / 32];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  for (int64_t sig = blockIdx.x; sig < n_signals; sig += gridDim.x) {
    float* y = out + sig * per_signal;
    float m = -INFINITY;
    for (int64_t i = tid; i < per_signal; i += kNormThreads) m = nan_max(m, y[i]);
    m = warp_nan_max(m);
    if (lane == 0) partial[warp] = m;
    __syncthreads();
    float top = partial[0];
#pragma unroll
    for (int w = 1; w < kNormThreads / 32; ++w) top = nan_max(top, partial[w]);
    __syncthreads();  // partial is reused by the next signal
    const float lo = top - 8.0f;
    for (int64_t i = tid; i < per_signal; i += kNormThreads) {
      y[i] = (nan_max(y[i], lo) + 4.0f) * 0.25f;
    }
  }
}

// ---- host side -------------------------------------------------------------------------------

const char* invalid(const std::string& what) { return set_error_message("invalid argument: " + what); }

int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Shared memory of one block with F frames of M points (layout: buf, table, scratch, perm).
int64_t shared_bytes(int64_t F, int64_t M, int64_t half_n, Args* a) {
  const int64_t table_offset = align16(8 * F * M);
  const int64_t scratch_offset = table_offset + align16(8 * (half_n + 1));
  const int64_t perm_offset = scratch_offset + kScratchBytes;
  if (a != nullptr) {
    a->table_offset = static_cast<int>(table_offset);
    a->scratch_offset = static_cast<int>(scratch_offset);
    a->perm_offset = static_cast<int>(perm_offset);
  }
  return perm_offset + align16(2 * M);
}

}  // namespace

const char* spectral(const SpectralParams& p, cudaStream_t stream) {
  using std::to_string;
  if (p.n_signals < 0 || p.T < 0 || p.n_frames < 0) {
    return invalid("negative size (n_signals=" + to_string(p.n_signals) + ", T=" + to_string(p.T) +
                   ", n_frames=" + to_string(p.n_frames) + ")");
  }
  if (p.n_fft < 1 || p.n_fft > kSpectralMaxFft) {
    return invalid("n_fft must lie in [1, " + to_string(kSpectralMaxFft) + "] for the CUDA backend, got " +
                   to_string(p.n_fft));
  }
  if (p.hop < 1) return invalid("hop must be >= 1, got " + to_string(p.hop));
  if (p.frame_length < 1 || p.frame_length > p.n_fft) {
    return invalid("frame_length must lie in [1, n_fft = " + to_string(p.n_fft) + "], got " +
                   to_string(p.frame_length));
  }
  if (p.frame_offset < 0 || p.frame_offset > p.n_fft - p.frame_length) {
    return invalid("frame_offset must lie in [0, n_fft - frame_length = " + to_string(p.n_fft - p.frame_length) +
                   "], got " + to_string(p.frame_offset));
  }
  const int64_t limit = std::numeric_limits<int64_t>::max() / 4;
  if (p.pad_left > limit || p.pad_left < -limit || p.T > limit ||
      (p.n_frames > 0 && p.n_frames - 1 > (limit - p.n_fft) / p.hop)) {
    return invalid("frame positions overflow int64 (pad_left=" + to_string(p.pad_left) + ", hop=" + to_string(p.hop) +
                   ", n_frames=" + to_string(p.n_frames) + ")");
  }
  if (p.pad_mode != PadMode::constant && p.pad_mode != PadMode::reflect) {
    return invalid("pad_mode must be 0 (constant) or 1 (reflect), got " + to_string(static_cast<int>(p.pad_mode)));
  }
  const int kind = static_cast<int>(p.kind);
  if (kind < 0 || kind > 2) {
    return invalid("kind must be 0 (complex), 1 (power) or 2 (mel), got " + to_string(kind));
  }
  const int log_mode = static_cast<int>(p.log_mode);
  if (log_mode < 0 || log_mode > 2) {
    return invalid("log_mode must be 0 (none), 1 (log10) or 2 (ln), got " + to_string(log_mode));
  }
  if (!std::isfinite(p.dither)) return invalid("dither must be finite");
  if (!std::isfinite(p.preemph)) return invalid("preemph must be finite");
  if (p.kind == SpectralKind::complex_stft) {
    if (p.log_mode != LogMode::none || p.whisper_norm) {
      return invalid("log_mode and whisper_norm need kind power or mel, not complex");
    }
  } else if (!(p.power > 0.0f) || !std::isfinite(p.power)) {
    return invalid("power must be finite and > 0, got " + to_string(p.power));
  }
  if (p.log_mode != LogMode::none && (!(p.log_floor >= 0.0f) || !std::isfinite(p.log_floor))) {
    return invalid("log_floor must be finite and >= 0, got " + to_string(p.log_floor));
  }
  if (p.kind == SpectralKind::mel && (p.n_mels < 0 || p.n_mels > (int64_t{1} << 30))) {
    return invalid("n_mels must lie in [0, 2^30], got " + to_string(p.n_mels));
  }

  const int64_t n_bins = p.n_fft / 2 + 1;
  const int64_t n_rows = p.kind == SpectralKind::mel ? p.n_mels : n_bins;
  if (p.n_signals == 0 || p.n_frames == 0 || n_rows == 0) return nullptr;  // nothing to compute
  const bool reflect = p.pad_mode == PadMode::reflect;
  if (reflect && p.T == 0) return invalid("reflect padding needs T >= 1 samples, got T = 0");
  if (p.T > 0 && p.x == nullptr) return invalid("x is null");
  if (p.out == nullptr) return invalid("out is null");
  if (p.kind == SpectralKind::mel && (p.mel_start == nullptr || p.mel_len == nullptr || p.mel_offset == nullptr)) {
    return invalid("mel_start, mel_len and mel_offset are required for kind mel");
  }

  Args a{};
  a.x = p.x;
  a.window = p.window;
  a.out = p.out;
  a.mel_start = p.mel_start;
  a.mel_len = p.mel_len;
  a.mel_offset = p.mel_offset;
  a.mel_weights = p.mel_weights;
  a.T = p.T;
  a.n_frames = p.n_frames;
  a.hop = p.hop;
  a.pad_left = p.pad_left;
  a.seed = p.seed;
  a.n_fft = static_cast<int>(p.n_fft);
  a.half_n = a.n_fft / 2;
  a.packed = a.n_fft % 2 == 0;
  a.M = a.packed ? a.n_fft / 2 : a.n_fft;
  a.frame_length = static_cast<int>(p.frame_length);
  a.frame_offset = static_cast<int>(p.frame_offset);
  a.n_bins = static_cast<int>(n_bins);
  a.n_mels = p.kind == SpectralKind::mel ? static_cast<int>(p.n_mels) : 0;
  a.kind = kind;
  a.log_mode = log_mode;
  a.dither = p.dither;
  a.preemph = p.preemph;
  a.power = p.power;
  a.log_floor = p.log_floor;
  a.reflect = reflect;
  a.remove_dc = p.remove_dc;

  // Radices in execution order: 4s, at most one 2, then odd primes ascending.
  int max_radix = 1;
  {
    int m = a.M;
    int ns = 0;
    auto push = [&](int r) {
      a.radix[ns++] = r;
      m /= r;
      if (r > max_radix) max_radix = r;
    };
    while (m % 4 == 0) push(4);
    if (m % 2 == 0) push(2);
    for (int r = 3; m > 1; r += 2) {
      if (static_cast<int64_t>(r) * r > m) {
        push(m);
        break;
      }
      while (m % r == 0) push(r);
    }
    a.n_stages = ns;
  }
  const bool wide = max_radix > kThreads;

  (void)cudaGetLastError();  // do not report an earlier, unrelated failure as ours
  int device = 0;
  MMCORE_CUDA_TRY(cudaGetDevice(&device), "querying the current device");
  int smem_limit = 0;
  int sm_count = 0;
  MMCORE_CUDA_TRY(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                  "querying the shared memory per block");
  MMCORE_CUDA_TRY(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device),
                  "querying the multiprocessor count");

  int64_t F = kTargetPoints / a.M;
  F = F < 1 ? 1 : (F > kMaxFrames ? kMaxFrames : F);
  if (F > p.n_frames) F = p.n_frames;
  const int64_t fixed = shared_bytes(0, a.M, a.half_n, nullptr);
  if (fixed + align16(8 * F * a.M) > smem_limit) {
    F = (smem_limit - fixed) / (8 * static_cast<int64_t>(a.M));
    while (F > 0 && shared_bytes(F, a.M, a.half_n, nullptr) > smem_limit) --F;
    if (F < 1) {
      return invalid("n_fft = " + to_string(p.n_fft) + " needs " + to_string(shared_bytes(1, a.M, a.half_n, nullptr)) +
                     " bytes of shared memory per block, this device allows " + to_string(smem_limit) +
                     "; use a smaller n_fft or the CPU backend");
    }
  }
  const int64_t smem = shared_bytes(F, a.M, a.half_n, &a);
  a.frames_per_block = static_cast<int>(F);
  a.groups = (p.n_frames + F - 1) / F;
  if (a.groups > std::numeric_limits<int64_t>::max() / p.n_signals) {
    return invalid("too many frames (n_signals * n_frames overflows)");
  }
  a.total_items = p.n_signals * a.groups;

  void (*kernel)(Args) = wide ? spectral_kernel<kWideOut> : spectral_kernel<1>;
  MMCORE_CUDA_TRY(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                  "raising the shared memory limit of the spectral kernel");
  int per_sm = 0;
  MMCORE_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(smem)),
                  "querying the occupancy of the spectral kernel");
  if (per_sm < 1) per_sm = 1;
  if (sm_count < 1) sm_count = 1;
  const int64_t resident = static_cast<int64_t>(sm_count) * per_sm;
  const int64_t grid = a.total_items < resident ? a.total_items : resident;
  kernel<<<static_cast<unsigned>(grid), kThreads, static_cast<size_t>(smem), stream>>>(a);
  MMCORE_CUDA_TRY(cudaGetLastError(), "launching the spectral kernel");

  if (p.whisper_norm) {
    const int64_t per_signal = n_rows * p.n_frames;
    const int64_t max_grid = std::numeric_limits<int32_t>::max();
    const int64_t norm_grid = p.n_signals < max_grid ? p.n_signals : max_grid;
    whisper_norm_kernel<<<static_cast<unsigned>(norm_grid), kNormThreads, 0, stream>>>(p.out, p.n_signals, per_signal);
    MMCORE_CUDA_TRY(cudaGetLastError(), "launching the Whisper normalization kernel");
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace mmcore
