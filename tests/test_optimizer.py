"""The checks MLX's own test suite makes of every optimizer, plus drop-in parity with
``mlx.optimizers.RMSprop``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_rmsprop import RMSprop

PATHS = [False, "compiled"]


def model_params(dtype=mx.float32, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w": (4, 3), "b": (3,), "scalar": (), "empty": (0, 2), "odd": (7, 5, 3)}
    tree = {k: mx.array(rng.standard_normal(s), dtype=dtype) for k, s in shapes.items()}
    tree["layers"] = [{"kernel": mx.array(rng.standard_normal((2, 5)), dtype=dtype)}]
    return tree


def random_like(tree, rng, scale=1.0):
    return tree_map(lambda a: mx.array(scale * rng.standard_normal(a.shape), dtype=a.dtype), tree)


def assert_trees_equal(a, b):
    flat_a, flat_b = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert sorted(flat_a) == sorted(flat_b)
    for key, x in flat_a.items():
        y = flat_b[key]
        assert x.dtype == y.dtype, key
        assert np.array_equal(np.array(x), np.array(y), equal_nan=True), key


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.01},
        {"learning_rate": 0.1, "alpha": 0.9, "eps": 1e-6},
        {"learning_rate": 1e-3, "alpha": 0.0},
        {"learning_rate": 0.5, "alpha": 1.0},
    ],
)
def test_default_configuration_is_builtin_bit_for_bit(kwargs, fused):
    ours, builtin = RMSprop(**kwargs, fused=fused), optim.RMSprop(**kwargs)
    params_ours = params_builtin = model_params()
    rng = np.random.default_rng(1)
    for step in range(25):
        # Includes a zero gradient and a x1e3 spike.
        scale = 0.0 if step == 3 else 1e3 if step == 7 else 1.0
        grads = random_like(params_ours, rng, scale)
        params_ours = ours.apply_gradients(grads, params_ours)
        params_builtin = builtin.apply_gradients(grads, params_builtin)
        mx.eval(params_ours, params_builtin, ours.state, builtin.state)
    assert_trees_equal(params_ours, params_builtin)
    assert_trees_equal(ours.state, builtin.state)


def test_schedule_is_builtin_bit_for_bit():
    schedule = optim.cosine_decay(0.1, 30)
    ours, builtin = RMSprop(schedule), optim.RMSprop(schedule)
    params_ours = params_builtin = model_params()
    rng = np.random.default_rng(2)
    for _ in range(30):
        grads = random_like(params_ours, rng)
        params_ours = ours.apply_gradients(grads, params_ours)
        params_builtin = builtin.apply_gradients(grads, params_builtin)
    mx.eval(params_ours, params_builtin)
    assert_trees_equal(params_ours, params_builtin)
    assert ours.learning_rate.item() == builtin.learning_rate.item()


def test_positional_learning_rate_alpha_eps():
    optimizer = RMSprop(0.1, 0.9, 1e-6)
    assert (optimizer.learning_rate.item(), optimizer.alpha, optimizer.eps) == (
        pytest.approx(0.1),
        0.9,
        1e-6,
    )
    with pytest.raises(TypeError):
        RMSprop(0.1, 0.9, 1e-6, 0.9)  # momentum and the rest are keyword-only


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("fused", PATHS)
def test_low_precision_parameters_keep_their_dtype_with_float32_state(dtype, fused):
    optimizer = RMSprop(0.01, momentum=0.9, centered=True, fused=fused)
    params = model_params(dtype)
    grads = random_like(params, np.random.default_rng(3))
    new = optimizer.apply_gradients(grads, params)
    for (key, value), (_, before) in zip(tree_flatten(new), tree_flatten(params), strict=True):
        assert value.dtype == dtype, key
        assert value.shape == before.shape, key
    for key, value in tree_flatten(optimizer.state):
        if key not in ("step", "learning_rate"):
            assert value.dtype == mx.float32, key


def test_state_dtype_is_honoured_and_float64_keeps_float64():
    half_state = RMSprop(0.01, momentum=0.5, state_dtype=mx.bfloat16)
    half_state.init({"w": mx.zeros((3,), mx.float32)})
    assert half_state.state["w"]["v"].dtype == mx.bfloat16
    assert half_state.state["w"]["momentum_buffer"].dtype == mx.bfloat16
    double = RMSprop(0.01)
    double.init({"w": mx.zeros((3,), mx.float64)})
    assert double.state["w"]["v"].dtype == mx.float64


@pytest.mark.parametrize("fused", PATHS)
def test_float16_zero_gradient_stays_finite_where_builtin_gives_nan(fused):
    params = {"w": mx.array([1.0, -2.0], mx.float16)}
    grads = {"w": mx.zeros((2,), mx.float16)}
    builtin = optim.RMSprop(0.01).apply_gradients(grads, params)
    assert np.isnan(np.array(builtin["w"])).all()  # eps=1e-8 is 0 in float16: 0/0
    ours = RMSprop(0.01, fused=fused).apply_gradients(grads, params)
    assert np.array_equal(np.array(ours["w"]), np.array(params["w"]))


def test_float16_tiny_gradients_do_not_underflow():
    # 1e-5 squared underflows to 0 in float16; our arithmetic is float32.
    params = {"w": mx.array([1.0], mx.float16)}
    optimizer = RMSprop(1e-3)
    new = optimizer.apply_gradients({"w": mx.array([1e-5], mx.float16)}, params)
    assert optimizer.state["w"]["v"].item() > 0
    assert new["w"].item() < 1.0


@pytest.mark.parametrize(
    "kwargs, keys",
    [
        ({}, {"v"}),
        ({"centered": True}, {"v", "grad_avg"}),
        ({"momentum": 0.9}, {"v", "momentum_buffer"}),
        ({"centered": True, "momentum": 0.9}, {"v", "grad_avg", "momentum_buffer"}),
    ],
)
def test_state_initialisation(kwargs, keys):
    optimizer = RMSprop(0.1, initial_accumulator_value=0.25, **kwargs)
    params = {"a": mx.zeros((2, 3)), "b": [mx.zeros((4,))]}
    optimizer.init(params)
    assert set(optimizer.state) == {"step", "learning_rate", "a", "b"}
    assert optimizer.state["step"].item() == 0 and optimizer.state["step"].dtype == mx.uint64
    for path, state in (("a", optimizer.state["a"]), ("b", optimizer.state["b"][0])):
        assert set(state) == keys, path
        assert np.all(np.array(state["v"]) == 0.25)
        for key in keys - {"v"}:
            assert np.all(np.array(state[key]) == 0)


def test_schedule_uses_the_pre_increment_step():
    optimizer = RMSprop(lambda step: 0.1 * (step + 1))
    params = {"w": mx.zeros((2,))}
    for expected_step in range(1, 4):
        params = optimizer.apply_gradients({"w": mx.ones((2,))}, params)
        assert optimizer.step.item() == expected_step
        assert optimizer.learning_rate.item() == pytest.approx(0.1 * expected_step)


@pytest.mark.parametrize("fused", PATHS)
def test_compiled_training_step_sees_learning_rate_changes(fused):
    model_a, model_b = nn.Linear(3, 2), nn.Linear(3, 2)
    model_b.update(model_a.parameters())
    x, y = mx.random.normal((8, 3)), mx.random.normal((8, 2))

    def loss_fn(model):
        return nn.losses.mse_loss(model(x), y)

    opt_a = RMSprop(0.1, momentum=0.9, fused=fused)
    opt_b = RMSprop(0.1, momentum=0.9, fused=fused)
    state = [model_a.state, opt_a.state]

    def step(model, optimizer):
        loss, grads = nn.value_and_grad(model, loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    compiled = mx.compile(lambda: step(model_a, opt_a), inputs=state, outputs=state)
    for lr in (0.1, 0.05, 0.01, 0.3):
        opt_a.learning_rate = lr
        opt_b.learning_rate = lr
        compiled()
        step(model_b, opt_b)
        mx.eval(state, model_b.state, opt_b.state)
    assert_trees_equal(model_a.parameters(), model_b.parameters())
    assert_trees_equal(opt_a.state, opt_b.state)


def run_steps(optimizer, params, grads_list):
    for grads in grads_list:
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
    return params


def test_state_save_load_continues_identically(tmp_path):
    rng = np.random.default_rng(4)
    params = model_params()
    grads = [random_like(params, rng) for _ in range(10)]
    config = {"learning_rate": 0.01, "momentum": 0.9, "centered": True}

    straight = RMSprop(**config)
    expected = run_steps(straight, params, grads)

    first = RMSprop(**config)
    half = run_steps(first, params, grads[:5])
    mx.save_safetensors(str(tmp_path / "opt.safetensors"), dict(tree_flatten(first.state)))
    resumed = RMSprop(**config)
    resumed.state = tree_unflatten(list(mx.load(str(tmp_path / "opt.safetensors")).items()))
    assert_trees_equal(run_steps(resumed, half, grads[5:]), expected)
    assert_trees_equal(resumed.state, straight.state)


def test_builtin_state_loads_into_ours(tmp_path):
    rng = np.random.default_rng(5)
    params = {"w": mx.array(rng.standard_normal((5, 4)), mx.float32), "b": mx.zeros((4,))}
    grads = [random_like(params, rng) for _ in range(8)]
    builtin = optim.RMSprop(0.01)
    half = run_steps(builtin, params, grads[:4])
    mx.save_safetensors(str(tmp_path / "builtin.safetensors"), dict(tree_flatten(builtin.state)))
    expected = run_steps(builtin, half, grads[4:])

    ours = RMSprop(0.01)
    ours.state = tree_unflatten(list(mx.load(str(tmp_path / "builtin.safetensors")).items()))
    assert_trees_equal(run_steps(ours, half, grads[4:]), expected)


@pytest.mark.parametrize("fused", PATHS)
def test_minimises_a_small_problem(fused):
    mx.random.seed(0)
    x = mx.random.normal((64, 4))
    true_w = mx.array([[1.0], [-2.0], [0.5], [3.0]])
    y = x @ true_w
    model = nn.Linear(4, 1)
    optimizer = RMSprop(0.01, fused=fused)

    def loss_fn(model):
        return nn.losses.mse_loss(model(x), y)

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    first = loss_fn(model).item()
    for _ in range(400):
        loss, grads = loss_and_grad(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    assert loss.item() < 1e-3 * first


def test_apply_single_is_the_per_parameter_contract():
    optimizer = RMSprop(0.01, momentum=0.9)
    optimizer.init({"w": mx.zeros((3,))})
    state = {}
    parameter, gradient = mx.array([1.0, 2.0, 3.0]), mx.array([0.5, -0.5, 1.0])
    new = optimizer.apply_single(gradient, parameter, state)
    assert set(state) == {"v", "momentum_buffer"}
    tree_result = RMSprop(0.01, momentum=0.9).apply_gradients({"w": gradient}, {"w": parameter})
    assert np.array_equal(np.array(new), np.array(tree_result["w"]))
