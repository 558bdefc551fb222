// Framework-free description of one short-time spectral call (STFT / power / mel / log-mel /
// Kaldi fbank). No pybind11, no Python here.
#pragma once
#include <cstdint>

namespace mmcore {

enum class SpectralKind : int {
  complex_stft = 0,  // out: complex64 as interleaved float pairs (N, n_bins, n_frames, 2)
  power = 1,         // out: |X|^power (N, n_bins, n_frames)
  mel = 2,           // out: sparse mel projection of |X|^power (N, n_mels, n_frames)
};

enum class PadMode : int { constant = 0, reflect = 1 };

enum class LogMode : int {
  none = 0,
  log10 = 1,  // log10(max(y, log_floor))
  ln = 2,     // ln(max(y, log_floor))
};

// Framing: for frame f, the FFT buffer of n_fft samples is zero except
//   buf[frame_offset + t] = window[t] * s(f * hop - pad_left + frame_offset + t),  t < frame_length
// where s(i) is sample i of the signal, extended outside [0, T) by pad_mode (reflect: numpy's
// "reflect", no edge repeat; constant: zeros). Before the window, each frame's frame_length
// samples optionally get dither (dither * N(0, 1) from a counter-based generator keyed by
// (seed, signal, frame, t)), DC removal (minus their mean) and pre-emphasis
// (x[t] -= preemph * x[t - 1], x[0] -= preemph * x[0]), in that order (Kaldi's order).
struct SpectralParams {
  const float* x = nullptr;  // (n_signals, T) row-major
  int64_t n_signals = 0, T = 0;
  int64_t n_fft = 0, hop = 0;
  int64_t frame_length = 0, frame_offset = 0, pad_left = 0;
  PadMode pad_mode = PadMode::reflect;
  const float* window = nullptr;  // frame_length values
  int64_t n_frames = 0;
  float dither = 0.0f;
  uint64_t seed = 0;
  bool remove_dc = false;
  float preemph = 0.0f;

  SpectralKind kind = SpectralKind::power;
  float power = 2.0f;  // 1: magnitude, 2: power (any positive value accepted)
  // Sparse mel filters: filter m covers bins [mel_start[m], mel_start[m] + mel_len[m]) with
  // weights mel_weights[mel_offset[m] + i].
  int64_t n_mels = 0;
  const int32_t* mel_start = nullptr;
  const int32_t* mel_len = nullptr;
  const int64_t* mel_offset = nullptr;
  const float* mel_weights = nullptr;

  LogMode log_mode = LogMode::none;
  float log_floor = 1e-10f;
  // Whisper's normalization after log10, per signal: y = (max(y, max_all(y) - 8) + 4) / 4.
  bool whisper_norm = false;

  float* out = nullptr;
  int num_threads = 1;
};

}  // namespace mmcore
