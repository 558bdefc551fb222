// A parallel-for over task indices on the library's own thread pool (see parallel.cpp).
#pragma once
#include <cstdint>
#include <functional>

namespace mmcore {

// Runs fn(task, thread_id) for task in [0, n) on at most num_threads threads, with dynamic
// scheduling (tasks may have uneven cost). Runs inline when n or num_threads is 1.
void parallel_for(int64_t n, int num_threads, const std::function<void(int64_t, int)>& fn);

}  // namespace mmcore
