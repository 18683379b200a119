// Threadgroups with real barrier semantics for the CPU emulation of the kernels (Metal shim and
// CUDA host shim): every thread of a group is a fiber (ucontext) on one OS thread. A fiber runs
// until it reaches a barrier, where it hands control back to the group's scheduler; the
// scheduler resumes the group only once every one of its threads waits at the barrier, and
// reports a group in which some threads ended while others wait (a barrier not reached by the
// whole group: undefined behaviour on a GPU). Between two barriers the threads run one after
// another, in increasing or decreasing order (`order`), so a thread that reads threadgroup
// memory another thread writes in the same phase sees the old contents in one of the two
// orders: a missing barrier changes the result.
//
// Threadgroup memory: each shim declares `threadgroup` / `__shared__` variables
// `static thread_local`, one instance per OS thread, which all fibers of the group share (a
// group runs on one OS thread, groups one after another). A thread that reads it too early
// sees what an earlier group (or nothing: zeros) left there.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace mlx_rmsprop_emulation {

enum class FiberState { kReady, kAtBarrier, kDone };

struct GroupRun {
  std::vector<ucontext_t> fibers;
  std::vector<FiberState> states;
  ucontext_t scheduler;
  int current = -1;
  void (*body)(int thread, void* context) = nullptr;
  void* context = nullptr;
};

// The group this OS thread runs, or null outside run_group (a barrier there is an error).
inline thread_local GroupRun* current_group = nullptr;
// Errors of this OS thread since the last reset: bit 0 a barrier outside a threadgroup run,
// bit 1 threads of a group ending while others wait at a barrier.
inline thread_local int errors = 0;

inline void barrier() {
  // The compiler must not keep threadgroup memory in registers across the switch.
  __asm__ volatile("" ::: "memory");
  GroupRun* group = current_group;
  if (group == nullptr || group->current < 0) {
    errors |= 1;
    return;
  }
  const int thread = group->current;
  group->states[thread] = FiberState::kAtBarrier;
  swapcontext(&group->fibers[thread], &group->scheduler);
  __asm__ volatile("" ::: "memory");
}

inline void fiber_entry() {
  GroupRun* group = current_group;
  const int thread = group->current;
  group->body(thread, group->context);
  group->states[thread] = FiberState::kDone;
  // Returning switches to uc_link, the scheduler.
}

// Runs `threads` threads of one group: body(thread, context) for thread 0 .. threads - 1, as
// fibers with the barrier semantics above. `order` 0 resumes them in increasing order, 1 in
// decreasing order. Returns false if the group's threads diverged at a barrier.
inline bool run_group(int threads, void (*body)(int, void*), void* context, int order) {
  constexpr size_t kStack = 256 * 1024;
  static thread_local std::unique_ptr<char[]> stacks;
  static thread_local int stack_count = 0;
  if (stack_count < threads) {
    stacks.reset(new char[kStack * size_t(threads)]);
    stack_count = threads;
  }
  GroupRun group;
  group.fibers.resize(threads);
  group.states.assign(threads, FiberState::kReady);
  group.body = body;
  group.context = context;
  for (int t = 0; t < threads; ++t) {
    getcontext(&group.fibers[t]);
    group.fibers[t].uc_stack.ss_sp = stacks.get() + kStack * size_t(t);
    group.fibers[t].uc_stack.ss_size = kStack;
    group.fibers[t].uc_link = &group.scheduler;
    makecontext(&group.fibers[t], fiber_entry, 0);
  }
  GroupRun* outer = current_group;
  current_group = &group;
  bool ok = true;
  for (;;) {
    for (int k = 0; k < threads; ++k) {
      const int t = order == 0 ? k : threads - 1 - k;
      if (group.states[t] != FiberState::kReady) continue;
      group.current = t;
      swapcontext(&group.scheduler, &group.fibers[t]);
    }
    group.current = -1;
    int waiting = 0, done = 0;
    for (FiberState state : group.states) {
      waiting += state == FiberState::kAtBarrier;
      done += state == FiberState::kDone;
    }
    if (done == threads) break;
    if (waiting == threads) {
      for (FiberState& state : group.states) state = FiberState::kReady;
      continue;
    }
    // Some threads ended, the others wait for them at a barrier forever.
    errors |= 2;
    ok = false;
    break;
  }
  current_group = outer;
  return ok;
}

}  // namespace mlx_rmsprop_emulation
