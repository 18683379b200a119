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
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from . import paths, spec, validation
from .pipeline import PipelineConfig, pipeline_config
from .spec import ACCUMULATOR, Scalar, UpdateOptions
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
    fused: str | bool
    pipeline: PipelineConfig
    name: str
    # The code-selecting flags every path's update takes.
    options: UpdateOptions
    # The buffers kept per parameter, in the order the fused update takes them (then the
    # accumulator, which the step function keeps itself).
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
            "fused": self.fused,
            **{
                key: getattr(self.pipeline, key)
                for key in self.pipeline.__dataclass_fields__
                if key != "guard_learning_rate"  # follows from learning_rate being a schedule
            },
        }

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
