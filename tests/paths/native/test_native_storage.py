"""The native CPU update's storage flags (issue 17) against the reference, bit for bit: 8-bit
state (codes and per-block scales) and stochastic rounding of float16/bfloat16 stores, crossed
with a pairwise subset of the option space and the dtype mixes of test_native_parity, at awkward
sizes (0-d, empty, below a block, ragged last blocks, the threaded sizes), over several steps,
with the gate at 0, NaN/Inf and all-zero blocks, non-contiguous inputs; the transforms' refusals;
and the baseline (non-AVX2) loops in a subprocess."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_native_parity import DTYPE_MIXES, EVERYTHING, assert_same, scalars_for

from mlx_rmsprop import storage
from mlx_rmsprop.paths import native
from mlx_rmsprop.reference import rmsprop_reference
from mlx_rmsprop.spec import (
    BLOCK_SIZES,
    FLAGS,
    QUANTIZED_KEYS,
    STORAGE_FLAGS,
    UpdateOptions,
    code_table,
    option_space,
    rounding_step_key,
    scale_key,
)

from native_available import requires_native

pytestmark = requires_native

STORAGE_MODES = {
    "8bit": {"quantized_state": True},
    "rounding": {"stochastic_rounding": True},
    "8bit+rounding": {"quantized_state": True, "stochastic_rounding": True},
}
SEED = 20261207
# Set in the subprocess of test_baseline_loops_match_the_reference.
BASELINE_VARIABLE = "MLX_RMSPROP_NATIVE_AVX2"


def with_storage(options: UpdateOptions, mode: str, block_size: int = 0) -> UpdateOptions:
    flags = STORAGE_MODES[mode]
    quantized = flags.get("quantized_state", False)
    return dataclasses.replace(options, **flags, block_size=block_size if quantized else 0)


def _pairs(options: UpdateOptions) -> set:
    names = [name for name in FLAGS if name not in STORAGE_FLAGS]
    values = [(name, getattr(options, name)) for name in names]
    return set(itertools.combinations(values, 2))


def pairwise_option_sets() -> list[UpdateOptions]:
    """A greedy pairwise covering subset of option_space(): every value pair of two flags that
    some valid option set has appears in one of these (deterministic)."""
    candidates = list(option_space())
    uncovered = set().union(*(_pairs(options) for options in candidates))
    chosen = []
    while uncovered:
        best = max(candidates, key=lambda options: len(_pairs(options) & uncovered))
        chosen.append(best)
        uncovered -= _pairs(best)
    return chosen


PAIRWISE = pairwise_option_sets()


def initial_state(
    options: UpdateOptions, shape: tuple, rng: np.random.Generator, state_dtype: mx.Dtype
) -> dict[str, mx.array]:
    """Random buffers for ``options.state_keys``; 8-bit ones quantized by the normative rule."""
    state = {}
    for key in options.state_keys:
        if key.endswith("_scale"):
            continue
        values = rng.standard_normal(shape).astype(np.float32) * np.float32(0.3)
        if key == "v":
            values = np.abs(values)
        if options.quantized_state and key in QUANTIZED_KEYS:
            codes, scales = storage.quantize(mx.array(values), code_table(key), options.block_size)
            state[key], state[scale_key(key)] = codes, scales
        else:
            state[key] = mx.array(values).astype(state_dtype)
    assert tuple(state) == options.state_keys
    return state


def step_scalars(options: UpdateOptions, compute: mx.Dtype, step: int, gate: float = 1.0):
    key = rounding_step_key(SEED, step) if options.stochastic_rounding else 0
    return scalars_for(options, compute, step=step, gate=gate, rounding_key=key)


def assert_steps_match(options, compute, parameter, gradients, state, what, *, index=0, gates=()):
    """Native update and reference side by side, each on its own outputs, one step per
    gradient (step t uses rounding key ``rounding_step_key(SEED, t)`` and gate ``gates[t-1]``,
    default 1); parameter and every state array compared bit for bit after each step."""
    ours_parameter, ours_state = parameter, dict(state)
    ref_parameter, ref_state = parameter, dict(state)
    for step, gradient in enumerate(gradients, start=1):
        gate = gates[step - 1] if step <= len(gates) else 1.0
        scalars = step_scalars(options, compute, step, gate)
        ours_parameter, ours_state = native.update(
            options, scalars, ours_parameter, gradient, ours_state, index=index
        )
        ref_parameter, ref_state = rmsprop_reference(
            options, scalars, ref_parameter, gradient, ref_state, index=index
        )
        mx.eval(ours_parameter, ours_state, ref_parameter, ref_state)
        assert tuple(ours_state) == tuple(ref_state) == options.state_keys
        assert_same(ours_parameter, ref_parameter, f"{what} step {step} parameter")
        for key in ref_state:
            assert_same(ours_state[key], ref_state[key], f"{what} step {step} {key}")
    return ours_parameter, ours_state


def run_case(options, shape, dtypes, seed, what, steps=3, **kwargs):
    parameter_dtype, gradient_dtype, state_dtype, compute = dtypes
    rng = np.random.default_rng(seed)
    parameter = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(parameter_dtype)
    state = initial_state(options, shape, rng, state_dtype)
    gradients = [
        mx.array(rng.standard_normal(shape).astype(np.float32) * np.float32(2.0 * 10.0**-t)).astype(
            gradient_dtype
        )
        for t in range(steps)
    ]
    return assert_steps_match(options, compute, parameter, gradients, state, what, **kwargs)


def bits(array: mx.array) -> np.ndarray:
    """The array's values, float16/bfloat16 as their bit patterns."""
    if array.dtype in (mx.float16, mx.bfloat16):
        return np.array(array.view(mx.uint16))
    return np.array(array)


def valid_mixes(mode: str) -> dict:
    """The dtype mixes a storage mode runs with: 8-bit state needs float32 arithmetic."""
    if "quantized_state" not in STORAGE_MODES[mode]:
        return DTYPE_MIXES
    return {name: dtypes for name, dtypes in DTYPE_MIXES.items() if dtypes[3] == mx.float32}


def test_pairwise_subset_covers_every_flag_pair():
    # The subset below is what makes the sweep representative: every pair of flag values.
    covered = set().union(*(_pairs(options) for options in PAIRWISE))
    assert covered == set().union(*(_pairs(options) for options in option_space()))
    assert len(PAIRWISE) < 16


# Each pairwise option set with each storage mode; dtype mix and block size rotate, so each
# appears with several option sets.
PAIRWISE_CASES = [
    pytest.param(options, mode, name, block, id=f"{mode}-{k}-{name}-B{block}")
    for k, options in enumerate(PAIRWISE)
    for m, mode in enumerate(STORAGE_MODES)
    for name in [list(valid_mixes(mode))[(k + m) % len(valid_mixes(mode))]]
    for block in [BLOCK_SIZES[(k + 2 * m) % len(BLOCK_SIZES)]]
]


@pytest.mark.parametrize("options, mode, mix, block", PAIRWISE_CASES)
def test_storage_flags_on_pairwise_option_sets_are_bit_exact(options, mode, mix, block):
    options = with_storage(options, mode, block)
    run_case(options, (37, 29), DTYPE_MIXES[mix], 1, f"{options} {mix}", steps=4, index=3)


SIZES = [(), (0,), (0, 3), (1,), (7,), (3, 5, 7), (255,), (257,), (513,), (1025,), (32771,)]
# Around the threaded split (parts of 2^15 elements from 2^16 on), ragged last part and block.
PARALLEL_SIZES = [(65536 - 1,), (65536,), (2 * 65536 + 37,)]


# 8-bit state with float64 arithmetic is refused (test_bad_storage_arguments...).
MODES_AND_MIXES = [
    pytest.param(mode, mix, id=f"{mode}-{mix}")
    for mode in STORAGE_MODES
    for mix in valid_mixes(mode)
]


@pytest.mark.parametrize("mode, mix", MODES_AND_MIXES)
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_every_dtype_mix_and_awkward_size_is_bit_exact(shape, mode, mix):
    options = with_storage(EVERYTHING, mode, 256)
    run_case(options, shape, DTYPE_MIXES[mix], 2, f"{shape} {mix} {mode}", index=1)


THREADED_MIXES = ["float32", "bfloat16", "float16-bf16grad-f16state"]


@pytest.mark.parametrize("mix", THREADED_MIXES)
@pytest.mark.parametrize("mode", STORAGE_MODES)
@pytest.mark.parametrize("shape", PARALLEL_SIZES, ids=str)
def test_threaded_sizes_are_bit_exact(shape, mode, mix):
    options = with_storage(UpdateOptions(centered=True, momentum=True, ema=True), mode, 1024)
    run_case(options, shape, DTYPE_MIXES[mix], 3, f"{shape} {mix} {mode}", steps=2, index=2)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCK_SIZES)
@pytest.mark.parametrize("mode, mix", MODES_AND_MIXES)
@pytest.mark.parametrize("shape", PARALLEL_SIZES, ids=str)
def test_threaded_sizes_every_mix_and_block_size(shape, mode, mix, block):
    options = with_storage(EVERYTHING, mode, block)
    run_case(options, shape, DTYPE_MIXES[mix], 4, f"{shape} {mix} {mode} B{block}", index=9)


@pytest.mark.slow
@pytest.mark.parametrize("mode", STORAGE_MODES)
@pytest.mark.parametrize("options", PAIRWISE, ids=range(len(PAIRWISE)))
def test_pairwise_option_sets_every_mix_and_block_size(options, mode):
    for (name, dtypes), block in itertools.product(valid_mixes(mode).items(), BLOCK_SIZES):
        run_case(with_storage(options, mode, block), (3, 347), dtypes, 5, f"{name} B{block}")


@pytest.mark.parametrize("mode", STORAGE_MODES)
def test_non_contiguous_inputs_are_read_in_logical_order_and_left_unchanged(mode):
    options = with_storage(UpdateOptions(centered=True, momentum=True, ema=True), mode, 32)
    rng = np.random.default_rng(6)
    shape = (40, 9)  # 360 elements: 11 full blocks of 32 and a ragged one
    parameter = mx.array(rng.standard_normal(shape[::-1]).astype(np.float32)).astype(mx.bfloat16).T
    gradient = mx.array(rng.standard_normal((40, 18)).astype(np.float32))[:, ::2]
    state = initial_state(options, shape, rng, mx.float16)
    strided = {}
    for key, value in state.items():
        if key.endswith("_scale"):
            # Every other entry of a vector twice as long.
            strided[key] = mx.repeat(value, 2)[::2]
        else:
            strided[key] = mx.array(np.ascontiguousarray(np.array(value).T)).T
    strided["ema"] = mx.broadcast_to(mx.array(0.25, mx.float16), shape)
    held = {key: bits(value) for key, value in [("parameter", parameter), *strided.items()]}
    assert_steps_match(options, mx.float32, parameter, [gradient] * 3, strided, mode, index=4)
    for key, value in [("parameter", parameter), *strided.items()]:
        np.testing.assert_array_equal(bits(value), held[key], err_msg=key)


@pytest.mark.parametrize("donate", [False, True], ids=["held", "donated"])
@pytest.mark.parametrize("mode", STORAGE_MODES)
def test_closed_gate_keeps_codes_scales_and_parameter_bits(mode, donate):
    options = with_storage(UpdateOptions(centered=True, momentum=True, gated=True), mode, 64)
    rng = np.random.default_rng(7)
    shape = (1000,)
    parameter = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)
    gradient = mx.array(rng.standard_normal(shape).astype(np.float32))
    state = initial_state(options, shape, rng, mx.bfloat16)
    mx.eval(parameter, state)
    kept = [bits(parameter), *(bits(state[key]) for key in options.state_keys)]
    scalars = step_scalars(options, mx.float32, 2, gate=0.0)
    new_parameter, new_state = native.update(options, scalars, parameter, gradient, state)
    if donate:
        del parameter, state
    mx.eval(new_parameter, new_state)
    got = [bits(new_parameter), *(bits(new_state[key]) for key in options.state_keys)]
    for before, after, name in zip(kept, got, ["parameter", *options.state_keys], strict=True):
        np.testing.assert_array_equal(after, before, err_msg=name)


@pytest.mark.parametrize("mode", ["8bit", "8bit+rounding"])
def test_gate_schedule_over_steps_matches_the_reference(mode):
    options = with_storage(EVERYTHING, mode, 128)
    run_case(options, (700,), DTYPE_MIXES["bfloat16"], 8, mode, steps=5, gates=(1, 0, 1, 0, 1))


@pytest.mark.parametrize("block", [32, 256])
@pytest.mark.parametrize("mode", STORAGE_MODES)
def test_nan_inf_and_all_zero_blocks_match_the_reference(mode, block):
    # Block patterns: NaN in the gradient, +Inf and -Inf, an all-zero block (zero gradient and
    # state), huge and tiny values, and an ordinary block.
    options = with_storage(UpdateOptions(centered=True, momentum=True), mode, block)
    rng = np.random.default_rng(11)
    patterns = [np.nan, np.inf, -np.inf, 0.0, 1e30, 1e-30, None]
    gradient = rng.standard_normal(len(patterns) * block).astype(np.float32)
    for b, value in enumerate(patterns):
        if value is not None:
            part = gradient[b * block : (b + 1) * block]
            if value == 0.0:
                part[:] = 0.0
            else:
                part[block // 3] = value
    shape = gradient.shape
    state = initial_state(options, shape, rng, mx.float16)
    zero_block = slice(3 * block, 4 * block)
    for key in options.state_keys:
        values = np.array(state[key])
        if options.quantized_state and key.endswith("_scale"):
            values[3] = 0.0
        elif options.quantized_state:
            continue
        else:
            values[zero_block] = 0.0
        state[key] = mx.array(values).astype(state[key].dtype)
    parameter = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.float16)
    gradients = [mx.array(gradient), mx.array(gradient * 0.5), mx.array(gradient)]
    _, new_state = assert_steps_match(
        options, mx.float32, parameter, gradients, state, f"{mode} B{block}", index=5
    )
    if options.quantized_state:
        v_scale = np.array(new_state["v_scale"])
        assert np.isnan(v_scale[0]) and np.isinf(v_scale[1]) and v_scale[3] == 0.0


def test_rounding_depends_on_index_and_key_as_the_reference_does():
    options = with_storage(UpdateOptions(), "rounding")
    rng = np.random.default_rng(12)
    parameter = mx.array(rng.standard_normal(4096).astype(np.float32)).astype(mx.bfloat16)
    gradient = mx.array(rng.standard_normal(4096).astype(np.float32))
    state = {"v": mx.full((4096,), 0.5, mx.bfloat16)}
    results = {}
    for key, index in [(5, 0), (5, 1), (6, 0)]:
        scalars = scalars_for(options, rounding_key=key)
        ours = native.update(options, scalars, parameter, gradient, state, index=index)
        expected = rmsprop_reference(options, scalars, parameter, gradient, state, index=index)
        assert_same(ours[0], expected[0], f"key {key} index {index}")
        assert_same(ours[1]["v"], expected[1]["v"], f"key {key} index {index} v")
        results[key, index] = np.array(ours[0].view(mx.uint16))
    assert not np.array_equal(results[5, 0], results[5, 1])
    assert not np.array_equal(results[5, 0], results[6, 0])
    # Rounding happened: some entries are not the round-to-nearest result.
    nearest = rmsprop_reference(
        UpdateOptions(), scalars_for(options, rounding_key=5), parameter, gradient, state
    )[0]
    assert not np.array_equal(results[5, 0], np.array(nearest.view(mx.uint16)))


def _two_indices(options, scalars, keys):
    def step(parameter, gradient, *buffers):
        state = dict(zip(keys, buffers, strict=True))
        first = native.update(options, scalars, parameter, gradient, state, index=0)
        second = native.update(options, scalars, parameter, gradient, state, index=1)
        return [first[0], second[0], *(first[1][k] for k in keys), *(second[1][k] for k in keys)]

    return step


@pytest.mark.parametrize("shapeless", [False, True], ids=["compile", "compile-shapeless"])
def test_compiled_updates_differing_only_in_index_stay_apart(shapeless):
    # index is a primitive attribute: two nodes over the same inputs are not merged, and one
    # compiled function serves every shape (shapeless) and both indices.
    options = with_storage(UpdateOptions(momentum=True), "8bit+rounding", 32)
    keys = options.state_keys
    compiled = mx.compile(_two_indices(options, None, keys), shapeless=shapeless)
    for shape in [(100,), (7, 40)]:
        rng = np.random.default_rng(13)
        parameter = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.float16)
        gradient = mx.array(rng.standard_normal(shape).astype(np.float32))
        state = initial_state(options, shape, rng, mx.float32)
        scalars = step_scalars(options, mx.float32, 1)
        compiled = mx.compile(_two_indices(options, scalars, keys), shapeless=shapeless)
        got = compiled(parameter, gradient, *(state[k] for k in keys))
        for index in (0, 1):
            expected_p, expected_state = rmsprop_reference(
                options, scalars, parameter, gradient, state, index=index
            )
            assert_same(got[index], expected_p, f"{shape} index {index} parameter")
            for k, key in enumerate(keys):
                actual = got[2 + index * len(keys) + k]
                assert_same(actual, expected_state[key], f"{shape} index {index} {key}")
        assert not np.array_equal(np.array(got[0]), np.array(got[1]))


_STORAGE_ERRORS = {
    "block size not a power of two": (
        {"flags": "quantized_state", "block_size": 48},
        "block_size must be a power of two from 32 to 1024 with quantized_state, got 48",
    ),
    "block size too large": (
        {"flags": "quantized_state", "block_size": 2048},
        "block_size must be a power of two from 32 to 1024 with quantized_state, got 2048",
    ),
    "block size without quantized state": (
        {"block_size": 256},
        "block_size must be 0 without quantized_state, got 256",
    ),
    "float64 arithmetic": (
        {"flags": "quantized_state", "scalars": mx.float64},
        "quantized_state needs float32 arithmetic (float32 scalars), got shape (17,) and "
        "dtype float64",
    ),
    "negative index": ({"index": -1}, "index must be from 0 to 4294967295, got -1"),
    "index beyond uint32": (
        {"index": 1 << 32},
        "index must be from 0 to 4294967295, got 4294967296",
    ),
    "float codes": (
        {"flags": "quantized_state", "codes": mx.float32},
        "state[0] (v) must be uint8 codes shaped like the parameter (shape (300,) and dtype "
        "float32), got shape (300,) and dtype float32",
    ),
    "codes shape": (
        {"flags": "quantized_state", "codes_shape": (3, 100)},
        "state[0] (v) must be uint8 codes shaped like the parameter (shape (300,) and dtype "
        "float32), got shape (3, 100) and dtype uint8",
    ),
    "scales count": (
        {"flags": "quantized_state", "scales": 1},
        "state[1] (v_scale) must be a float32 vector of 2 scales (one per block of 256 "
        "elements of the parameter), got shape (1,) and dtype float32",
    ),
    "scales dtype": (
        {"flags": "quantized_state", "scales_dtype": mx.float16},
        "state[1] (v_scale) must be a float32 vector of 2 scales (one per block of 256 "
        "elements of the parameter), got shape (2,) and dtype float16",
    ),
    "scales missing": (
        {"flags": "quantized_state", "drop_scales": True},
        "state must hold 2 buffers for these flags, got 1",
    ),
}


@pytest.mark.parametrize("case", list(_STORAGE_ERRORS))
def test_bad_storage_arguments_name_the_argument_and_value(case):
    from mlx_rmsprop.paths.native import _ext

    spec, message = _STORAGE_ERRORS[case]
    quantized = spec.get("flags") == "quantized_state"
    flags = native._flags(UpdateOptions(quantized_state=quantized))
    scalars = scalars_for(UpdateOptions()).astype(spec.get("scalars", mx.float32))
    parameter = mx.zeros((300,))
    if quantized:
        codes = mx.zeros(spec.get("codes_shape", (300,)), spec.get("codes", mx.uint8))
        scales = mx.ones((spec.get("scales", 2),), spec.get("scales_dtype", mx.float32))
        state = [codes] if spec.get("drop_scales") else [codes, scales]
    else:
        state = [mx.zeros((300,))]
    block_size = spec.get("block_size", 256 if quantized else 0)
    with pytest.raises(ValueError) as error:
        _ext.update(scalars, parameter, parameter, state, flags, block_size, spec.get("index", 0))
    assert str(error.value) == "[rmsprop_update] " + message


def _transformed(options, keys, dtype):
    rng = np.random.default_rng(14)
    parameter = mx.array(rng.standard_normal((64,)).astype(np.float32)).astype(dtype)
    gradient = mx.array(rng.standard_normal((64,)).astype(np.float32)).astype(dtype)
    state = initial_state(options, (64,), rng, mx.float32)
    scalars = step_scalars(options, mx.float32, 1)

    def through(update):
        def step(parameter, gradient, *buffers):
            new_parameter, new_state = update(
                options, scalars, parameter, gradient, dict(zip(keys, buffers, strict=True))
            )
            return [new_parameter, *(new_state[key] for key in keys)]

        return step

    return through, [parameter, gradient, *(state[key] for key in keys)]


TRANSFORMS = {
    "vjp": lambda f, primals: mx.vjp(f, primals, [mx.ones_like(out) for out in f(*primals)]),
    "jvp": lambda f, primals: mx.jvp(f, primals, [mx.ones_like(p) for p in primals]),
    "vmap": lambda f, primals: mx.vmap(f)(*(mx.stack([p, p]) for p in primals)),
}


@pytest.mark.parametrize(
    "transform, mode, dtype, flag",
    [
        *((name, "8bit", mx.float32, "quantized_state=True") for name in TRANSFORMS),
        ("vmap", "rounding", mx.bfloat16, "stochastic_rounding=True"),
    ],
    ids=["vjp-8bit", "jvp-8bit", "vmap-8bit", "vmap-rounding-bfloat16"],
)
def test_transforms_refuse_storage_they_cannot_follow(transform, mode, dtype, flag):
    options = with_storage(UpdateOptions(momentum=True), mode, 32)
    through, primals = _transformed(options, options.state_keys, dtype)
    message = re.escape(f"[rmsprop_update] {transform} is not supported with {flag}")
    with pytest.raises(ValueError, match=f"^{message}"):
        mx.eval(TRANSFORMS[transform](through(native.update), primals))


@pytest.mark.parametrize(
    "transform, dtype",
    [
        *((name, mx.float32) for name in TRANSFORMS),
        ("vjp", mx.bfloat16),
        ("jvp", mx.bfloat16),
        ("vjp", mx.float16),
    ],
    ids=["vjp", "jvp", "vmap", "vjp-bfloat16", "jvp-bfloat16", "vjp-float16"],
)
def test_rounding_transforms_as_the_reference(transform, dtype):
    # float32 outputs: stochastic rounding changes nothing. float16/bfloat16 outputs: the
    # reference differentiates each rounded store straight through, as the native vjp and jvp
    # do (bit for bit).
    options = with_storage(UpdateOptions(centered=True, momentum=True), "rounding")
    through, primals = _transformed(options, options.state_keys, dtype)
    ours = TRANSFORMS[transform](through(native.update), primals)
    expected = TRANSFORMS[transform](through(rmsprop_reference), primals)
    for (name, actual), (_, wanted) in zip(tree_flatten(ours), tree_flatten(expected), strict=True):
        assert_same(actual, wanted, f"{transform} {name}")
        assert np.array_equal(bits(actual), bits(wanted), equal_nan=True), name


def test_storage_loops_follow_the_setting():
    from mlx_rmsprop.paths.native import _ext

    if os.environ.get(BASELINE_VARIABLE) == "0":
        assert _ext.storage_loops() == "baseline"
    else:
        assert _ext.storage_loops() in ("avx2", "baseline")


def test_baseline_loops_match_the_reference():
    # The requantize and rounding loops exist twice on x86-64 (baseline and AVX2, picked per
    # CPU); this machine runs one of them above. Here the other: the baseline, forced.
    if os.environ.get(BASELINE_VARIABLE) == "0":
        pytest.skip("this is the run with the baseline loops")
    tests = ["pairwise_option_sets_are", "nan_inf", "storage_loops_follow"]
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
        + ["-k", " or ".join(tests)],
        env={**os.environ, BASELINE_VARIABLE: "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert " passed" in completed.stdout
