// A check of WorkerPool's contract, run by the module's `worker_pool_misruns` and, compiled
// alone under ThreadSanitizer, by tests/support/worker_pool_race.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "worker_pool.h"

namespace mlx_rmsprop {

// Runs `jobs` jobs of `parts` trivial parts on the pool, back to back; returns how often a
// part had not run exactly once when its job returned. Each part counts its runs in its own
// plain int: a part of a later job that ran during an earlier one, or twice, or never, shows
// as a count that is not the job number, and under ThreadSanitizer a part whose write is not
// ordered before its job's return is also reported as a data race.
inline int64_t worker_pool_misruns(int jobs, int parts) {
  std::vector<int> runs(static_cast<size_t>(parts), 0);
  int64_t misruns = 0;
  for (int job = 1; job <= jobs; ++job) {
    WorkerPool::instance().run(parts, [&](int part) { runs[part] += 1; });
    for (int runs_of_part : runs) {
      misruns += runs_of_part != job;
    }
  }
  return misruns;
}

} // namespace mlx_rmsprop
