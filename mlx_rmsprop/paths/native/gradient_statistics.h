// The pipeline's reduction over a whole step's gradients as one MLX primitive: one graph node
// with every gradient (and accumulator) as input and a single small output, so that clipping
// by norm and skipping non-finite steps add no per-tensor nodes (mlx_rmsprop/pipeline.py
// derives the clip factors and the skip decision from it with whole-matrix ops).
//
// A node with one output per tensor would not do: MLX gives each output of a multi-output
// node its own copy of the input and sibling lists, so such a node costs O(G^2) in G tensors.
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"

namespace mlx_rmsprop {

namespace mx = mlx::core;

// Columns of the float32 statistics matrix, one row per gradient, for the reduced values
// z = ((g / loss_scale) + accumulator) / accumulation_steps (each part only when configured):
// the sum of z^2, max |z|, 1 when some z is NaN or infinite (else 0), and the scaled sum
// (z / m)^2 that keeps a norm in float range where the plain sum overflows (see ScaledNorm).
enum StatisticsColumn : int {
  kSumOfSquares = 0,
  kLargest = 1,
  kNonFinite = 2,
  kScaledSumOfSquares = 3,
  kNumStatistics = 4,
};

// What the scaled column holds. kPerTensor (clipnorm): for a tensor whose sum of squares is
// +inf with a finite largest magnitude m, the sum of (z / m)^2. kGlobal (global_clipnorm):
// when the sum of all rows' sums of squares (in row order) is +inf with a finite largest
// magnitude M over all tensors, every row's sum of (z / M)^2. Otherwise, and with kNone, 0.
enum class ScaledNorm : int { kNone = 0, kPerTensor = 1, kGlobal = 2 };

// The summation order of every sum of squares (mlx_rmsprop/pipeline.py reproduces it with MLX
// ops): a tensor is cut into blocks of kStatisticsBlock elements in row-major order; in a block,
// element i adds into lane i mod kStatisticsLanes (each lane from 0, in increasing i); a block's
// lanes combine by halves (lane k += lane k + h for h = 16, 8, 4, 2, 1); the blocks' results
// add in block order from 0. Lanes vectorise and blocks split across threads, where one
// sequential sum per tensor (MLX's CPU order on Linux) runs at one add latency per element.
constexpr int64_t kStatisticsLanes = 32;
constexpr int64_t kStatisticsBlock = int64_t(1) << 15;

// Builds the node on the CPU stream. `gradients` must be float16, bfloat16 or float32 (the
// arithmetic is float32); `accumulators` is empty or one per gradient, shaped like it (any of
// those dtypes). `loss_scale` 0 means none; `accumulation_steps` 0 means no accumulation (then
// `accumulators` must be empty). Returns the (len(gradients), kNumStatistics) float32 matrix.
// Throws std::invalid_argument naming the bad argument.
mx::array gradient_statistics(
    const std::vector<mx::array>& gradients,
    const std::vector<mx::array>& accumulators,
    double loss_scale,
    int accumulation_steps,
    int scaled_norm);

// The same statistics from MLX ops (mlx_rmsprop.pipeline.statistics_ops over reduced_values),
// given by the Python module when it loads: (inputs, loss_scale, accumulation_steps,
// scaled_norm) -> the matrix. The primitive's vjp, jvp and vmap transform these ops, so that
// derivatives and batches equal the other paths' bit for bit.
using StatisticsOps =
    std::function<mx::array(const std::vector<mx::array>&, float, int, int)>;
void set_statistics_ops(StatisticsOps ops);

class GradientStatistics : public mx::UnaryPrimitive {
 public:
  GradientStatistics(
      mx::Stream stream,
      int tensors,
      float loss_scale,
      int accumulation_steps,
      ScaledNorm scaled_norm)
      : mx::UnaryPrimitive(stream),
        tensors_(tensors),
        loss_scale_(loss_scale),
        accumulation_steps_(accumulation_steps),
        scaled_norm_(scaled_norm) {}

  // inputs: {gradients..., accumulators...}; output: the statistics matrix.
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "GradientStatistics";
  }

 private:
  std::function<std::vector<mx::array>(const std::vector<mx::array>&)> ops() const;

  int tensors_;
  float loss_scale_;
  int accumulation_steps_;
  ScaledNorm scaled_norm_;
};

} // namespace mlx_rmsprop
