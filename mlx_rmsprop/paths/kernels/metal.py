"""The Metal launcher: ``mx.fast.metal_kernel`` around the shared body, for Apple GPUs."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import mlx.core as mx

from ...spec import UpdateFn
from .launch import KernelCall, launch_with, make_accumulating_update, make_update
from .source import kernel_arguments


@cache
def kernel_object(
    state_keys: tuple[str, ...],
    rounding: bool = False,
    factors: bool = False,
    accumulating: bool = False,
) -> Callable:
    """Built once per buffer layout, with or without stochastic rounding and with or without
    per-parameter clip factors (each changes the inputs: ``index``, ``factors``): dtypes and
    flags arrive as template arguments (MLX then compiles each variant once), per-step numbers
    as the scalars array and the factors matrix, so a learning-rate schedule never changes the
    source.

    Factors are a kernel of their own rather than an input every kernel takes: without
    per-parameter clipping the clip entries live in the scalars vector (a global clip factor
    among them), and a matrix made from them for every call would be the per-parameter graph
    node the factors input exists to remove. Whether an optimizer clips by each parameter's
    norm is fixed by its configuration, so each optimizer still uses one kernel object per
    layout. Accumulating gradients (Keras' gradient accumulation) likewise: its kernel takes
    the accumulator, the gates and (loss scale, steps) as inputs (source.ACCUMULATION_LINES)
    and writes the new accumulator, and whether an optimizer accumulates is fixed too."""
    return mx.fast.metal_kernel(
        **kernel_arguments("metal", state_keys, rounding, factors, accumulating)
    )


def launch(call: KernelCall, verbose: bool = False) -> list[mx.array]:
    variant = call.variant
    kernel = kernel_object(
        variant.options.state_keys, variant.rounding, variant.factors, variant.accumulates
    )
    return launch_with(kernel, call, verbose)


def load() -> UpdateFn:
    """The update function for ``fused="metal"``; raises ``RuntimeError`` without Metal."""
    if not mx.metal.is_available():
        raise RuntimeError(
            "MLX's Metal backend is not available (mx.metal.is_available() is False); "
            "the Metal kernel needs an Apple-silicon Mac"
        )
    return make_update(launch)


def load_accumulating() -> Callable:
    """The accumulating update for ``fused="metal"`` (signature of
    :func:`~mlx_rmsprop.paths.kernels.launch.accumulating_reference`); raises
    ``RuntimeError`` where :func:`load` does."""
    load()
    return make_accumulating_update(launch)
