"""The function that updates every parameter of one optimizer step.

One call covers the whole tree so that the compiled path costs one compiled-function call per
step rather than one per parameter (200 tensors of 2^10 floats: 2.5 ms against 11 ms, measured
on the 2-core Linux CI machine); a tree of more than ``COMPILE_CHUNK`` parameters costs one
call per chunk of them, after an uncompiled head. :func:`make_step_function` builds it from
the stages below, in Keras' order. The head reads the whole tree: the loss scale and
accumulation of the statistics (:func:`accumulate`), clipping by norm
(:func:`gradient_statistics`, :func:`clip_factors`), the skip decision, counters and gates
(:func:`nonfinite`, :func:`count`) and the per-step scalars (:class:`StepScalars`). Then one
fused update per parameter (:func:`update_parameters`) does the accumulation (or
:func:`carry_accumulators` beside it), weight decay, the update itself and the EMA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx

from .pipeline import (
    PipelineConfig,
    ScaledNorm,
    any_nonfinite,
    clip_by_norm_factors,
    ema_factors,
    global_clip_factor,
    statistics_ops,
)
from .spec import ACCUMULATOR, NUM_SCALARS, Scalar, UpdateFn, UpdateOptions
from .storage import mix32


class NativePipeline(NamedTuple):
    """The native path's pipeline primitives (:mod:`mlx_rmsprop.paths.native`), used where
    every parameter computes in float32; MLX ops give the same results elsewhere.

    ``statistics(gradients, accumulators, loss_scale, accumulation_steps, scaled_norm)``: the
    statistics matrix of :func:`~mlx_rmsprop.pipeline.statistics_ops`, one node per step.
    ``updates(parameter_options, vectors, parameters, gradients, states, *, first, factors,
    accumulation)``: the fused update of a run of parameters, several to a node, ``(new
    parameters, new states)``, the values of :func:`update_parameters`. With ``accumulation``
    = ``(gates, loss_scale, accumulation_steps)`` Keras' gradient accumulation is each
    update's first stage: the values of :func:`accumulate`, :func:`carry_accumulators` and the
    update on the mean, each new state holding the new accumulator too."""

    statistics: Callable[[list, list, float, int, int], mx.array]
    updates: Callable[..., tuple[list[mx.array], list[dict]]]


def compute_dtype(
    options: UpdateOptions, parameter: mx.array, gradient: mx.array, state: dict
) -> mx.Dtype:
    """Arithmetic is float32 at least; float64 anywhere in the inputs makes it float64, except
    with 8-bit state, which is always updated in float32 (a float64 gradient of a float32
    parameter is rounded to float32 first)."""
    if options.quantized_state:
        return mx.float32
    dtypes = [parameter.dtype, gradient.dtype, *(buffer.dtype for buffer in state.values())]
    return mx.float64 if mx.float64 in dtypes else mx.float32


def rounding_key(seed: mx.array, updates_done: mx.array) -> mx.array:
    """:func:`mlx_rmsprop.spec.rounding_step_key` in the graph: the ROUNDING_KEY of update
    ``updates_done`` (1-based, taken modulo 2^32) under the uint32 ``seed``, as uint32."""
    step = updates_done.astype(mx.uint32)
    return mix32(seed.astype(mx.uint32) ^ mix32(step)) >> mx.array(8, mx.uint32)


def constant_scalars(hyper: dict[Scalar, float]) -> list[float]:
    """The per-step vector with every entry that does not depend on the step filled in."""
    values = [0.0] * NUM_SCALARS
    for index, value in hyper.items():
        values[int(index)] = float(value)
    return values


def assemble_scalars(
    constants: Sequence[float], entries: dict[Scalar, mx.array], dtype: mx.Dtype
) -> mx.array:
    """The scalars vector: ``constants`` with some entries replaced by (0-d) arrays.

    One concatenation of constant runs and the replaced entries: a graph node per entry
    (``mx.stack`` of 16 scalars) cost a 2^10-element step about 40 us in node evaluation."""
    pieces, run = [], []
    for index in range(NUM_SCALARS):
        if index in entries:
            if run:
                pieces.append(mx.array(run, dtype))
                run = []
            pieces.append(entries[index].astype(dtype).reshape(1))
        else:
            run.append(constants[index])
    if run:
        pieces.append(mx.array(run, dtype))
    return mx.concatenate(pieces) if len(pieces) > 1 else pieces[0]


# Parameters per compiled function of a step. MLX's compile passes grow faster than linearly
# in the size of the graph they are given (20,000 tensors of 4 elements, one node each, took
# 5.8 s to compile as one function and 0.21 s as functions of 1,000, 2-core Linux CI machine),
# so a step over more parameters than this is compiled as a head (statistics, gates, scalars)
# and updates of at most this many parameters each: its first step grows linearly.
COMPILE_CHUNK = 1024


def make_step_function(
    options: UpdateOptions,
    constants: Sequence[float],
    pipeline: PipelineConfig,
    update: UpdateFn,
    compiled: bool,
    decay_excluded: tuple[bool, ...],
    parameter_options: tuple[UpdateOptions, ...],
    native: NativePipeline | None = None,
    accumulating_update: Callable | None = None,
) -> Callable:
    """``step_fn(counters, parameters, gradients, states)`` returning
    ``(new_parameters, new_states, new_counters)``.

    ``counters`` holds ``learning_rate`` (this step's), ``step`` (updates so far), when
    skipping non-finite steps ``skipped_steps``, and with stochastic rounding
    ``rounding_seed`` (uint32; read, never changed). ``options`` are the configuration's,
    ``parameter_options[i]`` what parameter ``i``'s update is told (its storage flags).
    ``decay_excluded[i]`` turns weight decay off for parameter ``i``. Both are fixed per
    function (the optimizer keeps one per combination).
    ``native``: the native pipeline primitives, used where every parameter computes in
    float32 from float32-or-narrower gradients and accumulators.
    ``accumulating_update``: the path's update with Keras' gradient accumulation as its first
    stage (signature of :func:`mlx_rmsprop.paths.native.accumulating_update`), used where the
    native primitives are not: the step then runs no accumulation of its own before the update
    (the statistics still take the accumulated values from MLX ops).
    ``compiled``: under ``mx.compile``, one function for up to ``COMPILE_CHUNK`` parameters,
    else a head and one function per ``COMPILE_CHUNK`` parameters (the same operations, the
    same results).
    """
    stages = _StepStages(
        options,
        constants,
        pipeline,
        update,
        decay_excluded,
        parameter_options,
        native,
        accumulating_update,
    )

    def step_fn(
        counters: dict[str, mx.array],
        parameters: list[mx.array],
        gradients: list[mx.array],
        states: list[dict],
    ) -> tuple[list[mx.array], list[dict], dict[str, mx.array]]:
        dtypes = stages.dtypes(parameters, gradients, states)
        route = stages.route(gradients, states, dtypes)
        shared, new_counters, accumulated = stages.head(route, counters, gradients, states, dtypes)
        new_parameters, new_states = stages.updates(
            route, 0, shared, parameters, gradients, states, dtypes, accumulated
        )
        return new_parameters, new_states, new_counters

    if not compiled:
        return step_fn
    if len(parameter_options) <= COMPILE_CHUNK:
        return mx.compile(step_fn)
    return _ChunkedStep(stages, COMPILE_CHUNK)


@dataclass(frozen=True)
class _StepStages:
    """The stages of one step function, split where a step compiled in chunks splits them:
    :meth:`head` (everything that reads the whole tree) and :meth:`updates` (the fused update
    of a run of parameters)."""

    options: UpdateOptions
    constants: Sequence[float]
    pipeline: PipelineConfig
    update: UpdateFn
    decay_excluded: tuple[bool, ...]
    parameter_options: tuple[UpdateOptions, ...]
    native: NativePipeline | None
    accumulating_update: Callable | None

    def dtypes(
        self,
        parameters: list[mx.array],
        gradients: list[mx.array],
        states: list[dict],
        first: int = 0,
    ) -> list[mx.Dtype]:
        """The arithmetic dtype of each parameter from ``first`` on (the lists hold those)."""
        options = self.parameter_options[first : first + len(parameters)]
        return [
            compute_dtype(o, p, g, s)
            for o, p, g, s in zip(options, parameters, gradients, states, strict=True)
        ]

    def route(self, gradients: list[mx.array], states: list[dict], dtypes: list[mx.Dtype]) -> bool:
        """Whether this step runs the native pipeline primitives (decided for the whole tree)."""
        return self.native is not None and native_applies(self.pipeline, gradients, states, dtypes)

    def vector_names(self, dtypes: list[mx.Dtype], first: int = 0) -> list[str]:
        """The name in the head's ``vectors`` of the scalars vector of each parameter from
        ``first`` on."""
        return [
            f"{dtype}/{int(excluded)}/{int(options.stochastic_rounding)}"
            for dtype, excluded, options in zip(
                dtypes,
                self.decay_excluded[first:],
                self.parameter_options[first:],
                strict=False,
            )
        ]

    def head(
        self,
        route: bool,
        counters: dict[str, mx.array],
        gradients: list[mx.array],
        states: list[dict],
        dtypes: list[mx.Dtype],
    ) -> tuple[dict, dict[str, mx.array], Accumulated | None]:
        """Keras' stages that read the whole tree: ``(shared, new counters, accumulated)``.
        ``shared`` holds what every update reads: the scalars ``vectors`` (by
        :meth:`vector_names`), the clipnorm ``factors`` matrix, and with accumulation the
        bool gates ``applies`` and (where calls can be skipped) ``skip``, and
        ``accumulation_gates`` (float32 (applies, skip)). ``accumulated``: the gradients and
        sums of an accumulation done with MLX ops for the statistics here, or ``None``.

        ``gradients`` and ``states`` may be empty where the pipeline reads no statistics
        (:meth:`head_inputs`); ``dtypes`` always covers every parameter."""
        pipeline = self.pipeline
        primitives = self.native if route else None
        accumulated = None
        if (
            pipeline.reads_statistics
            and pipeline.accumulates
            and primitives is None
            and self.accumulating_update is None
        ):
            accumulated = accumulate(pipeline, gradients, states, dtypes)
        summary = gradient_statistics(pipeline, primitives, gradients, states, accumulated, dtypes)
        clipping = clip_factors(pipeline, summary, dtypes, [g.size for g in gradients])
        gates = count(pipeline, counters, nonfinite(pipeline, summary, clipping))
        key = None
        if any(o.stochastic_rounding for o in self.parameter_options):
            key = rounding_key(counters["rounding_seed"], gates.updates_done)
        scalars = StepScalars(
            self.options,
            self.constants,
            pipeline,
            counters["learning_rate"],
            gates,
            clipping.global_factor,
            key,
        )
        vectors = {}
        for name, dtype, excluded, options in zip(
            self.vector_names(dtypes),
            dtypes,
            self.decay_excluded,
            self.parameter_options,
            strict=True,
        ):
            if name not in vectors:
                vectors[name] = scalars.vector(dtype, excluded, options.stochastic_rounding)
        shared: dict = {"vectors": vectors}
        if clipping.per_parameter is not None:
            shared["factors"] = clipping.per_parameter
        if pipeline.accumulates:
            shared["applies"] = gates.applies
            if gates.skip is not None:
                shared["skip"] = gates.skip
            skip = mx.array(False) if gates.skip is None else gates.skip
            shared["accumulation_gates"] = mx.stack([gates.applies, skip]).astype(mx.float32)
        return shared, gates.counters, accumulated

    def head_inputs(
        self, gradients: list[mx.array], states: list[dict]
    ) -> tuple[list[mx.array], list[dict]]:
        """What :meth:`head` reads of the trees: the gradients and each state's accumulator
        where the statistics are computed, else nothing (a compiled head then takes no
        per-parameter input at all)."""
        if not self.pipeline.reads_statistics:
            return [], []
        if not self.pipeline.accumulates:
            return gradients, [{} for _ in states]
        return gradients, [{ACCUMULATOR: state[ACCUMULATOR]} for state in states]

    def updates(
        self,
        route: bool,
        first: int,
        shared: dict,
        parameters: list[mx.array],
        gradients: list[mx.array],
        states: list[dict],
        dtypes: list[mx.Dtype],
        accumulated: Accumulated | None = None,
    ) -> tuple[list[mx.array], list[dict]]:
        """The fused updates of parameters ``first, first + 1, ...`` (``parameters`` and the
        other lists hold those only), reading the head's ``shared``: ``(new parameters, new
        states)``. Where the head accumulated with MLX ops, ``accumulated`` (the head's, for
        these parameters) or, when ``None``, the same accumulation done again here."""
        pipeline = self.pipeline
        options = self.parameter_options[first : first + len(parameters)]
        vectors = [shared["vectors"][name] for name in self.vector_names(dtypes, first)]
        if route:
            accumulation = None
            if pipeline.accumulates:
                accumulation = (
                    shared["accumulation_gates"],
                    pipeline.loss_scale_factor or 0.0,
                    pipeline.gradient_accumulation_steps,
                )
            return self.native.updates(
                options,
                vectors,
                parameters,
                gradients,
                states,
                first=first,
                factors=shared.get("factors"),
                accumulation=accumulation,
            )
        new_states: list[dict] = [dict() for _ in states]
        accumulating = None
        if pipeline.accumulates:
            if self.accumulating_update is not None:
                accumulating = bind_accumulation(
                    pipeline, self.accumulating_update, shared["accumulation_gates"]
                )
            else:
                if accumulated is None:
                    accumulated = accumulate(pipeline, gradients, states, dtypes)
                carry_accumulators(
                    accumulated, states, new_states, shared["applies"], shared.get("skip"), dtypes
                )
                gradients = accumulated.gradients
        new_parameters = update_parameters(
            options,
            self.update,
            vectors,
            parameters,
            gradients,
            states,
            new_states,
            shared.get("factors"),
            first,
            accumulating,
        )
        return new_parameters, new_states


class _ChunkedStep:
    """A step compiled as a head and one function per ``chunk`` parameters (see
    COMPILE_CHUNK), with the signature of ``make_step_function``'s. Each compiled function is
    made on first use, per route (native pipeline or not) and, for updates, per first
    parameter."""

    def __init__(self, stages: _StepStages, chunk: int) -> None:
        self._stages = stages
        self._chunk = chunk
        self._chunks: dict[tuple[bool, int], Callable] = {}

    def __call__(
        self,
        counters: dict[str, mx.array],
        parameters: list[mx.array],
        gradients: list[mx.array],
        states: list[dict],
    ) -> tuple[list[mx.array], list[dict], dict[str, mx.array]]:
        stages = self._stages
        dtypes = stages.dtypes(parameters, gradients, states)
        route = stages.route(gradients, states, dtypes)
        # The head runs uncompiled: its per-parameter work is one statistics node, which
        # MLX's compile passes would take about 25 us per parameter to process (20,000
        # parameters: 0.59 s compiled, 0.10 s uncompiled), against a few whole-tree ops.
        shared, new_counters, accumulated = stages.head(
            route, counters, *stages.head_inputs(gradients, states), dtypes
        )
        names = stages.vector_names(dtypes)
        new_parameters: list[mx.array] = []
        new_states: list[dict] = []
        for first in range(0, len(parameters), self._chunk):
            last = first + self._chunk
            # Each function is given the vectors its parameters read and nothing else, so that
            # its inputs change (and MLX traces it again) exactly when what it reads changes.
            chunk_shared = dict(shared)
            chunk_shared["vectors"] = {
                name: shared["vectors"][name] for name in sorted(set(names[first:last]))
            }
            updates = self._chunks.get((route, first))
            if updates is None:
                updates = self._chunks[(route, first)] = mx.compile(
                    functools.partial(self._updates_fn, route, first)
                )
            # The head's MLX-ops accumulation, where it made one for the statistics.
            carried = ([], [])
            if accumulated is not None:
                carried = (accumulated.gradients[first:last], accumulated.sums[first:last])
            chunk_parameters, chunk_states = updates(
                chunk_shared,
                parameters[first:last],
                gradients[first:last],
                states[first:last],
                carried,
            )
            new_parameters += chunk_parameters
            new_states += chunk_states
        return new_parameters, new_states, new_counters

    def _updates_fn(self, route, first, shared, parameters, gradients, states, carried):
        stages = self._stages
        dtypes = stages.dtypes(parameters, gradients, states, first)
        accumulated = Accumulated(*carried) if carried[0] else None
        return stages.updates(
            route, first, shared, parameters, gradients, states, dtypes, accumulated
        )


class Accumulated(NamedTuple):
    """The gradients as the fused update will see them, and with accumulation the running
    sums (the accumulator plus this call's gradient, loss scale divided out)."""

    gradients: list[mx.array]
    sums: list[mx.array]


def accumulate(
    pipeline: PipelineConfig,
    gradients: list[mx.array],
    states: list[dict],
    dtypes: list[mx.Dtype],
) -> Accumulated:
    """Keras' first two stages: divide out the loss scale, then accumulate.

    Without accumulation the gradients pass unchanged (the fused update divides by the loss
    scale itself); with it, each is divided by the loss scale before it is summed into the
    accumulator, as Keras does, and the update sees the mean of the sum."""
    if not pipeline.accumulates:
        return Accumulated(list(gradients), [])
    update_grads, sums = [], []
    for gradient, state, dtype in zip(gradients, states, dtypes, strict=True):
        mean, summed = accumulate_tensor(
            gradient,
            state[ACCUMULATOR],
            pipeline.loss_scale_factor,
            pipeline.gradient_accumulation_steps,
            dtype,
        )
        sums.append(summed)
        update_grads.append(mean)
    return Accumulated(update_grads, sums)


def accumulate_tensor(
    gradient: mx.array,
    accumulator: mx.array,
    loss_scale: float | None,
    steps: int,
    dtype: mx.Dtype,
) -> tuple[mx.array, mx.array]:
    """One parameter's ``(mean, summed)`` in ``dtype``: ``summed = gradient / loss_scale +
    accumulator`` (no division without ``loss_scale``), ``mean = summed / steps``."""
    scaled = gradient.astype(dtype)
    if loss_scale is not None:
        scaled = scaled / mx.array(loss_scale, dtype)
    summed = scaled + accumulator.astype(dtype)
    return summed / mx.array(steps, dtype), summed


def carry_tensor(
    summed: mx.array,
    accumulator: mx.array,
    applies: mx.array,
    skip: mx.array | None,
    dtype: mx.Dtype,
) -> mx.array:
    """One parameter's new accumulator, in the accumulator's dtype: emptied at the end of a
    cycle (``applies``), the sum otherwise, the old one when the call is skipped."""
    new_accumulator = mx.where(applies, mx.zeros_like(summed), summed)
    if skip is not None:
        new_accumulator = mx.where(skip, accumulator.astype(dtype), new_accumulator)
    return new_accumulator.astype(accumulator.dtype)


def unscaled(pipeline: PipelineConfig, gradient: mx.array, dtype: mx.Dtype) -> mx.array:
    """The gradient whose norm Keras clips: after the loss scale is divided out (which
    :func:`accumulate` has already done when accumulating)."""
    gradient = gradient.astype(dtype)
    if pipeline.loss_scale_factor is not None and not pipeline.accumulates:
        gradient = gradient / mx.array(pipeline.loss_scale_factor, dtype)
    return gradient


def norm_dtype(dtypes: list[mx.Dtype]) -> mx.Dtype:
    """The dtype of the global norm: float64 when any parameter computes in float64."""
    return mx.float64 if mx.float64 in dtypes else mx.float32


def native_applies(
    pipeline: PipelineConfig,
    gradients: list[mx.array],
    states: list[dict],
    dtypes: list[mx.Dtype],
) -> bool:
    """Whether the native pipeline primitives take this step: float32 arithmetic everywhere,
    and no float64 gradient or accumulator (8-bit state computes in float32 whatever the
    gradient's dtype; those steps keep the MLX ops)."""
    if any(dtype != mx.float32 for dtype in dtypes):
        return False
    if any(g.dtype == mx.float64 for g in gradients):
        return False
    return not pipeline.accumulates or all(s[ACCUMULATOR].dtype != mx.float64 for s in states)


def gradient_statistics(
    pipeline: PipelineConfig,
    native: NativePipeline | None,
    gradients: list[mx.array],
    states: list[dict],
    accumulated: Accumulated | None,
    dtypes: list[mx.Dtype],
) -> mx.array | None:
    """The statistics matrix (:mod:`mlx_rmsprop.pipeline`) of the values whose norms Keras
    clips and whose finiteness decides a skip: the gradients with the loss scale divided out,
    or with accumulation the accumulated sums over the steps. ``None`` when nothing reads it.

    One native node for the whole step with ``native`` (which reads the gradients and
    accumulators itself); otherwise the same matrix from MLX ops on ``accumulated`` or, when
    that is ``None``, on :func:`accumulate`'s values computed here (the gradients themselves
    without accumulation)."""
    if not pipeline.reads_statistics:
        return None
    scaled_norm = (
        ScaledNorm.GLOBAL
        if pipeline.global_clipnorm is not None
        else ScaledNorm.PER_TENSOR
        if pipeline.clipnorm is not None
        else ScaledNorm.NONE
    )
    if native is not None:
        accumulators = [state[ACCUMULATOR] for state in states] if pipeline.accumulates else []
        return native.statistics(
            list(gradients),
            accumulators,
            pipeline.loss_scale_factor or 0.0,
            pipeline.gradient_accumulation_steps or 0,
            int(scaled_norm),
        )
    if accumulated is None:
        accumulated = accumulate(pipeline, gradients, states, dtypes)
    if pipeline.global_clipnorm is not None:
        # Every norm of a global clip is taken in one dtype.
        dtypes = [norm_dtype(dtypes)] * len(dtypes)
    values = [
        unscaled(pipeline, g, dtype) for g, dtype in zip(accumulated.gradients, dtypes, strict=True)
    ]
    return statistics_ops(values, scaled_norm)


class ClipFactors(NamedTuple):
    """``global_factor``: the global_clipnorm scale for every gradient (or ``None``);
    ``per_parameter``: the clipnorm (multiplier, divisor) of gradient ``i`` in row ``i`` of a
    (parameters, 2) matrix (or ``None``), which the fused update reads at its index."""

    global_factor: mx.array | None
    per_parameter: mx.array | None


def clip_factors(
    pipeline: PipelineConfig,
    summary: mx.array | None,
    dtypes: list[mx.Dtype],
    sizes: list[int],
) -> ClipFactors:
    """Keras' third stage, the part that needs whole tensors: the norms, as factors the fused
    update multiplies and divides by (clipping by value is element-wise, in the update).
    Each parameter's factors are computed in its own arithmetic dtype."""
    if pipeline.global_clipnorm is not None:
        if not any(sizes):
            return ClipFactors(mx.array(1.0, norm_dtype(dtypes)), None)
        return ClipFactors(
            global_clip_factor(summary, pipeline.global_clipnorm, norm_dtype(dtypes)), None
        )
    if pipeline.clipnorm is None:
        return ClipFactors(None, None)
    present = sorted(set(dtypes), key=lambda dtype: dtype.size)
    by_dtype = {dtype: clip_by_norm_factors(summary, pipeline.clipnorm, dtype) for dtype in present}
    if len(present) == 1:
        return ClipFactors(None, by_dtype[present[0]])
    # Mixed float32/float64 arithmetic: float32 factors are exact in float64.
    wide = mx.array([dtype == mx.float64 for dtype in dtypes]).reshape(-1, 1)
    return ClipFactors(
        None, mx.where(wide, by_dtype[mx.float64], by_dtype[mx.float32].astype(mx.float64))
    )


def nonfinite(
    pipeline: PipelineConfig, summary: mx.array | None, clipping: ClipFactors
) -> mx.array | None:
    """With ``skip_nonfinite``, whether this step must be skipped: a NaN or an Inf on the
    way to the update, in the values the statistics describe or in a clip factor. ``None``
    without ``skip_nonfinite``."""
    if not pipeline.skip_nonfinite:
        return None
    flag = any_nonfinite(summary)
    if clipping.global_factor is not None:
        flag = mx.logical_or(flag, mx.logical_not(mx.isfinite(clipping.global_factor)))
    if clipping.per_parameter is not None:
        flag = mx.logical_or(flag, mx.logical_not(mx.all(mx.isfinite(clipping.per_parameter))))
    return flag


class Gates(NamedTuple):
    """What this call does, decided once for the whole tree."""

    # This call changes no parameter and no state (None: never, in this configuration).
    skip: mx.array | None
    # The update applies: the end of an accumulation cycle, and not skipped.
    keep: mx.array
    # The end of an accumulation cycle (always True without accumulation).
    applies: mx.array
    # Updates applied including this one: the t of the bias correction.
    updates_done: mx.array
    # Keras' `iterations` before this call, which counts EMA steps in whole cycles.
    iterations: mx.array
    # The optimizer's new step (and skipped_steps) counters.
    counters: dict[str, mx.array]


def count(
    pipeline: PipelineConfig, counters: dict[str, mx.array], nonfinite_step: mx.array | None
) -> Gates:
    """The skip decision, the new counters and the gates of the update and the EMA.

    A non-finite step (``nonfinite_step``, see :func:`nonfinite`) also holds the
    step counter (the call did not happen, as Keras' loss-scale optimizer has it); an invalid
    scheduled learning rate lets time move on, so that the schedule can recover."""
    step_before = counters["step"]
    new_counters = {}
    skip = None
    step_after = step_before + 1
    if pipeline.skip_nonfinite:
        skip = nonfinite_step
        step_after = step_before + mx.where(skip, 0, 1).astype(step_before.dtype)
    if pipeline.guard_learning_rate:
        lr = counters["learning_rate"]
        invalid = mx.logical_not(mx.logical_and(mx.isfinite(lr), lr >= 0))
        skip = invalid if skip is None else mx.logical_or(skip, invalid)
    if pipeline.skip_nonfinite:
        new_counters["skipped_steps"] = counters["skipped_steps"] + skip.astype(
            counters["skipped_steps"].dtype
        )
    new_counters["step"] = step_after

    applies = mx.array(True)
    updates_done = step_after
    iterations = step_before
    if pipeline.accumulates:
        steps = pipeline.gradient_accumulation_steps
        applies = (step_after % steps) == 0
        updates_done = step_after // steps
        iterations = step_before // steps
    keep = applies if skip is None else mx.logical_and(applies, mx.logical_not(skip))
    return Gates(skip, keep, applies, updates_done, iterations, new_counters)


def carry_accumulators(
    accumulated: Accumulated,
    states: list[dict],
    new_states: list[dict],
    applies: mx.array,
    skip: mx.array | None,
    dtypes: list[mx.Dtype],
) -> None:
    """Stores each parameter's new accumulator in ``new_states``: emptied at the end of a
    cycle (``applies``), the sum otherwise, the old one when the call is skipped."""
    for summed, state, new_state, dtype in zip(
        accumulated.sums, states, new_states, dtypes, strict=True
    ):
        new_state[ACCUMULATOR] = carry_tensor(summed, state[ACCUMULATOR], applies, skip, dtype)


def bind_accumulation(
    pipeline: PipelineConfig, accumulating_update: Callable, gates: mx.array
) -> Callable:
    """The fused update that accumulates as its first stage (the native primitive's or a
    kernel path's), bound to this step's ``gates`` (float32 (applies, skip)) and the
    configuration's loss scale (0: none) and steps."""
    return functools.partial(
        accumulating_update,
        gates=gates,
        loss_scale=pipeline.loss_scale_factor or 0.0,
        accumulation_steps=pipeline.gradient_accumulation_steps,
    )


class StepScalars:
    """This step's scalars vectors: one per arithmetic dtype and weight-decay exclusion, built
    once per step and shared by the parameters that have them (a parameter clipped by its own
    norm reads its factors from the clip-factor matrix instead)."""

    def __init__(
        self,
        options: UpdateOptions,
        constants: Sequence[float],
        pipeline: PipelineConfig,
        learning_rate: mx.array,
        gates: Gates,
        global_factor: mx.array | None,
        rounding_key: mx.array | None = None,
    ) -> None:
        self._options = options
        self._rounding_key = rounding_key
        self._constants = constants
        self._pipeline = pipeline
        self._learning_rate = learning_rate
        self._gates = gates
        self._global_factor = global_factor
        self._entries: dict[tuple, dict[Scalar, mx.array]] = {}
        self._vectors: dict[tuple, mx.array] = {}

    def entries(self, dtype: mx.Dtype, excluded: bool, rounding: bool) -> dict[Scalar, mx.array]:
        """The entries of the scalars vector that are not constants this step (the rounding
        key only for a parameter that rounds stochastically: 0 for the others)."""
        key = (dtype, excluded, rounding)
        if key in self._entries:
            return self._entries[key]
        pipeline, gates = self._pipeline, self._gates
        entries = {Scalar.LR: self._learning_rate.astype(dtype)}
        if rounding and self._rounding_key is not None:
            entries[Scalar.ROUNDING_KEY] = self._rounding_key.astype(dtype)
        if excluded:
            entries[Scalar.WEIGHT_DECAY] = mx.array(0.0, dtype)
        if self._options.bias_correction:
            alpha = mx.array(self._constants[Scalar.ALPHA], dtype)
            entries[Scalar.BIAS_CORRECTION] = 1 - mx.power(alpha, gates.updates_done.astype(dtype))
        if pipeline.gated:
            entries[Scalar.UPDATE_GATE] = gates.keep.astype(dtype)
        if self._global_factor is not None:
            entries[Scalar.CLIP_MULTIPLIER] = self._global_factor.astype(dtype)
        if pipeline.use_ema:
            momentum, one_minus = ema_factors(pipeline, gates.iterations, dtype)
            entries[Scalar.EMA_MOMENTUM] = momentum
            entries[Scalar.EMA_ONE_MINUS_MOMENTUM] = one_minus
            ema_gate = mx.array(True) if gates.skip is None else mx.logical_not(gates.skip)
            entries[Scalar.EMA_GATE] = ema_gate.astype(dtype)
            if pipeline.ema_overwrite_frequency is not None:
                due = ((gates.iterations + 1) % pipeline.ema_overwrite_frequency) == 0
                entries[Scalar.EMA_OVERWRITE] = mx.logical_and(due, ema_gate).astype(dtype)
        self._entries[key] = entries
        return entries

    def vector(self, dtype: mx.Dtype, excluded: bool, rounding: bool = False) -> mx.array:
        """The scalars vector for a parameter computed in ``dtype``, with weight decay
        ``excluded`` or not, and this step's rounding key when it rounds stochastically
        (``rounding``)."""
        key = (dtype, excluded, rounding)
        if key not in self._vectors:
            self._vectors[key] = assemble_scalars(
                self._constants, self.entries(dtype, excluded, rounding), dtype
            )
        return self._vectors[key]


def update_parameters(
    parameter_options: tuple[UpdateOptions, ...],
    update: UpdateFn,
    vectors: list[mx.array],
    parameters: list[mx.array],
    gradients: list[mx.array],
    states: list[dict],
    new_states: list[dict],
    factors: mx.array | None,
    first: int = 0,
    accumulating: Callable | None = None,
) -> list[mx.array]:
    """The last stages, in the path's fused update of each parameter: weight decay, the
    RMSprop update and the EMA, with the scalars vector ``vectors[i]`` (from
    :class:`StepScalars`). Stores each new state buffer in ``new_states``. Each update is
    told the parameter's position in the step (``index``, ``first`` for the first of these
    lists: it seeds stochastic rounding and selects the parameter's row of the clipnorm
    ``factors``). ``accumulating``: the fused update that accumulates first
    (:func:`bind_accumulation`), which replaces ``update`` and stores each new accumulator
    too."""
    new_parameters = []
    # Only clipping by each parameter's own norm has per-parameter factors.
    by_index = {} if factors is None else {"factors": factors}
    for offset, (options, vector, parameter, gradient, state, new_state) in enumerate(
        zip(parameter_options, vectors, parameters, gradients, states, new_states, strict=True)
    ):
        index = first + offset
        buffers = {key: state[key] for key in options.state_keys}
        if accumulating is None:
            new_parameter, kernel_state = update(
                options, vector, parameter, gradient, buffers, index=index, **by_index
            )
        else:
            new_parameter, kernel_state, new_state[ACCUMULATOR] = accumulating(
                options,
                vector,
                parameter,
                gradient,
                buffers,
                state[ACCUMULATOR],
                index=index,
                **by_index,
            )
        new_state.update(kernel_state)
        new_parameters.append(new_parameter)
    return new_parameters
