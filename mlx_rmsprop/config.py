"""The configuration of one ``RMSprop``: its constructor arguments validated as the update
computes with them (float32), and what follows from them once, before any step: the options
that select code, the state buffers, and the entries of the per-step scalars vector that never
change.

``RMSprop.__init__`` builds it with :func:`rmsprop_config`; every read-only hyperparameter
property, ``get_config`` and the step functions read it. It holds no arrays and no functions,
so it is copied and pickled with the optimizer as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from . import paths, spec, validation
from .pipeline import PipelineConfig, pipeline_config
from .spec import ACCUMULATOR, QUANTIZED_KEYS, Scalar, UpdateOptions, scale_key
from .step import constant_scalars

# The boolean constructor arguments that change the update rule, in the constructor's order
# (``get_config`` and ``repr`` list them so).
FLAG_ARGUMENTS = (
    "centered",
    "nesterov",
    "decoupled_weight_decay",
    "maximize",
    "eps_in_sqrt",
    "lr_in_momentum",
    "bias_correction",
)

# ``state_bits`` values: float state (``state_dtype``) or 8-bit codes with per-block scales.
STATE_BITS = (8, 32)
# The storage arguments, in the constructor's order, with their defaults: checkpoints saved
# before they existed were written with these values.
STORAGE_DEFAULTS: dict[str, Any] = {
    "state_bits": 32,
    "state_block_size": spec.DEFAULT_BLOCK_SIZE,
    "min_quantized_size": 4096,
    "stochastic_rounding": False,
    "rounding_seed": 0,
}
ROUNDING_SEED_LIMIT = 2**32 - 1
# Stores that stochastic rounding changes: the narrow floating dtypes.
_ROUNDED_DTYPES = (mx.float16, mx.bfloat16)


def blocks(size: int, block_size: int) -> int:
    """The number of quantization blocks (and scales) of a tensor of ``size`` elements."""
    return -(-size // block_size)


@dataclass(frozen=True)
class StateLayout:
    """The state buffers of one parameter: its ``keys`` (the fused update's, then the
    accumulator), and whether ``v``, ``grad_avg`` and ``momentum_buffer`` are 8-bit codes (the
    parameter's shape, uint8) with per-block scales (``(blocks,)``, float32), or float buffers
    of the parameter's shape."""

    quantized: bool
    block_size: int
    keys: tuple[str, ...]
    # Derived: ``keys`` as a set, and the code and scale keys among them (empty unless
    # quantized).
    key_set: frozenset[str] = dataclasses.field(init=False)
    code_keys: frozenset[str] = dataclasses.field(init=False)
    scale_keys: frozenset[str] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        codes = frozenset(self.keys) & frozenset(QUANTIZED_KEYS) if self.quantized else frozenset()
        object.__setattr__(self, "key_set", frozenset(self.keys))
        object.__setattr__(self, "code_keys", codes)
        object.__setattr__(self, "scale_keys", frozenset(scale_key(key) for key in codes))

    def shape(self, key: str, parameter_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape buffer ``key`` has for a parameter of ``parameter_shape``."""
        if key in self.scale_keys:
            return (blocks(math.prod(parameter_shape), self.block_size),)
        return tuple(parameter_shape)

    def dtype(self, key: str) -> mx.Dtype | None:
        """uint8 for codes, float32 for scales, None for a float buffer (any floating dtype)."""
        if key in self.code_keys:
            return mx.uint8
        if key in self.scale_keys:
            return mx.float32
        return None


@functools.cache
def _layout(
    options: UpdateOptions, accumulates: bool, quantized: bool, block_size: int
) -> StateLayout:
    keys = options.state_keys
    if quantized:
        keys = dataclasses.replace(options, quantized_state=True, block_size=block_size).state_keys
    return StateLayout(quantized, block_size, keys + ((ACCUMULATOR,) if accumulates else ()))


@functools.cache
def _parameter_options(
    options: UpdateOptions, quantized: bool, block_size: int, rounding: bool
) -> UpdateOptions:
    return dataclasses.replace(
        options,
        quantized_state=quantized,
        block_size=block_size if quantized else 0,
        stochastic_rounding=rounding,
    )


@dataclass(frozen=True)
class RMSpropConfig:
    """Validated hyperparameters and what is derived from them.

    ``options``, ``state_keys`` and ``constants`` are derived: :func:`rmsprop_config` is the
    only place that builds them, so they always agree with the arguments beside them.
    """

    alpha: float
    eps: float
    momentum: float
    weight_decay: float
    initial_accumulator_value: float
    # FLAG_ARGUMENTS -> value, in that order.
    flags: dict[str, bool]
    state_dtype: mx.Dtype | None
    # STORAGE_DEFAULTS' arguments.
    state_bits: int
    state_block_size: int
    min_quantized_size: int
    stochastic_rounding: bool
    rounding_seed: int
    fused: str | bool
    pipeline: PipelineConfig
    name: str
    # The code-selecting flags every path's update takes, storage flags off (each parameter's
    # own are ``parameter_options``).
    options: UpdateOptions
    # The buffers kept per parameter with float state, in the order the fused update takes
    # them (then the accumulator, which the step function keeps itself). A parameter with
    # 8-bit state keeps ``layout(...).keys``.
    state_keys: tuple[str, ...]
    # The scalars vector with every entry that does not depend on the step.
    constants: tuple[float, ...]

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments besides ``learning_rate`` and ``name``, JSON-serialisable,
        in the constructor's order (``get_config``)."""
        return {
            "alpha": self.alpha,
            "eps": self.eps,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "initial_accumulator_value": self.initial_accumulator_value,
            **self.flags,
            "state_dtype": None if self.state_dtype is None else str(self.state_dtype),
            **{key: getattr(self, key) for key in STORAGE_DEFAULTS},
            "fused": self.fused,
            **{
                key: getattr(self.pipeline, key)
                for key in self.pipeline.__dataclass_fields__
                if key != "guard_learning_rate"  # follows from learning_rate being a schedule
            },
        }

    def buffer_dtype(self, parameter_dtype: mx.Dtype) -> mx.Dtype:
        """The dtype of the float state buffers created for a parameter of this dtype."""
        if self.state_dtype is not None:
            return self.state_dtype
        return mx.float64 if parameter_dtype == mx.float64 else mx.float32

    def quantizes(self, shape: tuple[int, ...], dtype: mx.Dtype) -> bool:
        """Whether a parameter of this shape and dtype keeps 8-bit state: ``state_bits=8``,
        at least ``min_quantized_size`` elements, and float32 arithmetic (not float64)."""
        return (
            self.state_bits == 8
            and dtype != mx.float64
            and math.prod(shape) >= self.min_quantized_size
        )

    @functools.cached_property
    def _layouts(self) -> tuple[StateLayout, StateLayout]:
        # (float, 8-bit): looked up for every parameter of every step. Not a field: pickles
        # and copies rebuild it.
        return tuple(
            _layout(self.options, self.pipeline.accumulates, quantized, self.state_block_size)
            for quantized in (False, True)
        )

    def layout(self, shape: tuple[int, ...], dtype: mx.Dtype) -> StateLayout:
        """The state buffers of a parameter of this shape and dtype."""
        return self._layouts[self.quantizes(shape, dtype)]

    def rounds(self, layout: StateLayout, parameter: mx.array, state: dict[str, mx.array]) -> bool:
        """Whether one parameter's update rounds stochastically: only where one of its stores
        is float16/bfloat16 (the parameter, or a float state buffer the update writes; the
        accumulator is the step function's, stored to nearest). Elsewhere stochastic rounding
        changes no bit, and the update without it is cheaper."""
        return self.stochastic_rounding and (
            parameter.dtype in _ROUNDED_DTYPES
            or any(
                state[key].dtype in _ROUNDED_DTYPES
                for key in layout.keys
                if key not in layout.code_keys
                and key not in layout.scale_keys
                and key != ACCUMULATOR
            )
        )

    def parameter_options(self, quantized: bool, rounding: bool) -> UpdateOptions:
        """What the update of one parameter is told: ``options`` with its storage flags."""
        return _parameter_options(self.options, quantized, self.state_block_size, rounding)

    def __reduce__(self) -> tuple:
        # mx.Dtype cannot be pickled (nor deep-copied): it travels as its name.
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        if self.state_dtype is not None:
            fields["state_dtype"] = str(self.state_dtype)
        return (_rebuilt, (fields,))

    def with_preset_eps(self, eps: float) -> RMSpropConfig:
        """This configuration with a preset's epsilon, which may be 0 or round to 0 in float32
        (the constructor refuses that; see ``presets._with_eps``)."""
        constants = list(self.constants)
        constants[Scalar.EPS] = float(eps)
        return dataclasses.replace(self, eps=eps, constants=tuple(constants))


def _rebuilt(fields: dict[str, Any]) -> RMSpropConfig:
    # An optimizer pickled before the storage arguments existed had their defaults.
    fields = {**STORAGE_DEFAULTS, **fields}
    if fields["state_dtype"] is not None:
        by_name = {str(dtype): dtype for dtype in validation.FLOATING_DTYPES}
        fields = {**fields, "state_dtype": by_name[fields["state_dtype"]]}
    return RMSpropConfig(**fields)


def rmsprop_config(
    *,
    scheduled: bool,
    alpha: Any,
    eps: Any,
    momentum: Any,
    centered: Any,
    nesterov: Any,
    weight_decay: Any,
    decoupled_weight_decay: Any,
    maximize: Any,
    eps_in_sqrt: Any,
    lr_in_momentum: Any,
    initial_accumulator_value: Any,
    bias_correction: Any,
    state_dtype: Any,
    state_bits: Any,
    state_block_size: Any,
    min_quantized_size: Any,
    stochastic_rounding: Any,
    rounding_seed: Any,
    fused: Any,
    skip_nonfinite: Any,
    loss_scale_factor: Any,
    gradient_accumulation_steps: Any,
    clipnorm: Any,
    global_clipnorm: Any,
    clipvalue: Any,
    use_ema: Any,
    ema_momentum: Any,
    ema_overwrite_frequency: Any,
    name: Any,
) -> RMSpropConfig:
    """Validate ``RMSprop``'s arguments (``scheduled``: the learning rate is a schedule) and
    derive the rest. Every error is a ``ValueError`` naming the argument and the value."""
    alpha = validation.in_range("alpha", alpha, 0.0, 1.0)
    eps = validation.positive("eps", eps)
    momentum = validation.in_range("momentum", momentum, 0.0, 1.0)
    weight_decay = validation.non_negative("weight_decay", weight_decay)
    initial_accumulator_value = validation.non_negative(
        "initial_accumulator_value", initial_accumulator_value
    )
    given = {
        "centered": centered,
        "nesterov": nesterov,
        "decoupled_weight_decay": decoupled_weight_decay,
        "maximize": maximize,
        "eps_in_sqrt": eps_in_sqrt,
        "lr_in_momentum": lr_in_momentum,
        "bias_correction": bias_correction,
    }
    flags = {name: validation.flag(name, given[name]) for name in FLAG_ARGUMENTS}
    if flags["bias_correction"] and validation.in_float32(alpha) == 1:
        raise ValueError(
            "bias_correction=True requires alpha < 1 in float32 (the correction "
            f"1 - alpha**t would be 0), got alpha={alpha!r}"
            + (" (1.0 in float32)" if alpha != 1 else "")
        )
    state_dtype = validation.state_dtype("state_dtype", state_dtype)
    state_bits = validation.integer_choice("state_bits", state_bits, STATE_BITS)
    state_block_size = validation.integer_choice(
        "state_block_size", state_block_size, spec.BLOCK_SIZES
    )
    min_quantized_size = validation.integer_at_least("min_quantized_size", min_quantized_size, 0)
    stochastic_rounding = validation.flag("stochastic_rounding", stochastic_rounding)
    rounding_seed = validation.integer_in_range(
        "rounding_seed", rounding_seed, 0, ROUNDING_SEED_LIMIT
    )
    if state_bits == 8 and state_dtype is not None and state_dtype == mx.float64:
        raise ValueError(
            "state_bits=8 requires float32 arithmetic, which state_dtype=mx.float64 turns into "
            "float64: use state_dtype None, mx.float32, mx.float16 or mx.bfloat16"
        )
    fused = validation.choice("fused", fused, paths.FUSED_CHOICES)
    pipeline = pipeline_config(
        skip_nonfinite=skip_nonfinite,
        loss_scale_factor=loss_scale_factor,
        gradient_accumulation_steps=gradient_accumulation_steps,
        clipnorm=clipnorm,
        global_clipnorm=global_clipnorm,
        clipvalue=clipvalue,
        use_ema=use_ema,
        ema_momentum=ema_momentum,
        ema_overwrite_frequency=ema_overwrite_frequency,
        scheduled=scheduled,
    )
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {name!r}")

    options = _update_options(momentum, weight_decay, flags, pipeline)
    return RMSpropConfig(
        alpha=alpha,
        eps=eps,
        momentum=momentum,
        weight_decay=weight_decay,
        initial_accumulator_value=initial_accumulator_value,
        flags=flags,
        state_dtype=state_dtype,
        state_bits=state_bits,
        state_block_size=state_block_size,
        min_quantized_size=min_quantized_size,
        stochastic_rounding=stochastic_rounding,
        rounding_seed=rounding_seed,
        fused=fused,
        pipeline=pipeline,
        name=name,
        options=options,
        state_keys=options.state_keys + ((ACCUMULATOR,) if pipeline.accumulates else ()),
        constants=_constants(alpha, eps, momentum, weight_decay, pipeline),
    )


def _update_options(
    momentum: float, weight_decay: float, flags: dict[str, bool], pipeline: PipelineConfig
) -> UpdateOptions:
    decays = weight_decay > 0
    option_flags = spec.normalised(
        {
            "centered": flags["centered"],
            "momentum": momentum > 0,
            "nesterov": flags["nesterov"],
            "eps_in_sqrt": flags["eps_in_sqrt"],
            "lr_in_momentum": flags["lr_in_momentum"],
            "coupled_decay": decays and not flags["decoupled_weight_decay"],
            "decoupled_decay": decays and flags["decoupled_weight_decay"],
            "maximize": flags["maximize"],
            "bias_correction": flags["bias_correction"],
            "scale_gradient": pipeline.scales_in_update,
            "clip_value": pipeline.clipvalue is not None,
            "gated": pipeline.gated,
            "ema": pipeline.use_ema,
        }
    )
    # The spec's invariants, worded with this constructor's arguments.
    spec.check(option_flags, {"momentum": ("momentum > 0", f"momentum={momentum!r}")})
    return UpdateOptions(**option_flags)


def _constants(
    alpha: float, eps: float, momentum: float, weight_decay: float, pipeline: PipelineConfig
) -> tuple[float, ...]:
    # With accumulation the loss scale is divided out before accumulating, not in the update.
    divides_in_update = pipeline.loss_scale_factor is not None and not pipeline.accumulates
    return tuple(
        constant_scalars(
            {
                Scalar.ALPHA: alpha,
                Scalar.ONE_MINUS_ALPHA: 1.0 - alpha,
                Scalar.EPS: eps,
                Scalar.MOMENTUM: momentum,
                Scalar.WEIGHT_DECAY: weight_decay,
                Scalar.BIAS_CORRECTION: 1.0,
                Scalar.GRAD_DIVISOR: pipeline.loss_scale_factor if divides_in_update else 1.0,
                Scalar.CLIP_MULTIPLIER: 1.0,
                Scalar.CLIP_DIVISOR: 1.0,
                Scalar.CLIP_VALUE: pipeline.clipvalue or 0.0,
                Scalar.UPDATE_GATE: 1.0,
                Scalar.EMA_GATE: 1.0,
            }
        )
    )
