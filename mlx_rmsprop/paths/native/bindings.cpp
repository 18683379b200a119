// Python module mlx_rmsprop.paths.native._ext. Import mlx.core first: its nanobind domain ("mlx")
// registers the mx.array type this module's functions take and return.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "rmsprop_update.h"
#include "spec.h"

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
      "block_size"_a = 0,
      "index"_a = 0,
      "One RMSprop step for one parameter as a single graph node on the CPU stream.\n\n"
      "Returns [new parameter, new state arrays...] in the order of `state` "
      "(UpdateOptions.state_keys); `flags` ORs FLAG_BITS; `block_size` is "
      "UpdateOptions.block_size (0 without quantized_state); `index` the parameter's "
      "position in the step (stochastic rounding).");

  m.def("worker_threads", &mlx_rmsprop::worker_threads, "Threads a large update runs on.");
  m.def(
      "storage_loops",
      &mlx_rmsprop::storage_loops_name,
      "Which build of the 8-bit state and stochastic-rounding loops runs: \"avx2\" or "
      "\"baseline\" (MLX_RMSPROP_NATIVE_AVX2=0 forces the baseline).");

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
