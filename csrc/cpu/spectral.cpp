// Short-time spectra on the CPU: STFT, power spectrogram, mel, log-mel, Kaldi fbank.
//
// Compiled once per instruction-set target (see attention.cpp). One fused pass per block of
// kWidth frames of one signal: the frames go into the SIMD lanes (framing, dither, DC removal,
// pre-emphasis and window while they are gathered), a real FFT of length n_fft is done as a
// complex FFT of length n_fft / 2 on the lanes plus the split step, then the power, a sparse mel
// projection (each filter touches only its own bins) and the log, and the block is stored with
// frames contiguous, which is the (..., n_mels, frames) layout itself. The complex spectrum is
// only kept when the STFT is what was asked for.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "mmcore/dither.h"
#include "mmcore/fft.h"
#include "mmcore/fft_lanes.h"
#include "mmcore/parallel.h"
#include "mmcore/simd.h"
#include "mmcore/size_error.h"
#include "mmcore/spectral.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef MMCORE_TARGET
#error "MMCORE_TARGET must name the instruction-set target of this translation unit"
#endif

namespace mmcore {
namespace MMCORE_TARGET {

using simd::kWidth;
using simd::vf;

namespace {

constexpr int64_t kBlocksPerTask = 4;  // frame blocks of kWidth frames per parallel task
// Scratch budget of one thread (the FFT lanes: 4 complex-length buffers of kWidth floats and
// the power spectrum); an n_fft beyond it raises SizeError instead of exhausting memory.
constexpr double kMaxScratchBytes = 2.0 * 1024.0 * 1024.0 * 1024.0;

struct Scratch {
  std::vector<vf> ar, ai, br, bi, pw;
  std::vector<float> frame;
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

inline float sample(const float* x, int64_t T, int64_t i, PadMode mode) {
  if (i >= 0 && i < T) return x[i];
  if (mode == PadMode::constant) return 0.0f;
  // numpy 'reflect' (no edge repeat); the caller guarantees one reflection suffices.
  if (i < 0) i = -i;
  if (i >= T) i = 2 * (T - 1) - i;
  return (i >= 0 && i < T) ? x[i] : 0.0f;
}

// Lanes i of the result: base[idx[i]].
inline vf gather(const float* base, simd::vi idx) {
#if defined(__AVX512F__)
  // The masked form with a zero source: the plain one starts from an undefined register, which
  // GCC reports as maybe-uninitialized. All 16 lanes are gathered either way.
  return (vf)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), static_cast<__mmask16>(0xffff), (__m512i)idx, base, 4);
#elif defined(__AVX2__)
  return (vf)_mm256_i32gather_ps(base, (__m256i)idx, 4);
#else
  vf r;
  for (int i = 0; i < kWidth; ++i) r[i] = base[idx[i]];
  return r;
#endif
}

// Fast path: kWidth whole frames inside the signal, nothing to do per frame but the window.
// Each frame position t is one hardware gather over the lanes.
bool gather_frames_fast(const SpectralParams& p, int64_t sig, int64_t frame0, int nlanes, bool real_split,
                        int64_t csize, float* re, float* im) {
  const int64_t L = p.frame_length;
  if (nlanes != kWidth || p.dither != 0.0f || p.remove_dc || p.preemph != 0.0f) return false;
  const int64_t base0 = frame0 * p.hop - p.pad_left + p.frame_offset;
  const int64_t span = (kWidth - 1) * p.hop + L;
  if (base0 < 0 || base0 + span > p.T || span >= (int64_t(1) << 31)) return false;
  const int64_t cover = real_split ? 2 * csize : csize;
  // Zero the buffer outside the frame: [0, frame_offset) and [frame_offset + L, cover).
  auto zero_pos = [&](int64_t b) {
    if (real_split) {
      simd::store((b & 1 ? im : re) + (b >> 1) * kWidth, vf{});
    } else {
      simd::store(re + b * kWidth, vf{});
    }
  };
  for (int64_t b = 0; b < p.frame_offset; ++b) zero_pos(b);
  for (int64_t b = p.frame_offset + L; b < cover; ++b) zero_pos(b);
  if (!real_split) std::memset(im, 0, sizeof(float) * csize * kWidth);
  const float* x = p.x + sig * p.T + base0;
  auto put = [&](int64_t t, vf v) {
    v *= simd::splat(p.window[t]);
    const int64_t b = p.frame_offset + t;
    if (real_split) {
      simd::store((b & 1 ? im : re) + (b >> 1) * kWidth, v);
    } else {
      simd::store(re + b * kWidth, v);
    }
  };
  // Whole tiles: kWidth consecutive samples of each of the kWidth frames, transposed in
  // registers so that each vector holds one frame position across the frames.
  int64_t t = 0;
  for (; t + kWidth <= L; t += kWidth) {
    vf tile[kWidth];
    for (int l = 0; l < kWidth; ++l) tile[l] = simd::load(x + l * p.hop + t);
    simd::transpose(tile);
    for (int i = 0; i < kWidth; ++i) put(t + i, tile[i]);
  }
  simd::vi lanes;
  for (int i = 0; i < kWidth; ++i) lanes[i] = static_cast<int32_t>(i * p.hop);
  for (; t < L; ++t) put(t, gather(x + t, lanes));
  return true;
}

// Writes v[t] * window[t], t < L, at FFT-buffer position offset + t of lane `lane`: with
// real_split, even positions b go to re[b / 2] and odd ones to im[b / 2] (the real FFT done as a
// complex one of half the length), else every position to re[b].
void put_frame(const float* v, const float* window, int64_t L, int64_t offset, bool real_split, float* re, float* im,
               int lane) {
  if (!real_split) {
    for (int64_t t = 0; t < L; ++t) re[(offset + t) * kWidth + lane] = v[t] * window[t];
    return;
  }
  int64_t t = 0;
  if (offset & 1) {  // position offset is odd: its value goes to im
    im[(offset >> 1) * kWidth + lane] = v[0] * window[0];
    t = 1;
  }
  for (; t + 1 < L; t += 2) {  // offset + t is even from here on
    const int64_t b = (offset + t) >> 1;
    re[b * kWidth + lane] = v[t] * window[t];
    im[b * kWidth + lane] = v[t + 1] * window[t + 1];
  }
  if (t < L) re[((offset + t) >> 1) * kWidth + lane] = v[t] * window[t];
}

// Gathers the frames frame0 .. frame0 + nlanes - 1 of one signal into the lanes.
void gather_frames(const SpectralParams& p, int64_t sig, int64_t frame0, int nlanes, bool real_split, int64_t csize,
                   float* re, float* im, float* tmp) {
  std::memset(re, 0, sizeof(float) * csize * kWidth);
  std::memset(im, 0, sizeof(float) * csize * kWidth);
  const float* x = p.x + sig * p.T;
  const int64_t L = p.frame_length;
  const bool per_frame = p.dither != 0.0f || p.remove_dc || p.preemph != 0.0f;
  for (int lane = 0; lane < nlanes; ++lane) {
    const int64_t f = frame0 + lane;
    const int64_t base = f * p.hop - p.pad_left + p.frame_offset;
    const bool inside = base >= 0 && base + L <= p.T;
    if (!per_frame) {
      if (inside) {
        put_frame(x + base, p.window, L, p.frame_offset, real_split, re, im, lane);
      } else {
        for (int64_t t = 0; t < L; ++t) tmp[t] = sample(x, p.T, base + t, p.pad_mode);
        put_frame(tmp, p.window, L, p.frame_offset, real_split, re, im, lane);
      }
      continue;
    }
    if (inside) {
      std::memcpy(tmp, x + base, sizeof(float) * L);
    } else {
      for (int64_t t = 0; t < L; ++t) tmp[t] = sample(x, p.T, base + t, p.pad_mode);
    }
    if (p.dither != 0.0f)
      for (int64_t t = 0; t < L; ++t)
        tmp[t] += static_cast<float>(p.dither * dither_normal(p.seed, static_cast<uint64_t>(sig),
                                                              static_cast<uint64_t>(f), static_cast<uint64_t>(t)));
    if (p.remove_dc) {
      double sum = 0.0;
      for (int64_t t = 0; t < L; ++t) sum += tmp[t];
      const float mean = static_cast<float>(sum / static_cast<double>(L));
      for (int64_t t = 0; t < L; ++t) tmp[t] -= mean;
    }
    if (p.preemph != 0.0f) {
      for (int64_t t = L - 1; t > 0; --t) tmp[t] -= p.preemph * tmp[t - 1];
      tmp[0] -= p.preemph * tmp[0];
    }
    put_frame(tmp, p.window, L, p.frame_offset, real_split, re, im, lane);
  }
}

inline vf power_of(vf re, vf im, float power) {
  const vf p2 = re * re + im * im;
  if (power == 2.0f) return p2;
  if (power == 1.0f) return simd::sqrt(p2);
  vf r;
  for (int i = 0; i < kWidth; ++i) r[i] = std::pow(p2[i], 0.5f * power);
  return r;
}

inline vf apply_log(vf y, LogMode mode, float floor) {
  y = simd::vmax(y, simd::splat(floor));
  if (mode == LogMode::log10) return simd::log2(y) * simd::splat(0.30102999566398120f);
  return simd::log2(y) * simd::splat(0.69314718055994531f);
}

// Stores lanes [0, n) of v at dst[0 .. n).
inline void store_lanes(float* dst, vf v, int n) {
  if (n == kWidth) {
    simd::store(dst, v);
  } else {
    for (int i = 0; i < n; ++i) dst[i] = v[i];
  }
}

// Returns the maximum of the block's outputs when they are log-mel values (for whisper_norm;
// lanes past nlanes hold silence, whose log is the floor, so they never raise the maximum).
// `plan` is fft_plan(csize), looked up once per call rather than once per block.
float run_block(const SpectralParams& p, const FftPlan& plan, int64_t sig, int64_t frame0, int nlanes) {
  const int64_t n_fft = p.n_fft;
  const bool real_split = n_fft % 2 == 0;
  const int64_t csize = real_split ? n_fft / 2 : n_fft;
  const int64_t n_bins = n_fft / 2 + 1;
  const int64_t work = plan.conv ? plan.conv : csize;  // Bluestein works in longer buffers

  Scratch& sc = Scratch::get();
  vf* ar = grow(sc.ar, static_cast<size_t>(work));
  vf* ai = grow(sc.ai, static_cast<size_t>(work));
  vf* br = grow(sc.br, static_cast<size_t>(work));
  vf* bi = grow(sc.bi, static_cast<size_t>(work));
  float* tmp = grow(sc.frame, static_cast<size_t>(p.frame_length));

  float* fre = reinterpret_cast<float*>(ar);
  float* fim = reinterpret_cast<float*>(ai);
  if (!gather_frames_fast(p, sig, frame0, nlanes, real_split, csize, fre, fim))
    gather_frames(p, sig, frame0, nlanes, real_split, csize, fre, fim, tmp);
  const bool in_b = fft::forward(plan, ar, ai, br, bi);
  const vf* zr = in_b ? br : ar;
  const vf* zi = in_b ? bi : ai;

  // Spectrum bin k as (re, im) lanes.
  auto bin = [&](int64_t k, vf* re, vf* im) {
    if (!real_split) {
      *re = zr[k];
      *im = zi[k];
      return;
    }
    // X_k = E_k + w_k O_k with E = (Z_k + conj Z_{M-k}) / 2, O = -i (Z_k - conj Z_{M-k}) / 2.
    const int64_t k1 = k == csize ? 0 : k;
    const int64_t k2 = k == 0 ? 0 : csize - k;
    const vf a = zr[k1], b = zi[k1], c = zr[k2], d = zi[k2];
    const vf half = simd::splat(0.5f);
    const vf er = (a + c) * half, ei = (b - d) * half;
    const vf orr = (b + d) * half, oi = (c - a) * half;
    const vf wr = simd::splat(plan.split_re[k]), wi = simd::splat(plan.split_im[k]);
    *re = er + wr * orr - wi * oi;
    *im = ei + wr * oi + wi * orr;
  };

  const int64_t F = p.n_frames;
  if (p.kind == SpectralKind::complex_stft) {
    float* out = p.out + sig * n_bins * F * 2;
    for (int64_t k = 0; k < n_bins; ++k) {
      vf re, im;
      bin(k, &re, &im);
      float* dst = out + (k * F + frame0) * 2;
      for (int i = 0; i < nlanes; ++i) {
        dst[2 * i] = re[i];
        dst[2 * i + 1] = im[i];
      }
    }
    return 0.0f;
  }
  if (p.kind == SpectralKind::power) {
    float* out = p.out + sig * n_bins * F;
    for (int64_t k = 0; k < n_bins; ++k) {
      vf re, im;
      bin(k, &re, &im);
      vf y = power_of(re, im, p.power);
      if (p.log_mode != LogMode::none) y = apply_log(y, p.log_mode, p.log_floor);
      store_lanes(out + k * F + frame0, y, nlanes);
    }
    return 0.0f;
  }
  // Mel: the power spectrum of the block, then each filter over its own bins.
  vf* pw = grow(sc.pw, static_cast<size_t>(n_bins));
  for (int64_t k = 0; k < n_bins; ++k) {
    vf re, im;
    bin(k, &re, &im);
    pw[k] = power_of(re, im, p.power);
  }
  float* out = p.out + sig * p.n_mels * F;
  vf vmx = simd::splat(-std::numeric_limits<float>::infinity());
  for (int64_t m = 0; m < p.n_mels; ++m) {
    const float* w = p.mel_weights + p.mel_offset[m];
    const vf* src = pw + p.mel_start[m];
    // Two float32 partial sums per kMelFlush bins; a longer filter adds those into float64
    // totals (a filter of up to kMelFlush bins gives the float32 sum itself).
    constexpr int kMelFlush = 64;
    const int len = p.mel_len[m];
    double tot[kWidth] = {};
    vf y = vf{};
    for (int i0 = 0; i0 < len; i0 += kMelFlush) {
      const int i1 = std::min(len, i0 + kMelFlush);
      vf acc0 = vf{}, acc1 = vf{};
      int i = i0;
      for (; i + 1 < i1; i += 2) {
        acc0 += simd::splat(w[i]) * src[i];
        acc1 += simd::splat(w[i + 1]) * src[i + 1];
      }
      if (i < i1) acc0 += simd::splat(w[i]) * src[i];
      y = acc0 + acc1;
      if (len > kMelFlush)
        for (int l = 0; l < kWidth; ++l) tot[l] += static_cast<double>(y[l]);
    }
    if (len > kMelFlush)
      for (int l = 0; l < kWidth; ++l) y[l] = static_cast<float>(tot[l]);
    if (p.log_mode != LogMode::none) y = apply_log(y, p.log_mode, p.log_floor);
    vmx = simd::vmax(vmx, y);
    store_lanes(out + m * F + frame0, y, nlanes);
  }
  return simd::hmax(vmx);
}

// Whisper's normalization of rows [m0, m1) of a signal's log10 mel output, given the maximum
// mx over the whole signal: (max(y, mx - 8) + 4) / 4.
void whisper_normalize(const SpectralParams& p, int64_t sig, int64_t m0, int64_t m1, float mx) {
  float* y = p.out + (sig * p.n_mels + m0) * p.n_frames;
  const int64_t n = (m1 - m0) * p.n_frames;
  const int64_t nv = n / kWidth * kWidth;
  const float lo = mx - 8.0f;
  const vf vlo = simd::splat(lo), four = simd::splat(4.0f), quarter = simd::splat(0.25f);
  for (int64_t i = 0; i < nv; i += kWidth) simd::store(y + i, (simd::vmax(simd::load(y + i), vlo) + four) * quarter);
  for (int64_t i = nv; i < n; ++i) y[i] = (std::max(y[i], lo) + 4.0f) * 0.25f;
}

}  // namespace

void spectral_f32(const SpectralParams& p) {
  if (p.n_signals == 0 || p.n_frames == 0) return;
  {
    const double work = static_cast<double>(fft_work_length(p.n_fft % 2 == 0 ? p.n_fft / 2 : p.n_fft));
    const double bytes = (4.0 * work + static_cast<double>(p.n_fft / 2 + 1)) * sizeof(vf) +
                         static_cast<double>(p.frame_length) * sizeof(float);
    if (bytes > kMaxScratchBytes)
      throw SizeError("n_fft = " + std::to_string(p.n_fft) + " needs " + bytes_str(bytes) +
                      " of FFT scratch per thread (limit " + bytes_str(kMaxScratchBytes) + ")");
  }
  const int64_t blocks = (p.n_frames + kWidth - 1) / kWidth;
  const int64_t tasks_per_signal = (blocks + kBlocksPerTask - 1) / kBlocksPerTask;
  const bool whisper = p.whisper_norm && p.kind == SpectralKind::mel;
  std::vector<float> task_max(whisper ? p.n_signals * tasks_per_signal : 0);
  // Plan once before the threads start (the cache is thread-safe either way).
  const FftPlan& plan = fft_plan(p.n_fft % 2 == 0 ? p.n_fft / 2 : p.n_fft);
  parallel_for(p.n_signals * tasks_per_signal, p.num_threads, [&](int64_t task, int) {
    const int64_t sig = task / tasks_per_signal;
    const int64_t b0 = (task % tasks_per_signal) * kBlocksPerTask;
    const int64_t b1 = std::min(blocks, b0 + kBlocksPerTask);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t frame0 = blk * kWidth;
      const int nlanes = static_cast<int>(std::min<int64_t>(kWidth, p.n_frames - frame0));
      mx = std::max(mx, run_block(p, plan, sig, frame0, nlanes));
    }
    if (whisper) task_max[task] = mx;
  });
  if (whisper) {
    // Second pass, parallel over (signal, group of mel rows), once every maximum is known.
    // A few operations per value: below kInlineValues values one thread does it all, since
    // waking the pool would cost more than it saves (the values are the same either way).
    constexpr int64_t kRows = 16;
    constexpr int64_t kInlineValues = int64_t{1} << 16;
    const int64_t groups = (p.n_mels + kRows - 1) / kRows;
    const int threads = p.n_signals * p.n_mels * p.n_frames < kInlineValues ? 1 : p.num_threads;
    parallel_for(p.n_signals * groups, threads, [&](int64_t task, int) {
      const int64_t sig = task / groups, g = task % groups;
      const float* tm = task_max.data() + sig * tasks_per_signal;
      const float mx = *std::max_element(tm, tm + tasks_per_signal);
      whisper_normalize(p, sig, g * kRows, std::min(p.n_mels, (g + 1) * kRows), mx);
    });
  }
}

}  // namespace MMCORE_TARGET
}  // namespace mmcore
