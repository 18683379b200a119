// Runs jobs on mlx_rmsprop::WorkerPool (worker_pool.h, included from the directory the test
// gives) and exits non-zero when a part did not run exactly once before its job returned.
// Parts write plain ints, not atomics: under ThreadSanitizer, a part whose writes are not
// ordered before its job's return is also reported as a data race.
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "worker_pool.h"

namespace {

long misruns(int jobs, int parts) {
  std::vector<int> runs(static_cast<size_t>(parts), 0);
  long count = 0;
  for (int job = 1; job <= jobs; ++job) {
    mlx_rmsprop::WorkerPool::instance().run(parts, [&](int part) { runs[part] += 1; });
    for (int runs_of_part : runs) {
      count += runs_of_part != job;
    }
  }
  return count;
}

} // namespace

int main() {
  long count = 0;
  // Back to back: workers still claiming from one job meet the next one's ticket.
  for (int parts : {2, 3, 7, 64, 1000}) {
    count += misruns(2000, parts);
  }
  // Past the ticket's range: consecutive batches.
  count += misruns(2, (1 << 20) + 5);
  // Concurrent callers: the ones that find the pool owned run their parts themselves.
  std::vector<long> concurrent(3, 0);
  std::vector<std::thread> callers;
  for (size_t i = 0; i < concurrent.size(); ++i) {
    callers.emplace_back([&concurrent, i] { concurrent[i] = misruns(300, 16); });
  }
  for (auto& caller : callers) {
    caller.join();
  }
  for (long caller_count : concurrent) {
    count += caller_count;
  }
  // After the pool has gone to sleep: workers woken through the condition variable.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  count += misruns(20, 5);
  std::printf("misruns %ld\n", count);
  return count == 0 ? 0 : 1;
}
