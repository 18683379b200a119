// A fixed set of worker threads that split one large element loop across the cores.
//
// MLX runs a CPU stream's tasks on one thread; a large update left there is bound by one core.
// The stream thread hands parts of the range to these workers and runs a part itself.
//
// Waking a sleeping worker costs a futex wake and a reschedule (tens of microseconds, more on
// a busy machine), paid on every medium tensor (>= kParallelThreshold elements) of a step:
// the 7B LoRA tree's 448 adapters took 27-31% longer than with a worker still awake. So a
// worker that finishes a job spins for a bounded time (kSpinTime) before it sleeps on the
// condition variable, and the caller spins as long for the last part: the tensors of one
// step come back to back and find it awake, while an idle pool sleeps after kSpinTime.
//
// A job ends when its last part has finished; nothing waits for the workers to let go of it.
// Waiting for that (a mutex and a condition variable per job) put the stream thread to sleep
// 54-70 times per step of that tree; without it, 8-22 times, and the step's evaluation takes
// about 8% less (docs/benchmarks.md, "The worker pool").
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace mlx_rmsprop {

// Cores this process may run on (the affinity mask on Linux, else all online cores).
inline int usable_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int count = CPU_COUNT(&set);
    if (count > 0) {
      return count;
    }
  }
#endif
  unsigned count = std::thread::hardware_concurrency();
  return count == 0 ? 1 : static_cast<int>(count);
}

// Tells a spinning core that it waits (frees the pipeline for a sibling hyperthread).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// How long a worker waits awake for the next job, and the caller for its workers' parts,
// before sleeping. Long enough to span the gap between two tensors' updates of one step
// (the stream thread evaluates them back to back: a few microseconds), short enough that a
// pool between steps sleeps almost at once: at most this much CPU time per job per worker.
constexpr std::chrono::microseconds kSpinTime{200};

class WorkerPool {
 public:
  // The process-wide pool with one thread per usable core minus the caller's. Never
  // destroyed: its threads wait until the process exits, so no exit-time join can hang.
  static WorkerPool& instance() {
    static WorkerPool* pool = new WorkerPool(usable_cores() - 1);
    return *pool;
  }

  // Runs part(0) ... part(parts - 1) and returns when all are done. The caller runs parts
  // too; when another caller already owns the workers (two streams at once) or the pool was
  // inherited through fork() (its threads do not exist in the child), the caller runs all.
  void run(int parts, const std::function<void(int)>& part) {
    std::unique_lock<std::mutex> owner(owner_mutex_, std::try_to_lock);
    if (!owner.owns_lock() || workers_.empty() || parts <= 1 || forked()) {
      for (int i = 0; i < parts; ++i) {
        part(i);
      }
      return;
    }
    if (parts <= kMaxParts) {
      run_batch(parts, part);
      return;
    }
    for (int base = 0; base < parts; base += kMaxParts) {
      run_batch(std::min(kMaxParts, parts - base), [&](int i) { part(base + i); });
    }
  }

  int threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // Workers blocked on the condition variable now (not spinning, not working): all of them
  // once the pool has been idle for longer than kSpinTime.
  int sleeping() const {
    return sleeping_.load(std::memory_order_relaxed);
  }

  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

 private:
  // The ticket packs a job's generation, its number of parts and the next unclaimed part, so
  // that one fetch_add both claims a part and says which job it belongs to: a worker never
  // reads state of a job that has ended, and the caller never waits for workers to let go.
  static constexpr int kIndexBits = 20;
  // Every thread claims at most twice past a job's last part (once per look at the ticket),
  // so the index never carries into the parts field.
  static constexpr int kMaxParts = (1 << kIndexBits) - 4096;
  static constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;

  explicit WorkerPool(int workers) : owner_pid_(process_id()) {
    for (int i = 0; i < workers; ++i) {
      workers_.emplace_back([this] { serve(); });
    }
  }

  static int64_t process_id() {
#if defined(__unix__) || defined(__APPLE__)
    return static_cast<int64_t>(getpid());
#else
    return 0;
#endif
  }

  bool forked() const {
    return process_id() != owner_pid_;
  }

  // Spins until `ready()` or kSpinTime has passed; returns whether it became ready.
  template <typename Ready>
  static bool spin_until(Ready ready) {
    const auto until = std::chrono::steady_clock::now() + kSpinTime;
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        if (ready()) {
          return true;
        }
        cpu_relax();
      }
      if (std::chrono::steady_clock::now() >= until) {
        return ready();
      }
    }
  }

  static uint64_t generation_of(uint64_t ticket) {
    return ticket >> (2 * kIndexBits);
  }

  void run_batch(int parts, const std::function<void(int)>& part) {
    finished_.store(0, std::memory_order_relaxed);
    part_.store(&part, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const uint64_t generation = generation_of(ticket_.load(std::memory_order_relaxed)) + 1;
      ticket_.store(
          (generation << (2 * kIndexBits)) | (uint64_t(parts) << kIndexBits),
          std::memory_order_release);
    }
    wake_.notify_all();
    claim_parts();
    if (!spin_until([&] { return finished_.load(std::memory_order_acquire) == parts; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return finished_.load(std::memory_order_acquire) == parts; });
    }
  }

  // Claims and runs parts of the current job until none is left. A claim is one fetch_add on
  // the ticket; the job it names stays alive until its last part has finished, because the
  // caller waits for that.
  void claim_parts() {
    for (;;) {
      const uint64_t ticket = ticket_.fetch_add(1, std::memory_order_acq_rel);
      const int index = static_cast<int>(ticket & kIndexMask);
      const int parts = static_cast<int>((ticket >> kIndexBits) & kIndexMask);
      if (index >= parts) {
        return;
      }
      (*part_.load(std::memory_order_relaxed))(index);
      if (finished_.fetch_add(1, std::memory_order_acq_rel) + 1 == parts) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_all();
      }
    }
  }

  void serve() {
    uint64_t seen = 0;
    const auto fresh = [&] {
      return generation_of(ticket_.load(std::memory_order_acquire)) != seen;
    };
    for (;;) {
      if (!spin_until(fresh)) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1, std::memory_order_relaxed);
        wake_.wait(lock, fresh);
        sleeping_.fetch_sub(1, std::memory_order_relaxed);
      }
      seen = generation_of(ticket_.load(std::memory_order_acquire));
      claim_parts();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex owner_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  // Generation (high bits), parts and next part index of the current job.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<const std::function<void(int)>*> part_{nullptr};
  std::atomic<int> finished_{0};
  std::atomic<int> sleeping_{0};
  const int64_t owner_pid_;
};

} // namespace mlx_rmsprop
