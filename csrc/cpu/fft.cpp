// FFT planning: factorization into radices 4, 2, 3, 5 (then any other prime, done as a direct
// DFT of that length) and the twiddle tables, computed in double precision once per size.
#include "mmcore/fft.h"

#include <cmath>
#include <map>
#include <memory>
#include <mutex>

namespace mmcore {
namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;

std::vector<int> factorize(int64_t n) {
  std::vector<int> radices;
  while (n % 4 == 0) { radices.push_back(4); n /= 4; }
  while (n % 2 == 0) { radices.push_back(2); n /= 2; }
  for (int p : {3, 5}) {
    while (n % p == 0) { radices.push_back(p); n /= p; }
  }
  for (int64_t p = 7; p * p <= n; p += 2) {
    while (n % p == 0) { radices.push_back(static_cast<int>(p)); n /= p; }
  }
  if (n > 1) radices.push_back(static_cast<int>(n));
  return radices;
}

// exp(-2 pi i num / den) with the exact argument reduction of a rational angle.
void unit_root(int64_t num, int64_t den, float* re, float* im) {
  num %= den;
  const double a = kTwoPi * static_cast<double>(num) / static_cast<double>(den);
  *re = static_cast<float>(std::cos(a));
  *im = static_cast<float>(-std::sin(a));
}

std::unique_ptr<FftPlan> build(int64_t size) {
  auto plan = std::make_unique<FftPlan>();
  plan->size = size;
  int64_t n = size, s = 1;
  for (int p : factorize(size)) {
    FftStage st;
    st.radix = p;
    st.n = n;
    st.m = n / p;
    st.s = s;
    st.tw = static_cast<int64_t>(plan->tw_re.size());
    for (int64_t P = 0; P < st.m; ++P)
      for (int k = 1; k < p; ++k) {
        float re, im;
        unit_root(P * k, n, &re, &im);
        plan->tw_re.push_back(re);
        plan->tw_im.push_back(im);
      }
    if (p != 2 && p != 3 && p != 4 && p != 5) {
      st.gen = static_cast<int64_t>(plan->gen_re.size());
      for (int r = 0; r < p; ++r) {  // w_p^r; the stage reads w_p^(j k mod p)
        float re, im;
        unit_root(r, p, &re, &im);
        plan->gen_re.push_back(re);
        plan->gen_im.push_back(im);
      }
    }
    plan->stages.push_back(st);
    n = st.m;
    s *= p;
  }
  plan->split_re.resize(size + 1);
  plan->split_im.resize(size + 1);
  for (int64_t k = 0; k <= size; ++k) unit_root(k, 2 * size, &plan->split_re[k], &plan->split_im[k]);
  return plan;
}

}  // namespace

const FftPlan& fft_plan(int64_t n) {
  static std::mutex mutex;
  static std::map<int64_t, std::unique_ptr<FftPlan>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(n);
  if (it == cache.end()) it = cache.emplace(n, build(n)).first;
  return *it->second;
}

}  // namespace mmcore
