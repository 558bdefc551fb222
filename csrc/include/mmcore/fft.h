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
};

// The cached plan of a forward complex FFT of length n (n >= 1). Thread-safe; the reference
// stays valid for the life of the process.
const FftPlan& fft_plan(int64_t n);

}  // namespace mmcore
