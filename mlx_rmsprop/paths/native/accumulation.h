// Keras' gradient accumulation as a stage of the fused update (mlx_rmsprop/step.py's accumulate
// and carry_accumulators): the update reads the accumulator beside its other buffers and writes
// the new one, so the mean gradient it steps with never leaves the chunk being updated.
#pragma once

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
// In place on one chunk of `n` elements in the compute type C, step.py's order:
//   summed = g / loss_scale + accumulator      (the division only when loss_scale != 0)
//   g <- summed / steps                         (the gradient the update sees)
//   accumulator <- skip ? accumulator : (applies ? 0 : summed)
template <typename C>
inline void accumulate_chunk(
    int64_t n,
    const Accumulation& accumulation,
    bool applies,
    bool skip,
    C* __restrict g,
    C* __restrict accumulator) {
  const C loss_scale = static_cast<C>(accumulation.loss_scale);
  const C steps = static_cast<C>(accumulation.steps);
  if (accumulation.loss_scale != 0.0) {
    for (int64_t i = 0; i < n; ++i) {
      g[i] = g[i] / loss_scale;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const C old = accumulator[i];
    const C summed = g[i] + old;
    g[i] = summed / steps;
    accumulator[i] = skip ? old : (applies ? C(0) : summed);
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
