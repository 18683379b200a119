"""``python -m mlx_rmsprop check``: run the update paths this machine has against the reference.

With an Apple GPU (Metal) or MLX's CUDA backend, every kernel variant of
:func:`~mlx_rmsprop.paths.kernels.variants.verification_plan` runs on the GPU and is compared, for
several shapes and steps, with :func:`~mlx_rmsprop.reference.rmsprop_reference` evaluated on
the CPU; a table gives, per dtype combination, the variants run, the failures and the largest
error of the parameter and of every state buffer, judged by the tolerance table of
:mod:`mlx_rmsprop.tolerance`; the first failure is named down to the element. It also reports
which variants ``fused="auto"`` would not adopt on this GPU (:mod:`mlx_rmsprop.paths.probe`).
Without a GPU the command says that the kernels were not run here and verifies the paths that
do run (the compiled CPU path, ...).
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from . import paths
from .paths import native, probe
from .paths.kernels.launch import with_accumulator_in_state
from .paths.kernels.source import METAL_CONSTANT_BELOW, Variant
from .paths.kernels.variants import (
    accumulating_variants,
    dtype_combinations,
    factor_variants,
    pairwise_option_sets,
    plan_variant,
    verification_plan,
)
from .paths.probe import (
    accumulation_constants,
    accumulator_values,
    conditioned_values,
    describe,
    quantized_state,
    reference_update,
    step_scalars,
    update_arguments,
)
from .spec import ACCUMULATOR
from .tolerance import RTOL, Mismatch, compare, relative_error

GPU_PATHS = ("metal", "cuda")
# Shapes per address-space class (``Variant.small``: fewer than 8 elements).
SHAPES = {
    False: [(8,), (9,), (33,), (3, 5), (2, 3, 7), (257,)],
    True: [(), (1,), (3,), (7,), (2, 3)],
}


def shapes_for(variant: Variant) -> list[tuple[int, ...]]:
    """The shapes of ``variant``'s size classes: SHAPES, and with 8-bit state the ones with
    fewer than 8 blocks (``small_scales``) or, for more, shapes of a few blocks more than 7
    with a partial last block (one 1-D, one 2-D)."""
    options = variant.options
    if not options.quantized_state or variant.small:
        return SHAPES[variant.small]
    block = options.block_size
    if variant.small_scales:
        return [s for s in SHAPES[False] if -(-math.prod(s) // block) < METAL_CONSTANT_BELOW]
    return [(7 * block + 1,), (3, 3 * block - 1)]


STEPS = 3
# Element patterns mixed into every input: the ones every framework must agree on.
SPECIALS = (
    "nan_gradient",
    "inf_gradient",
    "negative_inf_gradient",
    "zero_gradient",
    "negative_zero_gradient",
    "clipped_gradient",
    "huge_gradient",
    "tiny_gradient",
    "clamped_variance",
    "nan_state",
    "nan_parameter",
)


def verification_inputs(
    variant: Variant, shape: tuple[int, ...], seed: int, transposed: bool = False
) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """Parameter, gradient and state for ``variant`` with ``shape``: well-conditioned random
    values with about a third of the elements replaced by one of SPECIALS. ``transposed``
    gives non-contiguous arrays (transposed views) of the same shape.

    Well-conditioned: the centred variance ``v/bc - (grad_avg/bc)^2`` stays above a tenth of
    the larger of its two terms on every step, with or without bias correction, so an ulp of
    difference in either term (a contracted multiply-add) moves it by at most about ten ulps
    instead of being amplified by cancellation. At step 1 with bias correction (bc = 0.1)
    grad_avg counts nine times: starting from |grad_avg| up to 0.3 gave differences like
    5.505 - 5.4999, so it starts within 0.05 here (v from 0.5). A constant gradient much
    larger than sqrt(v) cancels too as the bias-corrected moments converge to g^2 and g (a
    clipped gradient of -3 did by step 3), so the one beyond the clip bound is -1.25. Elements
    meant to clamp (``clamped_variance``) clamp by a wide margin. tests/test_check.py measures
    the margin."""
    rng = np.random.default_rng(seed)
    size = math.prod(shape)
    values = conditioned_values(rng, size)
    values["ema"] = values["parameter"] + rng.normal(0.0, 0.01, size)
    for index in np.flatnonzero(rng.random(size) < 0.35):
        special = SPECIALS[rng.integers(len(SPECIALS))]
        changes = {
            "nan_gradient": {"gradient": math.nan},
            "inf_gradient": {"gradient": math.inf},
            "negative_inf_gradient": {"gradient": -math.inf},
            "zero_gradient": {"gradient": 0.0},
            "negative_zero_gradient": {"gradient": -0.0},
            "clipped_gradient": {"gradient": -1.25},
            "huge_gradient": {"gradient": 1e30},
            "tiny_gradient": {"gradient": 1e-30},
            "clamped_variance": {"v": 0.01, "grad_avg": 1.0, "gradient": 0.1},
            "nan_state": {"v": math.nan},
            "nan_parameter": {"parameter": math.nan},
        }[special]
        for name, value in changes.items():
            values[name][index] = value
    dtypes = {"parameter": variant.parameter_dtype, "gradient": variant.gradient_dtype}

    def array(name: str) -> mx.array:
        dtype = dtypes.get(name, variant.state_dtype)
        if transposed:
            return mx.array(values[name].reshape(shape[::-1])).astype(dtype).T
        return mx.array(values[name].reshape(shape)).astype(dtype)

    state = {key: array(key) for key in variant.options.state_keys if key in values}
    if variant.accumulates:
        values[ACCUMULATOR] = accumulator_values(seed, size)
        dtypes[ACCUMULATOR] = variant.accumulator_dtype
        state[ACCUMULATOR] = array(ACCUMULATOR)
    return array("parameter"), array("gradient"), quantized_state(variant, state, transposed)


OUTPUTS = (
    "parameter",
    "v",
    "v_scale",
    "grad_avg",
    "grad_avg_scale",
    "momentum_buffer",
    "momentum_buffer_scale",
    "ema",
    ACCUMULATOR,
)


@dataclass(frozen=True)
class Failure:
    """Where a variant first failed: the shape, the step (1-based), the output and the
    element."""

    variant: Variant
    shape: tuple[int, ...]
    step: int
    output: str
    mismatch: Mismatch


def verify(
    variant: Variant, run_update: Callable, shapes: list[tuple[int, ...]], seed: int
) -> tuple[dict[str, float], Failure | None]:
    """Largest error of each output of ``run_update`` (signature of ``rmsprop_reference``
    without ``options``; ``index`` only with stochastic rounding) against the reference on the
    CPU, over ``shapes`` and STEPS steps, each step starting from the path's own previous
    outputs; and the first output that fails the tolerance table (``None`` when none does)."""
    errors = dict.fromkeys(("parameter", *variant.state_names), 0.0)
    first: Failure | None = None
    reference = reference_update(variant)
    for k, shape in enumerate(shapes):
        transposed = len(shape) >= 2 and (seed + k) % 2 == 0
        parameter, gradient, state = verification_inputs(variant, shape, seed + k, transposed)
        for step in range(1, STEPS + 1):
            scalars = step_scalars(step)
            arguments = update_arguments(variant, step)
            new_parameter, new_state = run_update(scalars, parameter, gradient, state, **arguments)
            with mx.stream(mx.cpu):
                expected = reference(
                    variant.options, scalars, parameter, gradient, state, **arguments
                )
            actual = {"parameter": new_parameter, **new_state}
            expected = {"parameter": expected[0], **expected[1]}
            for name in errors:
                errors[name] = max(errors[name], relative_error(actual[name], expected[name]))
                # Judged by the dtype of the expected array (the parameter's or the state's).
                mismatch = compare(actual[name], expected[name])
                if first is None and mismatch is not None:
                    first = Failure(variant, shape, step, name, mismatch)
            parameter, state = new_parameter, new_state
    return errors, first


@dataclass
class Row:
    """One line of the table: a path, a dtype combination and an address-space class."""

    path: str
    dtypes: tuple[mx.Dtype, mx.Dtype, mx.Dtype]
    small: bool
    variants: int = 0
    failures: list[Failure] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)

    def add(self, errors: dict[str, float], failure: Failure | None) -> None:
        self.variants += 1
        for name, error in errors.items():
            self.errors[name] = max(self.errors.get(name, 0.0), error)
        if failure is not None:
            self.failures.append(failure)


def _cpu_plan(quick: bool) -> list[Variant]:
    """CPU paths compile one graph per variant and shape (seconds each with g++), so they run
    the pairwise option sets in float32 and one option set per dtype combination."""
    options = pairwise_option_sets()
    if quick:
        return [Variant(o) for o in options[:3]]
    plan = [Variant(o) for o in options]
    for k, (parameter, gradient, state) in enumerate(dtype_combinations()):
        plan.append(Variant(options[k % len(options)], parameter, gradient, state))
        plan.append(Variant(options[-1 - k % len(options)], parameter, gradient, state, True))
    return list(dict.fromkeys(plan))


def _gpu_plan(quick: bool) -> list[Variant]:
    """``verification_plan()``, or with ``quick`` its part for the dtype combinations: the
    pairwise option sets (storage flags included) in every dtype combination and size class,
    and the kernels reading per-parameter clip factors (in both of Metal's address spaces)."""
    if not quick:
        return verification_plan()
    return (
        [
            plan_variant(options, dtypes, small, k + row)
            for k, (dtypes, small) in enumerate(
                itertools.product(dtype_combinations(), (False, True))
            )
            for row, options in enumerate(pairwise_option_sets(storage=True))
        ]
        + factor_variants()
        + accumulating_variants()
    )


def _runner(path: paths.UpdatePath, update: Callable, variant: Variant) -> Callable:
    def run_update(scalars, parameter, gradient, state, **arguments):
        return update(variant.options, scalars, parameter, gradient, state, **arguments)

    return mx.compile(run_update) if path.compile_step else run_update


def _updates(path: paths.UpdatePath, plan: list[Variant]) -> Callable[[Variant], Callable]:
    """Per variant of ``plan``, the update that runs it on ``path``: the path's update, or for
    an accumulating variant its accumulating update with the accumulator in the state
    (verification's loss scale and steps)."""
    update = path.load()
    accumulating = None
    if any(v.accumulates for v in plan) and path.load_accumulating is not None:
        accumulating = path.load_accumulating()

    def for_variant(variant: Variant) -> Callable:
        if not variant.accumulates:
            return update
        if accumulating is None:
            raise ValueError(f"the {path.name} path has no accumulating update")
        return with_accumulator_in_state(accumulating, *accumulation_constants(variant))

    return for_variant


def verify_path(name: str, plan: list[Variant], shapes_per_variant: int) -> list[Row]:
    path = paths.PATHS[name]
    update_for = _updates(path, plan)
    rows: dict[tuple, Row] = {}
    for k, variant in enumerate(plan):
        dtypes = (variant.parameter_dtype, variant.gradient_dtype, variant.state_dtype)
        row = rows.setdefault((dtypes, variant.small), Row(name, dtypes, variant.small))
        pool = shapes_for(variant)
        shapes = [pool[(k + j) % len(pool)] for j in range(shapes_per_variant)]
        row.add(*verify(variant, _runner(path, update_for(variant), variant), shapes, seed=k))
    return list(rows.values())


def probe_kernels(name: str, plan: list[Variant]) -> dict[Variant, str]:
    """The variants of ``plan`` that ``fused="auto"`` would not run on ``name``'s kernel here,
    and why: each is probed as ``auto`` probes it on first use (the verdicts are the process's
    own, so a variant already refused in this process shows up too)."""
    update_for = _updates(paths.PATHS[name], plan)
    verdicts = {v: probe.kernel_verdict(name, v, update_for(v), fall_back=False) for v in plan}
    return {variant: why for variant, why in verdicts.items() if why is not None}


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def describe_failure(path: str, failure: Failure) -> str:
    return (
        f"{path}: {describe(failure.variant)}; shape {failure.shape}, step {failure.step}, "
        f"output {failure.output!r}, {failure.mismatch}"
    )


def format_table(rows: list[Row]) -> str:
    """One line per path, dtype combination and size class: the dtypes (P, G, S: parameter,
    gradient, state), then the largest relative error of each output."""
    header = ["path", "P", "G", "S", "size", "variants", "failed", *(f"err:{o}" for o in OUTPUTS)]
    lines = [header]
    for row in rows:
        lines.append(
            [
                row.path,
                *(_dtype_name(d) for d in row.dtypes),
                f"<{METAL_CONSTANT_BELOW}" if row.small else f">={METAL_CONSTANT_BELOW}",
                str(row.variants),
                str(len(row.failures)),
                *(f"{row.errors[o]:.2g}" if o in row.errors else "-" for o in OUTPUTS),
            ]
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a shorter run: on a GPU the pairwise option sets for every dtype combination "
        "and the kernels reading per-parameter clip factors instead of every option set; on "
        "the CPU three option sets in float32",
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    print(f"mlx_rmsprop check: MLX {mx.__version__}, {platform.platform()}")
    print(f"Native CPU path: {native.status()}")
    available = paths.availability()
    gpu_paths = [name for name in GPU_PATHS if available.get(name) is None]
    if gpu_paths:
        plan, shapes_per_variant = _gpu_plan(args.quick), 2
        names = gpu_paths
        print(
            f"Running the kernel on this GPU ({', '.join(gpu_paths)}): {len(plan)} variants, "
            f"{shapes_per_variant} shapes x {STEPS} steps each, against the reference on the CPU."
        )
    else:
        reasons = "; ".join(f"{name}: {available[name]}" for name in GPU_PATHS)
        names = [
            name
            for name, reason in available.items()
            if reason is None and name != "reference" and name not in GPU_PATHS
        ]
        plan, shapes_per_variant = _cpu_plan(args.quick), 1
        print(f"No GPU kernel can run here ({reasons}).")
        print(
            f"The Metal and CUDA kernels were NOT run on this machine. Verified instead: "
            f"path(s) {', '.join(names)} against the reference, {len(plan)} variants x "
            f"{STEPS} steps."
        )
    rows = [row for name in names for row in verify_path(name, plan, shapes_per_variant)]
    print()
    print(format_table(rows))
    failures = [(row.path, failure) for row in rows for failure in row.failures]
    if failures:
        print(f"\nFirst failure: {describe_failure(*failures[0])}")
    refusals = 0
    for name in gpu_paths:
        refused = probe_kernels(name, plan)
        refusals += len(refused)
        print(
            f"\nfused='auto' probes each {name} kernel variant on first use: "
            f"{len(plan) - len(refused)} of {len(plan)} adopted here, {len(refused)} would "
            "run the compiled reference instead (after one warning)."
        )
        if refused:
            variant, why = next(iter(refused.items()))
            print(f"First refused: {describe(variant)}: {why}")
    total = sum(row.variants for row in rows)
    verdict = "PASS" if not failures and not refusals else "FAIL"
    elapsed = time.perf_counter() - started
    print(
        f"\n{verdict}: {total} variant runs, {len(failures)} failed, in {elapsed:.1f} s. "
        "Tolerance (mlx_rmsprop/tolerance.py), relative to the largest magnitude of the "
        "expected array, by the array's dtype: "
        + ", ".join(f"{k} {v:g}" for k, v in RTOL.items() if k != "float64")
        + "; NaN and infinities must match exactly."
    )
    if not gpu_paths:
        print(
            "To verify the kernels themselves, run this command on an Apple-silicon Mac or "
            "with MLX's CUDA backend; the test suite runs them on Linux under a Metal "
            "emulator (tests/paths/kernels/test_kernel_emulation.py)."
        )
    return 0 if verdict == "PASS" else 1
