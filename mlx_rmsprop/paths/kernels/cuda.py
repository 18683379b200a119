"""The CUDA launcher: ``mx.fast.cuda_kernel`` around the same body, for MLX's CUDA backend."""

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
    """Built once per buffer layout, as for Metal. MLX compiles each template instance with
    NVRTC on its first launch in a process and keeps it in memory only: for custom kernels it
    turns its PTX disk cache off (mlx/backend/cuda/custom_kernel.cpp passes
    use_disk_cache=false to cu::get_jit_module; jit_module.cpp writes the cache only when that
    is true), so every process compiles each variant it uses again (about a second each)."""
    return mx.fast.cuda_kernel(
        **kernel_arguments("cuda", state_keys, rounding, factors, accumulating)
    )


def launch(call: KernelCall, verbose: bool = False) -> list[mx.array]:
    variant = call.variant
    kernel = kernel_object(
        variant.options.state_keys, variant.rounding, variant.factors, variant.accumulates
    )
    return launch_with(kernel, call, verbose)


def load() -> UpdateFn:
    """The update function for ``fused="cuda"``; raises ``RuntimeError`` without CUDA."""
    if not mx.cuda.is_available():
        raise RuntimeError(
            "MLX's CUDA backend is not available (mx.cuda.is_available() is False); "
            "the CUDA kernel needs an NVIDIA GPU and MLX's CUDA build (mlx[cuda12] or "
            "mlx[cuda13])"
        )
    return make_update(launch)


def load_accumulating() -> Callable:
    """The accumulating update for ``fused="cuda"`` (signature of
    :func:`~mlx_rmsprop.paths.kernels.launch.accumulating_reference`); raises
    ``RuntimeError`` where :func:`load` does."""
    load()
    return make_accumulating_update(launch)
