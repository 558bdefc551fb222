// The library's own thread pool.
//
// Why not OpenMP: an OpenMP barrier waits for every thread of the team to arrive, so on a
// machine shared with other thread pools (a PyTorch process next door, a server's worker
// threads) one descheduled thread stalls the whole call, and libgomp is not usable in a child
// after fork(). Here the caller takes part in its own job and only waits for tasks that another
// thread has actually started; a worker that wakes up late finds no work left. After fork() the
// child starts with a fresh, empty pool.

#include "mmcore/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace mmcore {

namespace {

struct Job {
  const std::function<void(int64_t, int)>* fn = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex error_mutex;
  std::exception_ptr error;
  // The caller sleeps on done_cv once its bounded spin is over; the thread that finishes the
  // last task wakes it.
  std::mutex done_mutex;
  std::condition_variable done_cv;

  // Runs tasks until none is left; returns after the last task this thread took has finished.
  void work(int tid) {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      try {
        (*fn)(i, tid);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        std::lock_guard<std::mutex> lock(done_mutex);
        done_cv.notify_all();
      }
    }
  }

  // Returns once every task has finished: a short spin (tasks still running on other threads
  // usually end within microseconds), then sleep, so that a waiting caller never takes a core
  // from another runtime's threads (PyTorch's OpenMP team, a server's workers) for long.
  void wait_all() {
    for (int spins = 0; spins < kSpins; ++spins) {
      if (done.load(std::memory_order_acquire) >= n) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    std::unique_lock<std::mutex> lock(done_mutex);
    done_cv.wait(lock, [&] { return done.load(std::memory_order_acquire) >= n; });
  }

  static constexpr int kSpins = 2000;  // pause instructions, some microseconds
};

class Pool {
 public:
  // Runs job on the caller plus up to helpers pool threads.
  void run(Job& job, int helpers) {
    ensure_workers(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      wanted_ = helpers;
      ++generation_;
    }
    cv_.notify_all();
    job.work(0);
    job.wait_all();  // tasks still running on other threads
    {
      // Detach the job so that a late worker cannot touch it after we return.
      std::unique_lock<std::mutex> lock(mutex_);
      job_ = nullptr;
      idle_cv_.wait(lock, [&] { return active_ == 0; });
    }
  }

  static Pool& instance();
  static void reset_after_fork();

 private:
  void ensure_workers(int count) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_.size()) < count) {
      const int tid = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, tid] { loop(tid); });
      workers_.back().detach();
    }
  }

  void loop(int tid) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      cv_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (job_ == nullptr || tid > wanted_) continue;
      Job* job = job_;
      ++active_;
      lock.unlock();
      job->work(tid);
      lock.lock();
      if (--active_ == 0) idle_cv_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_, idle_cv_;
  std::vector<std::thread> workers_;
  Job* job_ = nullptr;
  int wanted_ = 0;
  int active_ = 0;
  uint64_t generation_ = 0;
};

Pool* g_pool = nullptr;
std::mutex g_pool_mutex;  // one job at a time; a concurrent caller runs its job inline

void child_after_fork() {
  // The parent's worker threads do not exist in the child; leak the old pool (its mutexes may
  // be in any state) and let the child build a new one on demand.
  g_pool = nullptr;
  new (&g_pool_mutex) std::mutex();
}

Pool& get_pool() {
  static bool registered = [] {
    pthread_atfork(nullptr, nullptr, child_after_fork);
    return true;
  }();
  (void)registered;
  if (!g_pool) g_pool = new Pool();
  return *g_pool;
}

}  // namespace

int max_threads() {
  static const int cap = [] {
    const unsigned cpus = std::thread::hardware_concurrency();  // 0 when unknown
    return kThreadsPerCpu * static_cast<int>(std::min(std::max(cpus, 1u), 1u << 16));
  }();
  return cap;
}

void parallel_for(int64_t n, int num_threads, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  // Pool threads live as long as the process: never start more than the cap, whatever count
  // the caller passes (mmcore.set_num_threads refuses such counts already).
  const int nt = static_cast<int>(std::min<int64_t>({std::max(num_threads, 1), n, max_threads()}));
  Job job;
  job.fn = &fn;
  job.n = n;
  std::unique_lock<std::mutex> lock(g_pool_mutex, std::defer_lock);
  if (nt > 1 && lock.try_lock()) {
    get_pool().run(job, nt - 1);
  } else {
    job.work(0);
  }
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace mmcore
