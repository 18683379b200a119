// Keras' gradient accumulation as a stage of the fused update (mlx_rmsprop/step.py's accumulate
// and carry_accumulators): the update reads the accumulator beside its other buffers and writes
// the new one, so the mean gradient it steps with never leaves the chunk being updated.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "mlx/array.h"

namespace mlx_rmsprop {

namespace mx = mlx::core;

// Entries of the accumulation gates input (float32): 1 or 0.
enum AccumulationGate : int {
  kGateApplies = 0, // the end of a cycle: the new accumulator is 0
  kGateSkip = 1, // a skipped call: the accumulator keeps its value
  kNumAccumulationGates = 2,
};

// The node's accumulation attributes: `steps` calls per cycle (0: no accumulation) and the loss
// scale divided out of each gradient (0: none).
struct Accumulation {
  int steps = 0;
  double loss_scale = 0.0;

  bool on() const {
    return steps > 0;
  }
  bool operator==(const Accumulation& other) const {
    return steps == other.steps && loss_scale == other.loss_scale;
  }
};

// --- accumulate ---
// One chunk of `n` elements in the compute type C, step.py's order:
//   summed = g / loss_scale + accumulator      (the division only when loss_scale != 0)
//   mean = summed / steps                       (the gradient the update sees)
//   accumulator_out = skip ? accumulator : (applies ? 0 : summed)
// `mean` is null on a call whose update gate is closed, which never reads it; it is then not
// computed. `accumulator_out` may be `accumulator` itself (the buffer rewritten in place): a
// skipped call then writes nothing, and the mean is computed before the accumulator changes.
template <bool kScaled, typename C>
inline C summed_at(const C* g, const C* accumulator, int64_t i, C loss_scale) {
  return (kScaled ? g[i] / loss_scale : g[i]) + accumulator[i];
}

template <bool kScaled, typename C>
inline void accumulate_loops(
    int64_t n,
    C loss_scale,
    C steps,
    bool applies,
    bool skip,
    const C* __restrict g,
    const C* accumulator,
    C* __restrict mean,
    C* accumulator_out) {
  if (mean != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      mean[i] = summed_at<kScaled>(g, accumulator, i, loss_scale) / steps;
    }
  }
  if (skip) {
    if (accumulator_out != accumulator) {
      std::copy(accumulator, accumulator + n, accumulator_out);
    }
  } else if (applies) {
    std::fill(accumulator_out, accumulator_out + n, C(0));
  } else if (accumulator_out == accumulator) {
    // One pointer for the read and the write (the gradient is never the accumulator's
    // buffer), so the loop vectorises without an alias check.
    C* in_place = accumulator_out;
    for (int64_t i = 0; i < n; ++i) {
      in_place[i] = summed_at<kScaled>(g, in_place, i, loss_scale);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      accumulator_out[i] = summed_at<kScaled>(g, accumulator, i, loss_scale);
    }
  }
}

template <typename C>
inline void accumulate_chunk(
    int64_t n,
    const Accumulation& accumulation,
    bool applies,
    bool skip,
    const C* g,
    const C* accumulator,
    C* mean,
    C* accumulator_out) {
  const C loss_scale = static_cast<C>(accumulation.loss_scale);
  const C steps = static_cast<C>(accumulation.steps);
  if (accumulation.loss_scale != 0.0) {
    accumulate_loops<true>(n, loss_scale, steps, applies, skip, g, accumulator, mean, accumulator_out);
  } else {
    accumulate_loops<false>(n, loss_scale, steps, applies, skip, g, accumulator, mean, accumulator_out);
  }
}

// The same from MLX ops, in step.py's order (transforms.cpp): {mean in `compute`, new
// accumulator in the accumulator's dtype}, what the update's transforms differentiate.
std::vector<mx::array> accumulate_ops(
    const mx::array& gradient,
    const mx::array& accumulator,
    const mx::array& gates,
    const Accumulation& accumulation,
    mx::Dtype compute);

} // namespace mlx_rmsprop
