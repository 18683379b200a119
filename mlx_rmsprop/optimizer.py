"""``RMSprop``: a drop-in replacement for ``mlx.optimizers.RMSprop`` that also reproduces the
RMSprop of PyTorch, Keras 3, TF1 and optax."""

from __future__ import annotations

from typing import Any, Callable, Union

import mlx.core as mx
from mlx.optimizers import Optimizer

from . import backends, presets, validation
from .options import Scalar, UpdateOptions
from .step import constant_scalars, make_step_function
from .trees import check_state, match_gradients, rebuild, state_leaves

LearningRate = Union[float, mx.array, Callable[[mx.array], mx.array]]


class RMSprop(Optimizer):
    r"""RMSprop with every framework's variant, run as one fused update per parameter.

    With gradient :math:`g`, parameter :math:`p`, step :math:`t` (1-based):

    .. math::

        g &\leftarrow -g \text{ if maximize};\quad
            g \leftarrow g + \lambda p \text{ (coupled weight decay)} \\
        v &\leftarrow \alpha v + (1-\alpha) g^2 \\
        \bar g &\leftarrow \alpha \bar g + (1-\alpha) g \text{ (centered)} \\
        s &= \frac{v}{b_t} - \Big(\frac{\bar g}{b_t}\Big)^2 \text{ (centered, clamped at 0) or }
            \frac{v}{b_t},\quad b_t = 1-\alpha^t \text{ with bias correction, else } 1 \\
        d &= \sqrt{s} + \epsilon \ \text{(default: eps outside the root, as MLX and PyTorch)}
            \quad\text{or}\quad \sqrt{s + \epsilon} \ \text{(eps\_in\_sqrt: Keras, TF, optax)} \\
        u &= g / d

    Momentum :math:`\mu > 0` keeps a buffer :math:`b`. PyTorch form (default):
    :math:`b \leftarrow \mu b + u`, :math:`p \leftarrow p - \eta b`. With ``lr_in_momentum``
    (Keras/TF/optax): :math:`b \leftarrow \mu b + \eta u`, :math:`p \leftarrow p - b`.
    ``nesterov`` steps by :math:`\eta u + \mu b` (optax). Without momentum
    :math:`p \leftarrow p - \eta u`. Decoupled weight decay (Keras) shrinks
    :math:`p \leftarrow p - p \lambda \eta` before the step.

    Args:
        learning_rate: :math:`\eta`; a float, a scalar ``mx.array`` (a float64 one keeps
            float64 runs exact on the CPU) or a schedule called with the step count.
        alpha: :math:`\alpha`, the smoothing constant of the running averages, in [0, 1].
            Default ``0.99`` (MLX, PyTorch).
        eps: :math:`\epsilon` > 0, added outside the square root unless ``eps_in_sqrt``.
            Default ``1e-8``.
        momentum: :math:`\mu` in [0, 1]; 0 keeps no momentum buffer.
        centered: divide by the centred second moment :math:`v - \bar g^2` (keeps
            ``grad_avg``).
        nesterov: Nesterov momentum as optax computes it; needs ``momentum > 0``.
        weight_decay: :math:`\lambda` >= 0.
        decoupled_weight_decay: ``False`` adds :math:`\lambda p` to the gradient (PyTorch);
            ``True`` shrinks the parameter by :math:`p \lambda \eta` (Keras).
        maximize: ascend instead of descend (PyTorch).
        eps_in_sqrt: put :math:`\epsilon` inside the square root (Keras, TF, optax default).
        lr_in_momentum: scale by :math:`\eta` before the momentum buffer (Keras, TF, optax);
            identical to the default while :math:`\eta` is constant, different under a schedule.
        initial_accumulator_value: start value of :math:`v` (TF1 uses 1.0), >= 0.
        bias_correction: divide :math:`v` and :math:`\bar g` by :math:`1-\alpha^t` (optax).
        state_dtype: dtype of the state buffers. ``None`` (default): float32 for float16,
            bfloat16 and float32 parameters, float64 for float64 ones. Arithmetic is always at
            least float32 whatever this is.
        fused: ``"auto"`` (the fastest path on this device), ``"native"`` (one C++ MLX
            operation per parameter on the CPU, built at install time), ``"compiled"`` (the
            reference math under ``mx.compile``) or ``False`` (plain uncompiled ops).

    State per parameter: ``v``, plus ``grad_avg`` (centered) and ``momentum_buffer``
    (momentum > 0). A state saved from ``mlx.optimizers.RMSprop`` loads into the defaults.
    """

    def __init__(
        self,
        learning_rate: LearningRate,
        alpha: float = 0.99,
        eps: float = 1e-8,
        *,
        momentum: float = 0.0,
        centered: bool = False,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        eps_in_sqrt: bool = False,
        lr_in_momentum: bool = False,
        initial_accumulator_value: float = 0.0,
        bias_correction: bool = False,
        state_dtype: mx.Dtype | None = None,
        fused: str | bool = "auto",
    ):
        super().__init__()
        learning_rate = validation.learning_rate("learning_rate", learning_rate)
        self._alpha = validation.in_range("alpha", alpha, 0.0, 1.0)
        self._eps = validation.positive("eps", eps)
        self._momentum = validation.in_range("momentum", momentum, 0.0, 1.0)
        self._weight_decay = validation.non_negative("weight_decay", weight_decay)
        self._initial_accumulator_value = validation.non_negative(
            "initial_accumulator_value", initial_accumulator_value
        )
        flags = {
            name: validation.flag(name, value)
            for name, value in (
                ("centered", centered),
                ("nesterov", nesterov),
                ("decoupled_weight_decay", decoupled_weight_decay),
                ("maximize", maximize),
                ("eps_in_sqrt", eps_in_sqrt),
                ("lr_in_momentum", lr_in_momentum),
                ("bias_correction", bias_correction),
            )
        }
        if flags["nesterov"] and self._momentum == 0:
            raise ValueError("nesterov=True requires momentum > 0, got momentum=0.0")
        if flags["bias_correction"] and self._alpha == 1:
            raise ValueError(
                "bias_correction=True requires alpha < 1 (the correction 1 - alpha**t would "
                "be 0), got alpha=1.0"
            )
        self._state_dtype = validation.state_dtype("state_dtype", state_dtype)
        self._fused = validation.choice("fused", fused, backends.FUSED_CHOICES)

        if self._weight_decay == 0:
            decay_mode = "none"
        else:
            decay_mode = "decoupled" if flags["decoupled_weight_decay"] else "coupled"
        self._options = UpdateOptions(
            centered=flags["centered"],
            momentum=self._momentum > 0,
            nesterov=flags["nesterov"],
            eps_in_sqrt=flags["eps_in_sqrt"],
            lr_in_momentum=flags["lr_in_momentum"],
            weight_decay=decay_mode,
            maximize=flags["maximize"],
            bias_correction=flags["bias_correction"],
        )
        self._flags = flags
        self._constants = constant_scalars(
            {
                Scalar.ALPHA: self._alpha,
                Scalar.ONE_MINUS_ALPHA: 1.0 - self._alpha,
                Scalar.EPS: self._eps,
                Scalar.MOMENTUM: self._momentum,
                Scalar.WEIGHT_DECAY: self._weight_decay,
                Scalar.BIAS_CORRECTION: 1.0,
                Scalar.GRAD_DIVISOR: 1.0,
                Scalar.CLIP_MULTIPLIER: 1.0,
                Scalar.CLIP_DIVISOR: 1.0,
                Scalar.UPDATE_GATE: 1.0,
            }
        )
        path, update = backends.resolve(self._fused)
        self._path = path.name
        self._step_function = make_step_function(
            self._options, self._constants, update, compiled=path.compile_step
        )
        self._maybe_schedule("learning_rate", learning_rate)

    # Hyperparameters are read-only: the state layout and the compiled update depend on them.
    alpha = property(lambda self: self._alpha, doc="Smoothing constant :math:`\\alpha`.")
    eps = property(lambda self: self._eps, doc="The :math:`\\epsilon` of the denominator.")
    momentum = property(lambda self: self._momentum, doc="Momentum :math:`\\mu`.")
    weight_decay = property(lambda self: self._weight_decay, doc="Weight decay :math:`\\lambda`.")
    initial_accumulator_value = property(lambda self: self._initial_accumulator_value)
    centered = property(lambda self: self._flags["centered"])
    nesterov = property(lambda self: self._flags["nesterov"])
    decoupled_weight_decay = property(lambda self: self._flags["decoupled_weight_decay"])
    maximize = property(lambda self: self._flags["maximize"])
    eps_in_sqrt = property(lambda self: self._flags["eps_in_sqrt"])
    lr_in_momentum = property(lambda self: self._flags["lr_in_momentum"])
    bias_correction = property(lambda self: self._flags["bias_correction"])
    state_dtype = property(lambda self: self._state_dtype)
    fused = property(lambda self: self._fused)
    path = property(
        lambda self: self._path,
        doc='The path ``fused`` resolved to on this machine ("compiled", "reference", ...).',
    )

    from_torch = classmethod(presets.from_torch)
    from_keras = classmethod(presets.from_keras)
    from_optax = classmethod(presets.from_optax)
    from_tensorflow = classmethod(presets.from_tensorflow)

    def __repr__(self) -> str:
        lr = self._schedulers.get("learning_rate", None) or self.state["learning_rate"].item()
        return (
            f"RMSprop(learning_rate={lr!r}, alpha={self._alpha!r}, eps={self._eps!r}, "
            f"momentum={self._momentum!r}, weight_decay={self._weight_decay!r}, "
            + ", ".join(f"{name}={value!r}" for name, value in self._flags.items())
            + f", initial_accumulator_value={self._initial_accumulator_value!r}, "
            f"state_dtype={self._state_dtype}, fused={self._fused!r})"
        )

    def _buffer_dtype(self, parameter_dtype: mx.Dtype) -> mx.Dtype:
        if self._state_dtype is not None:
            return self._state_dtype
        return mx.float64 if parameter_dtype == mx.float64 else mx.float32

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Create ``v`` (at ``initial_accumulator_value``) and, when used, ``grad_avg`` and
        ``momentum_buffer`` (at 0) for one parameter."""
        dtype = self._buffer_dtype(parameter.dtype)
        state["v"] = mx.full(parameter.shape, self._initial_accumulator_value, dtype)
        for key in self._options.state_keys[1:]:
            state[key] = mx.zeros(parameter.shape, dtype)

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        """Apply one step to every parameter that has a gradient and return the updated
        parameters, shaped like ``gradients``. Every gradient, parameter and state buffer is
        checked (path, shape, dtype) before anything changes."""
        leaves = match_gradients(gradients, parameters)
        if not self._initialized:
            self.init(rebuild(gradients, iter([leaf.parameter for leaf in leaves])))
        states = state_leaves(gradients, self.state)
        for leaf, state in zip(leaves, states):
            check_state(leaf.path, leaf.parameter, state, self._options.state_keys)

        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.step)
        self.state["step"] = self.step + 1

        new_parameters, new_states = self._step_function(
            self.state["learning_rate"],
            self.state["step"],
            [leaf.parameter for leaf in leaves],
            [leaf.gradient for leaf in leaves],
            [{key: state[key] for key in self._options.state_keys} for state in states],
        )
        for state, new_state in zip(states, new_states):
            state.update(new_state)
        return rebuild(gradients, iter(new_parameters))

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        """One update of one parameter at the current learning rate and step; stores the new
        buffers in ``state`` and returns the new parameter (MLX's per-parameter contract)."""
        (leaf,) = match_gradients(gradient, parameter)
        if not state:
            self.init_single(parameter, state)
        check_state(leaf.path, parameter, state, self._options.state_keys)
        (new_parameter,), (new_state,) = self._step_function(
            self.state["learning_rate"],
            # Called outside apply_gradients the step may still be 0; bias correction needs t >= 1.
            mx.maximum(self.step, 1),
            [parameter],
            [gradient],
            [{key: state[key] for key in self._options.state_keys}],
        )
        state.update(new_state)
        return new_parameter
