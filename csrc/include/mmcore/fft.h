// Mixed-radix FFT plans: factorization and twiddle tables, built once per size and cached.
// The transform itself runs on vectors of independent signals (one signal per SIMD lane, see
// fft_lanes.h), so a plan holds only scalar tables.
#pragma once
#include <cstdint>
#include <vector>

namespace mmcore {

// One Stockham stage: radix p splits sub-transforms of length n into p of length m = n / p;
// s is the product of the radices of the earlier stages.
struct FftStage {
  int radix = 0;
  int64_t n = 0, m = 0, s = 0;
  int64_t tw = 0;   // offset of w_n^(P*k), P < m, 1 <= k < p, in FftPlan::tw_re/tw_im
  int64_t gen = 0;  // radices other than 2, 3, 4, 5: offset of w_p^r, r < p, in gen_re/gen_im
};

struct FftPlan {
  int64_t size = 0;  // complex transform length
  std::vector<FftStage> stages;
  std::vector<float> tw_re, tw_im;
  std::vector<float> gen_re, gen_im;
  // For a real transform of length 2 * size done as a complex one of length size:
  // e^{-2 pi i k / (2 size)}, k = 0..size.
  std::vector<float> split_re, split_im;
  // A size with a prime factor above kMaxDirectRadix would need a direct DFT stage of O(size p)
  // work (hours for a large prime); it is done with Bluestein's algorithm instead: a circular
  // convolution of length conv (the power of 2 >= 2 size - 1) through the plan `inner`, with
  // chirp_j = e^{-i pi j^2 / size} (j < size) and kernel = FFT_conv(conj(chirp), wrapped) / conv.
  // conv == 0: the stages above do the transform.
  int64_t conv = 0;
  const FftPlan* inner = nullptr;
  std::vector<float> chirp_re, chirp_im, kernel_re, kernel_im;
};

// Largest prime radix done as a direct DFT stage; sizes with a larger prime factor use Bluestein.
constexpr int64_t kMaxDirectRadix = 128;

// The cached plan of a forward complex FFT of length n (n >= 1). Thread-safe; the reference
// stays valid for the life of the process.
const FftPlan& fft_plan(int64_t n);

// Length (in complex values) of each buffer fft::forward works in for length n: n, or the
// Bluestein convolution length. Computed without building the plan.
int64_t fft_work_length(int64_t n);

}  // namespace mmcore
