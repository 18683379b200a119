"""Setting up one kernel launch per parameter, shared by the Metal and the CUDA launcher.

``plan`` turns the arguments of an update into a :class:`KernelCall` (the inputs, template
arguments, grid and output description MLX needs) or ``None`` when the kernel cannot take this
parameter, which then goes through the reference math. ``make_update`` wraps a backend's
``launch(call)`` into an update function with the signature of ``rmsprop_reference``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from ...reference import rmsprop_reference, spliced_scalars
from ...spec import STORAGE_FLAGS, UpdateFn, UpdateOptions
from .source import KERNEL_DTYPES, METAL_CONSTANT_BELOW, Variant

# MLX takes each grid dimension as an int, and array dimensions are 32-bit too.
MAX_GRID_DIM = 2**31 - 1
# Threads per row of the 2-D grid used from 2^31 elements on: a multiple of THREADGROUP, so
# that CUDA's whole blocks tile each row exactly and the row pitch is this width on both
# backends (see the index lines in source.py).
ROW_WIDTH = 2**30
# 256 threads: a whole number of Apple SIMD groups and NVIDIA warps (32). Not tuned: no Apple
# or NVIDIA GPU was available to measure alternatives.
THREADGROUP = (256, 1, 1)
# CUDA's limit on the grid's y dimension (in blocks, one block per row here).
MAX_ROWS = 65535


def kernel_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the kernel sees: adjacent dimensions merged while their product stays a valid
    32-bit dimension, so (n,) whenever n < 2^31, (1,) for a 0-d array (MLX passes 0-d inputs
    by reference, which the body's indexing cannot take) and a few dimensions beyond 2^31
    elements. Merging is free for row-contiguous arrays (a view) and copies the others, which
    MLX would otherwise copy to make them row-contiguous."""
    merged: list[int] = []
    for dim in shape:
        if merged and merged[-1] * dim <= MAX_GRID_DIM:
            merged[-1] *= dim
        else:
            merged.append(dim)
    return tuple(merged) or (1,)


# The largest 1-D grid MLX's CUDA launch arithmetic takes: it computes the block count as
# (gx + tx - 1) / tx in signed 32-bit int (mlx/backend/cuda/custom_kernel.cpp,
# CustomKernel::eval_gpu, "Make the grid"; grid and threadgroup are std::tuple<int, int, int>),
# which overflows for gx > 2^31 - tx, i.e. sizes 2^31 - 255 .. 2^31 - 1 with 256 threads.
# From there on the grid is 2-D on both backends (one index computation for both).
MAX_1D_GRID = MAX_GRID_DIM - (THREADGROUP[0] - 1)


def grid_for(size: int) -> tuple[int, int, int]:
    """Threads to launch for ``size`` elements: one row of ``size`` threads up to
    ``MAX_1D_GRID`` (2^31 - 256), else rows of ``ROW_WIDTH`` (the body computes the 64-bit
    index and skips the overhang)."""
    if size <= MAX_1D_GRID:
        return (size, 1, 1)
    rows = -(-size // ROW_WIDTH)
    if rows > MAX_ROWS:
        raise ValueError(
            f"the kernel handles at most {MAX_ROWS * ROW_WIDTH} elements per parameter, got {size}"
        )
    return (ROW_WIDTH, rows, 1)


@dataclass(frozen=True)
class KernelCall:
    """One launch: what the backend's kernel object is called with."""

    variant: Variant
    inputs: tuple[mx.array, ...]
    grid: tuple[int, int, int]
    output_shape: tuple[int, ...]

    @property
    def output_shapes(self) -> list[tuple[int, ...]]:
        return [self.output_shape] * len(self.variant.output_names)

    def unpack(self, outputs: list[mx.array]) -> tuple[mx.array, dict[str, mx.array]]:
        """``(new_parameter, new_state)`` from the kernel's outputs."""
        return outputs[0], dict(zip(self.variant.options.state_keys, outputs[1:], strict=True))


def plan(
    options: UpdateOptions,
    scalars: mx.array,
    parameter: mx.array,
    gradient: mx.array,
    state: dict[str, mx.array],
) -> KernelCall | None:
    """The launch for a non-empty parameter, or ``None`` when an input has a dtype the kernel
    does not compute with (float64 runs, complex), the state buffers differ in dtype, or a
    storage option (8-bit state, stochastic rounding) is on, which the kernels do not store."""
    buffers = [state[key] for key in options.state_keys]
    state_dtypes = {buffer.dtype for buffer in buffers}
    if (
        any(getattr(options, name) for name in STORAGE_FLAGS)
        or scalars.dtype != mx.float32
        or parameter.dtype not in KERNEL_DTYPES
        or gradient.dtype not in KERNEL_DTYPES
        or len(state_dtypes) != 1
        or not state_dtypes <= set(KERNEL_DTYPES)
    ):
        return None
    variant = Variant(
        options,
        parameter_dtype=parameter.dtype,
        gradient_dtype=gradient.dtype,
        state_dtype=buffers[0].dtype,
        small=parameter.size < METAL_CONSTANT_BELOW,
    )
    shape = kernel_shape(parameter.shape)

    def flat(array: mx.array) -> mx.array:
        return array if array.shape == shape else array.reshape(shape)

    return KernelCall(
        variant=variant,
        inputs=(flat(parameter), flat(gradient), *(flat(b) for b in buffers), scalars),
        grid=grid_for(parameter.size),
        output_shape=tuple(parameter.shape),
    )


def launch_with(kernel: Callable, call: KernelCall, verbose: bool = False) -> list[mx.array]:
    """Call an MLX kernel object (Metal or CUDA: same call signature) for ``call``."""
    return kernel(
        inputs=list(call.inputs),
        template=call.variant.template_args(),
        grid=call.grid,
        threadgroup=THREADGROUP,
        output_shapes=call.output_shapes,
        output_dtypes=list(call.variant.output_dtypes),
        verbose=verbose,
    )


def make_update(launch: Callable[[KernelCall], list[mx.array]]) -> UpdateFn:
    """An update function (signature of ``rmsprop_reference``) running ``launch`` once per
    parameter: no launch for an empty parameter, the reference math where ``plan`` declines."""

    def update(
        options: UpdateOptions,
        scalars: mx.array,
        parameter: mx.array,
        gradient: mx.array,
        state: dict[str, mx.array],
        *,
        index: int = 0,
        factors: mx.array | None = None,
    ) -> tuple[mx.array, dict[str, mx.array]]:
        if parameter.size == 0:
            return parameter, {key: state[key] for key in options.state_keys}
        # The kernel body reads its clip factors from the scalars vector.
        scalars = spliced_scalars(scalars, index, factors)
        call = plan(options, scalars, parameter, gradient, state)
        if call is None:
            return rmsprop_reference(options, scalars, parameter, gradient, state, index=index)
        return call.unpack(launch(call))

    return update
