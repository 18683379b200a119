"""Proving an update path on this machine before it touches a user's parameters.

A probe runs a few steps of the path's update on a small awkward input (rows with a NaN, an
infinite, a zero and an overflowing gradient, a zero state, a NaN state) and compares every
output with :func:`~mlx_rmsprop.reference.rmsprop_reference` on the CPU under the tolerance
table (:mod:`mlx_rmsprop.tolerance`). The native path probes its extension once when it loads,
bit for bit; the GPU kernel paths probe each kernel variant (options x dtypes x size class) on
its first use in a process (:func:`kernel_verdict`), and ``fused="auto"`` keeps the compiled
reference for a variant whose probe fails.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from ..reference import rmsprop_reference
from ..spec import (
    ACCUMULATOR,
    FLAGS,
    NUM_SCALARS,
    QUANTIZED_KEYS,
    Scalar,
    code_table,
    rounding_step_key,
    scale_key,
)
from ..storage import quantize
from ..tolerance import compare
from .kernels.launch import accumulating_reference, with_accumulator_in_state
from .kernels.source import METAL_CONSTANT_BELOW, Variant

logger = logging.getLogger(__name__)

STEPS = 3
# Errors a path can raise when it cannot run a variant: a kernel that does not compile or
# launch, an extension that cannot exchange arrays with this mlx.
RUN_ERRORS = (RuntimeError, ValueError, TypeError)
# One row per pattern; `size` columns each (a single column below Metal's constant limit).
ROWS = (
    "finite",
    "nan_gradient",
    "inf_gradient",
    "negative_inf_gradient",
    "zero_gradient_and_state",
    "overflowing_gradient",
    "nan_state",
)
LARGE_COLUMNS = 5
# The rounding seed of verification: every step draws another stochastic-rounding key.
ROUNDING_SEED = 20240613
# The parameter position verification's updates run at (stochastic rounding draws per
# position): not 0, the default, so that a kernel that ignores it differs.
INDEX = 3


def step_scalars(step: int) -> mx.array:
    """The float32 scalars vector of verification step ``step`` (1-based). Every entry is
    away from its neutral value; the learning rate changes every step; the update gate is 0 on
    step 2; the EMA gate is 0 on step 2 and the EMA overwrites the parameter from step 2 on,
    so three steps see every gate combination. The stochastic-rounding key is the optimizer's
    for ROUNDING_SEED."""
    values = [0.0] * NUM_SCALARS
    values[Scalar.LR] = 0.01 * (1 + 0.5 * step)
    values[Scalar.ALPHA] = 0.9
    values[Scalar.ONE_MINUS_ALPHA] = 1 - 0.9
    values[Scalar.EPS] = 1e-6
    values[Scalar.MOMENTUM] = 0.8
    values[Scalar.WEIGHT_DECAY] = 0.1
    values[Scalar.BIAS_CORRECTION] = 1 - 0.9**step
    values[Scalar.GRAD_DIVISOR] = 2.0
    values[Scalar.CLIP_MULTIPLIER] = 0.75
    values[Scalar.CLIP_DIVISOR] = 1.5
    values[Scalar.CLIP_VALUE] = 0.25
    values[Scalar.UPDATE_GATE] = 0.0 if step == 2 else 1.0
    values[Scalar.EMA_MOMENTUM] = 0.99
    values[Scalar.EMA_ONE_MINUS_MOMENTUM] = 1 - 0.99
    values[Scalar.EMA_GATE] = 0.0 if step == 2 else 1.0
    values[Scalar.EMA_OVERWRITE] = 1.0 if step >= 2 else 0.0
    values[Scalar.ROUNDING_KEY] = float(rounding_step_key(ROUNDING_SEED, step))
    return mx.array(values, mx.float32)


def conditioned_values(rng: np.random.Generator, shape: int | tuple[int, ...]) -> dict:
    """Finite inputs (all but the EMA) that keep the centred variance far from cancellation:
    ``v`` well above ``grad_avg``'s square, gradients within the clip bounds. Shared by the
    probe and ``check``; tests/test_check.py measures the margin."""
    return {
        "parameter": rng.normal(0.0, 1.0, shape),
        "gradient": rng.uniform(-1.0, 1.0, shape),
        "v": rng.uniform(0.5, 2.0, shape),
        "grad_avg": rng.uniform(-0.05, 0.05, shape),
        "momentum_buffer": rng.normal(0.0, 0.1, shape),
    }


def quantized_state(
    variant: Variant, state: dict[str, mx.array], transposed: bool = False
) -> dict[str, mx.array]:
    """``state`` with 8-bit state's buffers in their stored form, as the optimizer keeps them:
    each moment buffer quantized (codes, and scales under ``scale_key``; ``transposed``: the
    codes as a transposed view with the same logical contents), for ``variant``'s block size."""
    if not variant.options.quantized_state:
        return state
    stored = {}
    for key in variant.options.state_keys:
        if key in QUANTIZED_KEYS:
            values = state[key].astype(mx.float32)
            codes, scales = quantize(values, code_table(key), variant.options.block_size)
            if transposed and codes.ndim >= 2:
                codes = mx.array(np.ascontiguousarray(np.array(codes).T)).T
            stored[key], stored[scale_key(key)] = codes, scales
        elif key in state:
            stored[key] = state[key]
    if ACCUMULATOR in state:  # an accumulating variant's: never quantized
        stored[ACCUMULATOR] = state[ACCUMULATOR]
    return stored


def clip_factors(rows: int) -> mx.array:
    """A float32 (rows, 2) matrix of per-parameter clip factors, every row another (multiplier,
    divisor) pair with another quotient, each exact in float32 and shrinking the gradient as
    the scalars' clip entries do (within the clip bounds of ``conditioned_values``)."""
    return mx.array([[0.5 + 0.0625 * k, 1.25 + 0.25 * k] for k in range(rows)], mx.float32)


# Verification's gradient accumulation: cycles of 3 calls, a loss scale of 4 (none for the
# small size class, so both branches of the stage run); per step (applies, skip) of STEPS
# steps: an accumulating call, a skipped one, the end of the cycle.
ACCUMULATION_STEPS = 3
ACCUMULATION_LOSS_SCALE = 4.0
ACCUMULATION_GATES = ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0))


def accumulation_constants(variant: Variant) -> tuple[float, int]:
    """(loss scale, steps) of verification's accumulating updates for ``variant`` (loss scale
    0: none)."""
    return (0.0 if variant.small else ACCUMULATION_LOSS_SCALE), ACCUMULATION_STEPS


def accumulator_values(seed: int, shape: int | tuple[int, ...]) -> np.ndarray:
    """A running sum's values for verification: a generator of its own, so that adding the
    accumulator leaves every other input as it was."""
    return np.random.default_rng(seed + 7919).uniform(-2.0, 2.0, shape)


def update_arguments(variant: Variant, step: int = 1) -> dict[str, object]:
    """The keyword arguments of verification's update calls: ``index`` where it matters
    (stochastic rounding, per-parameter clip factors), so that paths without it still take the
    other variants; with factors, a matrix whose row ``index`` is neither its first nor its
    last (3 rows where the variant's matrix has fewer than 8 elements); for an accumulating
    variant this step's ``gates`` (ACCUMULATION_GATES)."""
    arguments: dict[str, object] = {}
    if variant.factors:
        rows, index = (3, 1) if variant.small_factors else (INDEX + 2, INDEX)
        arguments = {"index": index, "factors": clip_factors(rows)}
    elif variant.options.stochastic_rounding:
        arguments = {"index": INDEX}
    if variant.accumulates:
        gates = ACCUMULATION_GATES[(step - 1) % len(ACCUMULATION_GATES)]
        arguments["gates"] = mx.array(gates, mx.float32)
    return arguments


def reference_update(variant: Variant) -> Callable:
    """What ``variant``'s outputs are compared with: ``rmsprop_reference``, or for an
    accumulating variant ``accumulating_reference`` with the accumulator in the state
    (``with_accumulator_in_state``, verification's loss scale and steps)."""
    if not variant.accumulates:
        return rmsprop_reference
    return with_accumulator_in_state(accumulating_reference, *accumulation_constants(variant))


def probe_inputs(variant: Variant) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """Parameter, gradient and state in ``variant``'s dtypes and size classes: one row per
    pattern of ROWS (with 8-bit state and more than 7 blocks, one column more than a block).
    Finite values are conditioned as ``check``'s (the centred variance far from cancellation),
    so a correct kernel meets the tolerance with room to spare."""
    columns = LARGE_COLUMNS
    if variant.options.quantized_state and not variant.small_scales:
        columns = variant.options.block_size + 1
    shape = (len(ROWS),) if variant.small else (len(ROWS), columns)
    assert (math.prod(shape) < METAL_CONSTANT_BELOW) == variant.small
    values = conditioned_values(np.random.default_rng(20240613), shape)
    values["ema"] = values["parameter"] + 0.01
    patterns = {
        "nan_gradient": {"gradient": math.nan},
        "inf_gradient": {"gradient": math.inf},
        "negative_inf_gradient": {"gradient": -math.inf},
        "zero_gradient_and_state": {"gradient": 0.0, "v": 0.0, "grad_avg": 0.0},
        "overflowing_gradient": {"gradient": 1e30},
        "nan_state": {"v": math.nan},
    }
    for row, pattern in enumerate(ROWS):
        for name, value in patterns.get(pattern, {}).items():
            values[name][row] = value
    dtypes = {"parameter": variant.parameter_dtype, "gradient": variant.gradient_dtype}

    def array(name: str) -> mx.array:
        return mx.array(values[name].astype(np.float32)).astype(
            dtypes.get(name, variant.state_dtype)
        )

    state = {key: array(key) for key in variant.options.state_keys if key in values}
    if variant.accumulates:
        values[ACCUMULATOR] = accumulator_values(0, shape)
        dtypes[ACCUMULATOR] = variant.accumulator_dtype
        state[ACCUMULATOR] = array(ACCUMULATOR)
    return array("parameter"), array("gradient"), quantized_state(variant, state)


def difference(update: Callable, variant: Variant, rtol: float | None = None) -> str | None:
    """``None`` when ``update`` (signature of ``rmsprop_reference``) gives the reference's
    outputs on the probe input for STEPS steps, each from its own previous outputs; else the
    first difference. ``rtol`` overrides the tolerance table (0: bit for bit). Errors the
    update raises propagate (the caller knows what they mean for its path)."""
    parameter, gradient, state = probe_inputs(variant)
    reference = reference_update(variant)
    for step in range(1, STEPS + 1):
        scalars = step_scalars(step)
        arguments = update_arguments(variant, step)
        new_parameter, new_state = update(
            variant.options, scalars, parameter, gradient, state, **arguments
        )
        mx.eval(new_parameter, new_state)
        with mx.stream(mx.cpu):
            expected = reference(variant.options, scalars, parameter, gradient, state, **arguments)
        actual = {"parameter": new_parameter, **new_state}
        for name, value in {"parameter": expected[0], **expected[1]}.items():
            mismatch = compare(actual[name], value, rtol=rtol)
            if mismatch is not None:
                return f"step {step}, {name} {mismatch}"
        parameter, state = new_parameter, new_state
    return None


# (path, variant) -> None (adopted) or why not; filled on first use, kept for the process.
_verdicts: dict[tuple[str, Variant], str | None] = {}
_warned: set[tuple[str, Variant]] = set()


def kernel_verdict(path: str, variant: Variant, update: Callable, fall_back: bool) -> str | None:
    """Whether the kernel ``update`` of ``path`` may run ``variant`` in this process: ``None``,
    or why not (its probe differs from the reference, or it fails to compile or launch).
    Probed once per variant and process. With ``fall_back`` (``fused="auto"``, which then
    takes the compiled reference) a refusal is logged once, at warning level."""
    key = (path, variant)
    if key not in _verdicts:
        try:
            verdict = difference(update, variant)
            if verdict is not None:
                verdict = f"its probe differs from the reference: {verdict}"
        except RUN_ERRORS as error:
            verdict = f"it does not run: {type(error).__name__}: {error}"
        _verdicts[key] = verdict
    verdict = _verdicts[key]
    if verdict is not None and fall_back and key not in _warned:
        _warned.add(key)
        logger.warning(
            "fused='auto': the %s kernel is not used for %s, the compiled reference runs it "
            "instead: %s",
            path,
            describe(variant),
            verdict,
        )
    return verdict


def kernel_verdicts() -> dict[tuple[str, Variant], str | None]:
    """Every kernel verdict of this process so far (a copy)."""
    return dict(_verdicts)


def describe(variant: Variant) -> str:
    """The variant in a few words: the options that are on, the dtypes, the size class."""
    options = variant.options
    on = [name for name in FLAGS if getattr(options, name)]
    dtypes = "/".join(
        str(d).split(".")[-1]
        for d in (variant.parameter_dtype, variant.gradient_dtype, variant.state_dtype)
    )
    size = f"<{METAL_CONSTANT_BELOW}" if variant.small else f">={METAL_CONSTANT_BELOW}"
    factors = ", per-parameter clip factors" if variant.factors else ""
    if variant.accumulates:
        factors += f", accumulating in {str(variant.accumulator_dtype).split('.')[-1]}"
    return (
        f"{'+'.join(on) or 'no options'}, parameter/gradient/state {dtypes}, {size} elements"
        f"{factors}"
    )
