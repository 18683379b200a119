// Python module mlx_rmsprop.paths.native._ext. Import mlx.core first: its nanobind domain ("mlx")
// registers the mx.array type this module's functions take and return.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "rmsprop_update.h"
#include "update_kernel.h"

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
      &mlx_rmsprop::rmsprop_update,
      "scalars"_a,
      "gradient"_a,
      "parameter"_a,
      "state"_a,
      "flags"_a,
      "One RMSprop step for one parameter as a single graph node on the CPU stream.\n\n"
      "Returns [new parameter, new state buffers...] in the order of `state` "
      "(UpdateOptions.state_keys); `flags` ORs FLAG_BITS.");

  m.def("worker_threads", &mlx_rmsprop::worker_threads, "Threads a large update runs on.");

  nb::dict flag_bits;
  flag_bits["centered"] = uint32_t(mlx_rmsprop::kCentered);
  flag_bits["momentum"] = uint32_t(mlx_rmsprop::kMomentumBuffer);
  flag_bits["nesterov"] = uint32_t(mlx_rmsprop::kNesterov);
  flag_bits["eps_in_sqrt"] = uint32_t(mlx_rmsprop::kEpsInSqrt);
  flag_bits["lr_in_momentum"] = uint32_t(mlx_rmsprop::kLrInMomentum);
  flag_bits["weight_decay=coupled"] = uint32_t(mlx_rmsprop::kCoupledDecay);
  flag_bits["weight_decay=decoupled"] = uint32_t(mlx_rmsprop::kDecoupledDecay);
  flag_bits["maximize"] = uint32_t(mlx_rmsprop::kMaximize);
  flag_bits["bias_correction"] = uint32_t(mlx_rmsprop::kBiasCorrected);
  flag_bits["scale_gradient"] = uint32_t(mlx_rmsprop::kScaleGradient);
  flag_bits["clip_value"] = uint32_t(mlx_rmsprop::kClipGradient);
  flag_bits["gated"] = uint32_t(mlx_rmsprop::kGated);
  flag_bits["ema"] = uint32_t(mlx_rmsprop::kEma);
  m.attr("FLAG_BITS") = flag_bits;

  // Scalar names in index order, as mlx_rmsprop.options.Scalar spells them.
  m.attr("SCALAR_NAMES") = nb::make_tuple(
      "LR",
      "ALPHA",
      "ONE_MINUS_ALPHA",
      "EPS",
      "MOMENTUM",
      "WEIGHT_DECAY",
      "BIAS_CORRECTION",
      "GRAD_DIVISOR",
      "CLIP_MULTIPLIER",
      "CLIP_DIVISOR",
      "CLIP_VALUE",
      "UPDATE_GATE",
      "EMA_MOMENTUM",
      "EMA_ONE_MINUS_MOMENTUM",
      "EMA_GATE",
      "EMA_OVERWRITE");
  static_assert(mlx_rmsprop::kNumScalars == 16, "SCALAR_NAMES lists every ScalarIndex");

  m.attr("PARALLEL_THRESHOLD") = mlx_rmsprop::kParallelThreshold;
  m.attr("MLX_VERSION") = MLX_RMSPROP_MLX_VERSION;
  m.attr("SOURCE_DIGEST") = MLX_RMSPROP_SOURCE_DIGEST;
}
