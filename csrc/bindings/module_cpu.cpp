// pybind11 bindings of the CPU kernels: mmcore._C. Argument checks that matter to users live in
// mmcore/ops; here we only guard the memory contract (dtype, contiguity, shapes) so that a
// wrong call can never read or write out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "mmcore/cpu_features.h"
#include "mmcore/kernels.h"
#include "mmcore/parallel.h"

namespace py = pybind11;

namespace {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

template <class T>
T* checked(const char* op, const char* name, py::object obj, const Shape& shape, bool writable,
           bool contiguous = true, int64_t* strides = nullptr) {
  if (obj.is_none()) return nullptr;
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string("[") + op + "] " + name + " must be a numpy array");
  py::array a = obj.cast<py::array>();
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string("[") + op + "] " + name + " has dtype " + std::string(py::str(a.dtype())) +
                         ", expected " + std::string(py::str(py::dtype::of<T>())));
  Shape got(a.shape(), a.shape() + a.ndim());
  if (got != shape)
    throw py::value_error(std::string("[") + op + "] " + name + " has shape " + shape_str(got) + ", expected " +
                          shape_str(shape));
  if (contiguous && !(a.flags() & py::array::c_style))
    throw py::value_error(std::string("[") + op + "] " + name + " must be C-contiguous");
  if (writable && !a.writeable()) throw py::value_error(std::string("[") + op + "] " + name + " must be writable");
  if (strides) {
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
      if (a.strides(d) % static_cast<py::ssize_t>(sizeof(T)) != 0)
        throw py::value_error(std::string("[") + op + "] " + name + " has unaligned strides");
      strides[d] = a.strides(d) / static_cast<py::ssize_t>(sizeof(T));
    }
  }
  return static_cast<T*>(const_cast<void*>(a.data()));
}

void attention(py::object q, py::object k, py::object v, py::object out, py::object weights, py::object lse,
               py::object mask, py::object bias, py::object key_lengths, double scale, bool dropout,
               uint64_t seed, uint32_t threshold, double dropout_scale, int num_threads) {
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
  p.q = checked<float>(op, "q", q, {p.B, p.H, p.Lq, p.D}, false);
  p.k = checked<float>(op, "k", k, {p.B, p.H, p.Lk, p.D}, false);
  p.v = checked<float>(op, "v", v, {p.B, p.H, p.Lk, p.Dv}, false);
  p.out = checked<float>(op, "out", out, {p.B, p.H, p.Lq, p.Dv}, true);
  if (!p.out && p.B * p.H * p.Lq * p.Dv > 0) throw py::value_error("[attention] out is required");
  p.weights = checked<float>(op, "weights", weights, {p.B, p.H, p.Lq, p.Lk}, true);
  p.lse = checked<float>(op, "lse", lse, {p.B, p.H, p.Lq}, true);
  const Shape full{p.B, p.H, p.Lq, p.Lk};
  p.mask = reinterpret_cast<const uint8_t*>(checked<bool>(op, "mask", mask, full, false, false, p.mask_strides));
  p.bias = checked<float>(op, "bias", bias, full, false, false, p.bias_strides);
  p.key_lengths = checked<int64_t>(op, "key_lengths", key_lengths, {p.B}, false);
  if (p.key_lengths)
    for (int64_t b = 0; b < p.B; ++b)
      if (p.key_lengths[b] < 0 || p.key_lengths[b] > p.Lk)
        throw py::value_error("[attention] key_lengths must lie in [0, Lk]");
  p.scale = static_cast<float>(scale);
  p.dropout = dropout;
  p.seed = seed;
  p.dropout_threshold = threshold;
  p.dropout_scale = static_cast<float>(dropout_scale);
  p.num_threads = num_threads < 1 ? 1 : num_threads;
  py::gil_scoped_release release;
  mmcore::attention_cpu(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmcore native CPU kernels (internal; use mmcore.ops)";
#ifdef MMCORE_VERSION
  m.attr("__version__") = MMCORE_VERSION;
#endif
  m.def("isa_level", []() { return std::string(mmcore::isa_name(mmcore::active_isa())); },
        "Instruction-set level the kernels run at: baseline, avx2 or avx512.");
  m.def("compiled_isas", &mmcore::compiled_isas);
  m.def("cpu_features", &mmcore::cpu_feature_list);
  m.def("set_isa_cap", &mmcore::set_isa_cap, py::arg("name"),
        "Cap the instruction-set level (tests, benchmarks); returns False if not available.");
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("weights"),
        py::arg("lse"), py::arg("mask"), py::arg("bias"), py::arg("key_lengths"), py::arg("scale"),
        py::arg("dropout"), py::arg("seed"), py::arg("threshold"), py::arg("dropout_scale"),
        py::arg("num_threads"));
}
