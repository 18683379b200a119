"""The Metal launcher: ``mx.fast.metal_kernel`` around the shared body, for Apple GPUs."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import mlx.core as mx

from ...spec import UpdateFn
from .launch import KernelCall, launch_with, make_update
from .source import kernel_arguments


@cache
def kernel_object(state_keys: tuple[str, ...], rounding: bool = False) -> Callable:
    """Built once per buffer layout (and with or without the ``index`` input of stochastic
    rounding): dtypes and flags arrive as template arguments (MLX then
    compiles each variant once), per-step numbers as the scalars array, so a learning-rate
    schedule never changes the source."""
    return mx.fast.metal_kernel(**kernel_arguments("metal", state_keys, rounding))


def launch(call: KernelCall, verbose: bool = False) -> list[mx.array]:
    return launch_with(
        kernel_object(call.variant.options.state_keys, call.variant.rounding), call, verbose
    )


def load() -> UpdateFn:
    """The update function for ``fused="metal"``; raises ``RuntimeError`` without Metal."""
    if not mx.metal.is_available():
        raise RuntimeError(
            "MLX's Metal backend is not available (mx.metal.is_available() is False); "
            "the Metal kernel needs an Apple-silicon Mac"
        )
    return make_update(launch)
