"""The gradient pipeline around the fused update, in Keras' order: loss-scale, accumulation,
clipping, weight decay, EMA; plus skipping non-finite steps.

What is element-wise and per parameter (dividing by the loss scale, clipping by value, weight
decay, the EMA) happens inside the fused update as scalars; what needs the whole tensor or the
whole tree (norms, the non-finite flag, the accumulator) is computed here, once per step, and
handed to the update as data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from . import validation


@dataclass(frozen=True)
class PipelineConfig:
    """Validated pipeline settings (``None`` / ``False`` = off)."""

    loss_scale_factor: float | None = None
    gradient_accumulation_steps: int | None = None
    clipnorm: float | None = None
    global_clipnorm: float | None = None
    clipvalue: float | None = None
    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: int | None = None
    skip_nonfinite: bool = False
    # A schedule may return NaN or a negative value where nobody can raise (inside
    # mx.compile): such a step is then skipped in the graph.
    guard_learning_rate: bool = False

    @property
    def accumulates(self) -> bool:
        return self.gradient_accumulation_steps is not None

    @property
    def gated(self) -> bool:
        """Some steps must leave the parameters and the state as they were."""
        return self.accumulates or self.skip_nonfinite or self.guard_learning_rate

    @property
    def scales_in_update(self) -> bool:
        """The fused update divides by the loss scale and multiplies by a clip factor.

        With accumulation the loss scale is divided out before accumulating (as Keras does),
        so only clipping by norm is left to the update."""
        loss_scale = self.loss_scale_factor is not None and not self.accumulates
        return loss_scale or self.clipnorm is not None or self.global_clipnorm is not None


def pipeline_config(
    *,
    skip_nonfinite: Any,
    loss_scale_factor: Any,
    gradient_accumulation_steps: Any,
    clipnorm: Any,
    global_clipnorm: Any,
    clipvalue: Any,
    use_ema: Any,
    ema_momentum: Any,
    ema_overwrite_frequency: Any,
    scheduled: bool,
) -> PipelineConfig:
    """Validate the pipeline arguments (errors name the argument and the value)."""
    clip_arguments = {
        "clipnorm": clipnorm,
        "clipvalue": clipvalue,
        "global_clipnorm": global_clipnorm,
    }
    if sum(value is not None for value in clip_arguments.values()) > 1:
        # Keras' wording, which code ported from Keras matches.
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received: "
            + ", ".join(f"{key}={value!r}" for key, value in clip_arguments.items())
        )
    use_ema = validation.flag("use_ema", use_ema)
    ema_momentum = validation.in_range("ema_momentum", ema_momentum, 0.0, 1.0)
    if ema_overwrite_frequency is not None:
        ema_overwrite_frequency = validation.integer_at_least(
            "ema_overwrite_frequency", ema_overwrite_frequency, 1
        )
        if not use_ema:
            raise ValueError(
                f"ema_overwrite_frequency={ema_overwrite_frequency} needs use_ema=True"
            )
    if gradient_accumulation_steps is not None:
        gradient_accumulation_steps = validation.integer_at_least(
            "gradient_accumulation_steps", gradient_accumulation_steps, 2
        )
    return PipelineConfig(
        loss_scale_factor=validation.optional_positive("loss_scale_factor", loss_scale_factor),
        gradient_accumulation_steps=gradient_accumulation_steps,
        clipnorm=validation.optional_positive("clipnorm", clipnorm),
        global_clipnorm=validation.optional_positive("global_clipnorm", global_clipnorm),
        clipvalue=validation.optional_positive("clipvalue", clipvalue),
        use_ema=use_ema,
        ema_momentum=ema_momentum,
        ema_overwrite_frequency=ema_overwrite_frequency,
        skip_nonfinite=validation.flag("skip_nonfinite", skip_nonfinite),
        guard_learning_rate=scheduled,
    )


def all_finite(gradients: list[mx.array]) -> mx.array:
    """One boolean for the whole step (no host synchronisation)."""
    flags = [mx.all(mx.isfinite(g)) for g in gradients if g.size]
    return mx.all(mx.stack(flags)) if flags else mx.array(True)


def _sum_of_squares(values: list[mx.array]) -> mx.array:
    return mx.sum(mx.stack([mx.sum(mx.square(v)) for v in values]))


def _overflow_safe(values: list[mx.array]) -> tuple[mx.array, mx.array, mx.array]:
    """``(overflows, largest, scaled_norm)``: whether the plain sum of squares of these
    finite-or-not values is infinite although every value is finite, the largest magnitude
    ``m`` and ``||values / m||``. The true norm is ``m * scaled_norm``, which may itself be
    beyond float range: callers use ``m`` and ``scaled_norm`` separately.

    The plain sum stays the result whenever it is finite, so ordinary steps keep Keras'
    rounding bit for bit; the scaled form is selected in the graph only where the plain one
    overflows (2^20 entries of 2e16 have a finite norm of 2e19, but the squares sum to inf).
    """
    largest = mx.max(mx.stack([mx.max(mx.abs(v)) for v in values]))
    # Divide by 1 where the largest magnitude is 0 or not finite: that branch is not selected.
    safe = mx.where(mx.logical_and(mx.isfinite(largest), largest > 0), largest, 1)
    scaled = mx.sqrt(_sum_of_squares([v / safe for v in values]))
    return mx.isfinite(largest), largest, scaled


def l2_norm(values: mx.array) -> mx.array:
    """Keras' clip_by_norm norm: the sum of squares, square-rooted where it is positive."""
    total = mx.sum(mx.square(values))
    return mx.where(total > 0, mx.sqrt(mx.where(total > 0, total, 1)), total)


def clip_by_norm_factors(values: mx.array, clipnorm: float) -> tuple[mx.array, mx.array]:
    """``g * clipnorm / max(||g||, clipnorm)`` as (multiplier, divisor).

    Where the sum of squares overflows for finite values, ``||g|| = m ||g / m||`` is far above
    ``clipnorm``, and the factors become ``(clipnorm / m, ||g / m||)``: the same quotient,
    with no intermediate beyond float range."""
    norm = l2_norm(values)
    limit = mx.array(clipnorm, values.dtype)
    multiplier, divisor = limit, mx.maximum(norm, limit)
    if values.size == 0:
        return multiplier, divisor
    finite, largest, scaled = _overflow_safe([values])
    overflows = mx.logical_and(mx.isinf(norm), finite)
    return (
        mx.where(overflows, limit / mx.where(overflows, largest, 1), multiplier),
        mx.where(overflows, scaled, divisor),
    )


def global_clip_factor(values: list[mx.array], clipnorm: float, dtype: mx.Dtype) -> mx.array:
    """Keras' clip_by_global_norm scale: ``c * min(1/n, 1/c)``, NaN when the norm is not
    finite (so a non-finite step stays visible).

    Where the sum of squares overflows for finite values, ``n = m ||g / m||`` is far above
    ``c`` and the scale is ``(c / m) / ||g / m||``, formed without leaving float range."""
    values = [v for v in values if v.size]
    limit = mx.array(clipnorm, dtype)
    if not values:
        return mx.array(1.0, dtype)
    norm = mx.sqrt(_sum_of_squares(values))
    plain = limit * mx.minimum(1 / norm, 1 / limit) + (norm - norm)
    finite, largest, scaled = _overflow_safe(values)
    overflows = mx.logical_and(mx.isinf(norm), finite)
    rescued = limit / mx.where(overflows, largest, 1) / scaled
    return mx.where(overflows, rescued, plain)


def ema_factors(
    config: PipelineConfig, iterations: mx.array, dtype: mx.Dtype
) -> tuple[mx.array, mx.array]:
    """Keras' EMA momentum: 0 at iteration 0 (the EMA starts as the weights), then
    ``ema_momentum``; and ``1 - momentum`` formed in the arithmetic dtype, as Keras does."""
    momentum = (iterations != 0).astype(dtype) * mx.array(config.ema_momentum, dtype)
    return momentum, 1 - momentum
