// pybind11 bindings of the CUDA kernels: mmcore._cuda.
//
// Thin by design: arguments arrive as raw device pointers (Python ints, 0 = null), shapes and
// element strides, and enums as their names (enum_args.h, as in mmcore._C); all checking of
// user input happens in mmcore/ops before the launchers of mmcore/kernels/cuda call this.
// Importing this module never needs a GPU or a driver: device_info() reports why CUDA is
// unusable instead of raising.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda/attention_cuda.h"
#include "../cuda/fusion_cuda.h"
#include "../cuda/image_cuda.h"
#include "../cuda/spectral_cuda.h"
#include "enum_args.h"

namespace py = pybind11;
using mmcore::bindings::EnumName;
using mmcore::bindings::parse_enum;

namespace {

// Enum arguments are names, as in mmcore._C (enum_args.h); these are the CUDA-only ones.
constexpr EnumName<int> kAttentionDtypes[] = {{"float32", mmcore::cuda::kAttentionFloat32},
                                              {"float16", mmcore::cuda::kAttentionFloat16},
                                              {"bfloat16", mmcore::cuda::kAttentionBFloat16}};
constexpr EnumName<int> kImageDtypes[] = {{"uint8", mmcore::cuda::kImageUint8},
                                          {"float32", mmcore::cuda::kImageFloat32}};
constexpr EnumName<int> kImageLayouts[] = {{"chw", mmcore::cuda::kLayoutCHW}, {"hwc", mmcore::cuda::kLayoutHWC}};

// 12080 -> "12.8"
std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }

std::string describe(cudaError_t err) { return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err); }

py::dict device_info() {
  py::dict info;
  py::list devices;
  py::object error = py::none();

  int runtime = 0;
  int driver = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;  // 0 also means "no driver"

  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    count = 0;
    std::string msg;
    if (driver == 0) {
      msg = "no CUDA driver found: " + describe(err);
    } else if (err == cudaErrorInsufficientDriver) {
      msg = "the CUDA driver (" + version_string(driver) + ") is older than the CUDA runtime (" +
            version_string(runtime) + ") mmcore._cuda was built with: " + describe(err);
    } else if (err == cudaErrorNoDevice) {
      msg = "no CUDA device found: " + describe(err);
    } else {
      msg = "CUDA runtime error while counting devices: " + describe(err);
    }
    error = py::str(msg);
  }

  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    const cudaError_t perr = cudaGetDeviceProperties(&prop, i);
    if (perr != cudaSuccess) {
      (void)cudaGetLastError();
      error = py::str("cannot query CUDA device " + std::to_string(i) + ": " + describe(perr));
      continue;
    }
    py::dict d;
    d["index"] = i;
    d["name"] = std::string(prop.name);
    d["compute_capability"] = std::to_string(prop.major) + "." + std::to_string(prop.minor);
    d["total_memory"] = static_cast<uint64_t>(prop.totalGlobalMem);
    d["multiprocessors"] = prop.multiProcessorCount;
    devices.append(d);
  }

  info["devices"] = devices;
  info["runtime_version"] = version_string(runtime);
  info["driver_version"] = driver > 0 ? py::object(py::str(version_string(driver))) : py::none();
  info["error"] = error;
  return info;
}

// Makes `device` current for the lifetime of the guard (no-op for device < 0).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess) {
      (void)cudaGetLastError();
      current = -1;
    }
    if (current == device) return;
    const cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      error_ = "CUDA error: " + describe(err) + " (selecting device " + std::to_string(device) + ")";
      return;
    }
    previous_ = current;
  }
  ~DeviceGuard() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  const std::string& error() const { return error_; }

 private:
  int previous_ = -1;
  std::string error_;
};

template <typename T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t weights, uintptr_t lse, uintptr_t mask,
               const std::array<int64_t, 4>& mask_strides, uintptr_t bias, const std::array<int64_t, 4>& bias_strides,
               uintptr_t key_lengths, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv, double scale,
               bool dropout, uint64_t seed, uint32_t threshold, double dropout_scale, const std::string& dtype_name,
               uintptr_t stream, int device) {
  const int dtype = parse_enum("attention", "dtype", dtype_name, kAttentionDtypes);
  mmcore::AttentionParams p;
  p.q = as_ptr<const float>(q);
  p.k = as_ptr<const float>(k);
  p.v = as_ptr<const float>(v);
  p.out = as_ptr<float>(out);
  p.weights = as_ptr<float>(weights);
  p.lse = as_ptr<float>(lse);
  p.mask = as_ptr<const uint8_t>(mask);
  p.bias = as_ptr<const float>(bias);
  for (int d = 0; d < 4; ++d) {
    p.mask_strides[d] = mask_strides[d];
    p.bias_strides[d] = bias_strides[d];
  }
  p.key_lengths = as_ptr<const int64_t>(key_lengths);
  p.B = B;
  p.H = H;
  p.Lq = Lq;
  p.Lk = Lk;
  p.D = D;
  p.Dv = Dv;
  p.scale = static_cast<float>(scale);
  p.dropout = dropout;
  p.seed = seed;
  p.dropout_threshold = threshold;
  p.dropout_scale = static_cast<float>(dropout_scale);

  std::string message;
  {
    py::gil_scoped_release release;
    DeviceGuard guard(device);
    if (!guard.error().empty()) {
      message = guard.error();
    } else {
      const char* err = mmcore::cuda::attention(p, dtype, reinterpret_cast<cudaStream_t>(stream));
      if (err != nullptr) message = err;
    }
  }
  if (!message.empty()) throw std::runtime_error("[attention] " + message);
}

void spectral(uintptr_t x, uintptr_t out, uintptr_t window, uintptr_t mel_start, uintptr_t mel_len,
              uintptr_t mel_offset, uintptr_t mel_weights, int64_t n_signals, int64_t T, int64_t n_fft, int64_t hop,
              int64_t frame_length, int64_t frame_offset, int64_t pad_left, const std::string& pad_mode,
              int64_t n_frames, double dither, uint64_t seed, bool remove_dc, double preemph, const std::string& kind,
              double power, int64_t n_mels, const std::string& log_mode, double log_floor, bool whisper_norm,
              uintptr_t stream, int device) {
  const char* op = "spectral";
  mmcore::SpectralParams p;
  p.x = as_ptr<const float>(x);
  p.out = as_ptr<float>(out);
  p.window = as_ptr<const float>(window);
  p.mel_start = as_ptr<const int32_t>(mel_start);
  p.mel_len = as_ptr<const int32_t>(mel_len);
  p.mel_offset = as_ptr<const int64_t>(mel_offset);
  p.mel_weights = as_ptr<const float>(mel_weights);
  p.n_signals = n_signals;
  p.T = T;
  p.n_fft = n_fft;
  p.hop = hop;
  p.frame_length = frame_length;
  p.frame_offset = frame_offset;
  p.pad_left = pad_left;
  p.pad_mode = parse_enum(op, "pad_mode", pad_mode, mmcore::bindings::kPadModes);
  p.n_frames = n_frames;
  p.dither = static_cast<float>(dither);
  p.seed = seed;
  p.remove_dc = remove_dc;
  p.preemph = static_cast<float>(preemph);
  p.kind = parse_enum(op, "kind", kind, mmcore::bindings::kSpectralKinds);
  p.power = static_cast<float>(power);
  p.n_mels = n_mels;
  p.log_mode = parse_enum(op, "log_mode", log_mode, mmcore::bindings::kLogModes);
  p.log_floor = static_cast<float>(log_floor);
  p.whisper_norm = whisper_norm;

  std::string message;
  {
    py::gil_scoped_release release;
    DeviceGuard guard(device);
    if (!guard.error().empty()) {
      message = guard.error();
    } else {
      const char* err = mmcore::cuda::spectral(p, reinterpret_cast<cudaStream_t>(stream));
      if (err != nullptr) message = err;
    }
  }
  if (!message.empty()) throw std::runtime_error("[spectral] " + message);
}

// ---- image ops ----------------------------------------------------------------------------------

mmcore::ResizeFilter to_filter(const char* op, const std::string& filter) {
  return parse_enum(op, "filter", filter, mmcore::bindings::kResizeFilters);
}

// Resize shapes (H, W, src_stride, OH, OW, dst_stride) with the image pointers (may be empty
// for a workspace query).
std::vector<mmcore::cuda::ImageDesc> resize_descs(const std::vector<uintptr_t>& srcs,
                                                  const std::vector<uintptr_t>& dsts,
                                                  const std::vector<std::array<int64_t, 6>>& shapes) {
  if ((!srcs.empty() && srcs.size() != shapes.size()) || (!dsts.empty() && dsts.size() != shapes.size())) {
    throw std::invalid_argument("[resize] srcs, dsts and shapes differ in length");
  }
  std::vector<mmcore::cuda::ImageDesc> d(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    if (!srcs.empty()) d[i].src = as_ptr<const void>(srcs[i]);
    if (!dsts.empty()) d[i].dst = as_ptr<void>(dsts[i]);
    d[i].H = shapes[i][0];
    d[i].W = shapes[i][1];
    d[i].src_stride = shapes[i][2];
    d[i].OH = shapes[i][3];
    d[i].OW = shapes[i][4];
    d[i].dst_stride = shapes[i][5];
  }
  return d;
}

// Preprocess shapes (H, W, src_stride, resize_h, resize_w, top, left).
std::vector<mmcore::cuda::ImageDesc> preprocess_descs(const std::vector<uintptr_t>& srcs,
                                                      const std::vector<std::array<int64_t, 7>>& shapes) {
  if (!srcs.empty() && srcs.size() != shapes.size()) {
    throw std::invalid_argument("[preprocess_image] srcs and shapes differ in length");
  }
  std::vector<mmcore::cuda::ImageDesc> d(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    if (!srcs.empty()) d[i].src = as_ptr<const void>(srcs[i]);
    d[i].H = shapes[i][0];
    d[i].W = shapes[i][1];
    d[i].src_stride = shapes[i][2];
    d[i].OH = shapes[i][3];
    d[i].OW = shapes[i][4];
    d[i].top = shapes[i][5];
    d[i].left = shapes[i][6];
  }
  return d;
}

template <typename Fn>
void run_on_device(const char* op, int device, Fn&& fn) {
  std::string message;
  {
    py::gil_scoped_release release;
    DeviceGuard guard(device);
    if (!guard.error().empty()) {
      message = guard.error();
    } else {
      const char* err = fn();
      if (err != nullptr) message = err;
    }
  }
  if (!message.empty()) throw std::runtime_error(std::string("[") + op + "] " + message);
}

mmcore::cuda::ResizeBatch resize_batch(const std::vector<mmcore::cuda::ImageDesc>& d, int64_t C,
                                       const std::string& dtype, const std::string& filter, bool antialias) {
  mmcore::cuda::ResizeBatch p;
  p.images = d.data();
  p.count = static_cast<int64_t>(d.size());
  p.C = C;
  p.dtype = parse_enum("resize", "dtype", dtype, kImageDtypes);
  p.filter = to_filter("resize", filter);
  p.antialias = antialias;
  return p;
}

size_t resize_workspace(const std::vector<std::array<int64_t, 6>>& shapes, int64_t C, const std::string& dtype,
                        const std::string& filter, bool antialias) {
  const auto d = resize_descs({}, {}, shapes);
  const auto p = resize_batch(d, C, dtype, filter, antialias);
  size_t bytes = 0;
  const char* err = mmcore::cuda::resize_workspace(p, &bytes);
  if (err != nullptr) throw std::runtime_error(std::string("[resize] ") + err);
  return bytes;
}

void resize(const std::vector<uintptr_t>& srcs, const std::vector<uintptr_t>& dsts,
            const std::vector<std::array<int64_t, 6>>& shapes, int64_t C, const std::string& dtype,
            const std::string& filter, bool antialias, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream,
            int device) {
  const auto d = resize_descs(srcs, dsts, shapes);
  const auto p = resize_batch(d, C, dtype, filter, antialias);
  run_on_device("resize", device, [&] {
    return mmcore::cuda::resize(p, as_ptr<void>(workspace), workspace_bytes, reinterpret_cast<cudaStream_t>(stream));
  });
}

mmcore::cuda::PreprocessBatch preprocess_batch(const std::vector<mmcore::cuda::ImageDesc>& d, int64_t C, int64_t crop_h,
                                               int64_t crop_w, const std::string& filter, bool antialias,
                                               int64_t patch) {
  mmcore::cuda::PreprocessBatch p;
  p.images = d.data();
  p.count = static_cast<int64_t>(d.size());
  p.C = C;
  p.crop_h = crop_h;
  p.crop_w = crop_w;
  p.filter = to_filter("preprocess_image", filter);
  p.antialias = antialias;
  p.norm.patch = patch;
  return p;
}

size_t preprocess_image_workspace(const std::vector<std::array<int64_t, 7>>& shapes, int64_t C, int64_t crop_h,
                                  int64_t crop_w, const std::string& filter, bool antialias, int64_t patch) {
  const auto d = preprocess_descs({}, shapes);
  const auto p = preprocess_batch(d, C, crop_h, crop_w, filter, antialias, patch);
  size_t bytes = 0;
  const char* err = mmcore::cuda::preprocess_image_workspace(p, &bytes);
  if (err != nullptr) throw std::runtime_error(std::string("[preprocess_image] ") + err);
  return bytes;
}

void preprocess_image(const std::vector<uintptr_t>& srcs, const std::vector<std::array<int64_t, 7>>& shapes, int64_t C,
                      uintptr_t out, int64_t crop_h, int64_t crop_w, const std::string& filter, bool antialias,
                      uintptr_t mean, uintptr_t stdv, double scale, int64_t patch, uintptr_t workspace,
                      size_t workspace_bytes, uintptr_t stream, int device) {
  const auto d = preprocess_descs(srcs, shapes);
  auto p = preprocess_batch(d, C, crop_h, crop_w, filter, antialias, patch);
  p.out = as_ptr<float>(out);
  p.norm.mean = as_ptr<const float>(mean);
  p.norm.std = as_ptr<const float>(stdv);
  p.norm.scale = static_cast<float>(scale);
  run_on_device("preprocess_image", device, [&] {
    return mmcore::cuda::preprocess_image(p, as_ptr<void>(workspace), workspace_bytes,
                                          reinterpret_cast<cudaStream_t>(stream));
  });
}

void normalize(uintptr_t src, uintptr_t dst, int64_t N, int64_t H, int64_t W, int64_t C, const std::string& dtype,
               uintptr_t mean, uintptr_t stdv, double scale, const std::string& layout, uintptr_t stream, int device) {
  mmcore::cuda::NormalizeCall p;
  p.src = as_ptr<const void>(src);
  p.dtype = parse_enum("normalize", "dtype", dtype, kImageDtypes);
  p.dst = as_ptr<float>(dst);
  p.N = N;
  p.H = H;
  p.W = W;
  p.C = C;
  p.mean = as_ptr<const float>(mean);
  p.std = as_ptr<const float>(stdv);
  p.scale = static_cast<float>(scale);
  p.layout = parse_enum("normalize", "layout", layout, kImageLayouts);
  run_on_device("normalize", device,
                [&] { return mmcore::cuda::normalize(p, reinterpret_cast<cudaStream_t>(stream)); });
}

void patchify(uintptr_t src, uintptr_t dst, int64_t B, int64_t T, int64_t C, int64_t H, int64_t W, int64_t patch,
              int64_t temporal_patch, uintptr_t stream, int device) {
  mmcore::cuda::PatchifyCall p;
  p.src = as_ptr<const float>(src);
  p.dst = as_ptr<float>(dst);
  p.B = B;
  p.T = T;
  p.C = C;
  p.H = H;
  p.W = W;
  p.patch = patch;
  p.temporal_patch = temporal_patch;
  run_on_device("patchify", device, [&] { return mmcore::cuda::patchify(p, reinterpret_cast<cudaStream_t>(stream)); });
}

// ---- fusion reductions --------------------------------------------------------------------------

mmcore::MaskedReduceParams masked_params(uintptr_t x, uintptr_t mask, uintptr_t out, int64_t B, int64_t L, int64_t D) {
  mmcore::MaskedReduceParams p;
  p.x = as_ptr<const float>(x);
  p.mask = as_ptr<const uint8_t>(mask);
  p.out = as_ptr<float>(out);
  p.B = B;
  p.L = L;
  p.D = D;
  return p;
}

void masked_mean(uintptr_t x, uintptr_t mask, uintptr_t out, int64_t B, int64_t L, int64_t D, uintptr_t stream,
                 int device) {
  const auto p = masked_params(x, mask, out, B, L, D);
  run_on_device("masked_mean", device,
                [&] { return mmcore::cuda::masked_mean(p, reinterpret_cast<cudaStream_t>(stream)); });
}

void masked_max(uintptr_t x, uintptr_t mask, uintptr_t out, int64_t B, int64_t L, int64_t D, uintptr_t stream,
                int device) {
  const auto p = masked_params(x, mask, out, B, L, D);
  run_on_device("masked_max", device,
                [&] { return mmcore::cuda::masked_max(p, reinterpret_cast<cudaStream_t>(stream)); });
}

void fuse(uintptr_t emb, uintptr_t present, uintptr_t weights, bool weights_per_batch, uintptr_t query,
          bool query_per_batch, uintptr_t out, uintptr_t out_weights, int64_t B, int64_t M, int64_t D,
          const std::string& strategy, uintptr_t stream, int device) {
  mmcore::FuseParams p;
  p.emb = as_ptr<const float>(emb);
  p.present = as_ptr<const uint8_t>(present);
  p.weights = as_ptr<const float>(weights);
  p.weights_per_batch = weights_per_batch;
  p.query = as_ptr<const float>(query);
  p.query_per_batch = query_per_batch;
  p.out = as_ptr<float>(out);
  p.out_weights = as_ptr<float>(out_weights);
  p.B = B;
  p.M = M;
  p.D = D;
  p.strategy = parse_enum("fuse", "strategy", strategy, mmcore::bindings::kFuseStrategies);
  run_on_device("fuse", device, [&] { return mmcore::cuda::fuse(p, reinterpret_cast<cudaStream_t>(stream)); });
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "mmcore CUDA kernels (internal; use mmcore.ops)";

  m.def("device_info", &device_info,
        "CUDA runtime/driver versions and devices: {'devices': [{'index', 'name', "
        "'compute_capability', 'total_memory', 'multiprocessors'}], 'runtime_version', "
        "'driver_version', 'error'}. Never raises; 'error' says why CUDA is unusable (or None).");

  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("weights"),
        py::arg("lse"), py::arg("mask"), py::arg("mask_strides"), py::arg("bias"), py::arg("bias_strides"),
        py::arg("key_lengths"), py::arg("B"), py::arg("H"), py::arg("Lq"), py::arg("Lk"), py::arg("D"), py::arg("Dv"),
        py::arg("scale"), py::arg("dropout"), py::arg("seed"), py::arg("threshold"), py::arg("dropout_scale"),
        py::arg("dtype"), py::arg("stream"), py::arg("device") = -1,
        "Queue attention on `stream` (a cudaStream_t as int, 0 = legacy default stream) of "
        "`device` (-1 = the current device). Pointers are device addresses as ints (0 = null); "
        "strides are in elements over (B, H, Lq, Lk); dtype 'float32', 'float16' or 'bfloat16' "
        "(of q/k/v). "
        "Raises RuntimeError('[attention] ...') on invalid arguments or CUDA errors.");

  m.def("spectral", &spectral, py::arg("x"), py::arg("out"), py::arg("window"), py::arg("mel_start"),
        py::arg("mel_len"), py::arg("mel_offset"), py::arg("mel_weights"), py::arg("n_signals"), py::arg("T"),
        py::arg("n_fft"), py::arg("hop"), py::arg("frame_length"), py::arg("frame_offset"), py::arg("pad_left"),
        py::arg("pad_mode"), py::arg("n_frames"), py::arg("dither"), py::arg("seed"), py::arg("remove_dc"),
        py::arg("preemph"), py::arg("kind"), py::arg("power"), py::arg("n_mels"), py::arg("log_mode"),
        py::arg("log_floor"), py::arg("whisper_norm"), py::arg("stream"), py::arg("device") = -1,
        "Queue a short-time spectral call (see mmcore/spectral.h) on `stream` (a cudaStream_t "
        "as int, 0 = legacy default stream) of `device` (-1 = the current device). Pointers are "
        "device addresses as ints (0 = null; a null window is rectangular): x float32 (n_signals, "
        "T), out float32 (n_signals, rows, n_frames[, 2]), window float32 (frame_length,), "
        "mel_start/mel_len int32 and mel_offset int64 (n_mels,), mel_weights float32. "
        "pad_mode 'constant' or 'reflect'; kind 'complex' (interleaved pairs), 'power' or 'mel'; "
        "log_mode 'none', 'log10' or 'ln'. Raises RuntimeError('[spectral] ...') "
        "on invalid arguments or CUDA errors.");

  m.def("resize_workspace", &resize_workspace, py::arg("shapes"), py::arg("C"), py::arg("dtype"), py::arg("filter"),
        py::arg("antialias"),
        "Bytes of device workspace that resize needs for images with `shapes`, a list of "
        "(H, W, src_stride, OH, OW, dst_stride) (strides in elements). dtype 'uint8' or "
        "'float32'; filter 'nearest', 'bilinear', 'bicubic' or 'lanczos'.");

  m.def("resize", &resize, py::arg("srcs"), py::arg("dsts"), py::arg("shapes"), py::arg("C"), py::arg("dtype"),
        py::arg("filter"), py::arg("antialias"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        py::arg("device") = -1,
        "Queue a Pillow-convention resize of each srcs[i] (H, W, C) into dsts[i] (OH, OW, C) on "
        "`stream` of `device` (-1 = the current device). Pointers are device addresses as ints; "
        "shapes as for resize_workspace; the workspace (16-byte aligned, at least "
        "resize_workspace(...) bytes) must stay allocated until the stream has run the call. "
        "Raises RuntimeError('[resize] ...') on invalid arguments or CUDA errors.");

  m.def("preprocess_image_workspace", &preprocess_image_workspace, py::arg("shapes"), py::arg("C"), py::arg("crop_h"),
        py::arg("crop_w"), py::arg("filter"), py::arg("antialias"), py::arg("patch"),
        "Bytes of device workspace that preprocess_image needs for images with `shapes`, a list "
        "of (H, W, src_stride, resize_h, resize_w, top, left).");

  m.def("preprocess_image", &preprocess_image, py::arg("srcs"), py::arg("shapes"), py::arg("C"), py::arg("out"),
        py::arg("crop_h"), py::arg("crop_w"), py::arg("filter"), py::arg("antialias"), py::arg("mean"), py::arg("std"),
        py::arg("scale"), py::arg("patch"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        py::arg("device") = -1,
        "Queue the fused preprocess of uint8 images srcs[i] (H, W, C): Pillow-convention resize "
        "to (resize_h, resize_w), the crop window [top, top + crop_h) x [left, left + crop_w) "
        "(0 outside the resized image), then (v * scale - mean[c]) / std[c] into out float32 "
        "(N, C, crop_h, crop_w), or (N, crop_h/p * crop_w/p, C * p * p) patches when patch > 0. "
        "mean and std are device float32 arrays of C values. Raises "
        "RuntimeError('[preprocess_image] ...') on invalid arguments or CUDA errors.");

  m.def("normalize", &normalize, py::arg("src"), py::arg("dst"), py::arg("N"), py::arg("H"), py::arg("W"), py::arg("C"),
        py::arg("dtype"), py::arg("mean"), py::arg("std"), py::arg("scale"), py::arg("layout"), py::arg("stream"),
        py::arg("device") = -1,
        "Queue (x * scale - mean[c]) / std[c] of a contiguous (N, H, W, C) uint8 or float32 "
        "(dtype 'uint8' / 'float32') batch into float32 dst laid out (N, C, H, W) (layout "
        "'chw') or (N, H, W, C) (layout 'hwc'). Raises RuntimeError('[normalize] ...') on invalid arguments "
        "or CUDA errors.");

  m.def("patchify", &patchify, py::arg("src"), py::arg("dst"), py::arg("B"), py::arg("T"), py::arg("C"), py::arg("H"),
        py::arg("W"), py::arg("patch"), py::arg("temporal_patch"), py::arg("stream"), py::arg("device") = -1,
        "Queue the patch split of a contiguous float32 (B, T, C, H, W) array into dst "
        "(B, T/tp * H/p * W/p, C * tp * p * p): patches t-major then row-major, each flattened "
        "(c, t, py, px). Raises RuntimeError('[patchify] ...') on invalid arguments or CUDA "
        "errors.");

  m.def("masked_mean", &masked_mean, py::arg("x"), py::arg("mask"), py::arg("out"), py::arg("B"), py::arg("L"),
        py::arg("D"), py::arg("stream"), py::arg("device") = -1,
        "Queue the masked mean over tokens on `stream` (a cudaStream_t as int, 0 = legacy "
        "default stream) of `device` (-1 = the current device): x float32 (B, L, D) and mask "
        "uint8 / bool (B, L) (0 = null: every token is real) contiguous, out float32 (B, D); a "
        "row without real tokens gives zeros. Pointers are device addresses as ints. Raises "
        "RuntimeError('[masked_mean] ...') on invalid arguments or CUDA errors.");

  m.def("masked_max", &masked_max, py::arg("x"), py::arg("mask"), py::arg("out"), py::arg("B"), py::arg("L"),
        py::arg("D"), py::arg("stream"), py::arg("device") = -1,
        "Queue the masked elementwise maximum over tokens (NaN propagates; a row without real "
        "tokens gives zeros); arguments as for masked_mean. Raises "
        "RuntimeError('[masked_max] ...') on invalid arguments or CUDA errors.");

  m.def("fuse", &fuse, py::arg("emb"), py::arg("present"), py::arg("weights"), py::arg("weights_per_batch"),
        py::arg("query"), py::arg("query_per_batch"), py::arg("out"), py::arg("out_weights"), py::arg("B"),
        py::arg("M"), py::arg("D"), py::arg("strategy"), py::arg("stream"), py::arg("device") = -1,
        "Queue a fusion over modalities (see mmcore/fusion.h) on `stream` of `device` (-1 = the "
        "current device). emb float32 (B, M, D), present uint8 / bool (B, M) (0 = all present), "
        "weights float32 (B, M) or (M,) (weights_per_batch false), query float32 (B, D) or (D,) "
        "(query_per_batch false), out float32 (B, M * D) for concat else (B, D), out_weights "
        "float32 (B, M) or 0 (written by weighted and attention only), all contiguous device "
        "addresses as ints. strategy 'concat', 'mean', 'sum', 'max', 'weighted' or "
        "'attention'. Raises RuntimeError('[fuse] ...') on invalid arguments or CUDA errors.");
}
