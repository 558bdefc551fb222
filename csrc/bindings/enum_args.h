// How the bindings take enum arguments: every enum crosses from Python as its name, a str
// ("bicubic", "reflect", "gelu", ...), and parse_enum maps it to the C++ value through one
// table per enum, listed here (the CUDA-only ones in module_cuda.cpp). An unknown name raises
// ValueError "[op] arg must be one of 'a', 'b'; got 'x'". Binding code only: no kernel
// includes this.
#pragma once
#include <cstddef>
#include <stdexcept>
#include <string>

#include "mmcore/fusion.h"
#include "mmcore/image.h"
#include "mmcore/linear.h"
#include "mmcore/spectral.h"

namespace mmcore {
namespace bindings {

template <class E>
struct EnumName {
  const char* name;
  E value;
};

// The value named `value` in `names`; std::invalid_argument (Python: ValueError) otherwise.
template <class E, std::size_t N>
E parse_enum(const char* op, const char* arg, const std::string& value, const EnumName<E> (&names)[N]) {
  for (const EnumName<E>& n : names)
    if (value == n.name) return n.value;
  std::string msg = std::string("[") + op + "] " + arg + " must be one of ";
  for (std::size_t i = 0; i < N; ++i) msg += (i ? ", '" : "'") + std::string(names[i].name) + "'";
  throw std::invalid_argument(msg + "; got '" + value + "'");
}

inline constexpr EnumName<ResizeFilter> kResizeFilters[] = {{"nearest", ResizeFilter::nearest},
                                                            {"bilinear", ResizeFilter::bilinear},
                                                            {"bicubic", ResizeFilter::bicubic},
                                                            {"lanczos", ResizeFilter::lanczos}};

inline constexpr EnumName<PadMode> kPadModes[] = {{"constant", PadMode::constant}, {"reflect", PadMode::reflect}};

inline constexpr EnumName<SpectralKind> kSpectralKinds[] = {
    {"complex", SpectralKind::complex_stft}, {"power", SpectralKind::power}, {"mel", SpectralKind::mel}};

inline constexpr EnumName<LogMode> kLogModes[] = {
    {"none", LogMode::none}, {"log10", LogMode::log10}, {"ln", LogMode::ln}};

inline constexpr EnumName<FuseStrategy> kFuseStrategies[] = {
    {"concat", FuseStrategy::concat}, {"mean", FuseStrategy::mean},         {"sum", FuseStrategy::sum},
    {"max", FuseStrategy::max},       {"weighted", FuseStrategy::weighted}, {"attention", FuseStrategy::attention}};

inline constexpr EnumName<Activation> kActivations[] = {{"none", Activation::none},
                                                        {"gelu", Activation::gelu},
                                                        {"gelu_tanh", Activation::gelu_tanh},
                                                        {"quick_gelu", Activation::quick_gelu},
                                                        {"relu", Activation::relu}};

inline constexpr EnumName<WeightKind> kWeightKinds[] = {{"float32", WeightKind::f32},
                                                        {"float16", WeightKind::f16},
                                                        {"bfloat16", WeightKind::bf16},
                                                        {"int8", WeightKind::i8}};

inline constexpr EnumName<Precision> kPrecisions[] = {
    {"highest", Precision::highest}, {"bf16", Precision::bf16}, {"int8", Precision::int8}};

}  // namespace bindings
}  // namespace mmcore
