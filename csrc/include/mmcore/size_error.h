// The one exception the framework-free kernels throw on purpose: a size they cannot handle
// (a scratch table beyond the kernel's memory budget, an index beyond what the arithmetic
// holds). The bindings turn it into mmcore.errors.ShapeError, prefixed with the op's name.
#pragma once
#include <cstdio>
#include <stdexcept>
#include <string>

namespace mmcore {

class SizeError : public std::length_error {
 public:
  using std::length_error::length_error;
};

// Human-readable byte count ("64.0 GiB") for the messages of SizeError.
inline std::string bytes_str(double bytes) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 6) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[64];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

}  // namespace mmcore
