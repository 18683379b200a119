// Python module mlx_rmsprop.paths.native._ext. Import mlx.core first: its nanobind domain ("mlx")
// registers the mx.array type this module's functions take and return.
#include <nanobind/nanobind.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>

#include "gradient_statistics.h"
#include "rmsprop_update.h"
#include "spec.h"
#include "worker_pool.h"
#include "worker_pool_check.h"

namespace nb = nanobind;
using namespace nb::literals;

#ifndef MLX_RMSPROP_MLX_VERSION
#error "the build passes MLX_RMSPROP_MLX_VERSION, the mlx version it compiles against"
#endif
#ifndef MLX_RMSPROP_SOURCE_DIGEST
#error "the build passes MLX_RMSPROP_SOURCE_DIGEST, the digest of the sources it compiles"
#endif

NB_MODULE(_ext, m) {
  m.doc() = "The fused RMSprop update as a native MLX primitive on the CPU.";

  m.def(
      "update",
      [](const mlx::core::array& scalars,
         const mlx::core::array& gradient,
         const mlx::core::array& parameter,
         const std::vector<mlx::core::array>& state,
         uint32_t flags,
         int block_size,
         int64_t index,
         const std::optional<mlx::core::array>& factors,
         int accumulation_steps,
         double loss_scale,
         const std::optional<mlx::core::array>& accumulator,
         const std::optional<mlx::core::array>& accumulation_gates) {
        return mlx_rmsprop::rmsprop_update(mlx_rmsprop::update_node(
            scalars,
            gradient,
            parameter,
            state,
            flags,
            block_size,
            index,
            factors,
            mlx_rmsprop::Accumulation{accumulation_steps, loss_scale},
            accumulator,
            accumulation_gates));
      },
      "scalars"_a,
      "gradient"_a,
      "parameter"_a,
      "state"_a,
      "flags"_a,
      "block_size"_a = 0,
      "index"_a = 0,
      "factors"_a = nb::none(),
      "accumulation_steps"_a = 0,
      "loss_scale"_a = 0.0,
      "accumulator"_a = nb::none(),
      "accumulation_gates"_a = nb::none(),
      "One RMSprop step for one parameter as a single graph node on the CPU stream.\n\n"
      "Returns [new parameter, new state arrays...] in the order of `state` "
      "(UpdateOptions.state_keys); `flags` ORs FLAG_BITS; `block_size` is "
      "UpdateOptions.block_size (0 without quantized_state); `index` the parameter's "
      "position in the step (stochastic rounding, and the row of `factors`, a (parameters, 2) "
      "matrix that replaces the scalars' clip entries). With `accumulation_steps` > 0 the "
      "update first accumulates (Keras' gradient accumulation; `loss_scale` 0 when off): "
      "`accumulator` and `accumulation_gates` (float32 (applies, skip)) are read, and the new "
      "accumulator is the last output.");

  m.def(
      "update_group",
      [](const std::vector<mlx::core::array>& scalars,
         const std::vector<mlx::core::array>& gradients,
         const std::vector<mlx::core::array>& parameters,
         const std::vector<std::vector<mlx::core::array>>& states,
         const std::vector<uint32_t>& flags,
         const std::vector<int>& block_sizes,
         const std::vector<int64_t>& indices,
         const std::optional<mlx::core::array>& factors,
         int accumulation_steps,
         double loss_scale,
         const std::vector<mlx::core::array>& accumulators,
         const std::optional<mlx::core::array>& accumulation_gates) {
        const size_t count = parameters.size();
        const mlx_rmsprop::Accumulation accumulation{accumulation_steps, loss_scale};
        if (scalars.size() != count || gradients.size() != count || states.size() != count ||
            flags.size() != count || block_sizes.size() != count || indices.size() != count ||
            accumulators.size() != (accumulation.on() ? count : 0)) {
          throw std::invalid_argument(
              "[rmsprop_update] update_group takes one scalars, gradient, state, flags, "
              "block_size and index (and with accumulation, one accumulator) per parameter; "
              "got " + std::to_string(count) + " parameters");
        }
        std::vector<mlx_rmsprop::UpdateNode> members;
        members.reserve(count);
        for (size_t m = 0; m < count; ++m) {
          std::optional<mlx::core::array> accumulator;
          if (accumulation.on()) {
            accumulator = accumulators[m];
          }
          members.push_back(mlx_rmsprop::update_node(
              scalars[m],
              gradients[m],
              parameters[m],
              states[m],
              flags[m],
              block_sizes[m],
              indices[m],
              factors,
              accumulation,
              accumulator,
              accumulation_gates));
        }
        return mlx_rmsprop::rmsprop_update_group(std::move(members));
      },
      "scalars"_a,
      "gradients"_a,
      "parameters"_a,
      "states"_a,
      "flags"_a,
      "block_sizes"_a,
      "indices"_a,
      "factors"_a = nb::none(),
      "accumulation_steps"_a = 0,
      "loss_scale"_a = 0.0,
      "accumulators"_a = std::vector<mlx::core::array>{},
      "accumulation_gates"_a = nb::none(),
      "Several parameters' updates as a single graph node on the CPU stream: the arguments of "
      "`update`, one list entry per parameter (`factors`, the accumulation settings and its "
      "gates are the step's, shared). Returns the outputs of each parameter's update in turn, "
      "laid out as `update` returns them (one parameter: the node `update` makes).");

  m.def(
      "gradient_statistics",
      &mlx_rmsprop::gradient_statistics,
      "gradients"_a,
      "accumulators"_a,
      "loss_scale"_a,
      "accumulation_steps"_a,
      "scaled_norm"_a,
      "The pipeline's statistics of a whole step's gradients as a single graph node on the "
      "CPU stream: a (len(gradients), 4) float32 matrix of each tensor's sum of squares, "
      "largest magnitude, non-finite flag and scaled sum of squares (mlx_rmsprop.pipeline).");
  m.def(
      "set_statistics_ops",
      [](nb::callable ops) {
        // Held for the life of the process (the loader registers it once).
        auto* held = new nb::callable(std::move(ops));
        mlx_rmsprop::set_statistics_ops([held](
                                            const std::vector<mlx::core::array>& inputs,
                                            float loss_scale,
                                            int accumulation_steps,
                                            int scaled_norm) {
          nb::gil_scoped_acquire gil;
          return nb::cast<mlx::core::array>(
              (*held)(inputs, loss_scale, accumulation_steps, scaled_norm));
        });
      },
      "ops"_a,
      "Registers the MLX-ops statistics that the primitive's vjp, jvp and vmap transform.");
  m.attr("STATISTICS_LANES") = mlx_rmsprop::kStatisticsLanes;
  m.attr("STATISTICS_BLOCK") = mlx_rmsprop::kStatisticsBlock;

  m.def("worker_threads", &mlx_rmsprop::worker_threads, "Threads a large update runs on.");
  m.def(
      "storage_loops",
      &mlx_rmsprop::storage_loops_name,
      "Which build of the 8-bit state and stochastic-rounding loops runs: \"avx2\" or "
      "\"baseline\" (MLX_RMSPROP_NATIVE_AVX2=0 forces the baseline).");
  m.def(
      "sleeping_workers",
      [] { return mlx_rmsprop::WorkerPool::instance().sleeping(); },
      "Worker threads blocked on their condition variable now (all of them once the pool "
      "has been idle longer than its bounded spin).");
  m.def(
      "worker_pool_misruns",
      &mlx_rmsprop::worker_pool_misruns,
      "jobs"_a,
      "parts"_a,
      nb::call_guard<nb::gil_scoped_release>(),
      "Runs `jobs` jobs of `parts` trivial parts on the worker pool, back to back; returns how "
      "often a part had not run exactly once when its job returned (a test of the pool).");

  // Both tables expand the X-macros of spec.h, generated from mlx_rmsprop/spec.py; the loader
  // compares them with the Python spec before it trusts a build.
  nb::dict flag_bits;
#define RMSPROP_X(name, constant) flag_bits[#name] = uint32_t(mlx_rmsprop::Flag::constant);
  RMSPROP_FLAGS(RMSPROP_X)
#undef RMSPROP_X
  m.attr("FLAG_BITS") = flag_bits;

  // Scalar names in index order, as mlx_rmsprop.spec.Scalar spells them.
  nb::list scalar_names;
#define RMSPROP_X(name, constant) scalar_names.append(#name);
  RMSPROP_SCALARS(RMSPROP_X)
#undef RMSPROP_X
  m.attr("SCALAR_NAMES") = nb::tuple(scalar_names);

  m.attr("PARALLEL_THRESHOLD") = mlx_rmsprop::kParallelThreshold;
  m.attr("MLX_VERSION") = MLX_RMSPROP_MLX_VERSION;
  m.attr("SOURCE_DIGEST") = MLX_RMSPROP_SOURCE_DIGEST;
}
