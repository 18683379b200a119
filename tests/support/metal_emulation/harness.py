"""Compile the translation units MLX generates with g++ and run them on the CPU: every thread
of the launched grid, or chosen thread positions, one call each. Kernels with 8-bit state run
each threadgroup as fibers that meet at every barrier (``threadgroups.h``): real barrier
semantics, so a kernel that reads threadgroup memory too early, or whose threads skip a
barrier, fails here.

Metal: against ``metal_shim.h`` (this folder). CUDA: against CUDA's own headers plus the
host stand-ins in ``tests/support/cuda_shim`` (MLX's device header, ``cuda_host.h``), where each call
gets its block and thread coordinates the way MLX's CUDA backend launches whole blocks.

The kernel text is used exactly as ``translation_unit(variant, backend)`` returns it (for
Metal equal to MLX's own output, tested in test_kernel_source.py). The driver around each
kernel is read off its generated signature, not from our assembler, so a parameter the
assembler got wrong shows up as a compile error or a wrong result rather than being
reproduced here.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_rmsprop.paths.kernels.launch import (
    MAX_1D_GRID,
    MAX_ROWS,
    ROW_WIDTH,
    THREADGROUP,
    KernelCall,
)
from mlx_rmsprop.paths.kernels.source import Variant, translation_unit
from mlx_rmsprop.paths.kernels.variants import (
    dtype_combinations,
    every_flag_on,
    pairwise_option_sets,
    plan_variant,
)
from mlx_rmsprop.spec import option_space

SHIM_DIR = Path(__file__).parent
CUDA_SHIM_DIR = SHIM_DIR.parent / "cuda_shim"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
# Include paths and the forced header per backend (CUDA: the stand-ins first, so that the
# host cooperative_groups.h stub wins over CUDA's device-only one).
BACKEND_FLAGS = {
    "metal": [f"-I{SHIM_DIR}"],
    "cuda": [
        f"-I{CUDA_SHIM_DIR / 'host'}",
        f"-I{CUDA_SHIM_DIR}",
        f"-I{CUDA_INCLUDE}",
        f"-I{CUDA_INCLUDE / 'cccl'}",
        "-include",
        "cuda_host.h",
    ],
}
CXXFLAGS = [
    "-std=c++17",
    "-O0",
    "-fPIC",
    "-shared",
    # IEEE float32 as written: no fused multiply-add, no reassociation.
    "-ffp-contract=off",
    "-fno-fast-math",
    "-Wall",
    "-Wextra",
    "-Werror",
    # Metal attributes are unknown to g++; the prologue reads every scalar, used or not;
    # CUDA's headers trip some of -Wextra on the host.
    "-Wno-attributes",
    "-Wno-unused-variable",
    "-Wno-unused-but-set-variable",
    "-Wno-unused-parameter",
    "-Wno-unused-local-typedefs",  # MLX declares `using G = ...` even where G is unused
    # An unsuffixed literal or double math would make the emulation compute in double.
    "-Wdouble-promotion",
    "-Wfloat-conversion",
]
# The fusing emulation: a compiler that contracts every a*b + c it is allowed to (GCC fuses
# across statements at -O2 with -ffp-contract=fast), on a CPU with FMA instructions. Only the
# kernel's arithmetic primitives (the __f*_rn stand-ins in cuda_shim/host/cuda_host.h and
# metal::precise:: in metal_shim.h) stay unfused, as they must on the GPU.
FUSING_CXXFLAGS = [
    "-O2" if flag == "-O0" else "-ffp-contract=fast" if flag == "-ffp-contract=off" else flag
    for flag in CXXFLAGS
] + ["-mfma"]


def cpu_has_fma() -> bool:
    """Whether this CPU runs FMA3 instructions (x86-64 Linux: the fma flag of /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\bfma\b", flags, re.M) is not None


SENTINEL_BYTE = 0x5A  # outputs start as this pattern: an element the kernel skips stands out

_METAL_SIGNATURE = re.compile(r"\[\[kernel\]\] void (\w+)\(\n(.*?)\) \{\n", re.S)
_METAL_PARAMETER = re.compile(
    r"^\s*(?P<type>.*?)\s*(?P<name>\w+) \[\[(?P<attr>\w+)(?:\(\d+\))?\]\]$"
)
_METAL_INSTANCE = re.compile(r"decltype\((\w+<[^>]*>)\)")
_CUDA_SIGNATURE = re.compile(r"__global__ void (\w+)\(\n(.*?)\) \{\n", re.S)
_CUDA_PARAMETER = re.compile(r"^\s*(?P<type>.*?)\s*(?P<name>\w+)$")


@dataclass(frozen=True)
class Parameter:
    type: str
    name: str
    attribute: str  # Metal: "buffer" or the thread attribute; CUDA: "buffer"


def parse_signature(unit: str, backend: str = "metal") -> tuple[str, str, list[Parameter]]:
    """(kernel name, the function to call, parameters) of one generated unit."""
    if backend == "cuda":
        signature = _CUDA_SIGNATURE.search(unit)
        assert signature, "not an MLX-generated CUDA kernel"
        lines = signature.group(2).split(",\n")
        matches = [_CUDA_PARAMETER.match(line) for line in lines]
        assert all(matches), f"unexpected kernel parameters: {lines}"
        parameters = [Parameter(m["type"], m["name"], "buffer") for m in matches]
        name = signature.group(1)
        return name, f"mlx::core::cu::{name}", parameters
    signature = _METAL_SIGNATURE.search(unit)
    instance = _METAL_INSTANCE.search(unit)
    assert signature and instance, "not an MLX-generated Metal kernel"
    parameters = []
    for line in signature.group(2).split(",\n"):
        match = _METAL_PARAMETER.match(line)
        assert match, f"unexpected kernel parameter: {line!r}"
        parameters.append(Parameter(match["type"], match["name"], match["attr"]))
    return signature.group(1), instance.group(1), parameters


def _driver(unit: str, variant: Variant, backend: str) -> str:
    name, function, parameters = parse_signature(unit, backend)
    buffers = [*variant.input_names, *variant.output_names]
    arguments = []
    for parameter in parameters:
        if parameter.attribute == "thread_position_in_grid":
            arguments.append("position")
        elif parameter.attribute == "threads_per_grid":
            arguments.append("grid")
        elif parameter.attribute == "thread_position_in_threadgroup":
            arguments.append(
                "uint3{position.x % group.x, position.y % group.y, position.z % group.z}"
            )
        elif parameter.attribute == "threads_per_threadgroup":
            arguments.append("group")
        elif parameter.attribute != "buffer":
            raise AssertionError(f"the harness does not provide [[{parameter.attribute}]]")
        elif parameter.name in buffers:
            assert parameter.type.endswith("*"), parameter
            arguments.append(f"({parameter.type})buffers[{buffers.index(parameter.name)}]")
        elif parameter.name == "parameter_shape":
            arguments.append("shape" if backend == "metal" else "shape_value")
        elif parameter.name == "parameter_ndim":
            arguments.append("ndim")
        elif parameter.name == "factors_shape":
            # The factors matrix's (rows, 2) follows the parameter's shape in `shape`.
            arguments.append("shape + ndim" if backend == "metal" else "factors_shape_value")
        else:
            raise AssertionError(f"the harness does not provide {parameter.name}")
    call = f"{function}({', '.join(arguments)});"
    if backend == "metal":
        setup = ""
    else:
        # MLX's CUDA launch: blocks of min(threadgroup, grid) threads, ceil(grid / threadgroup)
        # blocks per dimension; `position` counts threads over the whole blocks.
        setup = """
  blockDim = dim3(grid.x < group.x ? grid.x : group.x, grid.y < group.y ? grid.y : group.y,
                  grid.z < group.z ? grid.z : group.z);
  gridDim = dim3((grid.x + group.x - 1) / group.x, (grid.y + group.y - 1) / group.y,
                 (grid.z + group.z - 1) / group.z);
  blockIdx = {position.x / blockDim.x, position.y / blockDim.y, position.z / blockDim.z};
  threadIdx = {position.x % blockDim.x, position.y % blockDim.y, position.z % blockDim.z};
  mlx::core::cu::Shape shape_value{};
  for (int d = 0; d < ndim; ++d) shape_value[d] = shape[d];"""
        if variant.factors:
            setup += """
  mlx::core::cu::Shape factors_shape_value{};
  for (int d = 0; d < 2; ++d) factors_shape_value[d] = shape[ndim + d];"""
    # One call per thread; the loop over the grid is `run_grid`, shared by every kernel.
    return f"""
extern "C" void thread_{name}(void* const* buffers, const int* shape, const int& ndim,
                              uint3 position, uint3 grid, uint3 group) {{{setup}
  {call}
}}
"""


def _to_numpy(array: mx.array) -> np.ndarray:
    """Row-contiguous host copy with the kernel's element layout (bfloat16 as its bits)."""
    if array.dtype == mx.bfloat16:
        bits = np.array(array.astype(mx.float32)).view(np.uint32) >> 16
        return np.ascontiguousarray(bits.astype(np.uint16))
    return np.ascontiguousarray(np.array(array))


def _from_numpy(values: np.ndarray, dtype: mx.Dtype) -> mx.array:
    if dtype == mx.bfloat16:
        as_float = (values.astype(np.uint32) << 16).view(np.float32)
        return mx.array(as_float).astype(mx.bfloat16)
    return mx.array(values)


RUN_GRID = """
typedef void (*ThreadFunction)(void* const*, const int*, const int&, uint3, uint3, uint3);

struct GroupContext {
  ThreadFunction thread;
  void* const* buffers;
  const int* shape;
  int ndim;
  uint3 origin, size, requested, group;
};

static void run_group_thread(int t, void* opaque) {
  const GroupContext& c = *static_cast<const GroupContext*>(opaque);
  const uint32_t x = uint32_t(t) % c.size.x, y = uint32_t(t) / c.size.x % c.size.y,
                 z = uint32_t(t) / (c.size.x * c.size.y);
  c.thread(c.buffers, c.shape, c.ndim, {c.origin.x + x, c.origin.y + y, c.origin.z + z},
           c.requested, c.group);
}

// Every thread launched (`extent` per dimension: the grid on Metal, whole blocks on CUDA), or
// only the `count` positions given (each on its own, outside any threadgroup). `grid` is the
// grid MLX was asked for, `group` the threadgroup. With `fibers`, each threadgroup runs as
// fibers with real barrier semantics (threadgroups.h; `order` 0: threads resumed in
// increasing order, 1: decreasing); without, thread after thread, and a barrier is an error.
// Returns the errors (threadgroups.h): 0 when none.
extern "C" int run_grid(ThreadFunction thread, void* const* buffers, const int* shape, int ndim,
                        const uint32_t* grid, const uint32_t* extent, const uint32_t* group,
                        const uint32_t* positions, uint64_t count, int fibers, int order) {
  mlx_rmsprop_emulation::errors = 0;
  const uint3 requested = {grid[0], grid[1], grid[2]};
  const uint3 group_size = {group[0], group[1], group[2]};
  if (positions != nullptr) {
    for (uint64_t k = 0; k < count; ++k) {
      thread(buffers, shape, ndim, {positions[3 * k], positions[3 * k + 1], positions[3 * k + 2]},
             requested, group_size);
    }
    return mlx_rmsprop_emulation::errors;
  }
  for (uint32_t gz = 0; gz < extent[2]; gz += group[2])
    for (uint32_t gy = 0; gy < extent[1]; gy += group[1])
      for (uint32_t gx = 0; gx < extent[0]; gx += group[0]) {
        // A partial group at the end of a dimension (Metal's non-uniform threadgroups).
        const uint3 size = {extent[0] - gx < group[0] ? extent[0] - gx : group[0],
                            extent[1] - gy < group[1] ? extent[1] - gy : group[1],
                            extent[2] - gz < group[2] ? extent[2] - gz : group[2]};
        GroupContext context{thread, buffers, shape, ndim, {gx, gy, gz}, size, requested,
                             group_size};
        const int threads = int(size.x * size.y * size.z);
        if (fibers) {
          mlx_rmsprop_emulation::run_group(threads, run_group_thread, &context, order);
        } else {
          for (int t = 0; t < threads; ++t) run_group_thread(t, &context);
        }
      }
  return mlx_rmsprop_emulation::errors;
}
"""


INT32_MAX = 2**31 - 1


def mlx_cuda_launch(
    grid: tuple[int, int, int], threadgroup: tuple[int, int, int] = THREADGROUP
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(blocks, block) as MLX's CUDA backend computes them for a custom kernel, in its own
    arithmetic: grid and threadgroup are std::tuple<int, int, int> (mlx/fast_primitives.h,
    CustomKernel::grid_) and mlx/backend/cuda/custom_kernel.cpp (CustomKernel::eval_gpu, "Make
    the grid") computes ``dim3 block(std::min(tx, gx), ...)`` and
    ``dim3 grid((gx + tx - 1) / tx, ...)`` in signed 32-bit int. Raises OverflowError where
    that int arithmetic overflows (undefined behaviour in C++; in practice a negative block
    count that turns into a huge unsigned one and a failed launch)."""
    blocks, block = [], []
    for g, t in zip(grid, threadgroup, strict=True):
        if not (0 < g <= INT32_MAX and 0 < t <= INT32_MAX):
            raise OverflowError(f"grid {grid} / threadgroup {threadgroup} is not a 32-bit int")
        if g + t - 1 > INT32_MAX:
            raise OverflowError(f"(gx + tx - 1) overflows int for grid {grid}, threadgroup {t}")
        blocks.append((g + t - 1) // t)
        block.append(min(t, g))
    return tuple(blocks), tuple(block)


# Sizes around every edge of MLX's CUDA launch arithmetic: a partial block, 2^31 - 256 (the
# largest 1-D grid whose block count (gx + 255) / 256 fits in an int), 2^31 - 255 .. 2^31 - 1
# (where it would overflow), 2^31 and beyond (2-D), and the largest size the kernel takes.
LAUNCH_SIZES = [
    1,
    255,
    256,
    257,
    MAX_1D_GRID,
    MAX_1D_GRID + 1,
    2**31 - 2,
    2**31 - 1,
    2**31,
    2**31 + 18,
    2**32 + 36,
    MAX_ROWS * ROW_WIDTH,
]


def launched_extent(
    grid: tuple[int, int, int], backend: str, threadgroup: tuple[int, int, int] = THREADGROUP
) -> tuple[int, int, int]:
    """Threads launched per dimension: exactly the grid on Metal, whole blocks on CUDA (with
    MLX's launch arithmetic, which raises where MLX's would overflow)."""
    if backend == "metal":
        return grid
    blocks, block = mlx_cuda_launch(grid, threadgroup)
    return tuple(b * t for b, t in zip(blocks, block, strict=True))


def compile_library(
    source: Path, library: Path, backend: str = "metal", fusing: bool = False
) -> None:
    """g++ with the backend's shims; the library appears only once complete."""
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    flags = FUSING_CXXFLAGS if fusing else CXXFLAGS
    command = ["g++", *flags, *BACKEND_FLAGS[backend], str(source), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"g++ failed on {source}:\n{result.stderr[-6000:]}")
    partial.replace(library)


NUMPY_STORAGE = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,
    mx.uint8: np.uint8,
    mx.uint32: np.uint32,
}


class Emulator:
    """A shared library with one entry point per variant, built by one g++ call per chunk.
    ``fusing=True`` builds it as the fusing emulation (FUSING_CXXFLAGS)."""

    def __init__(
        self,
        variants: list[Variant],
        build_dir: Path,
        chunks: int | None = None,
        backend: str = "metal",
        fusing: bool = False,
    ):
        self.backend = backend
        self.fusing = fusing
        chunks = chunks or os.cpu_count() or 1
        units: dict[str, tuple[Variant, str]] = {}
        self.entries: dict[Variant, str] = {}
        for variant in variants:
            unit = translation_unit(variant, backend)
            name = parse_signature(unit, backend)[0]
            self.entries[variant] = f"thread_{name}"
            units.setdefault(name, (variant, unit))
        sources: list[list[str]] = [[] for _ in range(chunks)]
        for k, (variant, unit) in enumerate(units.values()):
            sources[k % chunks].append(unit + _driver(unit, variant, backend))
        self.libraries = self._build([s for s in sources if s], build_dir)
        self.count = len(units)

    def _build(self, chunks: list[list[str]], build_dir: Path) -> list[ctypes.CDLL]:
        build_dir.mkdir(parents=True, exist_ok=True)
        prelude = '#include "metal_shim.h"\n' if self.backend == "metal" else ""
        paths = []
        for chunk in chunks:
            text = prelude + RUN_GRID + "\n".join(chunk)
            # Content-addressed, so a rerun with nothing changed reuses the library.
            shims = (
                SHIM_DIR / "metal_shim.h",
                SHIM_DIR / "threadgroups.h",
                CUDA_SHIM_DIR / "host" / "cuda_host.h",
            )
            flags = FUSING_CXXFLAGS if self.fusing else CXXFLAGS
            key = text + " ".join(flags) + "".join(path.read_text() for path in shims)
            digest = hashlib.sha256(key.encode()).hexdigest()[:20]
            source = build_dir / f"{self.backend}_kernels_{digest}.cpp"
            paths.append((source, source.with_suffix(".so")))
            if not source.with_suffix(".so").exists():
                source.write_text(text)

        def compile_one(paths: tuple[Path, Path]) -> None:
            if not paths[1].exists():
                compile_library(*paths, self.backend, self.fusing)

        with ThreadPoolExecutor(len(paths)) as pool:
            list(pool.map(compile_one, paths))
        return [ctypes.CDLL(str(library)) for _, library in paths]

    def _thread_function(self, variant: Variant) -> tuple[ctypes.CDLL, ctypes.c_void_p]:
        entry = self.entries[variant]
        for library in self.libraries:
            if hasattr(library, entry):
                return library, ctypes.cast(getattr(library, entry), ctypes.c_void_p)
        raise KeyError(entry)

    def run_buffers(
        self,
        variant: Variant,
        buffers: list[np.ndarray],
        shape: tuple[int, ...],
        grid: tuple[int, int, int],
        positions: np.ndarray | None = None,
        threadgroup: tuple[int, int, int] = THREADGROUP,
        order: int = 0,
        factors_shape: tuple[int, ...] = (),
    ) -> None:
        """Run the kernel on host buffers (inputs then outputs, in the kernel's order). With
        8-bit state each threadgroup runs as fibers with real barriers (``order`` 0 or 1: its
        threads resumed in increasing or decreasing order between barriers).
        ``factors_shape``: the shape of the ``factors`` input, for a variant that takes one."""
        assert bool(factors_shape) == variant.factors, (factors_shape, variant)
        pointers = (ctypes.c_void_p * len(buffers))(*(b.ctypes.data for b in buffers))
        shape_array = np.array((*shape, *factors_shape), np.int32)
        grid_array = np.array(grid, np.uint32)
        group_array = np.array(threadgroup, np.uint32)
        extent_array = np.array(launched_extent(grid, self.backend, threadgroup), np.uint32)
        if positions is not None:
            positions = np.ascontiguousarray(positions, np.uint32)
        library, thread = self._thread_function(variant)
        library.run_grid.restype = ctypes.c_int
        errors = library.run_grid(
            thread,
            pointers,
            shape_array.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_int(len(shape)),
            grid_array.ctypes.data_as(ctypes.c_void_p),
            extent_array.ctypes.data_as(ctypes.c_void_p),
            group_array.ctypes.data_as(ctypes.c_void_p),
            None if positions is None else positions.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_uint64(0 if positions is None else len(positions)),
            ctypes.c_int(int(variant.options.quantized_state)),
            ctypes.c_int(order),
        )
        if errors & 1:
            raise AssertionError(f"{variant}: a barrier outside a threadgroup run")
        if errors & 2:
            raise AssertionError(
                f"{variant}: threads of a threadgroup ended while others waited at a barrier"
            )

    def run(self, call: KernelCall, order: int = 0) -> list[mx.array]:
        """What the GPU would return for ``call`` (the launcher's own plan): every thread of
        its grid, on row-contiguous copies of its inputs (as MLX makes them)."""
        variant = call.variant
        inputs = [_to_numpy(array) for array in call.inputs]
        outputs = [
            np.full(
                math.prod(shape) * np.dtype(NUMPY_STORAGE[d]).itemsize, SENTINEL_BYTE, np.uint8
            ).view(NUMPY_STORAGE[d])
            for shape, d in zip(call.output_shapes, variant.output_dtypes, strict=True)
        ]
        self.run_buffers(
            variant,
            [*inputs, *outputs],
            call.inputs[0].shape,
            call.grid,
            threadgroup=call.threadgroup,
            order=order,
            factors_shape=(
                call.inputs[variant.input_names.index("factors")].shape if variant.factors else ()
            ),
        )
        return [
            _from_numpy(values, dtype).reshape(shape)
            for values, dtype, shape in zip(
                outputs, variant.output_dtypes, call.output_shapes, strict=True
            )
        ]


def cuda_variants() -> list[Variant]:
    """Every dtype combination with the pairwise option sets (storage flags included, as the
    verification plan takes them), and every buffer layout, with and without stochastic
    rounding, with every flag on that it allows (the address-space class does not exist on
    CUDA). The kernels reading per-parameter clip factors are ``factor_variants``, the
    accumulating ones ``accumulating_variants``."""
    variants = [
        plan_variant(options, dtypes, False, k + row)
        for k, dtypes in enumerate(dtype_combinations())
        for row, options in enumerate(pairwise_option_sets(storage=True))
    ]
    layouts = {(o.state_keys, o.stochastic_rounding) for o in option_space(storage=True)}
    for keys, rounding in sorted(layouts):
        variants.append(
            Variant(every_flag_on(keys, rounding), mx.bfloat16, mx.float16, mx.bfloat16)
        )
    return list(dict.fromkeys(variants))
