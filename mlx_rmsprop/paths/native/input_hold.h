// Keeping a node's input alive for its task without pinning it against donation.
//
// After a primitive's eval_cpu, MLX holds the data of every input until the task has run, so a
// later node on the same stream cannot take that input's buffer over (array::is_donatable needs
// the only reference). The statistics pass reads each accumulator that the accumulating update
// then rewrites: pinned that way, the update would write a fresh buffer every step (at 2^24
// float32 elements, a page-faulting 64 MiB allocation and a copy). Instead the statistics node
// holds each accumulator through an InputHold, which the update releases when it runs: the
// buffer stays alive (the update holds it, in place or as an input, until its own task, which
// the stream runs after the statistics task), and if no update ever runs, the hold keeps it
// until the statistics task is done.
#pragma once

#include <memory>
#include <mutex>
#include <unordered_map>

#include "mlx/array.h"

namespace mlx_rmsprop {

namespace mx = mlx::core;

class InputHold {
 public:
  // Holds `input`'s data for a task on stream `stream` (Stream::index);
  // InputHold::release(input, stream) drops the hold. A second hold on data already held is
  // not registered: it keeps the data until it is destroyed (no in-place update then).
  InputHold(const mx::array& input, int stream)
      : key_(input.data_shared_ptr().get()), stream_(stream), data_(input.data_shared_ptr()) {
    std::lock_guard<std::mutex> lock(registry_mutex());
    registry().emplace(key_, this);
  }
  ~InputHold() {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto found = registry().find(key_);
    if (found != registry().end() && found->second == this) {
      registry().erase(found);
    }
  }
  InputHold(const InputHold&) = delete;
  InputHold& operator=(const InputHold&) = delete;

  // Drops the hold on `input`'s data, if a live InputHold has one for a task on `stream`. The
  // caller must itself hold `input` (so the data outlives the release) and depend on the
  // holder's output, so that its task runs after the holder's on that stream; on another
  // stream the hold stays (the tasks' order there is not known).
  static void release(const mx::array& input, int stream) {
    std::shared_ptr<mx::array::Data> dropped;
    {
      std::lock_guard<std::mutex> lock(registry_mutex());
      auto found = registry().find(input.data_shared_ptr().get());
      if (found == registry().end() || found->second->stream_ != stream) {
        return;
      }
      dropped = std::move(found->second->data_);
      registry().erase(found);
    }
    // `dropped` goes out of scope here: `input` still holds the data.
  }

 private:
  // Never destroyed: a hold may be dropped at exit, by a task MLX's stream thread still runs
  // after static destructors (MLX leaks its scheduler for the same reason).
  static std::unordered_map<const mx::array::Data*, InputHold*>& registry() {
    static auto* holds = new std::unordered_map<const mx::array::Data*, InputHold*>();
    return *holds;
  }
  static std::mutex& registry_mutex() {
    static auto* mutex = new std::mutex();
    return *mutex;
  }

  const mx::array::Data* key_;
  int stream_;
  std::shared_ptr<mx::array::Data> data_;
};

} // namespace mlx_rmsprop
