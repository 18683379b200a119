"""Setting up one kernel launch per parameter, shared by the Metal and the CUDA launcher.

``plan`` turns the arguments of an update into a :class:`KernelCall` (the inputs, template
arguments, grid and output description MLX needs) or ``None`` when the kernel cannot take this
parameter, which then goes through the reference math. ``make_update`` wraps a backend's
``launch(call)`` into an update function with the signature of ``rmsprop_reference``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx

from ...reference import rmsprop_reference
from ...spec import ACCUMULATOR, EMA, QUANTIZED_KEYS, UpdateFn, UpdateOptions, scale_key
from ...step import accumulate_tensor, carry_tensor, compute_dtype
from .source import KERNEL_DTYPES, METAL_CONSTANT_BELOW, Variant

# MLX takes each grid dimension as an int, and array dimensions are 32-bit too.
MAX_GRID_DIM = 2**31 - 1
# Threads per row of the 2-D grid used from 2^31 elements on: a multiple of THREADGROUP, so
# that CUDA's whole blocks tile each row exactly and the row pitch is this width on both
# backends (see the index lines in source.py).
ROW_WIDTH = 2**30
# 256 threads: a whole number of Apple SIMD groups and NVIDIA warps (32). Not tuned: no Apple
# or NVIDIA GPU was available to measure alternatives. With 8-bit state the threadgroup is one
# quantization block instead (``threadgroup_for``).
THREADGROUP = (256, 1, 1)
# CUDA's limit on the grid's y dimension (in blocks, one block per row here).
MAX_ROWS = 65535
# Per-parameter clip factors the launchers take (the native path's rule); float64 is cast.
FACTOR_DTYPES = (mx.float32, mx.float64)


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


def threadgroup_for(options: UpdateOptions) -> tuple[int, int, int]:
    """THREADGROUP, or with 8-bit state one block (``options.block_size`` threads: the body
    reduces a block over its threadgroup)."""
    return (options.block_size, 1, 1) if options.quantized_state else THREADGROUP


def grid_for(size: int, block_size: int = 0) -> tuple[int, int, int]:
    """Threads to launch for ``size`` elements: one row up to MLX's largest 1-D grid for the
    threadgroup (2^31 - 256 with THREADGROUP), else rows of ``ROW_WIDTH`` (the body computes
    the 64-bit index and skips the overhang). With ``block_size`` (8-bit state: the
    threadgroup is one block) the threads are rounded up to whole blocks, so that every
    threadgroup is full on Metal too; ROW_WIDTH is a multiple of every block size, so rows hold
    whole blocks."""
    threads = -(-size // block_size) * block_size if block_size else size
    group = block_size or THREADGROUP[0]
    if threads <= MAX_GRID_DIM - (group - 1):
        return (threads, 1, 1)
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
    output_shapes: tuple[tuple[int, ...], ...]
    threadgroup: tuple[int, int, int] = THREADGROUP

    def unpack(self, outputs: list[mx.array]) -> tuple[mx.array, dict[str, mx.array]]:
        """``(new_parameter, new_state)`` from the kernel's outputs; an accumulating kernel's
        new accumulator under ACCUMULATOR in the state."""
        return outputs[0], dict(zip(self.variant.state_names, outputs[1:], strict=True))


class Accumulation(NamedTuple):
    """What an accumulating kernel takes beside the update's arguments (the native path's
    ``accumulating_update`` arguments): the parameter's ``accumulator``, this step's float32
    ``gates`` (applies, skip), the ``loss_scale`` (0: none) and the number of ``steps``."""

    accumulator: mx.array
    gates: mx.array
    loss_scale: float
    steps: int

    def constants(self) -> mx.array:
        """The kernel's float32 ``accumulation`` input, (loss scale, steps): a constant."""
        return mx.array([self.loss_scale, self.steps], mx.float32)


def _float_state_dtype(options: UpdateOptions, state: dict[str, mx.array]) -> mx.Dtype | None:
    """The one dtype of the float state buffers (every buffer, or with 8-bit state the EMA),
    when the kernel computes with it; else None."""
    keys = [key for key in options.state_keys if key == EMA or not options.quantized_state]
    dtypes = {state[key].dtype for key in keys}
    if not keys:
        return mx.float32
    if len(dtypes) != 1 or not dtypes <= set(KERNEL_DTYPES):
        return None
    return dtypes.pop()


def _blocks(size: int, block_size: int) -> int:
    return -(-size // block_size)


def _quantized_state_fits(
    options: UpdateOptions, parameter: mx.array, state: dict[str, mx.array]
) -> bool:
    """Whether each 8-bit buffer is uint8 codes of the parameter's shape with float32 scales,
    one per block (else the reference raises its error or computes)."""
    blocks = _blocks(parameter.size, options.block_size)
    for key in QUANTIZED_KEYS:
        if key not in options.state_keys:
            continue
        codes, scales = state[key], state[scale_key(key)]
        if codes.dtype != mx.uint8 or codes.shape != parameter.shape:
            return False
        if scales.dtype != mx.float32 or scales.shape != (blocks,):
            return False
    return True


def check_factors(index: int, factors: mx.array | None) -> None:
    """``ValueError`` unless ``factors`` is ``None`` or a float32 or float64 (parameters, 2)
    matrix with a row ``index`` (the native path's rule; the reference would fail on an
    index past the last row with an unrelated message)."""
    if factors is None:
        return
    if factors.ndim != 2 or factors.shape[1] != 2 or factors.dtype not in FACTOR_DTYPES:
        raise ValueError(
            "factors must be a float32 or float64 matrix of shape (parameters, 2), got "
            f"{factors.dtype} {tuple(factors.shape)}"
        )
    if not 0 <= index < factors.shape[0]:
        raise ValueError(
            f"index must be a row of factors (0 to {factors.shape[0] - 1}), got {index}"
        )


def plan(
    options: UpdateOptions,
    scalars: mx.array,
    parameter: mx.array,
    gradient: mx.array,
    state: dict[str, mx.array],
    index: int = 0,
    factors: mx.array | None = None,
    accumulation: Accumulation | None = None,
) -> KernelCall | None:
    """The launch for a non-empty parameter, or ``None`` when an input has a dtype the kernel
    does not compute with (float64 runs, complex), the float state buffers differ in dtype,
    8-bit state is not in its format, or the accumulator is not a kernel dtype of the
    parameter's shape. ``index``: the parameter's position in the step (the
    stochastic rounding hash reads it, and it selects the row of ``factors``), passed as a
    one-element uint32 input array. ``factors``: the step's per-parameter clip factors, a
    (parameters, 2) matrix passed whole (no per-parameter slice node); the kernel reads its
    row ``index`` in place of the scalars' clip entries, as ``rmsprop_reference`` does.
    ``accumulation``: the kernel accumulates first (Keras' gradient accumulation) and returns
    the new accumulator too (:func:`accumulating_reference`'s values)."""
    check_factors(index, factors)
    state_dtype = _float_state_dtype(options, state)
    if (
        scalars.dtype != mx.float32
        or parameter.dtype not in KERNEL_DTYPES
        or gradient.dtype not in KERNEL_DTYPES
        or state_dtype is None
        or (options.quantized_state and not _quantized_state_fits(options, parameter, state))
        or (
            accumulation is not None
            and (
                accumulation.accumulator.dtype not in KERNEL_DTYPES
                or accumulation.accumulator.shape != parameter.shape
            )
        )
    ):
        return None
    quantized = options.quantized_state
    blocks = _blocks(parameter.size, options.block_size) if quantized else 0
    # Only scale_gradient reads the clip entries: without it the factors are not passed.
    if not options.scale_gradient:
        factors = None
    elif factors is not None and factors.dtype != mx.float32:
        # A tree mixing float32 and float64 arithmetic has float64 factors (float32 factors
        # widened exactly where the parameter computes in float32). The kernel computes in
        # float32 and Metal has no double, so the matrix arrives as float32: the cast rounds
        # each entry as the reference's factors[index, k].astype(float32) does, bit for bit.
        factors = factors.astype(mx.float32)
    variant = Variant(
        options,
        parameter_dtype=parameter.dtype,
        gradient_dtype=gradient.dtype,
        state_dtype=state_dtype,
        small=parameter.size < METAL_CONSTANT_BELOW,
        small_scales=quantized and blocks < METAL_CONSTANT_BELOW,
        factors=factors is not None,
        small_factors=factors is not None and factors.size < METAL_CONSTANT_BELOW,
        accumulator_dtype=None if accumulation is None else accumulation.accumulator.dtype,
    )
    shape = kernel_shape(parameter.shape)
    scales = {scale_key(key) for key in QUANTIZED_KEYS}

    def flat(array: mx.array) -> mx.array:
        return array if array.shape == shape else array.reshape(shape)

    buffers = [state[key] if key in scales else flat(state[key]) for key in options.state_keys]
    # `index` is a constant array (no graph node); `factors` the caller's matrix itself.
    index_input = (mx.array([index], dtype=mx.uint32),) if variant.positioned else ()
    factor_input = (factors,) if factors is not None else ()
    accumulation_inputs = ()
    if accumulation is not None:
        gates = accumulation.gates.astype(mx.float32)
        accumulation_inputs = (flat(accumulation.accumulator), gates, accumulation.constants())
    output_shapes = tuple(
        (blocks,) if name in scales else tuple(parameter.shape)
        for name in ("parameter", *variant.state_names)
    )
    return KernelCall(
        variant=variant,
        inputs=(
            flat(parameter),
            flat(gradient),
            *buffers,
            scalars,
            *index_input,
            *factor_input,
            *accumulation_inputs,
        ),
        grid=grid_for(parameter.size, options.block_size if quantized else 0),
        output_shapes=output_shapes,
        threadgroup=threadgroup_for(options),
    )


def launch_with(kernel: Callable, call: KernelCall, verbose: bool = False) -> list[mx.array]:
    """Call an MLX kernel object (Metal or CUDA: same call signature) for ``call``."""
    return kernel(
        inputs=list(call.inputs),
        template=call.variant.template_args(),
        grid=call.grid,
        threadgroup=call.threadgroup,
        output_shapes=list(call.output_shapes),
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
        check_factors(index, factors)
        if parameter.size == 0:
            return parameter, {key: state[key] for key in options.state_keys}
        call = plan(options, scalars, parameter, gradient, state, index, factors)
        if call is None:
            return rmsprop_reference(
                options, scalars, parameter, gradient, state, index=index, factors=factors
            )
        return call.unpack(launch(call))

    return update


def accumulating_reference(
    options: UpdateOptions,
    scalars: mx.array,
    parameter: mx.array,
    gradient: mx.array,
    state: dict[str, mx.array],
    accumulator: mx.array,
    gates: mx.array,
    loss_scale: float,
    accumulation_steps: int,
    *,
    index: int = 0,
    factors: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array], mx.array]:
    """The accumulating update from MLX ops, with the native path's ``accumulating_update``
    signature: ``(new parameter, new state, new accumulator)``, the values of
    :func:`mlx_rmsprop.step.accumulate`, :func:`mlx_rmsprop.step.carry_accumulators` and
    ``rmsprop_reference`` on the mean. What an accumulating kernel is compared with, and what
    runs a parameter the kernel does not take."""
    dtype = compute_dtype(options, parameter, gradient, {**state, ACCUMULATOR: accumulator})
    mean, summed = accumulate_tensor(
        gradient, accumulator, loss_scale or None, accumulation_steps, dtype
    )
    new_accumulator = carry_tensor(summed, accumulator, gates[0] != 0, gates[1] != 0, dtype)
    new_parameter, new_state = rmsprop_reference(
        options, scalars, parameter, mean, state, index=index, factors=factors
    )
    return new_parameter, new_state, new_accumulator


def make_accumulating_update(launch: Callable[[KernelCall], list[mx.array]]) -> Callable:
    """The accumulating update (signature of :func:`accumulating_reference`) running ``launch``
    once per parameter: no launch for an empty parameter, :func:`accumulating_reference` where
    ``plan`` declines."""

    def accumulating_update(
        options: UpdateOptions,
        scalars: mx.array,
        parameter: mx.array,
        gradient: mx.array,
        state: dict[str, mx.array],
        accumulator: mx.array,
        gates: mx.array,
        loss_scale: float,
        accumulation_steps: int,
        *,
        index: int = 0,
        factors: mx.array | None = None,
    ) -> tuple[mx.array, dict[str, mx.array], mx.array]:
        check_factors(index, factors)
        if parameter.size == 0:
            return parameter, {key: state[key] for key in options.state_keys}, accumulator
        accumulation = Accumulation(accumulator, gates, loss_scale, accumulation_steps)
        call = plan(options, scalars, parameter, gradient, state, index, factors, accumulation)
        if call is None:
            return accumulating_reference(
                options,
                scalars,
                parameter,
                gradient,
                state,
                accumulator,
                gates,
                loss_scale,
                accumulation_steps,
                index=index,
                factors=factors,
            )
        new_parameter, new_state = call.unpack(launch(call))
        return new_parameter, new_state, new_state.pop(ACCUMULATOR)

    return accumulating_update


def with_accumulator_in_state(
    accumulating_update: Callable, loss_scale: float, accumulation_steps: int
) -> UpdateFn:
    """``accumulating_update`` (signature of :func:`accumulating_reference`) for a fixed
    ``loss_scale`` and ``accumulation_steps``, as an update with the signature of
    ``rmsprop_reference`` plus the keyword ``gates``, whose state holds the accumulator under
    ACCUMULATOR, the new one too: verification compares every output of an accumulating kernel
    like every state buffer."""

    def update(
        options: UpdateOptions,
        scalars: mx.array,
        parameter: mx.array,
        gradient: mx.array,
        state: dict[str, mx.array],
        *,
        gates: mx.array,
        index: int = 0,
        factors: mx.array | None = None,
    ) -> tuple[mx.array, dict[str, mx.array]]:
        buffers = {key: state[key] for key in options.state_keys}
        new_parameter, new_state, new_accumulator = accumulating_update(
            options,
            scalars,
            parameter,
            gradient,
            buffers,
            state[ACCUMULATOR],
            gates,
            loss_scale,
            accumulation_steps,
            index=index,
            factors=factors,
        )
        return new_parameter, {**new_state, ACCUMULATOR: new_accumulator}

    return update
