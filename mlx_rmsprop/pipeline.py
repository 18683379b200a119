"""The gradient pipeline around the fused update, in Keras' order: loss-scale, accumulation,
clipping, weight decay, EMA; plus skipping non-finite steps.

What is element-wise and per parameter (dividing by the loss scale, clipping by value, weight
decay, the EMA) happens inside the fused update as scalars; what needs the whole tensor or the
whole tree (norms, the non-finite flag, the accumulator) is computed here, once per step, and
handed to the update as data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
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
    def reads_statistics(self) -> bool:
        """Some stage reads the gradients' statistics (norms, the non-finite flag)."""
        clips = self.clipnorm is not None or self.global_clipnorm is not None
        return clips or self.skip_nonfinite

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


# --- the statistics of a step's gradients ---------------------------------------------------
# Clipping by norm and skipping non-finite steps need whole tensors. They read one small
# matrix, a row per gradient, computed in a single pass over the step's gradients: on the
# native path by one graph node for the whole step (gradient_statistics.cpp), elsewhere by the
# MLX ops of :func:`statistics_ops` (the same values, bit for bit on the CPU). Everything the
# pipeline needs follows from it in a few whole-matrix ops, whatever the number of tensors.
#
# Each row describes the values z the norms are taken of (the gradient with the loss scale
# divided out; with accumulation the accumulated sum divided by the steps):
SUM_OF_SQUARES = 0  # sum of z^2 in STATISTICS_LANES/STATISTICS_BLOCK order (below)
LARGEST = 1  # max |z| over the values that are not NaN (0 when empty)
NONFINITE = 2  # 1 when some z is NaN or infinite, else 0
# Where the plain sum overflows although the values are finite, the sum of (z / m)^2 with m
# the largest magnitude (ScaledNorm says which); 0 elsewhere.
SCALED_SUM_OF_SQUARES = 3
NUM_STATISTICS = 4

# The summation order of every sum of squares: blocks of STATISTICS_BLOCK elements in
# row-major order; in a block element i adds into lane i mod STATISTICS_LANES (each lane from 0
# in increasing i), the lanes combine by halves, and the blocks' results add in order from 0.
# Lanes vectorise and blocks split across threads; MLX's own CPU sum adds one element after
# the other (a latency-bound chain: 2^24 elements took longer than the whole update).
STATISTICS_LANES = 32
STATISTICS_BLOCK = 1 << 15


class ScaledNorm(IntEnum):
    """What the SCALED_SUM_OF_SQUARES column holds."""

    NONE = 0
    # clipnorm: per row whose sum of squares is +inf with a finite largest magnitude m.
    PER_TENSOR = 1
    # global_clipnorm: every row, with M the largest magnitude of all rows, when the sum of
    # all rows' sums of squares (in row order) is +inf and M is finite.
    GLOBAL = 2


def blocked_sum_of_squares(values: mx.array) -> mx.array:
    """The sum of ``values**2`` in the statistics' order, as MLX ops (0-d, ``values.dtype``).

    Zero padding to whole blocks and lanes adds exact zeros, which change no sum of squares."""
    n = values.size
    if n == 0:
        return mx.array(0, values.dtype)
    blocks = -(-n // STATISTICS_BLOCK)
    padded = (
        blocks * STATISTICS_BLOCK if blocks > 1 else -(-n // STATISTICS_LANES) * STATISTICS_LANES
    )
    flat = values.reshape(-1)
    if padded > n:
        flat = mx.concatenate([flat, mx.zeros((padded - n,), values.dtype)])
    # MLX reduces a middle axis one row after the other for every lane (a sequential sum per
    # lane, on every CPU), then the lanes fold by halves.
    lanes = mx.sum(mx.square(flat).reshape(blocks, -1, STATISTICS_LANES), axis=1)
    width = STATISTICS_LANES
    while width > 1:
        width //= 2
        lanes = lanes[:, :width] + lanes[:, width:]
    partials = lanes.reshape(blocks)
    # cumsum adds in order on every backend; mx.sum's order differs between CPUs.
    return partials[0] if blocks == 1 else mx.cumsum(partials)[-1]


def _largest(values: mx.array) -> mx.array:
    if values.size == 0:
        return mx.array(0, values.dtype)
    magnitude = mx.abs(values)
    return mx.max(mx.where(mx.isnan(magnitude), 0, magnitude))


def _safe_divisor(largest: mx.array) -> mx.array:
    # Divide by 1 where the largest magnitude is 0 or not finite: that branch is not selected.
    return mx.where(mx.logical_and(mx.isfinite(largest), largest > 0), largest, 1)


def statistics_ops(values: list[mx.array], scaled_norm: ScaledNorm) -> mx.array:
    """The statistics matrix of ``values`` (the z of each gradient, each in the dtype its
    norm is computed in) as MLX ops: (len(values), NUM_STATISTICS), in float64 when any value
    is float64 (float32 entries are exact there), else float32."""
    dtype = mx.float64 if any(v.dtype == mx.float64 for v in values) else mx.float32
    sums = [blocked_sum_of_squares(v) for v in values]
    largest = [_largest(v) for v in values]
    nonfinite = [
        mx.logical_not(mx.all(mx.isfinite(v))) if v.size else mx.array(False) for v in values
    ]
    if scaled_norm == ScaledNorm.PER_TENSOR:
        scaled = [
            mx.where(
                mx.logical_and(mx.isinf(total), mx.isfinite(m)),
                blocked_sum_of_squares(v / _safe_divisor(m)),
                0,
            )
            for v, total, m in zip(values, sums, largest, strict=True)
        ]
    elif scaled_norm == ScaledNorm.GLOBAL and values:
        total = mx.sum(mx.stack([s.astype(dtype) for s in sums]))
        m = mx.max(mx.stack([v.astype(dtype) for v in largest]))
        overflows = mx.logical_and(mx.isinf(total), mx.isfinite(m))
        scaled = [
            mx.where(overflows, blocked_sum_of_squares(v / _safe_divisor(m).astype(v.dtype)), 0)
            for v in values
        ]
    else:
        scaled = [mx.array(0, dtype)] * len(values)
    if not values:
        return mx.zeros((0, NUM_STATISTICS), dtype)
    rows = [
        mx.stack([entry.astype(dtype) for entry in row])
        for row in zip(sums, largest, nonfinite, scaled, strict=True)
    ]
    return mx.stack(rows)


def reduced_values(
    gradients: list[mx.array],
    accumulators: list[mx.array],
    loss_scale: float,
    accumulation_steps: int,
    dtype: mx.Dtype,
) -> list[mx.array]:
    """The values the statistics describe, in ``dtype``: ``g / loss_scale`` (when
    ``loss_scale``), plus the accumulator and divided by ``accumulation_steps`` (when
    accumulating): the gradient whose norm Keras clips."""
    values = []
    for index, gradient in enumerate(gradients):
        value = gradient.astype(dtype)
        if loss_scale:
            value = value / mx.array(loss_scale, dtype)
        if accumulation_steps:
            value = (value + accumulators[index].astype(dtype)) / mx.array(
                accumulation_steps, dtype
            )
        values.append(value)
    return values


def any_nonfinite(statistics: mx.array) -> mx.array:
    """Whether some row's values hold a NaN or an infinity (0-d bool)."""
    return mx.any(statistics[:, NONFINITE] != 0)


def clip_by_norm_factors(statistics: mx.array, clipnorm: float, dtype: mx.Dtype) -> mx.array:
    """Keras' clip_by_norm for every row at once: ``g * clipnorm / max(||g||, clipnorm)`` as
    a (rows, 2) matrix of (multiplier, divisor), computed in ``dtype``. ``||g||`` is the sum of
    squares square-rooted where it is positive.

    Where the sum of squares overflows for finite values, ``||g|| = m ||g / m||`` is far above
    ``clipnorm``, and the factors become ``(clipnorm / m, ||g / m||)``: the same quotient,
    with no intermediate beyond float range."""
    total = statistics[:, SUM_OF_SQUARES].astype(dtype)
    positive = total > 0
    norm = mx.where(positive, mx.sqrt(mx.where(positive, total, 1)), total)
    limit = mx.array(clipnorm, dtype)
    largest = statistics[:, LARGEST].astype(dtype)
    overflows = mx.logical_and(mx.isinf(norm), mx.isfinite(largest))
    multiplier = mx.where(overflows, limit / mx.where(overflows, largest, 1), limit)
    # The scaled sum is 0 where it is not selected: sqrt(1) there keeps derivatives finite.
    scaled = mx.where(overflows, statistics[:, SCALED_SUM_OF_SQUARES].astype(dtype), 1)
    divisor = mx.where(overflows, mx.sqrt(scaled), mx.maximum(norm, limit))
    return mx.stack([multiplier, divisor], axis=1)


def global_clip_factor(statistics: mx.array, clipnorm: float, dtype: mx.Dtype) -> mx.array:
    """Keras' clip_by_global_norm scale: ``c * min(1/n, 1/c)``, NaN when the norm is not
    finite (so a non-finite step stays visible); computed in ``dtype``.

    Where the sum of squares overflows for finite values, ``n = m ||g / m||`` is far above
    ``c`` and the scale is ``(c / m) / ||g / m||``, formed without leaving float range."""
    limit = mx.array(clipnorm, dtype)
    norm = mx.sqrt(mx.sum(statistics[:, SUM_OF_SQUARES].astype(dtype)))
    plain = limit * mx.minimum(1 / norm, 1 / limit) + (norm - norm)
    largest = mx.max(statistics[:, LARGEST].astype(dtype))
    overflows = mx.logical_and(mx.isinf(norm), mx.isfinite(largest))
    # The scaled sums are 0 where they are not selected: 1 there keeps derivatives finite.
    scaled = mx.where(overflows, mx.sum(statistics[:, SCALED_SUM_OF_SQUARES].astype(dtype)), 1)
    rescued = limit / mx.where(overflows, largest, 1) / mx.sqrt(scaled)
    return mx.where(overflows, rescued, plain)


def ema_factors(
    config: PipelineConfig, iterations: mx.array, dtype: mx.Dtype
) -> tuple[mx.array, mx.array]:
    """Keras' EMA momentum: 0 at iteration 0 (the EMA starts as the weights), then
    ``ema_momentum``; and ``1 - momentum`` formed in the arithmetic dtype, as Keras does."""
    momentum = (iterations != 0).astype(dtype) * mx.array(config.ema_momentum, dtype)
    return momentum, 1 - momentum
