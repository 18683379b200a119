"""The native reduction over a whole step's gradients (gradient_statistics.cpp): the same
statistics matrix as the MLX ops of mlx_rmsprop.pipeline, bit for bit, in the documented
summation order, as one graph node for the whole step."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop, pipeline

from native_available import requires_native

NATIVE = "native"
pytestmark = requires_native

BLOCK = pipeline.STATISTICS_BLOCK
SIZES = [0, 1, 5, 31, 32, 33, 1000, BLOCK, BLOCK + 1, 3 * BLOCK + 17]


def native_statistics(*args):
    from mlx_rmsprop.paths import native

    return native.statistics(*args)


def bits(array: mx.array) -> np.ndarray:
    return np.array(array).view(np.uint32)


def ops_statistics(gradients, accumulators, loss_scale, steps, scaled_norm):
    values = pipeline.reduced_values(gradients, accumulators, loss_scale, steps, mx.float32)
    return pipeline.statistics_ops(values, pipeline.ScaledNorm(scaled_norm))


def numpy_sum_of_squares(values: np.ndarray) -> np.float32:
    """The documented order, one float32 addition at a time."""
    flat = values.astype(np.float32).reshape(-1)
    lanes_count = pipeline.STATISTICS_LANES
    total = np.float32(0)
    for start in range(0, flat.size, BLOCK):
        block = flat[start : start + BLOCK]
        lanes = np.zeros(lanes_count, np.float32)
        for i, x in enumerate(block):
            lanes[i % lanes_count] = np.float32(lanes[i % lanes_count] + np.float32(x * x))
        half = lanes_count // 2
        while half >= 1:
            lanes[:half] = (lanes[:half] + lanes[half : 2 * half]).astype(np.float32)
            half //= 2
        total = np.float32(total + lanes[0])
    return total


@pytest.mark.parametrize("size", [0, 1, 33, 1000, BLOCK + 5])
def test_sum_of_squares_follows_the_documented_order(size):
    values = np.random.default_rng(size).standard_normal(size).astype(np.float32) * 3
    expected = numpy_sum_of_squares(values)
    ops = pipeline.blocked_sum_of_squares(mx.array(values))
    native = native_statistics([mx.array(values)], [], 0.0, 0, 0)[0, pipeline.SUM_OF_SQUARES]
    assert bits(ops) == np.float32(expected).view(np.uint32)
    assert bits(native) == np.float32(expected).view(np.uint32)


@pytest.mark.parametrize("scaled_norm", [0, 1, 2])
@pytest.mark.parametrize("loss_scale, steps", [(0.0, 0), (4.0, 0), (0.0, 2), (2.0, 3)])
@pytest.mark.parametrize("size", SIZES)
def test_native_equals_the_ops_bit_for_bit(size, loss_scale, steps, scaled_norm):
    rng = np.random.default_rng(size)
    base = mx.array(rng.standard_normal(2 * size + 2).astype(np.float32) * 3)
    gradients = [
        base[:size],
        base[size : 2 * size].astype(mx.float16),  # half precision
        base[: 2 * size + 2 : 2].astype(mx.bfloat16),  # strided
        base[:size].reshape(1, -1).T if size else base[:0],  # transposed
    ]
    accumulators = []
    if steps:
        accumulators = [
            mx.array(rng.standard_normal(g.shape).astype(np.float32)).astype(dtype)
            for g, dtype in zip(
                gradients, [mx.float32, mx.float16, mx.float32, mx.bfloat16], strict=True
            )
        ]
    native = native_statistics(gradients, accumulators, loss_scale, steps, scaled_norm)
    expected = ops_statistics(gradients, accumulators, loss_scale, steps, scaled_norm)
    assert native.shape == (len(gradients), pipeline.NUM_STATISTICS)
    assert native.dtype == mx.float32
    np.testing.assert_array_equal(bits(native), bits(expected))


@pytest.mark.parametrize("scaled_norm", [1, 2])
@pytest.mark.parametrize(
    "values",
    [
        [2e16] * (1 << 20),  # finite values whose squares sum past float32's range
        [3e38, -3e38, 1.0],
        [1.0, float("nan"), 3.0],
        [float("inf"), 2.0],
        [float("-inf"), float("nan")],
    ],
    ids=["overflowing-sum", "huge", "nan", "inf", "inf-and-nan"],
)
def test_nonfinite_and_overflowing_values(values, scaled_norm):
    gradient = mx.array(np.array(values, np.float32))
    gradients = [gradient, gradient * 0.5, mx.array([1.0, 2.0])]
    native = native_statistics(gradients, [], 0.0, 0, scaled_norm)
    expected = ops_statistics(gradients, [], 0.0, 0, scaled_norm)
    np.testing.assert_array_equal(bits(native), bits(expected))
    finite = bool(np.isfinite(np.array(values, np.float32)).all())
    assert np.array(native[:, pipeline.NONFINITE]).tolist() == [
        float(not finite),
        float(not finite),
        0.0,
    ]
    if finite and np.isinf(np.array(native[0, pipeline.SUM_OF_SQUARES])):
        # The scaled sum keeps the norm in range: sqrt(n) for n equal magnitudes.
        scaled = np.array(native[0, pipeline.SCALED_SUM_OF_SQUARES])
        assert np.isfinite(scaled) and scaled > 0


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="scaled_norm must be 0"):
        native_statistics([mx.zeros(3)], [], 0.0, 0, 3)
    with pytest.raises(ValueError, match="accumulators must hold one array per gradient"):
        native_statistics([mx.zeros(3)], [], 0.0, 2, 0)
    with pytest.raises(ValueError, match=r"gradients\[0\] must be float16, bfloat16 or float32"):
        native_statistics([mx.zeros(3, mx.float64)], [], 0.0, 0, 0)


FULL_PIPELINE = {"use_ema": True, "skip_nonfinite": True, "gradient_accumulation_steps": 2}


def step_graph_nodes(tensors: int, **options) -> dict[str, int]:
    """The primitives in one step's graph (uncompiled, as traced): counted per node, a node
    with several outputs once."""
    params = {f"p{i}": mx.zeros((3, 4)) for i in range(tensors)}
    grads = {f"p{i}": mx.full((3, 4), 0.5) for i in range(tensors)}
    mx.eval(params, grads)
    optimizer = RMSprop.from_keras(learning_rate=0.01, fused=NATIVE, **options)
    optimizer.init(params)
    mx.eval(optimizer.state)
    optimizer._compile_step = False  # the graph mx.compile would receive
    new = optimizer.apply_gradients(grads, params)
    outputs = [leaf for _, leaf in tree_flatten(new)] + [
        leaf for _, leaf in tree_flatten(optimizer.state)
    ]
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    counts: dict[str, int] = {}
    for label in re.findall(r'label ="([^"]+)", shape=rectangle', dot.getvalue()):
        counts[label] = counts.get(label, 0) + 1
    return counts


def nodes_per_tensor(**options) -> dict[str, float]:
    small, large = step_graph_nodes(3, **options), step_graph_nodes(12, **options)
    return {
        label: (large.get(label, 0) - small.get(label, 0)) / 9
        for label in set(small) | set(large)
        if large.get(label, 0) != small.get(label, 0)
    }


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
def test_one_reduction_node_per_step(clip):
    options = {**FULL_PIPELINE, clip: 1.0}
    for tensors in (3, 12):
        counts = step_graph_nodes(tensors, **options)
        assert counts.get("GradientStatistics") == 1, counts
        assert counts.get("RMSpropUpdate") == tensors, counts


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
def test_graph_nodes_per_tensor(clip):
    # EMA, skip_nonfinite and clipping by norm add no node per tensor: the reduction is one
    # node for the step, and each update reads its clip factors by index.
    options = {key: value for key, value in FULL_PIPELINE.items()}
    del options["gradient_accumulation_steps"]
    assert nodes_per_tensor(**options, **{clip: 1.0}) == {"RMSpropUpdate": 1.0}
    # Every option on: accumulation is a stage of the update, no node of its own.
    assert nodes_per_tensor(**FULL_PIPELINE, **{clip: 1.0}) == {"RMSpropUpdate": 1.0}


def two_accumulating_steps(fused):
    """Parameters after two calls (one accumulation cycle) as a function of the parameters
    and both calls' gradients."""

    def run(params, grads):
        optimizer = RMSprop.from_keras(
            learning_rate=0.05,
            fused=fused,
            loss_scale_factor=4.0,
            gradient_accumulation_steps=2,
            clipnorm=0.5,
            skip_nonfinite=True,
            use_ema=True,
        )
        for g in grads:
            params = optimizer.apply_gradients(g, params)
        return params

    return run


def test_transforms_through_accumulation_equal_plain_ops():
    rng = np.random.default_rng(3)

    def tree(seed_shift=0):
        return {
            "w": mx.array(rng.standard_normal((3, 2)).astype(np.float32)),
            "b": mx.array(rng.standard_normal((2,)).astype(np.float32)),
        }

    params, grads = tree(), [tree(), tree()]

    def loss(path):
        step = two_accumulating_steps(path)
        return lambda p, g: sum((leaf * leaf).sum() for _, leaf in tree_flatten(step(p, g)))

    expected = mx.grad(loss(False), argnums=(0, 1))(params, grads)
    actual = mx.grad(loss(NATIVE), argnums=(0, 1))(params, grads)
    for (key, value), (_, reference) in zip(
        tree_flatten(actual), tree_flatten(expected), strict=True
    ):
        np.testing.assert_array_equal(bits(value), bits(reference), err_msg=key)
    # Forward: the same parameters bit for bit.
    forward = [two_accumulating_steps(path)(params, grads) for path in (False, NATIVE)]
    for (key, value), (_, reference) in zip(
        tree_flatten(forward[1]), tree_flatten(forward[0]), strict=True
    ):
        np.testing.assert_array_equal(bits(value), bits(reference), err_msg=key)


@pytest.mark.parametrize("clip", [{"clipnorm": 0.3}, {"global_clipnorm": 0.3}, {}])
def test_full_pipeline_on_native_equals_plain_ops(clip):
    # Half-precision parameters, a tensor of several statistics blocks that the threads
    # split, an empty one, a non-finite call (skipped) and accumulation cycles: every
    # parameter and buffer bit for bit against fused=False.
    rng = np.random.default_rng(1)
    start = {
        "a": mx.array(rng.standard_normal((300, 40)).astype(np.float32)).astype(mx.bfloat16),
        "b": mx.array(rng.standard_normal(70000).astype(np.float32)),
        "c": mx.array(rng.standard_normal(7).astype(np.float16)),
        "e": mx.zeros((0,)),
    }
    results = {}
    for fused in (False, NATIVE):
        optimizer = RMSprop.from_keras(
            learning_rate=0.1,
            fused=fused,
            skip_nonfinite=True,
            use_ema=True,
            loss_scale_factor=8.0,
            gradient_accumulation_steps=3,
            **clip,
        )
        params = start
        for t in range(7):
            grads = {key: (value * (t + 1)).astype(value.dtype) for key, value in start.items()}
            if t == 4:
                grads["b"] = grads["b"] * float("inf")
            params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
        results[fused] = dict(tree_flatten((params, optimizer.state)))
    assert results[NATIVE]["1.skipped_steps"].item() == 1
    assert results[False].keys() == results[NATIVE].keys()
    for key, expected in results[False].items():
        actual = results[NATIVE][key]
        assert actual.dtype == expected.dtype, key
        assert mx.array_equal(actual, expected, equal_nan=True).item(), key


def buffer_address(array: mx.array) -> int:
    view = np.array(array, copy=False)
    return view.ctypes.data


@pytest.mark.parametrize(
    "options",
    [{}, {"skip_nonfinite": True}, {"clipnorm": 1.0}, {"global_clipnorm": 1.0, "use_ema": True}],
    ids=["accumulation", "skip", "clipnorm", "global_clipnorm_ema"],
)
def test_accumulator_is_rewritten_in_place(options):
    # The statistics pass reads each accumulator before the update rewrites it. MLX would pin
    # an input read that way until the pass has run, and the update would then write a fresh
    # buffer every step; the update takes it over instead (input_hold.h). Every buffer the step
    # replaces keeps its memory, on accumulating and applying calls alike.
    params = {"w": mx.zeros((1 << 17,))}
    grads = {"w": mx.full((1 << 17,), 0.5)}
    optimizer = RMSprop.from_keras(
        learning_rate=0.01, fused=NATIVE, gradient_accumulation_steps=2, **options
    )
    optimizer.init(params)
    # One step first: the EMA starts out sharing the parameter's buffer.
    params = optimizer.apply_gradients(grads, params)
    mx.eval(params, optimizer.state)
    for _ in range(4):
        before = {"parameter": buffer_address(params["w"])}
        before.update({key: buffer_address(v) for key, v in optimizer.state["w"].items()})
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
        after = {"parameter": buffer_address(params["w"])}
        after.update({key: buffer_address(v) for key, v in optimizer.state["w"].items()})
        assert after == before
    assert optimizer.state["step"].item() == 5


def test_statistics_keep_an_accumulator_alive_that_no_update_reads():
    # The statistics node holds each accumulator until its task has run, whether or not an
    # update takes it over: here none does, and the accumulator's only other reference is
    # dropped before the pass runs.
    gradient = mx.full((1 << 17,), 2.0)
    mx.eval(gradient)
    accumulator = mx.full((1 << 17,), 1.0) + 0.0
    statistics = native_statistics([gradient], [accumulator], 0.0, 2, 0)
    del accumulator
    expected = float((1 << 17) * 1.5**2)  # the mean over the cycle, (2 + 1) / 2
    assert statistics[0, 0].item() == expected


def test_baseline_pass_matches_the_ops():
    # The statistics pass exists twice on x86-64 (baseline and AVX2, chosen as the update's
    # storage loops are); the tests above ran one of them. Here the baseline, forced.
    if os.environ.get("MLX_RMSPROP_NATIVE_AVX2") == "0":
        return  # this is that run
    tests = ["native_equals_the_ops", "nonfinite_and_overflowing", "documented_order"]
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
        + ["-k", " or ".join(tests)],
        env={**os.environ, "MLX_RMSPROP_NATIVE_AVX2": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert " passed" in completed.stdout
