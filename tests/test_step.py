"""The step function: it keeps no arrays of the previous step alive (MLX frees a buffer when its
last reference goes, so a Python reference cycle holding arrays costs a copy of the model until
the cyclic garbage collector happens to run: measured +100 MB on a 25M-parameter tree), and it
tells each update its storage flags, its position and the step's rounding key."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop, spec
from mlx_rmsprop.reference import rmsprop_reference
from mlx_rmsprop.spec import Scalar
from mlx_rmsprop.step import rounding_key

from native_available import native_path


@pytest.mark.parametrize("fused", [False, "compiled"], ids=lambda f: f"fused={f}")
def test_a_step_holds_no_arrays_of_the_previous_step(fused):
    optimizer = RMSprop(1e-3, centered=True, momentum=0.9, fused=fused)
    parameters = {"layers": [{"weight": mx.ones((512, 512)), "bias": mx.zeros((512,))}]}
    gradients = {"layers": [{"weight": mx.full((512, 512), 0.1), "bias": mx.full((512,), 0.1)}]}
    mx.eval(parameters, gradients)
    model = {"parameters": parameters}
    del parameters

    def step() -> int:
        model["parameters"] = optimizer.apply_gradients(gradients, model["parameters"])
        mx.eval(model, optimizer.state)
        mx.synchronize()
        return mx.get_active_memory()

    gc.collect()
    gc.disable()
    try:
        after_first = step()
        after_more = [step() for _ in range(4)]
    finally:
        gc.enable()
    # One 512x512 float32 array is 1 MiB: any retained copy of the parameters or a state buffer
    # shows up as growth of at least that much. Small per-step arrays (the scalars vector, the
    # step count) may come and go: a few KiB.
    assert all(abs(after - after_first) < 2**18 for after in after_more), (after_first, after_more)


SEEDS = [0, 1, 0xDEADBEEF, 2**32 - 1]
# Update counts as the uint64 step counter holds them, past 2^32 (the key takes t mod 2^32).
COUNTS = [1, 2, 3, 1000, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 7]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_rounding_key_in_the_graph_is_the_spec_key(compiled):
    key = mx.compile(rounding_key) if compiled else rounding_key
    for seed in SEEDS:
        for count in COUNTS:
            got = key(mx.array(seed, mx.uint32), mx.array(count, mx.uint64))
            assert got.dtype == mx.uint32
            assert got.item() == spec.rounding_step_key(seed, count), (seed, count)
            # Exact as the float32 scalar the update reads.
            assert got.astype(mx.float32).item() == got.item()


class Recorder:
    """An update that records what each call is told, then runs the reference."""

    def __init__(self):
        self.calls = []

    def __call__(self, options, scalars, parameter, gradient, state, *, index=0):
        self.calls.append((options, scalars[int(Scalar.ROUNDING_KEY)].item(), index))
        return rmsprop_reference(options, scalars, parameter, gradient, state, index=index)


def recording(optimizer):
    recorder = Recorder()
    optimizer._update = recorder
    optimizer._step_functions.clear()
    return recorder


def test_each_update_is_told_its_storage_flags_position_and_the_steps_key():
    optimizer = RMSprop(
        0.01,
        momentum=0.9,
        state_bits=8,
        state_block_size=64,
        min_quantized_size=100,
        stochastic_rounding=True,
        rounding_seed=1234,
        fused=False,
    )
    recorder = recording(optimizer)
    rng = np.random.default_rng(0)
    shapes = {
        "big_bf16": ((10, 20), mx.bfloat16),  # 8-bit, rounds its parameter
        "big_f32": ((10, 20), mx.float32),  # 8-bit, nothing to round
        "small_f16": ((5,), mx.float16),  # float state, rounds its parameter
        "small_f32": ((5,), mx.float32),  # float state, nothing to round
        "big_f64": ((10, 20), mx.float64),  # float64: never 8-bit, never rounded
    }
    params = {k: mx.array(rng.standard_normal(s), d) for k, (s, d) in shapes.items()}
    for step in (1, 2):
        grads = {k: mx.array(rng.standard_normal(s), d) for k, (s, d) in shapes.items()}
        params = optimizer.apply_gradients(grads, params)
        key = spec.rounding_step_key(1234, step)
        expected = [(True, True, key), (True, False, 0), (False, True, key), (False, False, 0)]
        expected.append((False, False, 0))
        calls = recorder.calls[-len(shapes) :]
        for index, ((options, got_key, got_index), (quantized, rounds, wanted_key)) in enumerate(
            zip(calls, expected, strict=True)
        ):
            assert got_index == index
            assert options.quantized_state is quantized, index
            assert options.block_size == (64 if quantized else 0)
            assert options.stochastic_rounding is rounds, index
            assert got_key == wanted_key, index
    assert set(optimizer.state["big_bf16"]) == {
        "v",
        "v_scale",
        "momentum_buffer",
        "momentum_buffer_scale",
    }
    assert set(optimizer.state["small_f16"]) == {"v", "momentum_buffer"}


def test_the_rounding_key_counts_applied_updates_under_accumulation():
    optimizer = RMSprop(
        0.01,
        gradient_accumulation_steps=2,
        stochastic_rounding=True,
        rounding_seed=5,
        fused=False,
    )
    recorder = recording(optimizer)
    params = {"w": mx.ones((3,), mx.bfloat16)}
    for _ in range(4):
        params = optimizer.apply_gradients({"w": mx.full((3,), 0.5, mx.bfloat16)}, params)
    # Calls 1..4 complete updates 0, 1, 1, 2: the key follows the bias correction's t.
    keys = [key for _, key, _ in recorder.calls]
    assert keys == [spec.rounding_step_key(5, t) for t in (0, 1, 1, 2)]


def test_without_stochastic_rounding_the_key_stays_zero_and_apply_single_is_index_0():
    optimizer = RMSprop(0.01, state_bits=8, min_quantized_size=0, fused=False)
    recorder = recording(optimizer)
    optimizer.apply_gradients(
        {"a": mx.ones((3,)), "b": mx.ones((2,))}, {"a": mx.ones((3,)), "b": mx.ones((2,))}
    )
    assert [(key, index) for _, key, index in recorder.calls] == [(0, 0), (0, 1)]
    state = {}
    optimizer.apply_single(mx.ones((4,)), mx.ones((4,)), state)
    assert recorder.calls[-1][2] == 0
    assert set(state) == {"v", "v_scale"}


def test_a_path_without_index_hands_storage_parameters_to_the_reference():
    from mlx_rmsprop import paths

    calls = []

    def legacy(options, scalars, parameter, gradient, state):
        calls.append(options)
        return rmsprop_reference(options, scalars, parameter, gradient, state)

    wrapped = paths._with_storage(legacy)
    assert paths._with_storage(rmsprop_reference) is rmsprop_reference  # takes index already
    optimizer = RMSprop(
        0.01, state_bits=8, min_quantized_size=10, stochastic_rounding=True, fused=False
    )
    optimizer._update = wrapped
    optimizer._step_functions.clear()
    expected = RMSprop(
        0.01, state_bits=8, min_quantized_size=10, stochastic_rounding=True, fused=False
    )
    tree = {
        "big": mx.linspace(-1, 1, 12).reshape(3, 4).astype(mx.bfloat16),
        "small": mx.ones((3,)),
        "half": mx.ones((3,), mx.float16),
    }
    grads = {k: mx.full(v.shape, 0.3, v.dtype) for k, v in tree.items()}
    got = optimizer.apply_gradients(grads, tree)
    want = expected.apply_gradients(grads, tree)
    for key in tree:
        assert mx.array_equal(got[key], want[key]).item(), key
    # Only the parameter with neither 8-bit state nor stochastic rounding reached the path.
    assert len(calls) == 1 and not calls[0].quantized_state and not calls[0].stochastic_rounding


# --- a step compiled in chunks (step.COMPILE_CHUNK) ---

CHUNK_CONFIGURATIONS = {
    "plain": {},
    "full": {
        "use_ema": True,
        "skip_nonfinite": True,
        "clipnorm": 0.5,
        "gradient_accumulation_steps": 2,
    },
    "global": {"global_clipnorm": 0.5, "gradient_accumulation_steps": 3, "loss_scale_factor": 4.0},
    # Accumulation that no statistics read: the head takes no per-parameter input.
    "accumulation": {"gradient_accumulation_steps": 2, "loss_scale_factor": 4.0, "use_ema": True},
    "storage": {
        "momentum": 0.9,
        "state_bits": 8,
        "state_block_size": 32,
        "min_quantized_size": 64,
        "stochastic_rounding": True,
        "skip_nonfinite": True,
    },
}
# Seven parameters: with chunks of 3 the step compiles a head and functions for [0, 3), [3, 6)
# and [6, 7).
CHUNK_SHAPES = [(3,), (4, 5), (64,), (2, 3, 4), (), (96,), (17,)]


def chunk_run(monkeypatch, chunk: int, fused, configuration: str, float64_from: int | None):
    """Parameters and state after 6 steps (a NaN gradient at the fourth); from step
    ``float64_from`` on, parameter 4 and its gradient are float64 (the tree leaves the native
    pipeline, and the head's scalars vectors change). ``fused="kernel"``: the compiled path
    with the kernel paths' accumulating update (their reference, on the CPU)."""
    from mlx_rmsprop import paths, step
    from mlx_rmsprop.paths.kernels.launch import accumulating_reference

    monkeypatch.setattr(step, "COMPILE_CHUNK", chunk)
    if fused == "kernel":
        monkeypatch.setattr(paths, "resolve_accumulating", lambda *_: accumulating_reference)
        fused = "compiled"
    rng = np.random.default_rng(7)
    dtypes = [mx.float32, mx.bfloat16, mx.float32, mx.float16, mx.float32, mx.bfloat16, mx.float32]
    params = {
        f"p{i}": mx.array(rng.standard_normal(shape), dtype)
        for i, (shape, dtype) in enumerate(zip(CHUNK_SHAPES, dtypes, strict=True))
    }
    optimizer = RMSprop.from_keras(
        learning_rate=0.05, fused=fused, **CHUNK_CONFIGURATIONS[configuration]
    )
    for number in range(6):
        grads = {
            name: mx.array(rng.standard_normal(p.shape), p.dtype) for name, p in params.items()
        }
        if number == 3:
            grads["p2"] = mx.full((64,), float("nan"))
        if float64_from is not None and number >= float64_from:
            params["p4"] = params["p4"].astype(mx.float64)
            grads["p4"] = grads["p4"].astype(mx.float64)
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
    return dict(tree_flatten((params, optimizer.state)))


@pytest.mark.parametrize("float64_from", [None, 0, 2], ids=["float32", "float64", "to_float64"])
@pytest.mark.parametrize("configuration", CHUNK_CONFIGURATIONS)
@pytest.mark.parametrize("fused", [native_path(), "compiled", "kernel"])
def test_a_step_compiled_in_chunks_equals_one_compiled_step(
    monkeypatch, fused, configuration, float64_from
):
    whole = chunk_run(monkeypatch, 1024, fused, configuration, float64_from)
    chunked = chunk_run(monkeypatch, 3, fused, configuration, float64_from)
    assert chunked.keys() == whole.keys()
    for key, expected in whole.items():
        assert chunked[key].dtype == expected.dtype, key
        assert mx.array_equal(chunked[key], expected, equal_nan=True).item(), key


@pytest.mark.parametrize("fused", [native_path(), "compiled"])
def test_a_chunk_is_traced_again_only_when_its_own_parameters_change(monkeypatch, fused):
    # The optimizer learns that trees changed from the updates traced (each traced update is
    # counted): a dtype change in parameter 4 traces its chunk, [3, 6), and no other.
    from mlx_rmsprop import step

    monkeypatch.setattr(step, "COMPILE_CHUNK", 3)
    params = {f"p{i}": mx.zeros(shape) for i, shape in enumerate(CHUNK_SHAPES)}
    grads = {name: mx.full(p.shape, 0.5) for name, p in params.items()}
    optimizer = RMSprop.from_keras(learning_rate=0.1, fused=fused, **CHUNK_CONFIGURATIONS["full"])
    params = optimizer.apply_gradients(grads, params)
    mx.eval(params, optimizer.state)
    assert optimizer._traces[0] == len(CHUNK_SHAPES)
    params = optimizer.apply_gradients(grads, params)
    mx.eval(params, optimizer.state)
    assert optimizer._traces[0] == len(CHUNK_SHAPES)
    params["p4"] = params["p4"].astype(mx.bfloat16)
    grads["p4"] = grads["p4"].astype(mx.bfloat16)
    params = optimizer.apply_gradients(grads, params)
    mx.eval(params, optimizer.state)
    assert optimizer._traces[0] == len(CHUNK_SHAPES) + 3
    assert params["p4"].dtype == mx.bfloat16
