// mlx_rmsprop::worker_pool_misruns (worker_pool_check.h, included with worker_pool.h from the
// directory the test gives) over the pool tests' jobs; exits non-zero when a part did not run
// exactly once before its job returned. Built with ThreadSanitizer by the test.
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "worker_pool_check.h"

int main() {
  using mlx_rmsprop::worker_pool_misruns;
  int64_t count = 0;
  // Back to back: workers still claiming from one job meet the next one's ticket.
  for (int parts : {2, 3, 7, 64, 1000}) {
    count += worker_pool_misruns(2000, parts);
  }
  // Past the ticket's range: consecutive batches.
  count += worker_pool_misruns(2, (1 << 20) + 5);
  // Concurrent callers: the ones that find the pool owned run their parts themselves.
  std::vector<int64_t> concurrent(3, 0);
  std::vector<std::thread> callers;
  for (size_t i = 0; i < concurrent.size(); ++i) {
    callers.emplace_back([&concurrent, i] { concurrent[i] = worker_pool_misruns(300, 16); });
  }
  for (auto& caller : callers) {
    caller.join();
  }
  for (int64_t caller_count : concurrent) {
    count += caller_count;
  }
  // After the pool has gone to sleep: workers woken through the condition variable.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  count += worker_pool_misruns(20, 5);
  std::printf("misruns %lld\n", static_cast<long long>(count));
  return count == 0 ? 0 : 1;
}
