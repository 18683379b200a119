"""What one fused update needs to know: the code-selecting flags and the per-step scalar layout.

Every path (plain reference ops, the compiled graph, the Metal/CUDA kernels, the native CPU op)
takes the same two things: an ``UpdateOptions`` (static, selects code, part of every cache key)
and a small ``scalars`` vector (data, changes per step, never part of a cache key) laid out as
``Scalar`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mlx.core as mx

WEIGHT_DECAY_MODES = ("none", "coupled", "decoupled")


class Scalar(IntEnum):
    """Index of each per-step value in the ``scalars`` vector (dtype = the arithmetic dtype)."""

    LR = 0
    ALPHA = 1
    # 1 - alpha rounded once from float64: computing it in float32 would differ from every
    # framework, which all form (1 - alpha) in Python double precision.
    ONE_MINUS_ALPHA = 2
    EPS = 3
    MOMENTUM = 4
    WEIGHT_DECAY = 5
    # 1 - alpha**t (t = 1-based step) when bias correction is on, else 1.
    BIAS_CORRECTION = 6
    # Keras pipeline: g / loss_scale_factor, then g * CLIP_MULTIPLIER / CLIP_DIVISOR
    # (clipnorm: c / max(||g||, c); global_clipnorm: scale / 1). All 1 when unused.
    GRAD_DIVISOR = 7
    CLIP_MULTIPLIER = 8
    CLIP_DIVISOR = 9
    CLIP_VALUE = 10
    # 1: apply the update; 0: parameter and optimizer state keep their values (a skipped
    # non-finite step, or an intermediate gradient-accumulation call).
    UPDATE_GATE = 11
    EMA_MOMENTUM = 12
    EMA_ONE_MINUS_MOMENTUM = 13
    # 1: update the EMA buffer; 0: keep it (a skipped non-finite step).
    EMA_GATE = 14
    # 1: overwrite the parameter with its EMA after this step.
    EMA_OVERWRITE = 15


NUM_SCALARS = len(Scalar)


@dataclass(frozen=True)
class UpdateOptions:
    """Flags that select code in the update. Hashable: used as a cache key for compiled
    functions and kernels. Values that are mere numbers live in the scalars vector instead."""

    centered: bool = False
    momentum: bool = False
    nesterov: bool = False
    eps_in_sqrt: bool = False
    lr_in_momentum: bool = False
    weight_decay: str = "none"
    maximize: bool = False
    bias_correction: bool = False
    scale_gradient: bool = False
    clip_value: bool = False
    gated: bool = False
    ema: bool = False

    def __post_init__(self) -> None:
        if self.weight_decay not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"weight_decay mode must be one of {WEIGHT_DECAY_MODES}, got {self.weight_decay!r}"
            )
        if self.nesterov and not self.momentum:
            raise ValueError("nesterov requires momentum")

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Per-parameter state buffers this configuration reads and writes, in kernel order."""
        keys = ["v"]
        if self.centered:
            keys.append("grad_avg")
        if self.momentum:
            keys.append("momentum_buffer")
        if self.ema:
            keys.append("ema")
        return tuple(keys)


# Every path's per-parameter update: (options, scalars, parameter, gradient, state) ->
# (new parameter, new state), as :func:`~mlx_rmsprop.reference.rmsprop_reference`. Spelled
# with strings: benchmarks/gpu_kernel_check.py loads this module by path where mlx is absent.
UpdateFn = Callable[
    [UpdateOptions, "mx.array", "mx.array", "mx.array", "dict[str, mx.array]"],
    "tuple[mx.array, dict[str, mx.array]]",
]
