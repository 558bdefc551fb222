// pybind11 bindings of the CPU kernels: mmcore._C. Argument checks that matter to users live in
// mmcore/ops; here we only guard the memory contract (dtype, contiguity, shapes) so that a
// wrong call can never read or write out of bounds.
//
// Conventions of both binding modules (this one and module_cuda.cpp):
//   - arrays (inputs, then outputs) are positional, in the kernel's order; every other
//     argument comes after py::kw_only() and is passed by keyword, with its py::arg name;
//   - an enum is passed as its name, a str (enum_args.h), never as an integer code;
//   - messages start with "[op] "; kernels run with the GIL released.
#include <pybind11/complex.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <complex>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "enum_args.h"
#include "mmcore/cpu_features.h"
#include "mmcore/encoder_layer.h"
#include "mmcore/kernels.h"
#include "mmcore/parallel.h"
#include "mmcore/size_error.h"

namespace py = pybind11;
using mmcore::bindings::parse_enum;

namespace {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// Product of dims (or of a dim and a factor) that refuses to overflow int64: shapes the caller
// passes as Python ints can be anything, and an overflowed product could match a real array.
int64_t mul_dims(const char* op, std::initializer_list<int64_t> dims) {
  int64_t r = 1;
  for (int64_t d : dims) {
    if (d < 0 || (d != 0 && r > INT64_MAX / d))
      throw py::value_error(std::string("[") + op + "] sizes overflow 64-bit integers");
    r *= d;
  }
  return r;
}

// Runs a kernel without the GIL; a SizeError it throws comes back with the op's prefix (the
// module's translator turns it into mmcore.errors.ShapeError).
template <class F>
void run_kernel(const char* op, F&& f) {
  try {
    py::gil_scoped_release release;
    f();
  } catch (const mmcore::SizeError& e) {
    throw mmcore::SizeError(std::string("[") + op + "] " + e.what());
  }
}

// Equal dtypes need not be the same object (arrays rebuilt by pickle, Ray or DLPack carry
// their own descriptor instances).
inline bool same_dtype(const py::dtype& a, const py::dtype& b) { return a.is(b) || a.equal(b); }

// What checked() requires of an array besides its dtype and shape.
struct ArrayOpts {
  bool writable = false;       // an output: the array must be writable
  bool contiguous = true;      // must be C-contiguous (false: any strides, see `strides`)
  int64_t* strides = nullptr;  // receives the element strides (ndim values) when set
};

// The data of `obj` as T*, or null for None, after checking that it is a numpy array of dtype
// T and shape `shape` meeting `opts` (e.g. {.writable = true} for an output,
// {.contiguous = false, .strides = s} for a strided input).
template <class T>
T* checked(const char* op, const char* name, py::object obj, const Shape& shape, const ArrayOpts& opts = {}) {
  if (obj.is_none()) return nullptr;
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string("[") + op + "] " + name + " must be a numpy array");
  py::array a = obj.cast<py::array>();
  if (!same_dtype(a.dtype(), py::dtype::of<T>()))
    throw py::type_error(std::string("[") + op + "] " + name + " has dtype " + std::string(py::str(a.dtype())) +
                         ", expected " + std::string(py::str(py::dtype::of<T>())));
  bool same_shape = static_cast<size_t>(a.ndim()) == shape.size();
  for (size_t d = 0; same_shape && d < shape.size(); ++d) same_shape = a.shape(static_cast<py::ssize_t>(d)) == shape[d];
  if (!same_shape)
    throw py::value_error(std::string("[") + op + "] " + name + " has shape " +
                          shape_str(Shape(a.shape(), a.shape() + a.ndim())) + ", expected " + shape_str(shape));
  if (opts.contiguous && !(a.flags() & py::array::c_style))
    throw py::value_error(std::string("[") + op + "] " + name + " must be C-contiguous");
  if (opts.writable && !a.writeable()) throw py::value_error(std::string("[") + op + "] " + name + " must be writable");
  if (opts.strides) {
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
      if (a.strides(d) % static_cast<py::ssize_t>(sizeof(T)) != 0)
        throw py::value_error(std::string("[") + op + "] " + name + " has unaligned strides");
      opts.strides[d] = a.strides(d) / static_cast<py::ssize_t>(sizeof(T));
    }
  }
  return static_cast<T*>(const_cast<void*>(a.data()));
}

void attention(py::object q, py::object k, py::object v, py::object out, py::object weights, py::object lse,
               py::object mask, py::object bias, py::object key_lengths, double scale, bool dropout, uint64_t seed,
               uint32_t threshold, double dropout_scale, const std::string& precision, int num_threads) {
  const char* op = "attention";
  if (!py::isinstance<py::array>(q) || !py::isinstance<py::array>(k) || !py::isinstance<py::array>(v))
    throw py::type_error("[attention] q, k and v must be numpy arrays");
  py::array qa = q.cast<py::array>(), ka = k.cast<py::array>(), va = v.cast<py::array>();
  if (qa.ndim() != 4 || ka.ndim() != 4 || va.ndim() != 4)
    throw py::value_error("[attention] q, k and v must have 4 dims");
  mmcore::AttentionParams p;
  p.B = qa.shape(0);
  p.H = qa.shape(1);
  p.Lq = qa.shape(2);
  p.D = qa.shape(3);
  p.Lk = ka.shape(2);
  p.Dv = va.shape(3);
  p.q = checked<float>(op, "q", q, {p.B, p.H, p.Lq, p.D});
  p.k = checked<float>(op, "k", k, {p.B, p.H, p.Lk, p.D});
  p.v = checked<float>(op, "v", v, {p.B, p.H, p.Lk, p.Dv});
  p.out = checked<float>(op, "out", out, {p.B, p.H, p.Lq, p.Dv}, {.writable = true});
  if (!p.out && p.B * p.H * p.Lq * p.Dv > 0) throw py::value_error("[attention] out is required");
  p.weights = checked<float>(op, "weights", weights, {p.B, p.H, p.Lq, p.Lk}, {.writable = true});
  p.lse = checked<float>(op, "lse", lse, {p.B, p.H, p.Lq}, {.writable = true});
  const Shape full{p.B, p.H, p.Lq, p.Lk};
  p.mask = reinterpret_cast<const uint8_t*>(
      checked<bool>(op, "mask", mask, full, {.contiguous = false, .strides = p.mask_strides}));
  p.bias = checked<float>(op, "bias", bias, full, {.contiguous = false, .strides = p.bias_strides});
  p.key_lengths = checked<int64_t>(op, "key_lengths", key_lengths, {p.B});
  if (p.key_lengths)
    for (int64_t b = 0; b < p.B; ++b)
      if (p.key_lengths[b] < 0 || p.key_lengths[b] > p.Lk)
        throw py::value_error("[attention] key_lengths must lie in [0, Lk]");
  p.scale = static_cast<float>(scale);
  p.dropout = dropout;
  p.seed = seed;
  p.dropout_threshold = threshold;
  p.dropout_scale = static_cast<float>(dropout_scale);
  p.bf16 = parse_enum(op, "precision", precision, mmcore::bindings::kPrecisions) == mmcore::Precision::bf16;
  p.num_threads = num_threads < 1 ? 1 : num_threads;
  py::gil_scoped_release release;
  mmcore::attention_cpu(p);
}

// The checks and scalar fields of SpectralParams that spectral() and SpectralPlan share (the
// signal, the window, the mel tables, n_frames and the output are set by each).
void set_spectral_params(const char* op, mmcore::SpectralParams& p, int64_t n_fft, int64_t hop, int64_t frame_length,
                         int64_t frame_offset, int64_t pad_left, const std::string& pad_mode, double dither,
                         uint64_t seed, bool remove_dc, double preemph, const std::string& kind, double power,
                         const std::string& log_mode, double log_floor, bool whisper_norm) {
  if (n_fft < 2) throw py::value_error("[spectral] n_fft must be >= 2");
  // The FFT plan (work and Bluestein lengths, powers of two above 2 n_fft) must stay far from
  // int64 overflow; 2^40 samples per frame is already beyond any memory.
  if (n_fft > (int64_t{1} << 40))
    throw py::value_error("[spectral] n_fft must be <= 2^40, got " + std::to_string(n_fft));
  if (hop < 1) throw py::value_error("[spectral] hop must be >= 1");
  if (frame_length < 1 || frame_offset < 0 || frame_length > n_fft || frame_offset > n_fft - frame_length)
    throw py::value_error("[spectral] the frame must lie inside the FFT buffer");
  constexpr int64_t kMaxIndex = int64_t{1} << 62;
  if (pad_left > kMaxIndex || pad_left < -kMaxIndex)
    throw py::value_error("[spectral] n_fft, hop, pad_left or n_frames is too large (sample indices overflow)");
  p.n_fft = n_fft;
  p.hop = hop;
  p.frame_length = frame_length;
  p.frame_offset = frame_offset;
  p.pad_left = pad_left;
  p.pad_mode = parse_enum(op, "pad_mode", pad_mode, mmcore::bindings::kPadModes);
  p.dither = static_cast<float>(dither);
  p.seed = seed;
  p.remove_dc = remove_dc;
  p.preemph = static_cast<float>(preemph);
  p.power = static_cast<float>(power);
  if (!(p.power > 0.0f)) throw py::value_error("[spectral] power must be > 0");
  p.log_mode = parse_enum(op, "log_mode", log_mode, mmcore::bindings::kLogModes);
  p.log_floor = static_cast<float>(log_floor);
  if (p.log_mode != mmcore::LogMode::none && !(p.log_floor > 0.0f))
    throw py::value_error("[spectral] log_floor must be > 0");
  p.whisper_norm = whisper_norm;
  p.kind = parse_enum(op, "kind", kind, mmcore::bindings::kSpectralKinds);
}

void spectral(py::object x, py::object out, py::object window, py::object mel_start, py::object mel_len,
              py::object mel_offset, py::object mel_weights, int64_t n_fft, int64_t hop, int64_t frame_length,
              int64_t frame_offset, int64_t pad_left, const std::string& pad_mode, int64_t n_frames, double dither,
              uint64_t seed, bool remove_dc, double preemph, const std::string& kind, double power,
              const std::string& log_mode, double log_floor, bool whisper_norm, int num_threads) {
  const char* op = "spectral";
  if (!py::isinstance<py::array>(x)) throw py::type_error("[spectral] x must be a numpy array");
  py::array xa = x.cast<py::array>();
  if (xa.ndim() != 2) throw py::value_error("[spectral] x must have 2 dims (signals, T)");
  mmcore::SpectralParams p;
  p.n_signals = xa.shape(0);
  p.T = xa.shape(1);
  p.x = checked<float>(op, "x", x, {p.n_signals, p.T});
  set_spectral_params(op, p, n_fft, hop, frame_length, frame_offset, pad_left, pad_mode, dither, seed, remove_dc,
                      preemph, kind, power, log_mode, log_floor, whisper_norm);
  if (n_frames < 0) throw py::value_error("[spectral] n_frames must be >= 0");
  // Sample indices f * hop - pad_left + frame_offset + t must stay within int64.
  constexpr int64_t kMaxIndex = int64_t{1} << 62;
  if (n_frames > 1 && hop > kMaxIndex / (n_frames - 1))
    throw py::value_error("[spectral] n_fft, hop, pad_left or n_frames is too large (sample indices overflow)");
  p.n_frames = n_frames;
  p.window = checked<float>(op, "window", window, {frame_length});
  if (!p.window) throw py::value_error("[spectral] window is required");
  const int64_t n_bins = n_fft / 2 + 1;
  if (p.kind == mmcore::SpectralKind::complex_stft) {
    p.out = reinterpret_cast<float*>(
        checked<std::complex<float>>(op, "out", out, {p.n_signals, n_bins, n_frames}, {.writable = true}));
  } else if (p.kind == mmcore::SpectralKind::power) {
    p.out = checked<float>(op, "out", out, {p.n_signals, n_bins, n_frames}, {.writable = true});
  } else {
    if (mel_start.is_none()) throw py::value_error("[spectral] kind 'mel' needs the mel filters");
    p.n_mels = mel_start.cast<py::array>().shape(0);
    p.mel_start = checked<int32_t>(op, "mel_start", mel_start, {p.n_mels});
    p.mel_len = checked<int32_t>(op, "mel_len", mel_len, {p.n_mels});
    p.mel_offset = checked<int64_t>(op, "mel_offset", mel_offset, {p.n_mels});
    if (!py::isinstance<py::array>(mel_weights)) throw py::type_error("[spectral] mel_weights must be an array");
    const int64_t nw = mel_weights.cast<py::array>().size();
    p.mel_weights = checked<float>(op, "mel_weights", mel_weights, {nw});
    for (int64_t m = 0; m < p.n_mels; ++m) {
      if (!p.mel_start || !p.mel_len || !p.mel_offset) throw py::value_error("[spectral] mel filters are incomplete");
      if (p.mel_start[m] < 0 || p.mel_len[m] < 0 || p.mel_start[m] + p.mel_len[m] > n_bins || p.mel_offset[m] < 0 ||
          p.mel_offset[m] + p.mel_len[m] > nw)
        throw py::value_error("[spectral] mel filter " + std::to_string(m) + " is out of bounds");
    }
    p.out = checked<float>(op, "out", out, {p.n_signals, p.n_mels, n_frames}, {.writable = true});
  }
  if (!p.out && p.n_signals * n_frames > 0) throw py::value_error("[spectral] out is required");
  if (whisper_norm && (p.kind != mmcore::SpectralKind::mel || p.log_mode != mmcore::LogMode::log10))
    throw py::value_error("[spectral] whisper_norm needs kind 'mel' and log_mode 'log10'");
  p.num_threads = num_threads < 1 ? 1 : num_threads;
  run_kernel(op, [&] { mmcore::spectral_cpu(p); });
}

// True when no value of x[0, n) is NaN or infinite (all exponent bits set). Blocks of a few
// thousand values, each an exit check, so that the loop stays a plain vectorized OR.
bool all_finite(const float* x, int64_t n) {
  constexpr int64_t kBlock = 2048;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    uint32_t bad = 0;
    for (int64_t i = i0; i < i1; ++i) {
      uint32_t bits;
      std::memcpy(&bits, x + i, sizeof bits);
      bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    }
    if (bad) return false;
  }
  return true;
}

// One spectral configuration with everything but the signal fixed, for the calls that repeat
// it (mmcore.ops keeps a bounded cache of plans): the scalar options are checked, the enums
// parsed and the window and mel tables copied once, so a call only checks the signal, allocates
// the output and runs spectral_cpu. Immutable after construction; run() may be called from
// several threads at once.
class SpectralPlan {
 public:
  SpectralPlan(py::object window, py::object mel_start, py::object mel_len, py::object mel_offset,
               py::object mel_weights, int64_t n_fft, int64_t hop, int64_t frame_length, int64_t frame_offset,
               int64_t pad_left, const std::string& pad_mode, double dither, uint64_t seed, bool remove_dc,
               double preemph, const std::string& kind, double power, const std::string& log_mode, double log_floor,
               bool whisper_norm) {
    const char* op = "spectral";
    mmcore::SpectralParams& p = params_;
    set_spectral_params(op, p, n_fft, hop, frame_length, frame_offset, pad_left, pad_mode, dither, seed, remove_dc,
                        preemph, kind, power, log_mode, log_floor, whisper_norm);
    const float* w = checked<float>(op, "window", window, {frame_length});
    if (!w) throw py::value_error("[spectral] window is required");
    window_.assign(w, w + frame_length);
    const int64_t n_bins = n_fft / 2 + 1;
    rows_ = n_bins;
    if (p.kind == mmcore::SpectralKind::mel) {
      if (mel_start.is_none()) throw py::value_error("[spectral] kind 'mel' needs the mel filters");
      if (!py::isinstance<py::array>(mel_start)) throw py::type_error("[spectral] mel_start must be a numpy array");
      p.n_mels = mel_start.cast<py::array>().shape(0);
      const int32_t* ms = checked<int32_t>(op, "mel_start", mel_start, {p.n_mels});
      const int32_t* ml = checked<int32_t>(op, "mel_len", mel_len, {p.n_mels});
      const int64_t* mo = checked<int64_t>(op, "mel_offset", mel_offset, {p.n_mels});
      if (!py::isinstance<py::array>(mel_weights)) throw py::type_error("[spectral] mel_weights must be an array");
      const int64_t nw = mel_weights.cast<py::array>().size();
      const float* mw = checked<float>(op, "mel_weights", mel_weights, {nw});
      if (!ms || !ml || !mo) throw py::value_error("[spectral] mel filters are incomplete");
      for (int64_t m = 0; m < p.n_mels; ++m)
        if (ms[m] < 0 || ml[m] < 0 || ms[m] + ml[m] > n_bins || mo[m] < 0 || mo[m] + ml[m] > nw)
          throw py::value_error("[spectral] mel filter " + std::to_string(m) + " is out of bounds");
      mel_start_.assign(ms, ms + p.n_mels);
      mel_len_.assign(ml, ml + p.n_mels);
      mel_offset_.assign(mo, mo + p.n_mels);
      mel_weights_.assign(mw, mw + nw);
      p.mel_start = mel_start_.data();
      p.mel_len = mel_len_.data();
      p.mel_offset = mel_offset_.data();
      p.mel_weights = mel_weights_.data();
      rows_ = p.n_mels;
    }
    if (whisper_norm && (p.kind != mmcore::SpectralKind::mel || p.log_mode != mmcore::LogMode::log10))
      throw py::value_error("[spectral] whisper_norm needs kind 'mel' and log_mode 'log10'");
    p.window = window_.data();
  }
  SpectralPlan(const SpectralPlan&) = delete;
  SpectralPlan& operator=(const SpectralPlan&) = delete;

  // The spectra of the signals x (..., T), C-contiguous, as a new array (..., rows, n_frames)
  // (complex64 for kind 'complex_stft'); None, without running the kernel, when check_finite is
  // set and x holds a NaN or an infinity (after its conversion to float32). x is float32, or
  // float64 or int16 converted to float32 first as numpy's astype(float32) does (int16 then
  // multiplied by 1 / 32768 when scale_int16 is set).
  py::object run(py::object x, int64_t n_frames, int num_threads, bool check_finite, bool scale_int16) const {
    const char* op = "spectral";
    if (!py::isinstance<py::array>(x)) throw py::type_error("[spectral] x must be a numpy array");
    py::array xa = x.cast<py::array>();
    const py::dtype dt = xa.dtype();
    const int kind = same_dtype(dt, py::dtype::of<float>())     ? 0
                     : same_dtype(dt, py::dtype::of<double>())  ? 1
                     : same_dtype(dt, py::dtype::of<int16_t>()) ? 2
                                                                : -1;
    if (kind < 0)
      throw py::type_error("[spectral] x has dtype " + std::string(py::str(dt)) +
                           ", expected float32, float64 or int16");
    if (!(xa.flags() & py::array::c_style)) throw py::value_error("[spectral] x must be C-contiguous");
    const py::ssize_t nd = xa.ndim();
    if (nd < 1) throw py::value_error("[spectral] x must have at least 1 dim (..., T)");
    if (n_frames < 0) throw py::value_error("[spectral] n_frames must be >= 0");
    constexpr int64_t kMaxIndex = int64_t{1} << 62;
    if (n_frames > 1 && params_.hop > kMaxIndex / (n_frames - 1))
      throw py::value_error("[spectral] n_fft, hop, pad_left or n_frames is too large (sample indices overflow)");
    mmcore::SpectralParams p = params_;
    std::vector<py::ssize_t> shape(xa.shape(), xa.shape() + nd);
    p.T = shape.back();
    p.n_signals = 1;
    for (py::ssize_t d = 0; d + 1 < nd; ++d) p.n_signals = mul_dims(op, {p.n_signals, shape[d]});
    p.n_frames = n_frames;
    shape.back() = rows_;
    shape.push_back(n_frames);
    mul_dims(op, {p.n_signals, rows_, n_frames, p.kind == mmcore::SpectralKind::complex_stft ? 8 : 4});
    py::array out = p.kind == mmcore::SpectralKind::complex_stft
                        ? py::array(py::dtype::of<std::complex<float>>(), shape)
                        : py::array(py::dtype::of<float>(), shape);
    p.out = static_cast<float*>(out.mutable_data());
    p.num_threads = num_threads < 1 ? 1 : num_threads;
    const int64_t n = mul_dims(op, {p.n_signals, p.T});
    std::vector<float> converted;
    bool finite = true;
    run_kernel(op, [&] {
      if (kind == 0) {
        p.x = static_cast<const float*>(xa.data());
      } else {
        converted.resize(static_cast<size_t>(n));
        if (kind == 1) {
          const double* src = static_cast<const double*>(xa.data());
          for (int64_t i = 0; i < n; ++i) converted[i] = static_cast<float>(src[i]);
        } else {
          const int16_t* src = static_cast<const int16_t*>(xa.data());
          const float scale = scale_int16 ? 1.0f / 32768.0f : 1.0f;
          for (int64_t i = 0; i < n; ++i) converted[i] = static_cast<float>(src[i]) * scale;
        }
        p.x = converted.data();
      }
      if (check_finite && kind != 2 && !all_finite(p.x, n)) {
        finite = false;
        return;
      }
      mmcore::spectral_cpu(p);
    });
    if (!finite) return py::none();
    return out;
  }

  int64_t rows() const { return rows_; }

 private:
  mmcore::SpectralParams params_;  // everything but the signal, its output and the threads
  std::vector<float> window_, mel_weights_;
  std::vector<int32_t> mel_start_, mel_len_;
  std::vector<int64_t> mel_offset_;
  int64_t rows_ = 0;  // n_fft / 2 + 1 bins, or n_mels
};

// An (H, W, C) image whose rows may be strided but whose (W, C) part is contiguous.
template <class T>
mmcore::ImageView<T> image_view(const char* op, const char* name, py::handle obj, bool writable) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string("[") + op + "] " + name + " must hold numpy arrays");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!same_dtype(a.dtype(), py::dtype::of<std::remove_const_t<T>>()))
    throw py::type_error(std::string("[") + op + "] " + name + " has dtype " + std::string(py::str(a.dtype())) +
                         ", expected " + std::string(py::str(py::dtype::of<std::remove_const_t<T>>())));
  if (a.ndim() != 3) throw py::value_error(std::string("[") + op + "] " + name + " images must have 3 dims (H, W, C)");
  const auto item = static_cast<py::ssize_t>(sizeof(T));
  mmcore::ImageView<T> v;
  v.H = a.shape(0);
  v.W = a.shape(1);
  v.C = a.shape(2);
  const bool inner_ok = (a.strides(2) == item || v.C == 1) && (a.strides(1) == item * v.C || v.W == 1);
  // Rows a stride 0 apart (one row repeated, a broadcast view) are fine to read, not to write.
  const bool repeated = a.strides(0) == 0 && !writable;
  if (!inner_ok || a.strides(0) < 0 || a.strides(0) % item != 0 ||
      (v.H > 1 && !repeated && a.strides(0) < item * v.W * v.C))
    throw py::value_error(std::string("[") + op + "] " + name + " images need contiguous rows");
  if (writable && !a.writeable()) throw py::value_error(std::string("[") + op + "] " + name + " must be writable");
  v.stride = v.H > 1 ? a.strides(0) / item : v.W * v.C;
  v.data = static_cast<T*>(const_cast<void*>(a.data()));
  return v;
}

// The views of one resize call, checked pairwise, and the kernel call for element type T.
template <typename T, typename Kernel>
void resize_views(py::list srcs, py::list dsts, mmcore::ResizeFilter f, bool antialias, int num_threads,
                  Kernel kernel) {
  const char* op = "resize";
  const size_t n = srcs.size();
  std::vector<mmcore::ImageView<const T>> s(n);
  std::vector<mmcore::ImageView<T>> d(n);
  for (size_t i = 0; i < n; ++i) {
    s[i] = image_view<const T>(op, "srcs", srcs[i], false);
    d[i] = image_view<T>(op, "dsts", dsts[i], true);
    if (s[i].C != d[i].C) throw py::value_error("[resize] source and destination channels differ");
    if (s[i].H == 0 || s[i].W == 0) throw py::value_error("[resize] empty source image");
  }
  mmcore::ResizeParams<T> p;
  p.srcs = s.data();
  p.dsts = d.data();
  p.n = static_cast<int64_t>(n);
  p.filter = f;
  p.antialias = antialias;
  p.num_threads = std::max(num_threads, 1);
  run_kernel(op, [&] { kernel(p); });
}

void resize(py::list srcs, py::list dsts, const std::string& filter, bool antialias, int num_threads) {
  const char* op = "resize";
  const auto f = parse_enum(op, "filter", filter, mmcore::bindings::kResizeFilters);
  if (srcs.size() != dsts.size()) throw py::value_error("[resize] srcs and dsts differ in length");
  if (srcs.size() == 0) return;
  if (same_dtype(py::reinterpret_borrow<py::array>(srcs[0]).dtype(), py::dtype::of<uint8_t>()))
    resize_views<uint8_t>(srcs, dsts, f, antialias, num_threads,
                          [](const mmcore::ResizeParams<uint8_t>& p) { mmcore::resize_u8_cpu(p); });
  else
    resize_views<float>(srcs, dsts, f, antialias, num_threads,
                        [](const mmcore::ResizeParams<float>& p) { mmcore::resize_f32_cpu(p); });
}

// layout "chw" gives planes (N, C, H, W), "hwc" keeps (N, H, W, C).
constexpr mmcore::bindings::EnumName<bool> kLayouts[] = {{"chw", true}, {"hwc", false}};

void normalize(py::array src, py::object dst, py::object mean, py::object stdv, double scale, const std::string& layout,
               int num_threads) {
  const char* op = "normalize";
  if (src.ndim() != 4) throw py::value_error("[normalize] src must have 4 dims (N, H, W, C)");
  const int64_t N = src.shape(0), H = src.shape(1), W = src.shape(2), C = src.shape(3);
  const bool chw = parse_enum(op, "layout", layout, kLayouts);
  float* d = checked<float>(op, "dst", dst, chw ? Shape{N, C, H, W} : Shape{N, H, W, C}, {.writable = true});
  const float* m = checked<float>(op, "mean", mean, {C});
  const float* sd = checked<float>(op, "std", stdv, {C});
  if (!d || !m || !sd) throw py::value_error("[normalize] dst, mean and std are required");
  auto run = [&](auto p, auto kernel) {
    p.dst = d;
    p.N = N;
    p.H = H;
    p.W = W;
    p.C = C;
    p.mean = m;
    p.std = sd;
    p.scale = static_cast<float>(scale);
    p.chw = chw;
    p.num_threads = std::max(num_threads, 1);
    py::gil_scoped_release release;
    kernel(p);
  };
  if (same_dtype(src.dtype(), py::dtype::of<uint8_t>())) {
    mmcore::NormalizeParams<uint8_t> p;
    p.src = checked<uint8_t>(op, "src", src, {N, H, W, C});
    run(p, mmcore::normalize_u8_cpu);
  } else {
    mmcore::NormalizeParams<float> p;
    p.src = checked<float>(op, "src", src, {N, H, W, C});
    run(p, mmcore::normalize_f32_cpu);
  }
}

void patchify(py::array src, py::object dst, int64_t patch, int64_t temporal_patch, int num_threads) {
  const char* op = "patchify";
  if (src.ndim() != 5) throw py::value_error("[patchify] src must have 5 dims (B, T, C, H, W)");
  const int64_t B = src.shape(0), T = src.shape(1), C = src.shape(2), H = src.shape(3), W = src.shape(4);
  if (patch < 1 || temporal_patch < 1 || H % patch || W % patch || T % temporal_patch)
    throw py::value_error("[patchify] sizes must be multiples of the patch sizes");
  const float* s = checked<float>(op, "src", src, {B, T, C, H, W});
  const int64_t np_ = mul_dims(op, {T / temporal_patch, H / patch, W / patch});
  float* d =
      checked<float>(op, "dst", dst, {B, np_, mul_dims(op, {C, temporal_patch, patch, patch})}, {.writable = true});
  if (!s || !d) throw py::value_error("[patchify] src and dst are required");
  mmcore::PatchifyParams p;
  p.src = s;
  p.dst = d;
  p.B = B;
  p.T = T;
  p.C = C;
  p.H = H;
  p.W = W;
  p.patch = patch;
  p.temporal_patch = temporal_patch;
  p.num_threads = std::max(num_threads, 1);
  py::gil_scoped_release release;
  mmcore::patchify_f32_cpu(p);
}

void preprocess_image(py::list srcs, py::object out, py::object geoms, py::object mean, py::object stdv, int64_t crop_h,
                      int64_t crop_w, const std::string& filter, bool antialias, double scale, int64_t patch,
                      int num_threads) {
  const char* op = "preprocess_image";
  const auto f = parse_enum(op, "filter", filter, mmcore::bindings::kResizeFilters);
  const int64_t n = static_cast<int64_t>(srcs.size());
  if (n == 0) return;
  std::vector<mmcore::ImageView<const uint8_t>> s(n);
  for (int64_t i = 0; i < n; ++i) {
    s[i] = image_view<const uint8_t>(op, "srcs", srcs[i], false);
    if (s[i].C != s[0].C) throw py::value_error("[preprocess_image] images differ in channels");
    if (s[i].H == 0 || s[i].W == 0) throw py::value_error("[preprocess_image] empty image");
  }
  const int64_t C = s[0].C;
  if (crop_h < 1 || crop_w < 1) throw py::value_error("[preprocess_image] crop sizes must be >= 1");
  if (patch < 0 || (patch > 0 && (crop_h % patch || crop_w % patch)))
    throw py::value_error("[preprocess_image] the crop must be a multiple of the patch size");
  const int64_t* g = checked<int64_t>(op, "geoms", geoms, {n, 4});
  if (!g) throw py::value_error("[preprocess_image] geoms is required: an (n, 4) int64 array");
  // |sizes and offsets| <= 2^62 keeps every sum of an offset and a crop size within int64.
  constexpr int64_t kMaxGeom = int64_t{1} << 62;
  if (crop_h > kMaxGeom || crop_w > kMaxGeom) throw py::value_error("[preprocess_image] crop sizes are too large");
  for (int64_t i = 0; i < n; ++i) {
    if (g[4 * i] < 1 || g[4 * i + 1] < 1) throw py::value_error("[preprocess_image] resize sizes must be >= 1");
    for (int k = 0; k < 4; ++k)
      if (g[4 * i + k] > kMaxGeom || g[4 * i + k] < -kMaxGeom)
        throw py::value_error("[preprocess_image] geoms values must lie within +-2^62");
  }
  mmcore::NormalizeSpec norm;
  norm.mean = checked<float>(op, "mean", mean, {C});
  norm.std = checked<float>(op, "std", stdv, {C});
  norm.scale = static_cast<float>(scale);
  norm.patch = patch;
  mul_dims(op, {n, C, crop_h, crop_w});
  float* o = patch == 0
                 ? checked<float>(op, "out", out, {n, C, crop_h, crop_w}, {.writable = true})
                 : checked<float>(op, "out", out,
                                  {n, mul_dims(op, {crop_h / patch, crop_w / patch}), mul_dims(op, {C, patch, patch})},
                                  {.writable = true});
  if (!o || !g || !norm.mean || !norm.std)
    throw py::value_error("[preprocess_image] out, geoms, mean, std are required");
  mmcore::PreprocessParams p;
  p.srcs = s.data();
  p.n = n;
  p.geoms = g;
  p.crop_h = crop_h;
  p.crop_w = crop_w;
  p.filter = f;
  p.antialias = antialias;
  p.norm = norm;
  p.out = o;
  p.num_threads = std::max(num_threads, 1);
  run_kernel(op, [&] { mmcore::preprocess_u8_cpu(p); });
}

void masked_reduce(const char* op, py::object x, py::object mask, py::object out, int num_threads, bool is_max) {
  if (!py::isinstance<py::array>(x)) throw py::type_error(std::string("[") + op + "] x must be a numpy array");
  py::array xa = x.cast<py::array>();
  if (xa.ndim() != 3) throw py::value_error(std::string("[") + op + "] x must have 3 dims (B, L, D)");
  mmcore::MaskedReduceParams p;
  p.B = xa.shape(0);
  p.L = xa.shape(1);
  p.D = xa.shape(2);
  p.x = checked<float>(op, "x", x, {p.B, p.L, p.D});
  p.mask = reinterpret_cast<const uint8_t*>(checked<bool>(op, "mask", mask, {p.B, p.L}));
  p.out = checked<float>(op, "out", out, {p.B, p.D}, {.writable = true});
  if (!p.out && p.B * p.D > 0) throw py::value_error(std::string("[") + op + "] out is required");
  p.num_threads = std::max(num_threads, 1);
  py::gil_scoped_release release;
  if (is_max)
    mmcore::masked_max_cpu(p);
  else
    mmcore::masked_mean_cpu(p);
}

void fuse(py::object emb, py::object present, py::object weights, py::object query, py::object out,
          py::object out_weights, const std::string& strategy, int num_threads) {
  const char* op = "fuse";
  if (!py::isinstance<py::array>(emb)) throw py::type_error("[fuse] emb must be a numpy array");
  py::array ea = emb.cast<py::array>();
  if (ea.ndim() != 3) throw py::value_error("[fuse] emb must have 3 dims (B, M, D)");
  mmcore::FuseParams p;
  p.B = ea.shape(0);
  p.M = ea.shape(1);
  p.D = ea.shape(2);
  p.emb = checked<float>(op, "emb", emb, {p.B, p.M, p.D});
  p.present = reinterpret_cast<const uint8_t*>(checked<bool>(op, "present", present, {p.B, p.M}));
  p.strategy = parse_enum(op, "strategy", strategy, mmcore::bindings::kFuseStrategies);
  if (p.strategy == mmcore::FuseStrategy::weighted) {
    if (weights.is_none()) throw py::value_error("[fuse] strategy 'weighted' needs weights");
    py::array wa = weights.cast<py::array>();
    p.weights_per_batch = wa.ndim() == 2;
    p.weights = checked<float>(op, "weights", weights, p.weights_per_batch ? Shape{p.B, p.M} : Shape{p.M});
  }
  if (p.strategy == mmcore::FuseStrategy::attention) {
    if (query.is_none()) throw py::value_error("[fuse] strategy 'attention' needs a query");
    py::array qa = query.cast<py::array>();
    p.query_per_batch = qa.ndim() == 2;
    p.query = checked<float>(op, "query", query, p.query_per_batch ? Shape{p.B, p.D} : Shape{p.D});
  }
  p.out = checked<float>(
      op, "out", out,
      p.strategy == mmcore::FuseStrategy::concat ? Shape{p.B, mul_dims(op, {p.M, p.D})} : Shape{p.B, p.D},
      {.writable = true});
  if (!p.out) throw py::value_error("[fuse] out is required");
  p.out_weights = checked<float>(op, "out_weights", out_weights, {p.B, p.M}, {.writable = true});
  p.num_threads = std::max(num_threads, 1);
  py::gil_scoped_release release;
  mmcore::fuse_cpu(p);
}

using PackedPtr = std::shared_ptr<mmcore::PackedWeight>;

// The weight operand of a linear map, as an array of the named kind (with the int8 scales); fills
// p.w, p.w_kind, p.w_scale, p.ldw for a (rows, cols) matrix.
void weight_operand(const char* op, const char* name, py::object w, const std::string& kind, py::object scale,
                    int64_t rows, int64_t cols, mmcore::LinearParams& p) {
  int64_t st[2];
  const ArrayOpts strided{.contiguous = false, .strides = st};
  p.w_kind = parse_enum(op, "weight_kind", kind, mmcore::bindings::kWeightKinds);
  switch (p.w_kind) {
    case mmcore::WeightKind::f32: p.w = checked<float>(op, name, w, {rows, cols}, strided); break;
    case mmcore::WeightKind::f16:
    case mmcore::WeightKind::bf16: p.w = checked<uint16_t>(op, name, w, {rows, cols}, strided); break;
    case mmcore::WeightKind::i8:
      p.w = checked<int8_t>(op, name, w, {rows, cols}, strided);
      p.w_scale = checked<float>(op, "weight_scale", scale, {rows});
      if (!p.w_scale) throw py::value_error(std::string("[") + op + "] int8 " + name + " needs weight_scale");
      break;
  }
  if (!p.w) throw py::value_error(std::string("[") + op + "] " + name + " is required");
  if ((cols > 1 && st[1] != 1) || (rows > 1 && st[0] < cols))
    throw py::value_error(std::string("[") + op + "] " + name +
                          " needs unit stride along its last axis and non-overlapping rows");
  p.ldw = rows > 1 ? st[0] : cols;
}

void check_int8_k(const char* op, mmcore::Precision precision, int64_t K) {
  if (precision == mmcore::Precision::int8 && K > mmcore::kInt8MaxK)
    throw py::value_error(std::string("[") + op + "] precision 'int8' supports in_features <= " +
                          std::to_string(mmcore::kInt8MaxK) + ", got " + std::to_string(K));
}

// A PackedWeight argument must have been packed for the call's precision and shape.
const mmcore::PackedWeight* packed_operand(const char* op, const char* name, py::object w, mmcore::Precision precision,
                                           int64_t rows, int64_t cols) {
  const mmcore::PackedWeight& pw = *w.cast<PackedPtr>();
  if (pw.precision != precision)
    throw py::value_error(std::string("[") + op + "] " + name + " was packed for another precision");
  if (pw.N != rows || pw.K != cols)
    throw py::value_error(std::string("[") + op + "] " + name + " is packed with shape (" + std::to_string(pw.N) +
                          ", " + std::to_string(pw.K) + "), expected (" + std::to_string(rows) + ", " +
                          std::to_string(cols) + ")");
  return &pw;
}

PackedPtr pack_weight(py::object w, py::object weight_scale, const std::string& weight_kind,
                      const std::string& precision, int num_threads) {
  const char* op = "pack_weight";
  if (!py::isinstance<py::array>(w)) throw py::type_error("[pack_weight] weight must be a numpy array");
  py::array wa = w.cast<py::array>();
  if (wa.ndim() != 2) throw py::value_error("[pack_weight] weight must have 2 dims");
  mmcore::LinearParams p;
  p.N = wa.shape(0);
  p.K = wa.shape(1);
  p.precision = parse_enum(op, "precision", precision, mmcore::bindings::kPrecisions);
  check_int8_k(op, p.precision, p.K);
  weight_operand(op, "weight", w, weight_kind, weight_scale, p.N, p.K, p);
  p.num_threads = std::max(num_threads, 1);
  auto out = std::make_shared<mmcore::PackedWeight>();
  run_kernel(op, [&] { mmcore::pack_weight(p, *out); });
  return out;
}

void linear(py::object x, py::object w, py::object bias, py::object y, const std::string& activation,
            const std::string& weight_kind, py::object weight_scale, const std::string& precision, int num_threads) {
  const char* op = "linear";
  const bool packed = py::isinstance<mmcore::PackedWeight>(w);
  if (!py::isinstance<py::array>(x) || (!packed && !py::isinstance<py::array>(w)))
    throw py::type_error("[linear] x must be a numpy array and weight a numpy array or a PackedWeight");
  py::array xa = x.cast<py::array>();
  if (xa.ndim() != 2 || (!packed && w.cast<py::array>().ndim() != 2))
    throw py::value_error("[linear] x and weight must have 2 dims");
  mmcore::LinearParams p;
  p.M = xa.shape(0);
  p.K = xa.shape(1);
  p.precision = parse_enum(op, "precision", precision, mmcore::bindings::kPrecisions);
  int64_t xs[2];
  p.x = checked<float>(op, "x", x, {p.M, p.K}, {.contiguous = false, .strides = xs});
  if (packed) {
    p.N = w.cast<PackedPtr>()->N;
    p.packed = packed_operand(op, "weight", w, p.precision, p.N, p.K);
  } else {
    p.N = w.cast<py::array>().shape(0);
    weight_operand(op, "weight", w, weight_kind, weight_scale, p.N, p.K, p);
  }
  check_int8_k(op, p.precision, p.K);
  if ((p.K > 1 && xs[1] != 1) || (p.M > 1 && xs[0] < p.K))
    throw py::value_error("[linear] x and weight need unit stride along the last axis and non-overlapping rows");
  p.ldx = p.M > 1 ? xs[0] : p.K;
  p.bias = checked<float>(op, "bias", bias, {p.N});
  p.y = checked<float>(op, "out", y, {p.M, p.N}, {.writable = true});
  if (!p.y) throw py::value_error("[linear] out is required");
  p.ldy = p.N;
  p.activation = parse_enum(op, "activation", activation, mmcore::bindings::kActivations);
  p.num_threads = std::max(num_threads, 1);
  run_kernel(op, [&] { mmcore::linear_cpu(p); });
}

mmcore::WeightRef weight_ref(const char* op, const char* name, py::object w, py::object kind, py::object scale,
                             int64_t rows, int64_t cols, mmcore::Precision precision) {
  mmcore::WeightRef r;
  if (py::isinstance<mmcore::PackedWeight>(w)) {
    r.packed = packed_operand(op, name, w, precision, rows, cols);
    return r;
  }
  mmcore::LinearParams p;
  weight_operand(op, name, w, kind.cast<std::string>(), scale, rows, cols, p);
  r.data = p.w;
  r.kind = p.w_kind;
  r.scale = p.w_scale;
  r.ld = p.ldw;
  return r;
}

// weights: a tuple (w_in, w_out, w1, w2), each (array, kind name, scale or None)
void encoder_layer(py::object x, py::object y, py::object key_lengths, int64_t num_heads, py::tuple weights,
                   py::tuple biases, py::tuple norms, double eps1, double eps2, const std::string& activation,
                   double scale, const std::string& precision, int num_threads) {
  const char* op = "encoder_layer";
  if (!py::isinstance<py::array>(x)) throw py::type_error("[encoder_layer] x must be a numpy array");
  py::array xa = x.cast<py::array>();
  if (xa.ndim() != 3) throw py::value_error("[encoder_layer] x must have 3 dims (B, L, E)");
  mmcore::EncoderLayerParams p;
  p.B = xa.shape(0);
  p.L = xa.shape(1);
  p.E = xa.shape(2);
  p.H = num_heads;
  if (p.H < 1 || p.E % p.H) throw py::value_error("[encoder_layer] num_heads must divide E");
  p.x = checked<float>(op, "x", x, {p.B, p.L, p.E});
  p.y = checked<float>(op, "out", y, {p.B, p.L, p.E}, {.writable = true});
  if (p.x == p.y) throw py::value_error("[encoder_layer] out must not be x");
  p.key_lengths = checked<int64_t>(op, "key_lengths", key_lengths, {p.B});
  if (p.key_lengths)
    for (int64_t b = 0; b < p.B; ++b)
      if (p.key_lengths[b] < 0 || p.key_lengths[b] > p.L)
        throw py::value_error("[encoder_layer] key_lengths must lie in [0, L]");
  if (weights.size() != 4 || biases.size() != 4 || norms.size() != 4)
    throw py::value_error("[encoder_layer] weights, biases and norms must hold 4 entries");
  p.precision = parse_enum(op, "precision", precision, mmcore::bindings::kPrecisions);
  auto wt = [&](int i) { return weights[i].cast<py::tuple>(); };
  p.F = py::isinstance<mmcore::PackedWeight>(wt(2)[0]) ? wt(2)[0].cast<PackedPtr>()->N
                                                       : wt(2)[0].cast<py::array>().shape(0);
  const char* wnames[4] = {"w_in", "w_out", "w1", "w2"};
  const int64_t rows[4] = {mul_dims(op, {3, p.E}), p.E, p.F, p.E}, cols[4] = {p.E, p.E, p.E, p.F};
  mmcore::WeightRef* refs[4] = {&p.w_in, &p.w_out, &p.w1, &p.w2};
  for (int i = 0; i < 4; ++i)
    *refs[i] = weight_ref(op, wnames[i], wt(i)[0], wt(i)[1], wt(i)[2], rows[i], cols[i], p.precision);
  check_int8_k(op, p.precision, std::max(p.E, p.F));
  const float** bs[4] = {&p.b_in, &p.b_out, &p.b1, &p.b2};
  const char* bnames[4] = {"b_in", "b_out", "b1", "b2"};
  for (int i = 0; i < 4; ++i) *bs[i] = checked<float>(op, bnames[i], biases[i], {rows[i]});
  p.ln1_w = checked<float>(op, "ln1_w", norms[0], {p.E});
  p.ln1_b = checked<float>(op, "ln1_b", norms[1], {p.E});
  p.ln2_w = checked<float>(op, "ln2_w", norms[2], {p.E});
  p.ln2_b = checked<float>(op, "ln2_b", norms[3], {p.E});
  if ((p.ln1_b && !p.ln1_w) || (p.ln2_b && !p.ln2_w))
    throw py::value_error("[encoder_layer] a norm bias needs its weight");
  if (!(eps1 > 0.0) || !(eps2 > 0.0)) throw py::value_error("[encoder_layer] eps must be > 0");
  p.eps1 = eps1;
  p.eps2 = eps2;
  p.activation = parse_enum(op, "activation", activation, mmcore::bindings::kActivations);
  p.scale = static_cast<float>(scale);
  p.num_threads = std::max(num_threads, 1);
  run_kernel(op, [&] { mmcore::encoder_layer_cpu(p); });
}

void layer_norm(py::object x, py::object weight, py::object bias, py::object y, double eps, int num_threads) {
  const char* op = "layer_norm";
  if (!py::isinstance<py::array>(x)) throw py::type_error("[layer_norm] x must be a numpy array");
  py::array xa = x.cast<py::array>();
  if (xa.ndim() != 2) throw py::value_error("[layer_norm] x must have 2 dims (rows, D)");
  mmcore::LayerNormParams p;
  p.rows = xa.shape(0);
  p.D = xa.shape(1);
  int64_t xs[2];
  p.x = checked<float>(op, "x", x, {p.rows, p.D}, {.contiguous = false, .strides = xs});
  if ((p.D > 1 && xs[1] != 1) || (p.rows > 1 && xs[0] < p.D))
    throw py::value_error("[layer_norm] x needs unit stride along the last axis and non-overlapping rows");
  p.ldx = p.rows > 1 ? xs[0] : p.D;
  p.weight = checked<float>(op, "weight", weight, {p.D});
  p.bias = checked<float>(op, "bias", bias, {p.D});
  if (p.bias && !p.weight) throw py::value_error("[layer_norm] bias needs a weight");
  p.y = checked<float>(op, "out", y, {p.rows, p.D}, {.writable = true});
  if (!p.y) throw py::value_error("[layer_norm] out is required");
  if (!(eps > 0.0)) throw py::value_error("[layer_norm] eps must be > 0");
  p.eps = eps;
  p.num_threads = std::max(num_threads, 1);
  py::gil_scoped_release release;
  mmcore::layer_norm_cpu(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmcore native CPU kernels (internal; use mmcore.ops)";
  // Sizes a kernel cannot handle raise mmcore.errors.ShapeError (a ValueError).
  py::register_exception_translator([](std::exception_ptr ep) {
    try {
      if (ep) std::rethrow_exception(ep);
    } catch (const mmcore::SizeError& e) {
      py::object cls;
      try {
        cls = py::module_::import("mmcore.errors").attr("ShapeError");
      } catch (py::error_already_set&) {
        cls = py::reinterpret_borrow<py::object>(PyExc_ValueError);
      }
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
#ifdef MMCORE_VERSION
  m.attr("__version__") = MMCORE_VERSION;
#endif
  m.def(
      "isa_level", []() { return std::string(mmcore::isa_name(mmcore::active_isa())); },
      "Instruction-set level the kernels run at: baseline, avx2 or avx512.");
  m.def("compiled_isas", &mmcore::compiled_isas);
  m.def("cpu_features", &mmcore::cpu_feature_list);
  m.def("set_isa_cap", &mmcore::set_isa_cap, py::arg("name"),
        "Cap the instruction-set level (tests, benchmarks); returns False if not available.");
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("weights"),
        py::arg("lse"), py::arg("mask"), py::arg("bias"), py::arg("key_lengths"), py::kw_only(), py::arg("scale"),
        py::arg("dropout"), py::arg("seed"), py::arg("threshold"), py::arg("dropout_scale"),
        py::arg("precision") = "highest", py::arg("num_threads"));
  m.def("spectral", &spectral, py::arg("x"), py::arg("out"), py::arg("window"), py::arg("mel_start"),
        py::arg("mel_len"), py::arg("mel_offset"), py::arg("mel_weights"), py::kw_only(), py::arg("n_fft"),
        py::arg("hop"), py::arg("frame_length"), py::arg("frame_offset"), py::arg("pad_left"), py::arg("pad_mode"),
        py::arg("n_frames"), py::arg("dither"), py::arg("seed"), py::arg("remove_dc"), py::arg("preemph"),
        py::arg("kind"), py::arg("power"), py::arg("log_mode"), py::arg("log_floor"), py::arg("whisper_norm"),
        py::arg("num_threads"));
  py::class_<SpectralPlan>(m, "SpectralPlan",
                           "A spectral configuration checked once; run(x, ...) computes a new output.")
      .def(py::init<py::object, py::object, py::object, py::object, py::object, int64_t, int64_t, int64_t, int64_t,
                    int64_t, const std::string&, double, uint64_t, bool, double, const std::string&, double,
                    const std::string&, double, bool>(),
           py::arg("window"), py::arg("mel_start"), py::arg("mel_len"), py::arg("mel_offset"), py::arg("mel_weights"),
           py::kw_only(), py::arg("n_fft"), py::arg("hop"), py::arg("frame_length"), py::arg("frame_offset"),
           py::arg("pad_left"), py::arg("pad_mode"), py::arg("dither"), py::arg("seed"), py::arg("remove_dc"),
           py::arg("preemph"), py::arg("kind"), py::arg("power"), py::arg("log_mode"), py::arg("log_floor"),
           py::arg("whisper_norm"))
      .def("run", &SpectralPlan::run, py::arg("x"), py::kw_only(), py::arg("n_frames"), py::arg("num_threads"),
           py::arg("check_finite") = true, py::arg("scale_int16") = true)
      .def_property_readonly("rows", &SpectralPlan::rows);
  m.def(
      "masked_mean",
      [](py::object x, py::object mask, py::object out, int num_threads) {
        masked_reduce("masked_mean", x, mask, out, num_threads, false);
      },
      py::arg("x"), py::arg("mask"), py::arg("out"), py::kw_only(), py::arg("num_threads"));
  m.def(
      "masked_max",
      [](py::object x, py::object mask, py::object out, int num_threads) {
        masked_reduce("masked_max", x, mask, out, num_threads, true);
      },
      py::arg("x"), py::arg("mask"), py::arg("out"), py::kw_only(), py::arg("num_threads"));
  m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::kw_only(),
        py::arg("activation") = "none", py::arg("weight_kind") = "float32", py::arg("weight_scale") = py::none(),
        py::arg("precision") = "highest", py::arg("num_threads"));
  py::class_<mmcore::PackedWeight, PackedPtr>(m, "PackedWeight",
                                              "A (N, K) linear weight packed for one precision (pack_weight).")
      .def_property_readonly("shape", [](const mmcore::PackedWeight& w) { return py::make_tuple(w.N, w.K); })
      .def_property_readonly("precision",
                             [](const mmcore::PackedWeight& w) {
                               for (const auto& e : mmcore::bindings::kPrecisions)
                                 if (e.value == w.precision) return std::string(e.name);
                               return std::string("highest");
                             })
      .def_property_readonly("nbytes", [](const mmcore::PackedWeight& w) { return w.nbytes(); })
      .def("__repr__", [](const mmcore::PackedWeight& w) {
        return "PackedWeight(shape=(" + std::to_string(w.N) + ", " + std::to_string(w.K) + "))";
      });
  m.def("pack_weight", &pack_weight, py::arg("weight"), py::arg("weight_scale") = py::none(), py::kw_only(),
        py::arg("weight_kind") = "float32", py::arg("precision") = "highest", py::arg("num_threads") = 1);
  m.def("encoder_layer", &encoder_layer, py::arg("x"), py::arg("out"), py::arg("key_lengths"), py::kw_only(),
        py::arg("num_heads"), py::arg("weights"), py::arg("biases"), py::arg("norms"), py::arg("eps1"), py::arg("eps2"),
        py::arg("activation"), py::arg("scale"), py::arg("precision") = "highest", py::arg("num_threads"));
  m.def("layer_norm", &layer_norm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::kw_only(),
        py::arg("eps"), py::arg("num_threads"));
  m.def("fuse", &fuse, py::arg("emb"), py::arg("present"), py::arg("weights"), py::arg("query"), py::arg("out"),
        py::arg("out_weights"), py::kw_only(), py::arg("strategy"), py::arg("num_threads"));
  m.def("resize", &resize, py::arg("srcs"), py::arg("dsts"), py::kw_only(), py::arg("filter"), py::arg("antialias"),
        py::arg("num_threads"));
  m.def("normalize", &normalize, py::arg("src"), py::arg("dst"), py::arg("mean"), py::arg("std"), py::kw_only(),
        py::arg("scale"), py::arg("layout"), py::arg("num_threads"));
  m.def("patchify", &patchify, py::arg("src"), py::arg("dst"), py::kw_only(), py::arg("patch"),
        py::arg("temporal_patch"), py::arg("num_threads"));
  m.def("preprocess_image", &preprocess_image, py::arg("srcs"), py::arg("out"), py::arg("geoms"), py::arg("mean"),
        py::arg("std"), py::kw_only(), py::arg("crop_h"), py::arg("crop_w"), py::arg("filter"), py::arg("antialias"),
        py::arg("scale"), py::arg("patch"), py::arg("num_threads"));
}
