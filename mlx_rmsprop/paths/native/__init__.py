"""The native CPU path: the whole update of one parameter as one MLX primitive written in C++
(the sources beside this loader), vectorised, split across the cores for large tensors, and
updating the parameter and state in place when MLX can donate their buffers.

The module ``mlx_rmsprop.paths.native._ext`` is built when the package is installed where a C++
toolchain exists. It is used only after it proves to match this installation: built against
the running mlx version (it links against libmlx's C++ ABI), from the sources beside it, with
this package's option and scalar layout, and giving the reference's result on a probe update.

When it was built against another mlx version or from other sources (mlx was upgraded, or the
C++ sources of a checkout changed), it is rebuilt on first use into the per-user cache
(:mod:`mlx_rmsprop.paths.native.cache`) where CMake, nanobind and a C++ compiler are available, and
that module is used. Otherwise :func:`load` raises ``RuntimeError`` with the reason and the
command that rebuilds it, and ``fused="auto"`` takes the next path; the reason is logged once,
at warning level when a rebuild would have fixed it, else (not built at install) at debug level.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import mlx
import mlx.core as mx
import numpy as np

from ... import pipeline
from ...reference import rmsprop_reference
from ...spec import (
    ACCUMULATOR,
    FLAGS,
    QUANTIZED_KEYS,
    Scalar,
    UpdateFn,
    UpdateOptions,
    code_table,
    rounding_step_key,
    scale_key,
)
from ...step import NativePipeline
from ...storage import quantize
from ...tolerance import compare
from .. import probe
from ..kernels.source import Variant
from . import build, cache
from .sources import SOURCE_DIR, source_digest

logger = logging.getLogger(__name__)

_EXTENSION = "mlx_rmsprop.paths.native._ext"


class _Mismatch(RuntimeError):
    """The module was built against another mlx or from other sources: building it again here
    fixes that."""


def update(
    options: UpdateOptions,
    scalars: mx.array,
    parameter: mx.array,
    gradient: mx.array,
    state: dict[str, mx.array],
    *,
    index: int = 0,
    factors: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """:func:`~mlx_rmsprop.reference.rmsprop_reference`'s update as one native node on the
    CPU stream (same signature, same results). ``index``: the parameter's position in the
    step, which stochastic rounding hashes and which selects the row of ``factors``; an
    attribute of the node, not compiled code."""
    outputs = _node(options, scalars, parameter, gradient, state, index, factors)
    return outputs[0], dict(zip(options.state_keys, outputs[1:], strict=True))


def statistics(
    gradients: list[mx.array],
    accumulators: list[mx.array],
    loss_scale: float,
    accumulation_steps: int,
    scaled_norm: int,
) -> mx.array:
    """:func:`~mlx_rmsprop.pipeline.statistics_ops`'s matrix for float32 arithmetic as one
    native node on the CPU stream over all of a step's gradients (``loss_scale`` and
    ``accumulation_steps``: 0 when off; ``accumulators``: empty without accumulation).

    Under mx.grad, mx.vjp, mx.jvp and mx.vmap it is transformed as
    :func:`_statistics_ops` (registered with the module when it loads), so results equal the
    other paths'."""
    return _loaded().gradient_statistics(
        gradients, accumulators, float(loss_scale), int(accumulation_steps), int(scaled_norm)
    )


def accumulating_update(
    options: UpdateOptions,
    scalars: mx.array,
    parameter: mx.array,
    gradient: mx.array,
    state: dict[str, mx.array],
    accumulator: mx.array,
    gates: mx.array,
    loss_scale: float,
    accumulation_steps: int,
    *,
    index: int = 0,
    factors: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array], mx.array]:
    """:func:`update` with Keras' gradient accumulation as its first stage, in the same node:
    ``(new parameter, new state, new accumulator)``, the values of
    :func:`mlx_rmsprop.step.accumulate`, :func:`mlx_rmsprop.step.carry_accumulators` and the
    update on the mean gradient. ``gates``: float32 (applies, skip); ``loss_scale``: 0 when
    off. The mean is computed chunk by chunk inside the update and never stored."""
    accumulation = (int(accumulation_steps), float(loss_scale), accumulator, gates)
    outputs = _node(options, scalars, parameter, gradient, state, index, factors, accumulation)
    return outputs[0], dict(zip(options.state_keys, outputs[1:-1], strict=True)), outputs[-1]


# Consecutive parameters that the worker threads split (PARALLEL_THRESHOLD elements or more)
# are updated by one node (``_ext.update_group``), up to GROUP_PARAMETERS of them and
# GROUP_ELEMENTS elements; every other parameter has a node of its own (``RMSpropUpdate``). A
# node per parameter hands each split parameter's parts to the worker threads and waits for
# them; a group waits once. On the 7B LoRA tree (448 adapters of 65,536 to 176,128 elements,
# plain, float32; 2-core CI machine, interleaved) evaluating a step took 23.9 ms with one
# parameter per node, 22.1 ms with 4, 21.6 ms with 8 and 22.4 ms with 16; building the step
# cost more as groups grew (3.6, 3.9, 4.2, 4.6 ms), as every output of a node holds a copy of
# the node's input list. Grouping parameters that are not split saved nothing to offset that
# (200 tensors of 1,024 elements: 1.76 ms a step one per node, 1.82 ms eight per node). A
# group's outputs all exist while it runs, so GROUP_ELEMENTS bounds what it adds to a step's
# peak memory where buffers cannot be updated in place.
GROUP_PARAMETERS = 8
GROUP_ELEMENTS = 1 << 21


def group_bounds(sizes: Sequence[int], split_from: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: the runs of parameters (``sizes``: their elements) that
    :func:`updates` builds as one node each; ``split_from``: the elements from which the
    worker threads split an update."""
    bounds = []
    start = 0
    while start < len(sizes):
        stop, elements = start + 1, sizes[start]
        if sizes[start] >= split_from:
            while (
                stop < len(sizes)
                and stop - start < GROUP_PARAMETERS
                and sizes[stop] >= split_from
                and elements + sizes[stop] <= GROUP_ELEMENTS
            ):
                elements += sizes[stop]
                stop += 1
        bounds.append((start, stop))
        start = stop
    return bounds


def updates(
    parameter_options: Sequence[UpdateOptions],
    vectors: Sequence[mx.array],
    parameters: Sequence[mx.array],
    gradients: Sequence[mx.array],
    states: Sequence[dict[str, mx.array]],
    *,
    first: int = 0,
    factors: mx.array | None = None,
    accumulation: tuple[mx.array, float, int] | None = None,
) -> tuple[list[mx.array], list[dict[str, mx.array]]]:
    """:func:`update` (or with ``accumulation`` = ``(gates, loss_scale, accumulation_steps)``,
    :func:`accumulating_update`) of each parameter, with ``vectors[i]`` its scalars and
    ``first + i`` its index, in the nodes :func:`group_bounds` gives:
    ``(new parameters, new states)``, each new state holding the options' state keys and, when
    accumulating, the new accumulator. The results are those of one node per parameter."""
    extension = _loaded()
    new_parameters: list[mx.array] = []
    new_states: list[dict[str, mx.array]] = []
    accumulators = []
    gates, loss_scale, steps = None, 0.0, 0
    if accumulation is not None:
        gates, loss_scale, steps = accumulation
        accumulators = [state[ACCUMULATOR] for state in states]
    sizes = [parameter.size for parameter in parameters]
    for start, stop in group_bounds(sizes, extension.PARALLEL_THRESHOLD):
        members = parameter_options[start:stop]
        buffers = [
            [state[key] for key in options.state_keys]
            for options, state in zip(members, states[start:stop], strict=True)
        ]
        outputs = extension.update_group(
            list(vectors[start:stop]),
            list(gradients[start:stop]),
            list(parameters[start:stop]),
            buffers,
            [_flags(options) for options in members],
            [options.block_size for options in members],
            list(range(first + start, first + stop)),
            factors,
            int(steps),
            float(loss_scale),
            accumulators[start:stop],
            gates,
        )
        at = 0
        for options in members:
            keys = options.state_keys
            new_parameters.append(outputs[at])
            new_state = dict(zip(keys, outputs[at + 1 : at + 1 + len(keys)], strict=True))
            at += 1 + len(keys)
            if accumulation is not None:
                new_state[ACCUMULATOR] = outputs[at]
                at += 1
            new_states.append(new_state)
    return new_parameters, new_states


def _node(
    options: UpdateOptions,
    scalars: mx.array,
    parameter: mx.array,
    gradient: mx.array,
    state: dict[str, mx.array],
    index: int,
    factors: mx.array | None,
    accumulation: tuple = (),
) -> list[mx.array]:
    """The native update node's outputs; ``accumulation``: (steps, loss scale, accumulator,
    gates), or empty."""
    return _loaded().update(
        scalars,
        gradient,
        parameter,
        [state[key] for key in options.state_keys],
        _flags(options),
        options.block_size,
        index,
        factors,
        *accumulation,
    )


def _statistics_ops(
    inputs: list[mx.array], loss_scale: float, accumulation_steps: int, scaled_norm: int
) -> mx.array:
    """The primitive's statistics from MLX ops; ``inputs``: gradients, then accumulators."""
    count = len(inputs) // 2 if accumulation_steps else len(inputs)
    values = pipeline.reduced_values(
        inputs[:count], inputs[count:], loss_scale, accumulation_steps, mx.float32
    )
    return pipeline.statistics_ops(values, pipeline.ScaledNorm(scaled_norm))


# The native path's pipeline primitives, as the step function takes them.
PIPELINE = NativePipeline(statistics, updates)


def load() -> UpdateFn:
    """The update function, or ``RuntimeError`` saying why the native path cannot run here.

    It runs on the CPU stream, so it is offered only while the CPU is the default device (on
    a GPU, ``fused="auto"`` moves on to a path that runs there)."""
    _loaded()
    device = mx.default_device()
    if device.type != mx.cpu:
        raise RuntimeError(
            f"the default device is {device}; the native update runs on the CPU "
            "(mx.set_default_device(mx.cpu) selects it)"
        )
    return update


def status() -> str:
    """One line: whether the native path runs here and where its module came from (built at
    install, or rebuilt into the per-user cache), or why it does not run."""
    verdict = _probe()
    extension = verdict.extension
    if extension is None:
        return f"not available: {verdict.reason}"
    origin = (
        "built at install"
        if verdict.cache_entry is None
        else f"rebuilt into the cache at {verdict.cache_entry}"
    )
    return (
        f"{origin} and loaded (mlx {extension.MLX_VERSION}; {extension.worker_threads()} "
        f"threads from {extension.PARALLEL_THRESHOLD} elements)"
    )


@dataclasses.dataclass(frozen=True)
class _Verdict:
    extension: ModuleType | None
    reason: str | None = None
    # The per-user cache directory the module was loaded from; None: the installed module.
    cache_entry: Path | None = None


def _loaded() -> ModuleType:
    verdict = _probe()
    if verdict.extension is None:
        raise RuntimeError(verdict.reason)
    return verdict.extension


@functools.cache
def _probe() -> _Verdict:
    try:
        return _Verdict(_checked(_import_installed()))
    except _Mismatch as error:
        mismatch = str(error)
    except RuntimeError as error:
        reason = f"{error}; to rebuild it: {build.rebuild_command()}"
        logger.debug("native CPU update unavailable: %s", reason)
        return _Verdict(None, reason)
    try:
        entry, extension = _rebuilt(mismatch)
    except RuntimeError as error:
        # Warning level: the user had the native path and is losing it (typically after
        # changing the mlx version). Once per process: this verdict is cached.
        reason = f"{mismatch}; {error}; to rebuild it: {build.rebuild_command()}"
        logger.warning("mlx-rmsprop's native CPU update is unavailable: %s", reason)
        return _Verdict(None, reason)
    return _Verdict(extension, cache_entry=entry)


def _import_installed() -> ModuleType:
    try:
        return importlib.import_module(_EXTENSION)
    except ModuleNotFoundError as error:
        if error.name != _EXTENSION:
            raise
        raise RuntimeError(
            "the native extension is not built (building it at install time needs a C++ "
            "compiler and the Python headers; `pip install -v` shows why it failed)"
        ) from None
    except ImportError as error:
        raise _Mismatch(f"the native extension cannot be loaded ({error})") from None


def _rebuilt(mismatch: str) -> tuple[Path, ModuleType]:
    """The module built against the running mlx from the sources beside this package, from the
    per-user cache, built there first when missing (``mismatch``: what is wrong with the
    installed one)."""
    digest = source_digest()
    if digest is None:
        raise RuntimeError("its C++ sources are not installed, so it cannot be rebuilt here")
    entry = cache.entry(mx.__version__, digest)
    cache.ensure_built(
        entry,
        mlx_version=mx.__version__,
        mlx_package_dir=Path(mlx.__path__[0]),
        source_dir=SOURCE_DIR,
        source_digest=digest,
        why=mismatch,
    )
    path = cache.module_file(entry)
    try:
        spec = importlib.util.spec_from_file_location(_EXTENSION, path)
        extension = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(extension)
    except ImportError as error:
        raise RuntimeError(f"the module rebuilt into {entry} cannot be loaded ({error})") from None
    try:
        return entry, _checked(extension)
    except RuntimeError as error:
        raise RuntimeError(f"the module rebuilt into {entry} is unusable too ({error})") from None


def _checked(extension: ModuleType) -> ModuleType:
    """``extension`` once it proves to match this installation; ``_Mismatch`` or
    ``RuntimeError`` saying how it does not."""
    if extension.MLX_VERSION != mx.__version__:
        raise _Mismatch(
            f"the native extension was built against mlx {extension.MLX_VERSION} but mlx "
            f"{mx.__version__} is installed (their C++ ABIs must match)"
        )
    digest = source_digest()
    if digest is not None and digest != extension.SOURCE_DIGEST:
        raise _Mismatch("the native extension was built from older sources")
    if tuple(extension.SCALAR_NAMES) != tuple(Scalar.__members__):
        raise RuntimeError("the native extension has another scalar layout")
    if set(extension.FLAG_BITS) != set(FLAGS):
        raise RuntimeError("the native extension has another set of options")
    if (extension.STATISTICS_LANES, extension.STATISTICS_BLOCK) != (
        pipeline.STATISTICS_LANES,
        pipeline.STATISTICS_BLOCK,
    ):
        raise RuntimeError("the native extension sums the statistics in another order")
    extension.set_statistics_ops(_statistics_ops)
    _check_against_reference(extension)
    return extension


@functools.cache
def _flags(options: UpdateOptions) -> int:
    return _flags_from(_loaded().FLAG_BITS, options)


def _flags_from(bits: dict[str, int], options: UpdateOptions) -> int:
    return sum(bits[name] for name in FLAGS if getattr(options, name))


def _check_against_reference(extension: ModuleType) -> None:
    """The shared probe (:mod:`mlx_rmsprop.paths.probe`: NaN, infinite, zero and overflowing rows,
    three steps) on a centered momentum update, then 8-bit state with stochastic rounding, must
    give the reference's result bit for bit: this catches a module that cannot exchange arrays
    with this mlx (another nanobind ABI) or computes wrong."""
    keys = ("v", "grad_avg", "momentum_buffer")

    def update(options, scalars, parameter, gradient, state):
        flags = _flags_from(extension.FLAG_BITS, options)
        outputs = extension.update(scalars, gradient, parameter, [state[k] for k in keys], flags)
        return outputs[0], dict(zip(keys, outputs[1:], strict=True))

    variant = Variant(UpdateOptions(centered=True, momentum=True))
    assert variant.options.state_keys == keys
    try:
        difference = probe.difference(update, variant, rtol=0.0)
    except probe.RUN_ERRORS as error:
        raise _Mismatch(f"the native extension does not run with this mlx ({error})") from None
    if difference is None:
        difference = _storage_difference(extension)
    if difference is not None:
        raise RuntimeError(
            f"the native extension's probe update differs from the reference ({difference})"
        )


def _storage_difference(extension: ModuleType) -> str | None:
    """8-bit state and stochastic rounding on the probe's values (bfloat16 parameter, blocks of
    32 with a ragged last one, the probe's three steps with the gate closed on the second), bit
    for bit against the reference; ``None`` when equal, else the first difference."""
    options = UpdateOptions(
        centered=True,
        momentum=True,
        gated=True,
        quantized_state=True,
        stochastic_rounding=True,
        block_size=32,
    )
    flags = _flags_from(extension.FLAG_BITS, options)
    values = probe.conditioned_values(np.random.default_rng(20240613), 45)
    parameter = mx.array(values["parameter"].astype(np.float32)).astype(mx.bfloat16)
    gradient = mx.array(values["gradient"].astype(np.float32)).astype(mx.bfloat16)
    state = {}
    for key in QUANTIZED_KEYS:
        state[key], state[scale_key(key)] = quantize(
            mx.array(values[key].astype(np.float32)), code_table(key), options.block_size
        )
    assert tuple(state) == options.state_keys
    ours, expected = (parameter, state), (parameter, state)
    for step in range(1, probe.STEPS + 1):
        scalars = probe.step_scalars(step)
        scalars[Scalar.ROUNDING_KEY] = rounding_step_key(0, step)
        keys = options.state_keys
        try:
            outputs = extension.update(
                scalars, gradient, ours[0], [ours[1][k] for k in keys], flags, 32, 1
            )
        except probe.RUN_ERRORS as error:
            return f"8-bit state and stochastic rounding do not run ({error})"
        ours = outputs[0], dict(zip(keys, outputs[1:], strict=True))
        with mx.stream(mx.cpu):
            expected = rmsprop_reference(
                options, scalars, *expected[:1], gradient, expected[1], index=1
            )
        for name, actual, wanted in [
            ("parameter", ours[0], expected[0]),
            *((key, ours[1][key], expected[1][key]) for key in keys),
        ]:
            mismatch = compare(actual.astype(mx.float32), wanted.astype(mx.float32), rtol=0.0)
            if mismatch is not None:
                return f"8-bit state and stochastic rounding, step {step}, {name} {mismatch}"
    return None
