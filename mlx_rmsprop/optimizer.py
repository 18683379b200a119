"""``RMSprop``: a drop-in replacement for ``mlx.optimizers.RMSprop`` that also reproduces the
RMSprop of PyTorch, Keras 3, TF1 and optax."""

from __future__ import annotations

import math
import numbers
import re
import threading
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.optimizers import Optimizer

from . import paths, presets, validation
from .config import StateLayout, blocks, rmsprop_config
from .paths import native
from .spec import EMA, V, code_midpoints, code_table, scale_key
from .step import make_step_function
from .trees import LeafCache, check_state, gather, gather_cached, match_gradients, rebuild

LearningRate = float | mx.array | Callable[[mx.array], mx.array]


def _constant_codes(
    key: str, shape: tuple[int, ...], value: float, block_size: int
) -> tuple[mx.array, mx.array]:
    """The codes and scales of quantized buffer ``key`` holding ``value`` everywhere, as the
    requantization rule gives them (without building the float32 tensor): every block's scale
    is |value| and every normalised element 1 (or, for 0, scale 0 and element 0)."""
    scale = validation.in_float32(abs(value))
    normalised = 0.0 if scale == 0 else 1.0
    code = sum(midpoint < normalised for midpoint in code_midpoints(code_table(key)))
    return (
        mx.full(shape, code, mx.uint8),
        mx.full((blocks(math.prod(shape), block_size),), scale, mx.float32),
    )


class _UpdateLock:
    """A re-entrant lock that makes an update and a checkpoint save exclusive per optimizer
    (a save between two per-parameter writes would record one step's counter with another
    step's buffers). A copy or an unpickled optimizer gets a fresh, unheld lock."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def __reduce__(self) -> tuple:
        return (_UpdateLock, ())


def _inputs(found: Any) -> list[dict]:
    """Each leaf's state as the step function takes it: its buffers in its layout's key
    order. mx.compile takes the inputs in the order of the trees it is given, and a user's
    ``mx.compile(..., outputs=optimizer.state)`` writes its outputs back in the state's own
    order, which must therefore never change: the nodes are copied, not reordered."""
    return [
        {key: state[key] for key in layout.keys}
        for layout, state in zip(found.layouts, found.states, strict=True)
    ]


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
        state_dtype: dtype of the float state buffers. ``None`` (default): float32 for
            float16, bfloat16 and float32 parameters, float64 for float64 ones. Arithmetic is
            always at least float32 whatever this is.
        state_bits: ``32`` (default): ``v``, ``grad_avg`` and ``momentum_buffer`` are float
            buffers (``state_dtype``); ``8``: each is kept as uint8 codes (the parameter's
            shape) and one float32 scale per block of ``state_block_size`` elements
            (``v_scale``, ...), for every parameter of at least ``min_quantized_size``
            elements that is not float64 (smaller ones keep float buffers). A code stands for
            ``table[code] * scale``, on a logarithmic table with no zero; the update
            dequantizes, computes in float32 and requantizes in one pass. ``ema`` and
            ``accumulated_gradient`` stay float (``state_dtype``, which must not be float64).
        state_block_size: elements per scale with ``state_bits=8``: 32, 64, 128, 256 (default),
            512 or 1024, in row-major order.
        min_quantized_size: the smallest parameter (in elements, >= 0) whose state is 8-bit
            with ``state_bits=8``. Default 4096.
        stochastic_rounding: round each float32 result stored to a float16/bfloat16 parameter
            (or float16/bfloat16 state buffer) up or down at random, with probability
            proportional to its distance, instead of to nearest: small updates then survive
            in expectation. Reproducible bit for bit: the random bits are a hash of
            ``rounding_seed``, the update count, the parameter's position and the element
            index. With float32 and float64 parameters and state it changes nothing.
        rounding_seed: the seed of stochastic rounding, an integer in [0, 2**32 - 1]. Kept in
            ``optimizer.state["rounding_seed"]`` (uint32) with ``stochastic_rounding``, so a
            checkpoint resumes the same random bits.
        fused: which update path runs (``optimizer.path`` says which one did):
            ``"auto"`` (default) the first of ``"metal"``, ``"cuda"``, ``"native"``,
            ``"compiled"`` that runs on this machine; ``"metal"`` one fused Metal kernel
            launch per parameter (Apple GPU); ``"cuda"`` the same kernel body on MLX's CUDA
            backend; ``"native"`` fused C++ MLX operations on the CPU, one per parameter
            or per up to 8 medium ones (built at install time); ``"compiled"``, not fused:
            the reference math as separate MLX ops, the whole step under ``mx.compile``
            (per 1,024 parameters of a larger tree); ``False``, neither fused nor compiled:
            the reference math as plain MLX ops.
        skip_nonfinite: when a step's gradients hold any NaN or Inf, or a value computed on
            the way to the update does (the gradient with the loss scale divided out, an
            accumulated sum, a clip factor), leave every parameter and state buffer as it was
            and count the step in ``skipped_steps`` instead (default ``False``: NaN
            propagates, as in every framework).

    Keras' training pipeline, applied in Keras' order (loss scale, accumulation, clipping,
    weight decay, the update, EMA), with Keras' names and defaults:

    Args:
        loss_scale_factor: divide every gradient by this first.
        gradient_accumulation_steps: integer >= 2: calls accumulate gradients and change
            nothing else; every N-th call applies the mean of the last N.
        clipnorm: clip each gradient to this L2 norm: :math:`g c / \max(\|g\|, c)`.
        global_clipnorm: clip all gradients together to this global L2 norm.
        clipvalue: clip each gradient element to :math:`[-c, c]`. At most one of the three.
        use_ema: keep an exponential moving average ``ema`` of each parameter.
        ema_momentum: its momentum :math:`m` (0 on the first update), in [0, 1].
        ema_overwrite_frequency: every this many updates, overwrite the parameters with
            their EMA.
        name: a name for the optimizer.

    State per parameter: ``v``, plus ``grad_avg`` (centered), ``momentum_buffer``
    (momentum > 0), ``ema`` (use_ema) and ``accumulated_gradient`` (accumulation); with 8-bit
    state each of the first three is followed by its scales (``v_scale``, ...). A state saved
    from ``mlx.optimizers.RMSprop`` loads into the defaults.
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
        state_bits: int = 32,
        state_block_size: int = 256,
        min_quantized_size: int = 4096,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        fused: str | bool = "auto",
        skip_nonfinite: bool = False,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        clipnorm: float | None = None,
        global_clipnorm: float | None = None,
        clipvalue: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        name: str = "rmsprop",
    ):
        super().__init__()
        learning_rate = validation.learning_rate("learning_rate", learning_rate)
        self._config = rmsprop_config(
            scheduled=callable(learning_rate),
            alpha=alpha,
            eps=eps,
            momentum=momentum,
            centered=centered,
            nesterov=nesterov,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            eps_in_sqrt=eps_in_sqrt,
            lr_in_momentum=lr_in_momentum,
            initial_accumulator_value=initial_accumulator_value,
            bias_correction=bias_correction,
            state_dtype=state_dtype,
            state_bits=state_bits,
            state_block_size=state_block_size,
            min_quantized_size=min_quantized_size,
            stochastic_rounding=stochastic_rounding,
            rounding_seed=rounding_seed,
            fused=fused,
            skip_nonfinite=skip_nonfinite,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            clipnorm=clipnorm,
            global_clipnorm=global_clipnorm,
            clipvalue=clipvalue,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            name=name,
        )
        self.name = self._config.name
        self._decay_exclusion: re.Pattern | None = None
        self._decay_patterns: list[str] = []
        self._update_lock = _UpdateLock()
        self._excluded_paths: dict[str, bool] = {}
        self._init_runtime()
        self._maybe_schedule("learning_rate", learning_rate)
        if callable(learning_rate):
            # Its value at step 0 is the state's learning rate until the first update (and
            # what a checkpoint saved before it records): it must be a scalar already.
            self.state["learning_rate"] = self._checked_schedule_value(
                self.state["learning_rate"], check_value=False
            )
        if self._config.pipeline.skip_nonfinite:
            self.state["skipped_steps"] = mx.array(0, mx.uint64)
        if self._config.stochastic_rounding:
            # State, not only configuration: a checkpoint carries it, so a resume draws the
            # same random bits.
            self.state["rounding_seed"] = mx.array(self._config.rounding_seed, mx.uint32)

    # Attributes that copy.deepcopy and pickle leave out and _init_runtime rebuilds: functions
    # (compiled graphs, kernel launchers) that cannot be pickled and follow from the
    # configuration and this machine alone.
    _RUNTIME_ATTRIBUTES = (
        "_path",
        "_update",
        "_traces",
        "_accumulating_update",
        "_native_pipeline",
        "_compile_step",
        "_step_functions",
        "_leaves",
    )

    def _init_runtime(self) -> None:
        path, update = paths.resolve(self._config.fused)
        self._path = path.name
        self._compile_step = path.compile_step
        # Calls of the per-parameter update. Under mx.compile it runs only while the step
        # function is traced, which mx.compile does again for inputs of shapes or dtypes it
        # has not seen: how a step that skipped the checks (_cached_step) learns that the
        # trees changed.
        # Every update function the step calls is counted, the accumulating ones included.
        traces = self._traces = [0]

        def counted(function: Callable) -> Callable:
            def counted_call(*args: Any, **kwargs: Any) -> Any:
                traces[0] += 1
                return function(*args, **kwargs)

            return counted_call

        self._update = counted(update)
        # The kernel paths' update that accumulates gradients itself (None on the others, and
        # where nothing accumulates), and the native pipeline, whose update accumulates too.
        accumulating = None
        if self._config.pipeline.accumulates:
            accumulating = paths.resolve_accumulating(path, self._config.fused)
        self._accumulating_update = None if accumulating is None else counted(accumulating)
        self._native_pipeline = None
        if self._path == "native":

            def counted_updates(parameter_options: Any, *args: Any, **kwargs: Any) -> Any:
                # Builds several parameters' updates: each one counts.
                traces[0] += len(parameter_options)
                return native.PIPELINE.updates(parameter_options, *args, **kwargs)

            self._native_pipeline = native.PIPELINE._replace(updates=counted_updates)
        # The last step's leaves, with their step function as payload (_cached_step).
        self._leaves: LeafCache | None = None
        # One step function per weight-decay exclusion pattern and per-parameter options over
        # the parameters.
        self._step_functions: dict[tuple, Callable] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in self._RUNTIME_ATTRIBUTES:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # Hyperparameters are read-only: the state layout and the compiled update depend on them.
    alpha = property(lambda self: self._config.alpha, doc="Smoothing constant :math:`\\alpha`.")
    eps = property(lambda self: self._config.eps, doc="The :math:`\\epsilon` of the denominator.")
    momentum = property(lambda self: self._config.momentum, doc="Momentum :math:`\\mu`.")
    weight_decay = property(
        lambda self: self._config.weight_decay, doc="Weight decay :math:`\\lambda`."
    )
    initial_accumulator_value = property(lambda self: self._config.initial_accumulator_value)
    centered = property(lambda self: self._config.flags["centered"])
    nesterov = property(lambda self: self._config.flags["nesterov"])
    decoupled_weight_decay = property(lambda self: self._config.flags["decoupled_weight_decay"])
    maximize = property(lambda self: self._config.flags["maximize"])
    eps_in_sqrt = property(lambda self: self._config.flags["eps_in_sqrt"])
    lr_in_momentum = property(lambda self: self._config.flags["lr_in_momentum"])
    bias_correction = property(lambda self: self._config.flags["bias_correction"])
    state_dtype = property(lambda self: self._config.state_dtype)
    state_bits = property(lambda self: self._config.state_bits)
    state_block_size = property(lambda self: self._config.state_block_size)
    min_quantized_size = property(lambda self: self._config.min_quantized_size)
    stochastic_rounding = property(lambda self: self._config.stochastic_rounding)

    @property
    def rounding_seed(self) -> int:
        """The seed of stochastic rounding: the state's (a checkpoint loaded with
        ``strict=False`` brings its own) when it rounds stochastically."""
        seed = self.state.get("rounding_seed")
        return self._config.rounding_seed if seed is None else int(seed.item())

    fused = property(lambda self: self._config.fused)
    pipeline = property(lambda self: self._config.pipeline, doc="The Keras pipeline settings.")
    skipped_steps = property(
        lambda self: self.state["skipped_steps"],
        doc="How many steps ``skip_nonfinite`` has skipped (an array: usable in mx.compile).",
    )
    path = property(
        lambda self: self._path,
        doc='The path ``fused`` resolved to on this machine ("compiled", "reference", ...).',
    )
    update_lock = property(
        lambda self: self._update_lock,
        doc="The re-entrant lock each update and ``save_state``/``load_state`` hold. MLX "
        "evaluates an array only on the thread whose stream built it, and is not safe to "
        "evaluate from two threads at once: to checkpoint from another thread, update and "
        "evaluate inside ``with optimizer.update_lock:`` in the training thread.",
    )
    # Keras' attribute names for the pipeline settings (read-only here, as the compiled update
    # depends on them).
    loss_scale_factor = property(lambda self: self._config.pipeline.loss_scale_factor)
    gradient_accumulation_steps = property(
        lambda self: self._config.pipeline.gradient_accumulation_steps
    )
    clipnorm = property(lambda self: self._config.pipeline.clipnorm)
    global_clipnorm = property(lambda self: self._config.pipeline.global_clipnorm)
    clipvalue = property(lambda self: self._config.pipeline.clipvalue)
    use_ema = property(lambda self: self._config.pipeline.use_ema)
    ema_momentum = property(lambda self: self._config.pipeline.ema_momentum)
    ema_overwrite_frequency = property(lambda self: self._config.pipeline.ema_overwrite_frequency)

    def scale_loss(self, loss: Any) -> Any:
        """``loss * loss_scale_factor`` when a loss scale is set, else ``loss`` (Keras'
        ``scale_loss``); the update divides the gradients by the same factor."""
        if self._config.pipeline.loss_scale_factor is None:
            return loss
        return loss * self._config.pipeline.loss_scale_factor

    from_torch = classmethod(presets.from_torch)
    from_keras = classmethod(presets.from_keras)
    from_optax = classmethod(presets.from_optax)
    from_tensorflow = classmethod(presets.from_tensorflow)

    def __repr__(self) -> str:
        lr = self._schedulers.get("learning_rate", None) or self.state["learning_rate"].item()
        config = self._config
        return (
            f"RMSprop(learning_rate={lr!r}, alpha={config.alpha!r}, eps={config.eps!r}, "
            f"momentum={config.momentum!r}, weight_decay={config.weight_decay!r}, "
            + ", ".join(f"{name}={value!r}" for name, value in config.flags.items())
            + f", initial_accumulator_value={config.initial_accumulator_value!r}, "
            f"state_dtype={config.state_dtype}, state_bits={config.state_bits!r}, "
            f"state_block_size={config.state_block_size!r}, "
            f"min_quantized_size={config.min_quantized_size!r}, "
            f"stochastic_rounding={config.stochastic_rounding!r}, "
            f"rounding_seed={self.rounding_seed!r}, fused={config.fused!r})"
        )

    @property
    def state_keys(self) -> tuple[str, ...]:
        """The buffers kept per parameter with float state, in the order the fused update
        takes them (a parameter with 8-bit state keeps ``state_layout(parameter).keys``)."""
        return self._config.state_keys

    def state_layout(self, parameter: mx.array) -> StateLayout:
        """The state buffers this optimizer keeps for ``parameter``: their keys, and whether
        they are 8-bit (``layout.quantized``; ``layout.shape(key, parameter.shape)`` and
        ``layout.dtype(key)`` give each buffer's shape and dtype)."""
        return self._config.layout(parameter.shape, parameter.dtype)

    def get_config(self) -> dict:
        """The constructor arguments (JSON-serialisable; a schedule shows as ``"schedule"``)."""
        schedule = self._schedulers.get("learning_rate")
        return {
            "learning_rate": "schedule" if schedule else self.state["learning_rate"].item(),
            **self._config.arguments(),
            "rounding_seed": self.rounding_seed,
            "exclude_from_weight_decay": list(self._decay_patterns),
            "name": self.name,
        }

    def kernel_source(self, dtype: mx.Dtype = mx.float32, backend: str = "metal") -> str:
        """The complete kernel source MLX compiles for this optimizer's configuration and a
        parameter of ``dtype`` (its gradient of the same dtype, the state as ``state_dtype``
        makes it, 8 elements or more): MLX's generated signature, the template instantiation
        and the update body. ``backend`` is ``"metal"`` or ``"cuda"``. With ``clipnorm`` the
        kernel reads its clip factors from the step's factor matrix (here of 4 parameters or
        more). With ``gradient_accumulation_steps`` it is the kernel that accumulates first,
        into an accumulator of the state's dtype. Raises ``ValueError`` for a dtype the kernel
        does not compute with (float64 parameters take the reference path)."""
        from .paths.kernels.source import Variant, translation_unit

        options = self._config.options
        pipeline = self._config.pipeline
        variant = Variant(
            options,
            dtype,
            dtype,
            self.buffer_dtype(dtype),
            factors=pipeline.clipnorm is not None and options.scale_gradient,
            accumulator_dtype=self.buffer_dtype(dtype) if pipeline.accumulates else None,
        )
        return translation_unit(variant, backend)

    def buffer_dtype(self, parameter_dtype: mx.Dtype) -> mx.Dtype:
        """The dtype of the float state buffers this optimizer creates for such a parameter."""
        return self._config.buffer_dtype(parameter_dtype)

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Create ``v`` (at ``initial_accumulator_value``) and, when used, ``grad_avg`` and
        ``momentum_buffer`` (at 0) for one parameter; 8-bit ones as codes and scales that
        dequantize to exactly those values."""
        dtype = self.buffer_dtype(parameter.dtype)
        layout = self.state_layout(parameter)
        start = self._config.initial_accumulator_value
        for key in layout.keys:
            if key in layout.scale_keys:
                continue
            if key in layout.code_keys:
                state[key], state[scale_key(key)] = _constant_codes(
                    key, parameter.shape, start if key == V else 0.0, layout.block_size
                )
            elif key == EMA:
                state[key] = parameter.astype(dtype)  # the EMA starts as the weights (Keras)
            else:
                state[key] = mx.full(parameter.shape, start if key == V else 0.0, dtype)

    def _new_state(self, parameter: mx.array) -> dict:
        state: dict = {}
        self.init_single(parameter, state)
        return state

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        """Apply one step to every parameter that has a gradient and return the updated
        parameters, shaped like ``gradients``. Every gradient, parameter and state buffer is
        checked (path, shape, dtype) before anything changes."""
        with self._update_lock:
            return self._apply_gradients(gradients, parameters)

    def _apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        # Schedules run first and are checked before anything changes.
        scheduled = {name: scheduler(self.step) for name, scheduler in self._schedulers.items()}
        if "learning_rate" in scheduled:
            scheduled["learning_rate"] = self._checked_schedule_value(scheduled["learning_rate"])
        if self._leaves is not None:
            result = self._cached_step(gradients, parameters, scheduled)
            if result is not None:
                return result
        excluding = self._decay_exclusion is not None
        # Parameters without state (the first step, one added mid-training) get init_single's
        # state here, once the whole tree has passed its checks: what `init` would create.
        found = self._checked(gradients, parameters, with_paths=excluding)
        self._initialized = True
        if self._config.pipeline.skip_nonfinite and "skipped_steps" not in self.state:
            self.state["skipped_steps"] = mx.array(0, mx.uint64)  # a state loaded from elsewhere
        self._ensure_rounding_seed()
        self.state.update(scheduled)

        excluded = (
            tuple(self._excluded(path) for path in found.paths)
            if excluding
            else (False,) * len(found.parameters)
        )
        # (quantized, rounds) per parameter: a cheap key for the step functions.
        if self._config.state_bits == 32 and not self._config.stochastic_rounding:
            storage = ((False, False),) * len(found.parameters)
        else:
            storage = tuple(
                (layout.quantized, self._config.rounds(layout, parameter, state))
                for layout, parameter, state in zip(
                    found.layouts, found.parameters, found.states, strict=True
                )
            )
        step_function = self._step_function(excluded, storage)
        new_parameters, new_states, counters = step_function(
            self._counters(self.step),
            found.parameters,
            found.gradients,
            _inputs(found),
        )
        for state, new_state in zip(found.states, new_states, strict=True):
            state.update(new_state)
        self.state.update(counters)
        if self._compile_step:
            self._leaves = LeafCache(gradients, found, step_function)
        return rebuild(gradients, iter(new_parameters))

    def _checked(self, gradients: Any, parameters: Any, with_paths: bool = False) -> Any:
        """:func:`trees.gather` with this optimizer's state layouts."""
        if self._config.state_bits == 32:
            # One layout for every parameter: skip the per-leaf lookup (per-step overhead).
            layout = self._config.layout((), mx.float32)
            layout_of = lambda parameter: layout  # noqa: E731
        else:
            layout_of = self.state_layout
        return gather(
            gradients,
            parameters,
            self.state,
            layout_of,
            with_paths=with_paths,
            new_state=self._new_state,
        )

    def _cached_step(self, gradients: Any, parameters: Any, scheduled: dict) -> dict | None:
        """The step over trees that match the last step's (trees.LeafCache), without their
        per-leaf checks: the per-leaf walk at a third of its cost, no per-leaf dicts. None when
        they do not match, nothing changed: the checked step runs.

        The compiled step function it calls was traced for the last step's shapes and
        dtypes, and chosen for their layouts. When it traces again (or fails), the trees
        changed in a way only the checks can judge: they run before anything changes; a
        refused tree also drops the step functions (their new trace was made for it), an
        accepted one (a parameter's dtype changed) goes to the checked step, which chooses
        the step function again."""
        cache = self._leaves
        found = gather_cached(cache, gradients, parameters, self.state)
        if (
            found is None
            or (self._config.pipeline.skip_nonfinite and "skipped_steps" not in self.state)
            or (self._config.stochastic_rounding and "rounding_seed" not in self.state)
        ):
            self._leaves = None
            return None
        counters = self._counters(self.step)
        if "learning_rate" in scheduled:
            counters["learning_rate"] = scheduled["learning_rate"]
        traces = self._traces[0]
        try:
            new_parameters, new_states, new_counters = cache.payload(
                counters,
                found.parameters,
                found.gradients,
                found.states if cache.in_order else _inputs(found),
            )
        except Exception:
            self._forget_steps()
            self._checked(gradients, parameters)
            raise
        if self._traces[0] != traces:
            try:
                self._checked(gradients, parameters)
            except Exception:
                self._forget_steps()
                raise
            self._leaves = None
            return None
        self._initialized = True
        self.state.update(scheduled)
        for state, new_state in zip(found.states, new_states, strict=True):
            state.update(new_state)
        self.state.update(new_counters)
        cache.stored()
        return rebuild(gradients, iter(new_parameters))

    def _forget_steps(self) -> None:
        self._step_functions.clear()
        self._leaves = None

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        """One update of one parameter at the current learning rate and step; stores the new
        buffers in ``state`` and returns the new parameter (MLX's per-parameter contract).
        Stochastic rounding draws its bits as for the first parameter of a step (index 0)."""
        with self._update_lock:
            return self._apply_single(gradient, parameter, state)

    def _apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        (leaf,) = match_gradients(gradient, parameter)
        if not state:
            self.init_single(parameter, state)
        layout = self.state_layout(parameter)
        check_state(leaf.path, parameter, state, layout)
        self._ensure_rounding_seed()
        storage = ((layout.quantized, self._config.rounds(layout, parameter, state)),)
        # MLX calls this after incrementing the step; the update counts from step - 1.
        step = mx.maximum(self.step, 1) - 1
        (new_parameter,), (new_state,), _ = self._step_function((False,), storage)(
            self._counters(step),
            [parameter],
            [gradient],
            [{k: state[k] for k in layout.keys}],
        )
        state.update(new_state)
        return new_parameter

    def _ensure_rounding_seed(self) -> None:
        # A state assigned from elsewhere (MLX's own, or a configuration without stochastic
        # rounding) gets this optimizer's seed.
        if self._config.stochastic_rounding and "rounding_seed" not in self.state:
            self.state["rounding_seed"] = mx.array(self._config.rounding_seed, mx.uint32)

    def _checked_schedule_value(self, value: Any, check_value: bool = True) -> mx.array:
        """The schedule's learning rate as a scalar array; NaN, infinite or negative values
        raise here (unless ``check_value`` is False). Inside mx.compile the value cannot be
        read: the step function then skips the update in the graph instead
        (``PipelineConfig.guard_learning_rate``)."""
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(()).item() if value.dtype.kind in "iuf" else value
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            # Any real scalar the constructor accepts (int, numpy.float32, ...), as float32.
            value = mx.array(float(value))
        if (
            isinstance(value, mx.array)
            and value.size == 1
            and mx.issubdtype(value.dtype, mx.integer)
        ):
            value = value.astype(mx.float32)  # an integer scalar array, as MLX's RMSprop takes
        if (
            not isinstance(value, mx.array)
            or value.size != 1
            or value.dtype not in (validation.FLOATING_DTYPES)
        ):
            raise ValueError(
                f"the learning_rate schedule must return a scalar floating value, got "
                f"{validation.describe(value)} at step {self.step}"
            )
        if not check_value:
            return value.reshape(())
        try:
            number = value.item()
        except ValueError as error:
            if "function transformations" in str(error):
                return value.reshape(())  # being traced by mx.compile
            raise
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(
                f"the learning_rate schedule returned {number!r} at step {self.step.item()}; "
                f"a learning rate must be finite and >= 0 (nothing was changed)"
            )
        return value.reshape(())

    @Optimizer.learning_rate.setter
    def learning_rate(self, learning_rate: float | mx.array) -> None:
        """Set a constant learning rate (checked like the constructor's)."""
        value = validation.learning_rate("learning_rate", learning_rate)
        if callable(value):
            raise ValueError(
                "learning_rate can be set to a number or a scalar array; a schedule must be "
                "given to the constructor"
            )
        self.state["learning_rate"] = mx.array(value)

    def _use_preset_eps(self, eps: float) -> None:
        # A preset's epsilon of 0 (or one that rounds to 0 in float32); see presets._with_eps.
        self._config = self._config.with_preset_eps(eps)
        self._forget_steps()

    def _counters(self, step: mx.array) -> dict[str, mx.array]:
        counters = {"learning_rate": self.state["learning_rate"], "step": step}
        if self._config.pipeline.skip_nonfinite:
            counters["skipped_steps"] = self.state["skipped_steps"]
        if self._config.stochastic_rounding:
            counters["rounding_seed"] = self.state["rounding_seed"]
        return counters

    def _step_function(
        self, decay_excluded: tuple[bool, ...], storage: tuple[tuple[bool, bool], ...]
    ) -> Callable:
        """The step function for these weight-decay exclusions and, per parameter, whether
        its state is 8-bit and whether it rounds stochastically."""
        key = (decay_excluded, storage)
        if key not in self._step_functions:
            self._step_functions[key] = make_step_function(
                self._config.options,
                self._config.constants,
                self._config.pipeline,
                self._update,
                compiled=self._compile_step,
                decay_excluded=decay_excluded,
                parameter_options=tuple(
                    self._config.parameter_options(*flags) for flags in storage
                ),
                native=self._native_pipeline,
                accumulating_update=self._accumulating_update,
            )
        return self._step_functions[key]

    def _excluded(self, path: str) -> bool:
        # Looked up every step for every parameter: search each path once (the patterns are
        # fixed before the first update).
        if path not in self._excluded_paths:
            self._excluded_paths[path] = self._decay_exclusion is not None and bool(
                self._decay_exclusion.search(path)
            )
        return self._excluded_paths[path]

    def exclude_from_weight_decay(
        self, var_list: Any = None, var_names: list[str] | None = None
    ) -> None:
        """Turn weight decay off for every parameter whose path (``"layers.0.bias"``) matches
        one of the regular expressions in ``var_names`` (searched, as Keras searches variable
        names). Must be called before the first update, as in Keras.

        ``var_list`` (Keras' list of variables) cannot work in MLX, where an update returns new
        arrays: it is refused with a pointer to ``var_names``.
        """
        if var_list is not None:
            raise ValueError(
                "var_list is not supported: MLX parameters are replaced by every update, so "
                "they cannot be recognised by identity; pass var_names (regular expressions "
                "matched against parameter paths such as 'layers.0.bias')"
            )
        if self._initialized:
            raise ValueError(
                "exclude_from_weight_decay() can only be configured before the optimizer's "
                "first update (or init)"
            )
        patterns = validation.name_patterns("var_names", var_names or [])
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"var_names: {pattern!r} is not a regular expression: {error}"
                ) from None
        self._set_decay_exclusion(patterns)

    def _set_decay_exclusion(self, patterns: list[str]) -> None:
        # Also used by load_state to restore the patterns a checkpoint was saved with.
        self._decay_patterns = list(patterns)
        self._decay_exclusion = re.compile("|".join(patterns)) if patterns else None
        self._excluded_paths.clear()
        self._forget_steps()

    def finalize_variable_values(self, target: nn.Module | dict) -> Any:
        """Swap the EMA in at the end of training (Keras' ``finalize_variable_values``).

        With an ``nn.Module`` its parameters are updated in place (and the module returned);
        with a parameter tree, a new tree is returned whose leaves that have an EMA are
        replaced by it. Without ``use_ema`` nothing changes.
        """
        if not self._config.pipeline.use_ema:
            return target
        parameters = target.trainable_parameters() if isinstance(target, nn.Module) else target
        averaged = self.ema_parameters(parameters)
        if isinstance(target, nn.Module):
            target.update(averaged)
            return target
        return averaged

    def ema_parameters(self, parameters: dict) -> dict:
        """``parameters`` with each leaf the optimizer keeps an EMA for replaced by that EMA
        (cast to the parameter's dtype)."""
        if not self._config.pipeline.use_ema:
            raise ValueError("ema_parameters() needs use_ema=True")

        def swap(node: Any, state: Any) -> Any:
            if isinstance(node, mx.array):
                if isinstance(state, dict) and "ema" in state:
                    if state["ema"].shape != node.shape:
                        raise ValueError(
                            f"the EMA has shape {tuple(state['ema'].shape)} but the parameter "
                            f"has shape {tuple(node.shape)}: not the model this optimizer trained"
                        )
                    return state["ema"].astype(node.dtype)
                return node
            if isinstance(node, dict):
                return {
                    k: swap(v, state.get(k, {}) if isinstance(state, dict) else {})
                    for k, v in node.items()
                }
            if isinstance(node, (list, tuple)):
                states = state if isinstance(state, (list, tuple)) else []
                return type(node)(
                    swap(v, states[i] if i < len(states) else {}) for i, v in enumerate(node)
                )
            return node

        return swap(parameters, self.state)
