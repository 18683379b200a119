"""Constructors that take another framework's RMSprop arguments (names and defaults) and
return an ``RMSprop`` that reproduces that framework's trajectory."""

from __future__ import annotations

from typing import Any

from . import validation


def from_torch(
    cls: type,
    lr: Any = 0.01,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0,
    momentum: float = 0,
    centered: bool = False,
    capturable: bool = False,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    **options: Any,
) -> Any:
    """``torch.optim.RMSprop(params, lr, alpha, eps, weight_decay, momentum, centered,
    capturable, foreach, maximize, differentiable)``: eps outside the square root, coupled
    weight decay, learning rate applied after the momentum buffer. ``capturable``, ``foreach``
    and ``differentiable`` choose torch's implementation, not its numbers: they are checked and
    have no effect here (every path is one fused update, and ``mx.grad`` runs through a step
    on the CPU paths). ``options`` go to ``RMSprop`` (``state_dtype``, ``state_bits``,
    ``stochastic_rounding``, ``fused``, ...: ``FORWARDED_OPTIONS``)."""
    _check_forwarded(options)
    validation.flag("capturable", capturable)
    validation.flag("differentiable", differentiable)
    if foreach is not None:
        validation.flag("foreach", foreach)
    return _with_eps(
        cls,
        validation.non_negative("eps", eps),
        validation.learning_rate("lr", lr),
        alpha=validation.in_range("alpha", alpha, 0.0, 1.0),
        weight_decay=validation.non_negative("weight_decay", weight_decay),
        momentum=validation.in_range("momentum", momentum, 0.0, 1.0),
        centered=validation.flag("centered", centered),
        maximize=validation.flag("maximize", maximize),
        **options,
    )


def from_keras(
    cls: type,
    learning_rate: Any = 0.001,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-7,
    centered: bool = False,
    weight_decay: float | None = None,
    **options: Any,
) -> Any:
    """``keras.optimizers.RMSprop`` (Keras 3): eps inside the square root, learning rate
    inside the momentum buffer, decoupled weight decay ``p -= p * wd * lr``. Keras' pipeline
    arguments (``clipnorm``, ``clipvalue``, ``global_clipnorm``, ``use_ema``,
    ``ema_momentum``, ``ema_overwrite_frequency``, ``loss_scale_factor``,
    ``gradient_accumulation_steps``, ``name``) pass through with Keras' names and defaults."""
    _check_forwarded(options)
    decay = 0.0 if weight_decay is None else validation.non_negative("weight_decay", weight_decay)
    return _with_eps(
        cls,
        validation.non_negative("epsilon", epsilon),
        validation.learning_rate("learning_rate", learning_rate),
        alpha=validation.in_range("rho", rho, 0.0, 1.0),
        momentum=validation.in_range("momentum", momentum, 0.0, 1.0),
        centered=validation.flag("centered", centered),
        weight_decay=decay,
        decoupled_weight_decay=True,
        eps_in_sqrt=True,
        lr_in_momentum=True,
        **options,
    )


def from_optax(
    cls: type,
    learning_rate: Any,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    **options: Any,
) -> Any:
    """``optax.rmsprop``: learning rate applied before the momentum trace, optional bias
    correction, Nesterov momentum as ``optax.trace`` computes it."""
    _check_forwarded(options)
    mu = 0.0 if momentum is None else validation.in_range("momentum", momentum, 0.0, 1.0)
    return _with_eps(
        cls,
        validation.non_negative("eps", eps),
        validation.learning_rate("learning_rate", learning_rate),
        alpha=validation.in_range("decay", decay, 0.0, 1.0),
        initial_accumulator_value=validation.non_negative("initial_scale", initial_scale),
        eps_in_sqrt=validation.flag("eps_in_sqrt", eps_in_sqrt),
        centered=validation.flag("centered", centered),
        momentum=mu,
        nesterov=validation.flag("nesterov", nesterov),
        bias_correction=validation.flag("bias_correction", bias_correction),
        lr_in_momentum=True,
        **options,
    )


def from_tensorflow(
    cls: type,
    learning_rate: Any = 0.001,
    decay: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-10,
    use_locking: bool = False,
    centered: bool = False,
    name: str = "RMSProp",
    **options: Any,
) -> Any:
    """TF1 ``tf.compat.v1.train.RMSPropOptimizer(learning_rate, decay, momentum, epsilon,
    use_locking, centered, name)``: like Keras, but the accumulator ``v`` starts at 1.0 and the
    default epsilon is 1e-10. ``use_locking`` (TF's variable locking) is checked and has no
    effect: an update and a checkpoint are always exclusive (``optimizer.update_lock``)."""
    _check_forwarded(options)
    validation.flag("use_locking", use_locking)
    return _with_eps(
        cls,
        validation.non_negative("epsilon", epsilon),
        validation.learning_rate("learning_rate", learning_rate),
        alpha=validation.in_range("decay", decay, 0.0, 1.0),
        momentum=validation.in_range("momentum", momentum, 0.0, 1.0),
        centered=validation.flag("centered", centered),
        initial_accumulator_value=1.0,
        eps_in_sqrt=True,
        lr_in_momentum=True,
        name=name,
        **options,
    )


# Options a preset passes through: what the library adds and Keras' training pipeline, which
# does not change the framework's update rule.
FORWARDED_OPTIONS = (
    "state_dtype",
    "state_bits",
    "state_block_size",
    "min_quantized_size",
    "stochastic_rounding",
    "rounding_seed",
    "fused",
    "skip_nonfinite",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "clipnorm",
    "global_clipnorm",
    "clipvalue",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "name",
)


def _with_eps(cls: type, eps: float, *args: Any, **kwargs: Any) -> Any:
    """``cls(*args, eps=eps, **kwargs)``, where ``eps`` may be 0 or round to 0 in float32.

    Every framework accepts epsilon = 0 (TF's own tests use it) and then divides 0 by 0 where
    a gradient and its running average are 0: the preset reproduces that, NaN included. The
    main constructor keeps requiring eps > 0 (as MLX's message says): it is built with a
    placeholder, then given the framework's value."""
    if validation.in_float32(eps) > 0:
        return cls(*args, eps=eps, **kwargs)
    optimizer = cls(*args, eps=1.0, **kwargs)
    optimizer._use_preset_eps(eps)
    return optimizer


def _check_forwarded(options: dict) -> None:
    unknown = sorted(set(options) - set(FORWARDED_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected argument(s) {', '.join(unknown)}; a preset takes its framework's "
            f"arguments plus {', '.join(FORWARDED_OPTIONS)}"
        )
