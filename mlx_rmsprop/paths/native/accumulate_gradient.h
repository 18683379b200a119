// Keras' gradient accumulation for one parameter as one MLX primitive: the sum of this call's
// gradient (loss scale divided out) and the accumulator, the mean the update sees, and the new
// accumulator, in one pass and one graph node (mlx_rmsprop/step.py's accumulate and
// carry_accumulators, whose MLX ops cost six nodes per parameter and, under mx.compile, a
// fused kernel each to build).
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"

namespace mlx_rmsprop {

namespace mx = mlx::core;

// Entries of the `gates` input (float32): 1 or 0.
enum AccumulationGate : int {
  kGateApplies = 0, // the end of a cycle: the new accumulator is 0
  kGateSkip = 1, // a skipped call: the accumulator keeps its value
  kNumAccumulationGates = 2,
};

// Builds the node on the CPU stream. In `compute` (float32 or float64), elementwise:
//   summed = g / loss_scale + accumulator    (the division only when loss_scale != 0)
//   gradient_out = summed / steps
//   accumulator_out = skip ? accumulator : (applies ? 0 : summed)
// Returns {gradient_out (compute dtype), accumulator_out (the accumulator's dtype)}.
// Throws std::invalid_argument naming the bad argument.
std::vector<mx::array> accumulate_gradient(
    const mx::array& gradient,
    const mx::array& accumulator,
    const mx::array& gates,
    double loss_scale,
    int steps,
    mx::Dtype compute);

// The same from MLX ops, in step.py's order: what the primitive's transforms run on.
std::vector<mx::array> accumulate_ops(
    const std::vector<mx::array>& inputs,
    double loss_scale,
    int steps,
    mx::Dtype compute);

class AccumulateGradient : public mx::Primitive {
 public:
  AccumulateGradient(mx::Stream stream, double loss_scale, int steps, mx::Dtype compute)
      : mx::Primitive(stream), loss_scale_(loss_scale), steps_(steps), compute_(compute) {}

  // inputs: {gradient, accumulator, gates}; outputs: {gradient_out, accumulator_out}.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "AccumulateGradient";
  }

 private:
  double loss_scale_;
  int steps_;
  mx::Dtype compute_;
};

} // namespace mlx_rmsprop
