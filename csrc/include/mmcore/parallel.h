// A parallel-for over task indices on the library's own thread pool (see parallel.cpp).
#pragma once
#include <cstdint>
#include <functional>

namespace mmcore {

// The thread cap: at most kThreadsPerCpu threads per CPU (std::thread::hardware_concurrency,
// taken as 1 when unknown). The same cap as mmcore._backend.max_num_threads().
constexpr int kThreadsPerCpu = 8;
int max_threads();

// Runs fn(task, thread_id) for task in [0, n) on at most min(num_threads, max_threads())
// threads, with dynamic scheduling (tasks may have uneven cost); thread_id < that count. Runs
// inline when n or num_threads is 1.
void parallel_for(int64_t n, int num_threads, const std::function<void(int64_t, int)>& fn);

}  // namespace mmcore
