// One pre-norm transformer encoder block in a single native call: the same kernels the Python
// layers call one by one (layer norm, linear with fused activation, attention), with the head
// split / merge transposes and the residual adds in between, on per-thread scratch buffers.

#include "mmcore/encoder_layer.h"

#include <cstring>
#include <vector>

#include "mmcore/kernels.h"
#include "mmcore/parallel.h"

namespace mmcore {

namespace {

void run_linear(const float* x, int64_t M, int64_t K, const WeightRef& w, int64_t N, const float* bias, float* y,
                Activation act, Precision precision, int threads) {
  LinearParams lp;
  lp.x = x;
  lp.M = M;
  lp.K = K;
  lp.N = N;
  lp.ldx = K;
  lp.w = w.data;
  lp.w_kind = w.kind;
  lp.w_scale = w.scale;
  lp.ldw = w.ld;
  lp.bias = bias;
  lp.y = y;
  lp.ldy = N;
  lp.activation = act;
  lp.precision = precision;
  lp.packed = w.packed;
  lp.num_threads = threads;
  linear_cpu(lp);
}

void run_norm(const float* x, int64_t rows, int64_t D, const float* w, const float* b, double eps, float* y,
              int threads) {
  LayerNormParams np;
  np.x = x;
  np.rows = rows;
  np.D = D;
  np.ldx = D;
  np.weight = w;
  np.bias = b;
  np.eps = eps;
  np.y = y;
  np.num_threads = threads;
  layer_norm_cpu(np);
}

struct Buffers {
  std::vector<float> h, qkv, q, k, v, o, merged, a, m;
};

}  // namespace

void encoder_layer_cpu(const EncoderLayerParams& p) {
  const int64_t B = p.B, L = p.L, E = p.E, H = p.H, F = p.F, T = p.B * p.L;
  if (T == 0 || E == 0) return;
  const int64_t hd = E / H;
  const int th = p.num_threads;
  // Kept per calling thread between calls (a stack of layers reuses them; fresh buffers of this
  // size cost a page fault per 4 KiB every call); released when they grew beyond 256 MiB.
  thread_local Buffers buf;
  buf.h.resize(static_cast<size_t>(T * E));
  buf.qkv.resize(static_cast<size_t>(T * 3 * E));
  buf.q.resize(static_cast<size_t>(T * E));
  buf.k.resize(static_cast<size_t>(T * E));
  buf.v.resize(static_cast<size_t>(T * E));
  buf.o.resize(static_cast<size_t>(T * E));
  buf.merged.resize(static_cast<size_t>(T * E));
  buf.a.resize(static_cast<size_t>(T * E));
  buf.m.resize(static_cast<size_t>(T * F));

  // attention half: h = LN1(x); qkv = h W_in^T + b_in; split heads
  run_norm(p.x, T, E, p.ln1_w, p.ln1_b, p.eps1, buf.h.data(), th);
  run_linear(buf.h.data(), T, E, p.w_in, 3 * E, p.b_in, buf.qkv.data(), Activation::none, p.precision, th);
  float* dst[3] = {buf.q.data(), buf.k.data(), buf.v.data()};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      const float* row = buf.qkv.data() + (b * L + l) * 3 * E;
      for (int s = 0; s < 3; ++s)
        for (int64_t h = 0; h < H; ++h)
          std::memcpy(dst[s] + ((b * H + h) * L + l) * hd, row + s * E + h * hd,
                      static_cast<size_t>(hd) * sizeof(float));
    }
  AttentionParams ap;
  ap.q = buf.q.data();
  ap.k = buf.k.data();
  ap.v = buf.v.data();
  ap.out = buf.o.data();
  ap.key_lengths = p.key_lengths;
  ap.B = B;
  ap.H = H;
  ap.Lq = L;
  ap.Lk = L;
  ap.D = hd;
  ap.Dv = hd;
  ap.scale = p.scale;
  ap.bf16 = p.precision == Precision::bf16;
  ap.num_threads = th;
  attention_cpu(ap);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t l = 0; l < L; ++l)
        std::memcpy(buf.merged.data() + (b * L + l) * E + h * hd, buf.o.data() + ((b * H + h) * L + l) * hd,
                    static_cast<size_t>(hd) * sizeof(float));
  run_linear(buf.merged.data(), T, E, p.w_out, E, p.b_out, buf.a.data(), Activation::none, p.precision, th);
  if (p.key_lengths)
    for (int64_t b = 0; b < B; ++b)
      if (p.key_lengths[b] == 0) std::memset(buf.a.data() + b * L * E, 0, static_cast<size_t>(L * E) * sizeof(float));
  // y = x + a
  for (int64_t i = 0; i < T * E; ++i) p.y[i] = p.x[i] + buf.a[static_cast<size_t>(i)];

  // MLP half: y += W2 act(W1 LN2(y) + b1) + b2
  run_norm(p.y, T, E, p.ln2_w, p.ln2_b, p.eps2, buf.h.data(), th);
  run_linear(buf.h.data(), T, E, p.w1, F, p.b1, buf.m.data(), p.activation, p.precision, th);
  run_linear(buf.m.data(), T, F, p.w2, E, p.b2, buf.a.data(), Activation::none, p.precision, th);
  for (int64_t i = 0; i < T * E; ++i) p.y[i] += buf.a[static_cast<size_t>(i)];
  if ((10 * T * E + T * F) * sizeof(float) > (size_t{256} << 20)) buf = Buffers();
}

}  // namespace mmcore
