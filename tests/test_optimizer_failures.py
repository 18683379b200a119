"""Non-finite gradients, numeric edges and hostile inputs: what each does, on every path, and
that nothing here corrupts the parameters or state it was called on."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop
from mlx_rmsprop.paths import availability

PATHS = [False] + [n for n, reason in availability().items() if reason is None and n != "reference"]


def snapshot(tree):
    return {
        k: np.array(v.astype(mx.float32)) if v.dtype == mx.bfloat16 else np.array(v)
        for k, v in tree_flatten(tree)
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def model():
    rng = np.random.default_rng(0)
    return {
        "w": mx.array(rng.standard_normal((4, 3)), mx.float32),
        "b": mx.array(rng.standard_normal(3), mx.float32),
    }


def grads(seed=1, poison=None):
    rng = np.random.default_rng(seed)
    g = {
        "w": mx.array(rng.standard_normal((4, 3)), mx.float32),
        "b": mx.array(rng.standard_normal(3), mx.float32),
    }
    if poison is not None:
        g["b"] = mx.array([1.0, poison, 2.0])
    return g


@pytest.mark.parametrize("fused", PATHS, ids=lambda f: f"fused={f}")
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_skip_nonfinite_leaves_everything_and_counts(poison, fused):
    optimizer = RMSprop(
        0.05, momentum=0.9, centered=True, use_ema=True, skip_nonfinite=True, fused=fused
    )
    params = optimizer.apply_gradients(grads(1), model())
    mx.eval(params, optimizer.state)
    before_params, before_state = snapshot(params), snapshot(optimizer.state)
    after = optimizer.apply_gradients(grads(2, poison), params)
    mx.eval(after, optimizer.state)
    assert_same(snapshot(after), before_params)
    state = snapshot(optimizer.state)
    assert state.pop("skipped_steps") == 1
    before_state.pop("skipped_steps")
    assert_same(state, before_state)  # the step counter included: the call did not happen
    resumed = optimizer.apply_gradients(grads(3), after)
    mx.eval(resumed, optimizer.state)
    assert optimizer.step.item() == 2 and optimizer.skipped_steps.item() == 1


def test_skip_nonfinite_inside_a_compiled_step_matches_eager():
    config = dict(learning_rate=0.05, momentum=0.9, skip_nonfinite=True)
    eager, traced = RMSprop(**config), RMSprop(**config)
    traced.init(model())
    step = mx.compile(
        lambda g, p: traced.apply_gradients(g, p), inputs=traced.state, outputs=traced.state
    )
    p_eager = p_traced = model()
    for i, poison in enumerate([None, np.nan, None, np.inf, None]):
        p_eager = eager.apply_gradients(grads(i, poison), p_eager)
        p_traced = step(grads(i, poison), p_traced)
        mx.eval(p_eager, p_traced, eager.state, traced.state)
    assert traced.skipped_steps.item() == 2
    assert_same(snapshot(p_traced), snapshot(p_eager))
    assert_same(snapshot(traced.state), snapshot(eager.state))


def test_without_skip_nan_propagates_as_in_every_framework():
    params = RMSprop(0.05).apply_gradients(grads(2, np.nan), model())
    assert np.isnan(np.array(params["b"])[1])
    assert np.isfinite(np.array(params["w"])).all()


def run_all_paths(config, parameters, gradient_sequence):
    results = {}
    for fused in PATHS:
        optimizer = RMSprop(fused=fused, **config)
        params = parameters
        for g in gradient_sequence:
            params = optimizer.apply_gradients(g, params)
        mx.eval(params, optimizer.state)
        results[fused] = (snapshot(params), snapshot(optimizer.state))
    first = results[PATHS[0]]
    for fused, result in results.items():
        for got, expected in zip(result, first, strict=True):
            assert got.keys() == expected.keys()
            for key in got:
                np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{fused} {key}")
    return first


def test_learning_rate_zero_changes_parameters_not_state():
    params, state = run_all_paths(
        {"learning_rate": 0.0, "momentum": 0.9}, model(), [grads(1), grads(2)]
    )
    assert_same(params, snapshot(model()))
    assert (state["w.v"] > 0).all() and (state["w.momentum_buffer"] != 0).any()


def test_huge_float32_gradient_saturates_v_and_freezes_the_parameter():
    # (1e30)^2 overflows float32: v becomes inf, the step g / (sqrt(inf) + eps) is 0, and v stays
    # inf (alpha * inf), so this parameter no longer moves. PyTorch and MLX do the same; every
    # path here agrees.
    start = {"w": mx.array([1.0, 2.0])}
    huge = {"w": mx.array([1e30, 1.0])}
    params, state = run_all_paths(
        {"learning_rate": 0.1}, start, [huge, {"w": mx.array([1.0, 1.0])}]
    )
    assert np.isinf(state["w.v"][0]) and np.isfinite(state["w.v"][1])
    assert params["w"][0] == 1.0 and params["w"][1] < 2.0
    # Centered: gbar^2 overflows too and inf - inf is NaN (as in PyTorch).
    params, state = run_all_paths({"learning_rate": 0.1, "centered": True}, start, [huge])
    assert np.isnan(params["w"][0]) and np.isfinite(params["w"][1])


def test_float16_gradients_below_1e_4_still_move_the_parameter():
    # Squared in float16, 5e-5 underflows to 0; our arithmetic is float32.
    start = {"w": mx.array([1.0, 1.0], mx.float16)}
    tiny = {"w": mx.array([5e-5, -5e-5], mx.float16)}
    params, state = run_all_paths({"learning_rate": 1e-2}, start, [tiny] * 3)
    assert state["w.v"].dtype == np.float32 and (state["w.v"] > 0).all()
    assert params["w"][0] < 1.0 < params["w"][1]


def constant_gradient_rounding_negative():
    """A constant float32 gradient for which v - gbar^2 rounds below 0 after some steps."""
    for value in np.linspace(0.1, 10.0, 400, dtype=np.float32):
        v = gbar = np.float32(0)
        a, b = np.float32(0.5), np.float32(0.5)
        for step in range(100):
            v = a * v + b * (value * value)
            gbar = a * gbar + b * value
            if v - gbar * gbar < 0:
                return float(value), step + 1
    raise AssertionError("no such gradient found")


def test_centered_variance_that_rounds_negative_is_clamped_at_zero():
    value, steps = constant_gradient_rounding_negative()
    config = {"learning_rate": 1e-3, "alpha": 0.5, "centered": True}
    start = {"w": mx.array([0.0])}
    params, _ = run_all_paths(config, start, [{"w": mx.array([value])}] * steps)
    # PyTorch's formula (sqrt of the negative value, eps outside) gives NaN here.
    assert np.isfinite(params["w"]).all()


# The hostile-input table: each case, what it does to an optimizer that has already taken a
# step, and the exact error (or the result it must give).
def _complex_param():
    return {"w": mx.array([1 + 1j, 2 + 0j])}, {"w": mx.array([1 + 0j, 1 + 0j])}


def schedule_returning(value):
    return lambda step: mx.where(step >= 1, mx.array(value), mx.array(0.1))


HOSTILE = [
    (
        "gradient with an extra key",
        lambda o, p: o.apply_gradients({**grads(), "x": mx.ones(1)}, p),
        ValueError,
        "gradient 'x' has no matching parameter",
    ),
    (
        "gradient of another shape",
        lambda o, p: o.apply_gradients({"w": mx.ones((3, 4)), "b": mx.ones(3)}, p),
        ValueError,
        "gradient 'w' has shape (3, 4) but its parameter has shape (4, 3)",
    ),
    (
        "integer parameter",
        lambda o, p: o.apply_gradients({"w": mx.ones((2,))}, {"w": mx.ones((2,), mx.int32)}),
        TypeError,
        "parameter 'w' has dtype mlx.core.int32; RMSprop updates real floating arrays only",
    ),
    (
        "bool parameter",
        lambda o, p: o.apply_gradients({"w": mx.ones((2,))}, {"w": mx.ones((2,), mx.bool_)}),
        TypeError,
        "parameter 'w' has dtype mlx.core.bool; RMSprop updates real floating arrays only",
    ),
    (
        "complex parameter",
        lambda o, p: o.apply_gradients(*reversed(_complex_param())),
        TypeError,
        "parameter 'w' has dtype mlx.core.complex64; RMSprop updates real floating arrays only",
    ),
    (
        "gradient is a numpy array",
        lambda o, p: o.apply_gradients({"w": np.ones((4, 3)), "b": mx.ones(3)}, p),
        TypeError,
        "gradient 'w' must be an mx.array, got ndarray",
    ),
    (
        "schedule returns NaN",
        None,
        ValueError,
        "the learning_rate schedule returned nan at step 1; a learning rate must be finite and >= 0 (nothing was changed)",
    ),
    (
        "schedule returns a negative value",
        None,
        ValueError,
        "the learning_rate schedule returned -0.5 at step 1; a learning rate must be finite and >= 0 (nothing was changed)",
    ),
    (
        "learning rate set to a string",
        lambda o, p: setattr(o, "learning_rate", "fast"),
        ValueError,
        "learning_rate must be a number, a schedule (callable of the step) or a scalar floating mx.array, got 'fast'",
    ),
    (
        "state assigned from another model",
        lambda o, p: (
            setattr(
                o, "state", {**o.state, "w": {"v": mx.ones((2,)), "momentum_buffer": mx.ones((2,))}}
            ),
            o.apply_gradients(grads(), p),
        ),
        ValueError,
        "optimizer state 'w.v' has shape (2,) but its parameter has shape (4, 3): it belongs to another model",
    ),
]


@pytest.mark.parametrize("name, call, error, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_refused_and_corrupts_nothing(name, call, error, message):
    if call is None:
        bad = float("nan") if "NaN" in name else -0.5
        optimizer = RMSprop(schedule_returning(bad), momentum=0.9)
        call = lambda o, p: o.apply_gradients(grads(), p)  # noqa: E731
    else:
        optimizer = RMSprop(0.1, momentum=0.9)
    params = optimizer.apply_gradients(grads(), model())
    mx.eval(params, optimizer.state)
    before_params, before_state = snapshot(params), snapshot(optimizer.state)
    state_object = optimizer.state
    with pytest.raises(error, match="^" + re.escape(message)):
        call(optimizer, params)
    assert_same(snapshot(params), before_params)
    if name != "state assigned from another model":
        assert optimizer.state is state_object
        assert_same(snapshot(optimizer.state), before_state)


@pytest.mark.parametrize("fused", PATHS, ids=lambda f: f"fused={f}")
def test_invalid_schedule_value_inside_compile_skips_the_step(fused):
    # Inside mx.compile nothing can raise: the update is skipped in the graph instead.
    optimizer = RMSprop(
        lambda step: mx.where(step == 1, mx.array(float("nan")), mx.array(0.1)),
        momentum=0.9,
        fused=fused,
    )
    params = model()
    optimizer.init(params)
    step = mx.compile(
        lambda g, p: optimizer.apply_gradients(g, p),
        inputs=optimizer.state,
        outputs=optimizer.state,
    )
    params = step(grads(1), params)
    mx.eval(params, optimizer.state)
    before_params, before_state = snapshot(params), snapshot(optimizer.state)
    after = step(grads(2), params)  # the schedule returns NaN at step 1
    mx.eval(after, optimizer.state)
    assert_same(snapshot(after), before_params)
    state = snapshot(optimizer.state)
    assert state.pop("step") == 2 and before_state.pop("step") == 1
    state.pop("learning_rate"), before_state.pop("learning_rate")
    assert_same(state, before_state)


ACCEPTED = [
    ("gradient subset of the parameters", {"w": mx.ones((4, 3))}, None),
    (
        "bfloat16 gradient for float32 parameters",
        {"w": mx.ones((4, 3), mx.bfloat16), "b": mx.ones(3, mx.bfloat16)},
        None,
    ),
    (
        "broadcast-view gradient",
        {"w": mx.broadcast_to(mx.ones((1, 3)), (4, 3)), "b": mx.ones(3)},
        None,
    ),
    ("non-contiguous gradient", {"w": mx.ones((3, 4)).T, "b": mx.ones(6)[::2]}, None),
]


@pytest.mark.parametrize("name, gradient, _", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_awkward_but_valid_inputs_give_the_contiguous_result(name, gradient, _):
    contiguous = {k: mx.array(np.array(v.astype(mx.float32))) for k, v in gradient.items()}
    got = RMSprop(0.1).apply_gradients(gradient, model())
    expected = RMSprop(0.1).apply_gradients(contiguous, model())
    assert got.keys() == gradient.keys()
    for key in got:
        assert got[key].dtype == mx.float32
        np.testing.assert_array_equal(np.array(got[key]), np.array(expected[key]))


def test_zero_dimensional_and_empty_parameters():
    params = {"s": mx.array(2.0), "e": mx.zeros((0, 5))}
    new = RMSprop(0.1).apply_gradients({"s": mx.array(1.0), "e": mx.zeros((0, 5))}, params)
    assert new["s"].shape == () and new["s"].item() < 2.0 and new["e"].shape == (0, 5)


# Finite gradients whose squared norm overflows float32: 2^20 entries of 2e16 have the norm
# 2e16 * 2^10 = 2.048e19, but their squares sum to inf.
OVERFLOWING = 2e16
HUGE_SIZE = 2**20


@pytest.mark.parametrize("fused", PATHS, ids=lambda f: f"fused={f}")
@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm"])
def test_norm_of_finite_gradients_whose_squares_overflow_clips_them(clip, fused):
    optimizer = RMSprop(0.1, momentum=0.9, skip_nonfinite=True, fused=fused, **{clip: 1.0})
    params = {"w": mx.zeros((HUGE_SIZE,)), "b": mx.zeros((3,))}
    gradient = {"w": mx.full((HUGE_SIZE,), OVERFLOWING), "b": mx.array([1e-3, 0.0, -1e-3])}
    out = optimizer.apply_gradients(gradient, params)
    mx.eval(out, optimizer.state)
    # The same step given the gradients clipped in float64.
    norm = OVERFLOWING * 2**10
    if clip == "global_clipnorm":
        norm = np.sqrt(norm**2 + 2e-6)
        clipped = {k: np.array(v, np.float64) / norm for k, v in gradient.items()}
    else:
        clipped = {"w": np.array(gradient["w"], np.float64) / norm, "b": np.array(gradient["b"])}
    plain = RMSprop(0.1, momentum=0.9, fused=fused)
    expected = plain.apply_gradients(
        {k: mx.array(v, mx.float32) for k, v in clipped.items()}, params
    )
    mx.eval(expected, plain.state)
    assert optimizer.skipped_steps.item() == 0 and optimizer.step.item() == 1
    for key in ("w", "b"):
        got, want = np.array(out[key]), np.array(expected[key])
        assert np.isfinite(got).all() and np.isfinite(np.array(optimizer.state[key]["v"])).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(
            np.array(optimizer.state[key]["v"]), np.array(plain.state[key]["v"]), rtol=1e-5
        )


@pytest.mark.parametrize("fused", PATHS, ids=lambda f: f"fused={f}")
@pytest.mark.parametrize(
    "config, gradient",
    [
        # 1e10 / 1e-30 = 1e40: inf once the loss scale is divided out.
        ({"loss_scale_factor": 1e-30}, 1e10),
        ({"loss_scale_factor": 1e-30, "clipnorm": 1.0}, 1e10),
        ({"loss_scale_factor": 1e-30, "global_clipnorm": 1.0}, 1e10),
        # The accumulated sum overflows (each call's gradient is finite).
        ({"gradient_accumulation_steps": 2}, 3e38),
    ],
    ids=["loss_scale", "loss_scale+clipnorm", "loss_scale+global_clipnorm", "accumulation"],
)
def test_skip_nonfinite_covers_values_that_overflow_inside_the_step(config, gradient, fused):
    optimizer = RMSprop(0.05, momentum=0.9, skip_nonfinite=True, fused=fused, **config)
    params = model()
    optimizer.init(params)
    first = {k: mx.full(v.shape, gradient) for k, v in params.items()}
    if "gradient_accumulation_steps" in config:
        params = optimizer.apply_gradients(first, params)  # accumulated: 3e38 each
        mx.eval(params, optimizer.state)
    before_params, before_state = snapshot(params), snapshot(optimizer.state)
    after = optimizer.apply_gradients(first, params)
    mx.eval(after, optimizer.state)
    assert_same(snapshot(after), before_params)
    state = snapshot(optimizer.state)
    assert state.pop("skipped_steps") == 1
    before_state.pop("skipped_steps")
    assert_same(state, before_state)
