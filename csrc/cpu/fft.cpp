// FFT planning: factorization into radices 4, 2, 3, 5 (then any other prime, done as a direct
// DFT of that length) and the twiddle tables, computed in double precision once per size.
#include "mmcore/fft.h"

#include <algorithm>
#include <cmath>
#include <complex>
#include <map>
#include <memory>
#include <mutex>

namespace mmcore {
namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;

std::vector<int> factorize(int64_t n) {
  std::vector<int> radices;
  while (n % 4 == 0) {
    radices.push_back(4);
    n /= 4;
  }
  while (n % 2 == 0) {
    radices.push_back(2);
    n /= 2;
  }
  for (int p : {3, 5}) {
    while (n % p == 0) {
      radices.push_back(p);
      n /= p;
    }
  }
  for (int64_t p = 7; p * p <= n; p += 2) {
    while (n % p == 0) {
      radices.push_back(static_cast<int>(p));
      n /= p;
    }
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

int64_t largest_factor(int64_t n) {
  int64_t mx = 1;
  for (int64_t p = 2; p * p <= n; p += (p == 2 ? 1 : 2)) {
    while (n % p == 0) {
      mx = p;
      n /= p;
    }
  }
  return n > 1 ? std::max(mx, n) : mx;
}

int64_t bluestein_length(int64_t n) {
  if (n <= kMaxDirectRadix || largest_factor(n) <= kMaxDirectRadix) return 0;
  int64_t m = 1;
  while (m < 2 * n - 1) m *= 2;
  return m;
}

// In-place radix-2 FFT of a power-of-2 length in double precision (plan building only).
void fft_double(std::vector<std::complex<double>>& a) {
  const size_t n = a.size();
  for (size_t i = 1, j = 0; i < n; ++i) {
    size_t bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) std::swap(a[i], a[j]);
  }
  for (size_t len = 2; len <= n; len <<= 1) {
    for (size_t k = 0; k < len / 2; ++k) {
      const double ang = -kTwoPi * static_cast<double>(k) / static_cast<double>(len);
      const std::complex<double> w(std::cos(ang), std::sin(ang));
      for (size_t i = 0; i < n; i += len) {
        const std::complex<double> u = a[i + k], v = a[i + k + len / 2] * w;
        a[i + k] = u + v;
        a[i + k + len / 2] = u - v;
      }
    }
  }
}

std::unique_ptr<FftPlan> build(int64_t size) {
  auto plan = std::make_unique<FftPlan>();
  plan->size = size;
  plan->split_re.resize(size + 1);
  plan->split_im.resize(size + 1);
  for (int64_t k = 0; k <= size; ++k) unit_root(k, 2 * size, &plan->split_re[k], &plan->split_im[k]);
  if (const int64_t m = bluestein_length(size)) {
    plan->conv = m;
    plan->inner = &fft_plan(m);
    plan->chirp_re.resize(size);
    plan->chirp_im.resize(size);
    std::vector<std::complex<double>> b(static_cast<size_t>(m));
    for (int64_t j = 0; j < size; ++j) {
      // e^{-i pi j^2 / size} = e^{-2 pi i (j^2 mod 2 size) / (2 size)}, reduced exactly
      const int64_t jm = j % (2 * size);
      const int64_t num = static_cast<int64_t>((static_cast<unsigned __int128>(jm) * jm) % (2 * size));
      unit_root(num, 2 * size, &plan->chirp_re[j], &plan->chirp_im[j]);
      const double a = kTwoPi * static_cast<double>(num) / static_cast<double>(2 * size);
      const std::complex<double> bj(std::cos(a), std::sin(a));  // conj(chirp_j)
      b[j] = bj;
      if (j > 0) b[m - j] = bj;
    }
    fft_double(b);
    plan->kernel_re.resize(m);
    plan->kernel_im.resize(m);
    for (int64_t k = 0; k < m; ++k) {
      plan->kernel_re[k] = static_cast<float>(b[k].real() / static_cast<double>(m));
      plan->kernel_im[k] = static_cast<float>(b[k].imag() / static_cast<double>(m));
    }
    return plan;
  }
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
  return plan;
}

}  // namespace

const FftPlan& fft_plan(int64_t n) {
  static std::mutex mutex;
  static std::map<int64_t, std::unique_ptr<FftPlan>> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(n);
    if (it != cache.end()) return *it->second;
  }
  // Built outside the lock: a Bluestein plan asks for the plan of its convolution length.
  std::unique_ptr<FftPlan> plan = build(n);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(n);
  if (it == cache.end()) it = cache.emplace(n, std::move(plan)).first;  // else another thread won
  return *it->second;
}

int64_t fft_work_length(int64_t n) {
  const int64_t m = bluestein_length(n);
  return m ? m : n;
}

}  // namespace mmcore
