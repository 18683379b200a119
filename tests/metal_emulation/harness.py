"""Compile the Metal translation units MLX generates with g++ against ``metal_shim.h`` and run
them on the CPU: every thread of the grid, or chosen thread positions, one call each.

The kernel text is used exactly as ``translation_unit(variant, "metal")`` returns it (equal to
MLX's own output, tested in test_kernel_source.py). The driver around each kernel is read off
its generated signature, not from our assembler, so a parameter the assembler got wrong shows
up as a compile error or a wrong result rather than being reproduced here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_rmsprop.kernels.launch import KernelCall
from mlx_rmsprop.kernels.source import Variant, metal_translation_unit

SHIM_DIR = Path(__file__).parent
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
    # Metal attributes are unknown to g++; the prologue reads every scalar, used or not.
    "-Wno-attributes",
    "-Wno-unused-variable",
    "-Wno-unused-but-set-variable",
    # An unsuffixed literal or double math would make the emulation compute in double.
    "-Wdouble-promotion",
    "-Wfloat-conversion",
]
SENTINEL_BYTE = 0x5A  # outputs start as this pattern: an element the kernel skips stands out

_SIGNATURE = re.compile(r"\[\[kernel\]\] void (\w+)\(\n(.*?)\) \{\n", re.S)
_PARAMETER = re.compile(r"^\s*(?P<type>.*?)\s*(?P<name>\w+) \[\[(?P<attr>\w+)(?:\(\d+\))?\]\]$")
_INSTANCE = re.compile(r"decltype\((\w+<[^>]*>)\)")


@dataclass(frozen=True)
class Parameter:
    type: str
    name: str
    attribute: str


def parse_signature(unit: str) -> tuple[str, str, list[Parameter]]:
    """(kernel name, instantiated template ``name<args>``, parameters) of one generated unit."""
    signature = _SIGNATURE.search(unit)
    instance = _INSTANCE.search(unit)
    assert signature and instance, "not an MLX-generated Metal kernel"
    parameters = []
    for line in signature.group(2).split(",\n"):
        match = _PARAMETER.match(line)
        assert match, f"unexpected kernel parameter: {line!r}"
        parameters.append(Parameter(match["type"], match["name"], match["attr"]))
    return signature.group(1), instance.group(1), parameters


def _driver(unit: str, variant: Variant) -> str:
    name, instance, parameters = parse_signature(unit)
    buffers = [*variant.input_names, *variant.output_names]
    arguments = []
    for parameter in parameters:
        if parameter.attribute == "thread_position_in_grid":
            arguments.append("position")
        elif parameter.attribute == "threads_per_grid":
            arguments.append("threads_per_grid")
        elif parameter.attribute != "buffer":
            raise AssertionError(f"the harness does not provide [[{parameter.attribute}]]")
        elif parameter.name in buffers:
            assert parameter.type.endswith("*"), parameter
            arguments.append(f"({parameter.type})buffers[{buffers.index(parameter.name)}]")
        elif parameter.name == "parameter_shape":
            arguments.append("shape")
        elif parameter.name == "parameter_ndim":
            arguments.append("ndim")
        else:
            raise AssertionError(f"the harness does not provide {parameter.name}")
    # One call per thread; the loop over the grid is `run_grid`, shared by every kernel.
    return f"""
extern "C" void thread_{name}(void* const* buffers, const int* shape, const int& ndim,
                              uint3 position, uint3 threads_per_grid) {{
  {instance}({", ".join(arguments)});
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
typedef void (*ThreadFunction)(void* const*, const int*, const int&, uint3, uint3);

// Every thread of the grid in turn, or only the `count` positions given.
extern "C" void run_grid(ThreadFunction thread, void* const* buffers, const int* shape,
                         int ndim, const uint32_t* grid, const uint32_t* positions,
                         uint64_t count) {
  const uint3 threads_per_grid = {grid[0], grid[1], grid[2]};
  if (positions != nullptr) {
    for (uint64_t k = 0; k < count; ++k) {
      thread(buffers, shape, ndim, {positions[3 * k], positions[3 * k + 1], positions[3 * k + 2]},
             threads_per_grid);
    }
    return;
  }
  for (uint z = 0; z < grid[2]; ++z)
    for (uint y = 0; y < grid[1]; ++y)
      for (uint x = 0; x < grid[0]; ++x) thread(buffers, shape, ndim, {x, y, z}, threads_per_grid);
}
"""


def compile_library(source: Path, library: Path) -> None:
    """g++ with the shim on the include path; the library appears only once complete."""
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    command = ["g++", *CXXFLAGS, f"-I{SHIM_DIR}", str(source), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"g++ failed on {source}:\n{result.stderr[-6000:]}")
    partial.replace(library)


NUMPY_STORAGE = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16}


class Emulator:
    """A shared library with one entry point per variant, built by one g++ call per chunk."""

    def __init__(self, variants: list[Variant], build_dir: Path, chunks: int | None = None):
        chunks = chunks or os.cpu_count() or 1
        units: dict[str, tuple[Variant, str]] = {}
        self.entries: dict[Variant, str] = {}
        for variant in variants:
            unit = metal_translation_unit(variant)
            name = parse_signature(unit)[0]
            self.entries[variant] = f"thread_{name}"
            units.setdefault(name, (variant, unit))
        sources: list[list[str]] = [[] for _ in range(chunks)]
        for k, (variant, unit) in enumerate(units.values()):
            sources[k % chunks].append(unit + _driver(unit, variant))
        self.libraries = self._build([s for s in sources if s], build_dir)
        self.count = len(units)

    @staticmethod
    def _build(chunks: list[list[str]], build_dir: Path) -> list[ctypes.CDLL]:
        build_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for chunk in chunks:
            text = '#include "metal_shim.h"\n' + RUN_GRID + "\n".join(chunk)
            # Content-addressed, so a rerun with nothing changed reuses the library.
            key = text + " ".join(CXXFLAGS) + (SHIM_DIR / "metal_shim.h").read_text()
            digest = hashlib.sha256(key.encode()).hexdigest()[:20]
            source = build_dir / f"kernels_{digest}.cpp"
            paths.append((source, source.with_suffix(".so")))
            if not source.with_suffix(".so").exists():
                source.write_text(text)

        def compile_one(paths: tuple[Path, Path]) -> None:
            if not paths[1].exists():
                compile_library(*paths)

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
    ) -> None:
        """Run the kernel on host buffers (inputs then outputs, in the kernel's order)."""
        pointers = (ctypes.c_void_p * len(buffers))(*(b.ctypes.data for b in buffers))
        shape_array = np.array(shape, np.int32)
        grid_array = np.array(grid, np.uint32)
        if positions is not None:
            positions = np.ascontiguousarray(positions, np.uint32)
        library, thread = self._thread_function(variant)
        library.run_grid.restype = None
        library.run_grid(
            thread,
            pointers,
            shape_array.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_int(len(shape)),
            grid_array.ctypes.data_as(ctypes.c_void_p),
            None if positions is None else positions.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_uint64(0 if positions is None else len(positions)),
        )

    def run(self, call: KernelCall) -> list[mx.array]:
        """What the GPU would return for ``call`` (the launcher's own plan): every thread of
        its grid, on row-contiguous copies of its inputs (as MLX makes them)."""
        variant = call.variant
        inputs = [_to_numpy(array) for array in call.inputs]
        size = int(np.prod(call.output_shape, dtype=np.int64))
        outputs = [
            np.full(size * np.dtype(NUMPY_STORAGE[d]).itemsize, SENTINEL_BYTE, np.uint8).view(
                NUMPY_STORAGE[d]
            )
            for d in variant.output_dtypes
        ]
        self.run_buffers(variant, [*inputs, *outputs], call.inputs[0].shape, call.grid)
        return [
            _from_numpy(values, dtype).reshape(call.output_shape)
            for values, dtype in zip(outputs, variant.output_dtypes, strict=True)
        ]
