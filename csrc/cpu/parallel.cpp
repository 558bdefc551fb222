#include "mmcore/parallel.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(MMCORE_HAVE_OPENMP)
#include <omp.h>
#endif

namespace mmcore {

bool has_openmp() {
#if defined(MMCORE_HAVE_OPENMP)
  return true;
#else
  return false;
#endif
}

void parallel_for(int64_t n, int num_threads, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  int nt = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), n));
  if (nt == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](int64_t i, int tid) {
    try {
      fn(i, tid);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
#if defined(MMCORE_HAVE_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) guarded(i, omp_get_thread_num());
#else
  std::atomic<int64_t> next{0};
  std::vector<std::thread> workers;
  auto work = [&](int tid) {
    for (int64_t i = next++; i < n; i = next++) guarded(i, tid);
  };
  for (int t = 1; t < nt; ++t) workers.emplace_back(work, t);
  work(0);
  for (auto& w : workers) w.join();
#endif
  if (error) std::rethrow_exception(error);
}

}  // namespace mmcore
