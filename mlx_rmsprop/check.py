"""``python -m mlx_rmsprop check``: run the update paths this machine has against the reference.

With an Apple GPU (Metal) or MLX's CUDA backend, every kernel variant of
:func:`~mlx_rmsprop.kernels.variants.verification_plan` runs on the GPU and is compared, for
several shapes and steps, with :func:`~mlx_rmsprop.reference.rmsprop_reference` evaluated on
the CPU; a table gives, per dtype combination, the variants run, the failures and the largest
error of the parameter and of every state buffer. Without a GPU the command says that the
kernels were not run here and verifies the paths that do run (the compiled CPU path, ...).
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

from . import backends, native
from .kernels.source import METAL_CONSTANT_BELOW, Variant
from .kernels.variants import dtype_combinations, pairwise_option_sets, verification_plan
from .reference import rmsprop_reference
from .spec import NUM_SCALARS, Scalar

GPU_PATHS = ("metal", "cuda")
# Shapes per address-space class (``Variant.small``: fewer than 8 elements).
SHAPES = {
    False: [(8,), (9,), (33,), (3, 5), (2, 3, 7), (257,)],
    True: [(), (1,), (3,), (7,), (2, 3)],
}
STEPS = 3
# Largest error accepted, relative to the largest magnitude of the expected array, by the
# dtype of the array compared. The same numbers as the test suite's table (tests/tolerances.py,
# which a test keeps equal to this one): a GPU compiler may fuse a*b + c into one rounding,
# which moves float32 results by an ulp or so; float16/bfloat16 stores can then round the
# other way (half an ulp of 2^-11 resp. 2^-8).
RTOL = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
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


def step_scalars(step: int) -> mx.array:
    """The float32 scalars vector of verification step ``step`` (1-based). Every entry is
    away from its neutral value; the learning rate changes every step; the update gate is 0 on
    step 2; the EMA gate is 0 on step 2 and the EMA overwrites the parameter from step 2 on,
    so three steps see every gate combination."""
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
    return mx.array(values, mx.float32)


def verification_inputs(
    variant: Variant, shape: tuple[int, ...], seed: int, transposed: bool = False
) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """Parameter, gradient and state for ``variant`` with ``shape``: well-conditioned random
    values (the centred variance stays well away from 0, so a fused multiply-add cannot flip a
    clamp) with about a third of the elements replaced by one of SPECIALS. ``transposed``
    gives non-contiguous arrays (transposed views) of the same shape."""
    rng = np.random.default_rng(seed)
    size = math.prod(shape)
    values = {
        "parameter": rng.normal(0.0, 1.0, size),
        "gradient": rng.uniform(-1.0, 1.0, size),
        "v": rng.uniform(0.5, 2.0, size),
        "grad_avg": rng.uniform(-0.3, 0.3, size),
        "momentum_buffer": rng.normal(0.0, 0.1, size),
    }
    values["ema"] = values["parameter"] + rng.normal(0.0, 0.01, size)
    for index in np.flatnonzero(rng.random(size) < 0.35):
        special = SPECIALS[rng.integers(len(SPECIALS))]
        changes = {
            "nan_gradient": {"gradient": math.nan},
            "inf_gradient": {"gradient": math.inf},
            "negative_inf_gradient": {"gradient": -math.inf},
            "zero_gradient": {"gradient": 0.0},
            "negative_zero_gradient": {"gradient": -0.0},
            "clipped_gradient": {"gradient": -3.0},
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

    state = {key: array(key) for key in variant.options.state_keys}
    return array("parameter"), array("gradient"), state


def relative_error(actual: mx.array, expected: mx.array) -> float:
    """Largest difference relative to the largest finite magnitude of ``expected``; infinite
    when the two differ in shape, dtype or in where they are NaN / infinite."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return math.inf
    # float32 holds float16, bfloat16 and float32 values exactly.
    a = np.array(actual.astype(mx.float32), np.float64)
    e = np.array(expected.astype(mx.float32), np.float64)
    finite = np.isfinite(e)
    if not np.array_equal(finite, np.isfinite(a)) or not np.array_equal(
        e[~finite], a[~finite], equal_nan=True
    ):
        return math.inf
    if not finite.any():
        return 0.0
    scale = max(np.abs(e[finite]).max(), np.finfo(np.float64).tiny)
    return float(np.abs(a[finite] - e[finite]).max() / scale)


OUTPUTS = ("parameter", "v", "grad_avg", "momentum_buffer", "ema")


def verify(
    variant: Variant, run_update: Callable, shapes: list[tuple[int, ...]], seed: int
) -> dict[str, float]:
    """Largest error of each output of ``run_update`` (signature of ``rmsprop_reference``
    without ``options``) against the reference on the CPU, over ``shapes`` and STEPS steps,
    each step starting from the path's own previous outputs."""
    errors = dict.fromkeys(("parameter", *variant.options.state_keys), 0.0)
    for k, shape in enumerate(shapes):
        transposed = len(shape) >= 2 and (seed + k) % 2 == 0
        parameter, gradient, state = verification_inputs(variant, shape, seed + k, transposed)
        for step in range(1, STEPS + 1):
            scalars = step_scalars(step)
            new_parameter, new_state = run_update(scalars, parameter, gradient, state)
            with mx.stream(mx.cpu):
                expected = rmsprop_reference(variant.options, scalars, parameter, gradient, state)
            actual = {"parameter": new_parameter, **new_state}
            expected = {"parameter": expected[0], **expected[1]}
            for name in errors:
                errors[name] = max(errors[name], relative_error(actual[name], expected[name]))
            parameter, state = new_parameter, new_state
    return errors


def passes(variant: Variant, errors: dict[str, float]) -> bool:
    dtype_of = {"parameter": variant.parameter_dtype}
    return all(
        error <= RTOL[str(dtype_of.get(name, variant.state_dtype)).split(".")[-1]]
        for name, error in errors.items()
    )


@dataclass
class Row:
    """One line of the table: a path, a dtype combination and an address-space class."""

    path: str
    dtypes: tuple[mx.Dtype, mx.Dtype, mx.Dtype]
    small: bool
    variants: int = 0
    failures: list[tuple[Variant, dict[str, float]]] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)

    def add(self, variant: Variant, errors: dict[str, float]) -> None:
        self.variants += 1
        for name, error in errors.items():
            self.errors[name] = max(self.errors.get(name, 0.0), error)
        if not passes(variant, errors):
            self.failures.append((variant, errors))


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
    if not quick:
        return verification_plan()
    return [
        Variant(o, parameter, gradient, state, small)
        for (parameter, gradient, state), small in itertools.product(
            dtype_combinations(), (False, True)
        )
        for o in pairwise_option_sets()
    ]


def _runner(path: backends.Path, update: Callable, variant: Variant) -> Callable:
    def run_update(scalars, parameter, gradient, state):
        return update(variant.options, scalars, parameter, gradient, state)

    return mx.compile(run_update) if path.compile_step else run_update


def verify_path(name: str, plan: list[Variant], shapes_per_variant: int) -> list[Row]:
    path = backends.PATHS[name]
    update = path.load()
    rows: dict[tuple, Row] = {}
    for k, variant in enumerate(plan):
        dtypes = (variant.parameter_dtype, variant.gradient_dtype, variant.state_dtype)
        row = rows.setdefault((dtypes, variant.small), Row(name, dtypes, variant.small))
        pool = SHAPES[variant.small]
        shapes = [pool[(k + j) % len(pool)] for j in range(shapes_per_variant)]
        row.add(variant, verify(variant, _runner(path, update, variant), shapes, seed=k))
    return list(rows.values())


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def format_table(rows: list[Row]) -> str:
    header = ["path", "parameter", "gradient", "state", "size", "variants", "failed", *OUTPUTS]
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
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a shorter run: on a GPU the pairwise option sets for every dtype combination "
        "(330 variants instead of 4927); on the CPU three option sets in float32",
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    print(f"mlx_rmsprop check: MLX {mx.__version__}, {platform.platform()}")
    print(f"Native CPU path: {native.status()}")
    available = backends.availability()
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
    failures = [failure for row in rows for failure in row.failures]
    for row in rows:
        for variant, errors in row.failures:
            print(f"FAILED {row.path}: {variant} errors {errors}")
    total = sum(row.variants for row in rows)
    verdict = "PASS" if not failures else "FAIL"
    print(
        f"\n{verdict}: {total} variant runs, {len(failures)} failed "
        f"({time.perf_counter() - started:.0f} s; tolerances relative to the array's scale: "
        + ", ".join(f"{k} {v:g}" for k, v in RTOL.items())
        + ")."
    )
    if not gpu_paths:
        print(
            "To verify the kernels themselves, run this command on an Apple-silicon Mac or "
            "with MLX's CUDA backend; the test suite runs them on Linux under a Metal "
            "emulator (tests/test_kernel_emulation.py)."
        )
    return 0 if not failures else 1
