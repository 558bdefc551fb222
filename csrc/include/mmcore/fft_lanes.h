// Forward complex FFT over SIMD lanes: every lane carries an independent signal, so one
// scalar-looking mixed-radix Stockham FFT transforms kWidth signals at once with no shuffles.
// Data are split complex arrays of vf (re[n], im[n]). For per-target kernel files only.
#pragma once
#include <cstdint>
#include <utility>

#include "mmcore/fft.h"
#include "mmcore/simd.h"

namespace mmcore {
namespace MMCORE_TARGET {
namespace fft {

using simd::vf;

struct Cx {
  vf re, im;
};

inline Cx add(Cx a, Cx b) { return {a.re + b.re, a.im + b.im}; }
inline Cx sub(Cx a, Cx b) { return {a.re - b.re, a.im - b.im}; }
// a * (wr + i wi) for scalar twiddles.
inline Cx mul(Cx a, float wr, float wi) {
  const vf r = simd::splat(wr), i = simd::splat(wi);
  return {a.re * r - a.im * i, a.re * i + a.im * r};
}
// -i * a
inline Cx mul_neg_i(Cx a) { return {a.im, -a.re}; }

// One Stockham stage of radix P: y[q + s (p P' + k)] = w_n^(P' k) sum_j x[q + s (P' + m j)] w_p^(j k).
template <int P>
void stage(const FftPlan& plan, const FftStage& st, const vf* xr, const vf* xi, vf* yr, vf* yi) {
  const int64_t m = st.m, s = st.s;
  const float* twr = plan.tw_re.data() + st.tw;
  const float* twi = plan.tw_im.data() + st.tw;
  for (int64_t Pp = 0; Pp < m; ++Pp) {
    const float* wr = twr + Pp * (P - 1);
    const float* wi = twi + Pp * (P - 1);
    for (int64_t q = 0; q < s; ++q) {
      Cx a[P];
      for (int j = 0; j < P; ++j) {
        const int64_t idx = q + s * (Pp + m * j);
        a[j] = {xr[idx], xi[idx]};
      }
      Cx y[P];
      if constexpr (P == 2) {
        y[0] = add(a[0], a[1]);
        y[1] = sub(a[0], a[1]);
      } else if constexpr (P == 3) {
        const vf h = simd::splat(0.5f), c = simd::splat(0.86602540378443865f);
        const Cx t1 = add(a[1], a[2]), t2 = sub(a[1], a[2]);
        y[0] = add(a[0], t1);
        const Cx b = {a[0].re - h * t1.re, a[0].im - h * t1.im};
        // -i * c * t2 = (c t2.im, -c t2.re)
        y[1] = {b.re + c * t2.im, b.im - c * t2.re};
        y[2] = {b.re - c * t2.im, b.im + c * t2.re};
      } else if constexpr (P == 4) {
        const Cx t0 = add(a[0], a[2]), t1 = sub(a[0], a[2]);
        const Cx t2 = add(a[1], a[3]), t3 = mul_neg_i(sub(a[1], a[3]));
        y[0] = add(t0, t2);
        y[1] = add(t1, t3);
        y[2] = sub(t0, t2);
        y[3] = sub(t1, t3);
      } else if constexpr (P == 5) {
        const vf c1 = simd::splat(0.30901699437494742f), c2 = simd::splat(-0.80901699437494742f);
        const vf s1 = simd::splat(0.95105651629515357f), s2 = simd::splat(0.58778525229247313f);
        const Cx t1 = add(a[1], a[4]), t2 = add(a[2], a[3]);
        const Cx t3 = sub(a[1], a[4]), t4 = sub(a[2], a[3]);
        y[0] = add(a[0], add(t1, t2));
        const Cx b1 = {a[0].re + c1 * t1.re + c2 * t2.re, a[0].im + c1 * t1.im + c2 * t2.im};
        const Cx b2 = {a[0].re + c2 * t1.re + c1 * t2.re, a[0].im + c2 * t1.im + c1 * t2.im};
        const Cx d1 = {s1 * t3.re + s2 * t4.re, s1 * t3.im + s2 * t4.im};
        const Cx d2 = {s2 * t3.re - s1 * t4.re, s2 * t3.im - s1 * t4.im};
        // X1 = b1 - i d1, X4 = b1 + i d1, X2 = b2 - i d2, X3 = b2 + i d2
        y[1] = {b1.re + d1.im, b1.im - d1.re};
        y[4] = {b1.re - d1.im, b1.im + d1.re};
        y[2] = {b2.re + d2.im, b2.im - d2.re};
        y[3] = {b2.re - d2.im, b2.im + d2.re};
      }
      const int64_t out0 = q + s * P * Pp;
      yr[out0] = y[0].re;
      yi[out0] = y[0].im;
      for (int k = 1; k < P; ++k) {
        const Cx t = mul(y[k], wr[k - 1], wi[k - 1]);
        yr[out0 + s * k] = t.re;
        yi[out0 + s * k] = t.im;
      }
    }
  }
}

// A stage of any radix p, as a direct DFT of length p (for sizes with large prime factors).
inline void stage_generic(const FftPlan& plan, const FftStage& st, const vf* xr, const vf* xi, vf* yr, vf* yi) {
  const int p = st.radix;
  const int64_t m = st.m, s = st.s;
  const float* gr = plan.gen_re.data() + st.gen;
  const float* gi = plan.gen_im.data() + st.gen;
  for (int64_t Pp = 0; Pp < m; ++Pp) {
    const float* wr = plan.tw_re.data() + st.tw + Pp * (p - 1);
    const float* wi = plan.tw_im.data() + st.tw + Pp * (p - 1);
    for (int64_t q = 0; q < s; ++q) {
      const int64_t out0 = q + s * p * Pp;
      for (int k = 0; k < p; ++k) {
        Cx acc = {vf{}, vf{}};
        int r = 0;  // j * k mod p
        for (int j = 0; j < p; ++j) {
          const int64_t idx = q + s * (Pp + m * j);
          acc = add(acc, mul(Cx{xr[idx], xi[idx]}, gr[r], gi[r]));
          r += k;
          if (r >= p) r -= p;
        }
        if (k > 0) acc = mul(acc, wr[k - 1], wi[k - 1]);
        yr[out0 + s * k] = acc.re;
        yi[out0 + s * k] = acc.im;
      }
    }
  }
}

inline bool forward(const FftPlan& plan, vf* xr, vf* xi, vf* yr, vf* yi);

// Bluestein: X_k = chirp_k conj(FFT_m(conj(FFT_m(a) kernel)))_k with a_j = x_j chirp_j zero-padded
// to m = plan.conv. The buffers hold m values each; the result goes back to (xr, xi).
inline bool bluestein(const FftPlan& plan, vf* xr, vf* xi, vf* yr, vf* yi) {
  const int64_t n = plan.size, m = plan.conv;
  for (int64_t j = 0; j < n; ++j) {
    const Cx a = mul(Cx{xr[j], xi[j]}, plan.chirp_re[j], plan.chirp_im[j]);
    xr[j] = a.re;
    xi[j] = a.im;
  }
  for (int64_t j = n; j < m; ++j) xr[j] = xi[j] = vf{};
  const bool s1 = forward(*plan.inner, xr, xi, yr, yi);
  vf* ar = s1 ? yr : xr;
  vf* ai = s1 ? yi : xi;
  vf* br = s1 ? xr : yr;
  vf* bi = s1 ? xi : yi;
  for (int64_t k = 0; k < m; ++k) {
    const Cx t = mul(Cx{ar[k], ai[k]}, plan.kernel_re[k], plan.kernel_im[k]);
    ar[k] = t.re;
    ai[k] = -t.im;
  }
  const bool s2 = forward(*plan.inner, ar, ai, br, bi);
  const vf* cr = s2 ? br : ar;
  const vf* ci = s2 ? bi : ai;
  for (int64_t k = 0; k < n; ++k) {
    const Cx t = mul(Cx{cr[k], -ci[k]}, plan.chirp_re[k], plan.chirp_im[k]);
    xr[k] = t.re;
    xi[k] = t.im;
  }
  return false;
}

// Transforms (xr, xi) in place of lanes; (yr, yi) is scratch of the same size (at least
// fft_work_length(plan.size) values each). Returns true if the result ended up in (yr, yi)
// instead of (xr, xi).
inline bool forward(const FftPlan& plan, vf* xr, vf* xi, vf* yr, vf* yi) {
  if (plan.conv) return bluestein(plan, xr, xi, yr, yi);
  bool swapped = false;
  for (const FftStage& st : plan.stages) {
    switch (st.radix) {
      case 2: stage<2>(plan, st, xr, xi, yr, yi); break;
      case 3: stage<3>(plan, st, xr, xi, yr, yi); break;
      case 4: stage<4>(plan, st, xr, xi, yr, yi); break;
      case 5: stage<5>(plan, st, xr, xi, yr, yi); break;
      default: stage_generic(plan, st, xr, xi, yr, yi); break;
    }
    std::swap(xr, yr);
    std::swap(xi, yi);
    swapped = !swapped;
  }
  return swapped;
}

}  // namespace fft
}  // namespace MMCORE_TARGET
}  // namespace mmcore
