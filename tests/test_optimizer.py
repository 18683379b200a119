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

from native_available import native_path

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
        if x.dtype == mx.bfloat16:  # NumPy has no bfloat16: compare the bits
            x, y = x.view(mx.uint16), y.view(mx.uint16)
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


# --- 8-bit state and stochastic rounding under MLX's optimizer contract (issue 17) -----------

EIGHT_BIT = {
    "learning_rate": 0.01,
    "momentum": 0.9,
    "centered": True,
    "state_bits": 8,
    "state_block_size": 32,
    "min_quantized_size": 10,
    "stochastic_rounding": True,
    "rounding_seed": 77,
}
STORAGE_PATHS = [False, "compiled", native_path()]


def storage_params(seed=0):
    """A tree that mixes every case: 8-bit bfloat16 and float32 parameters (several blocks,
    a partial last block), float state below the threshold, float64, 0-d and empty."""
    tree = model_params(mx.bfloat16, seed)  # w, odd, layers.0.kernel: 8-bit; b, scalar: float
    rng = np.random.default_rng(seed + 100)
    tree["f32"] = mx.array(rng.standard_normal((9, 7)), mx.float32)
    tree["f64"] = mx.array(rng.standard_normal((6, 5)), mx.float64)
    return tree


def storage_run(optimizer, steps=6, seed=1, params=None):
    params = params if params is not None else storage_params()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        params = optimizer.apply_gradients(random_like(params, rng), params)
        mx.eval(params, optimizer.state)
    return params


@pytest.mark.parametrize("fused", STORAGE_PATHS[1:], ids=lambda f: f"fused={f}")
def test_8_bit_state_and_stochastic_rounding_agree_bit_for_bit_on_every_path(fused):
    expected_optimizer = RMSprop(**EIGHT_BIT, fused=False)
    expected = storage_run(expected_optimizer)
    optimizer = RMSprop(**EIGHT_BIT, fused=fused)
    assert_trees_equal(storage_run(optimizer), expected)
    assert_trees_equal(optimizer.state, expected_optimizer.state)
    # The native path keeps running the parameters without storage flags itself.
    assert optimizer.path == (fused if fused else "reference")
    state = optimizer.state
    assert state["w"]["v"].dtype == mx.uint8 and state["b"]["v"].dtype == mx.float32
    assert state["f64"]["v"].dtype == mx.float64
    assert state["empty"]["v"].dtype == mx.float32  # 0 elements: below the threshold


def test_stochastic_rounding_changes_nothing_for_float32_parameters_and_state():
    params = model_params()
    rounding = RMSprop(0.01, momentum=0.9, stochastic_rounding=True, rounding_seed=3)
    plain = RMSprop(0.01, momentum=0.9)
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    params_a = params_b = params
    for _ in range(5):
        params_a = rounding.apply_gradients(random_like(params_a, rng_a), params_a)
        params_b = plain.apply_gradients(random_like(params_b, rng_b), params_b)
    assert_trees_equal(params_a, params_b)
    state = dict(rounding.state)
    assert state.pop("rounding_seed").item() == 3
    assert_trees_equal(state, plain.state)


def test_stochastic_rounding_of_bfloat16_is_reproducible_and_follows_the_seed():
    def run(**arguments):
        optimizer = RMSprop(1e-3, **arguments)
        return storage_run(optimizer, steps=4, params=model_params(mx.bfloat16))

    first = run(stochastic_rounding=True, rounding_seed=1)
    assert_trees_equal(run(stochastic_rounding=True, rounding_seed=1), first)
    for other in (run(stochastic_rounding=True, rounding_seed=2), run()):
        assert not mx.array_equal(other["odd"], first["odd"])


@pytest.mark.parametrize("fused", PATHS)
def test_compiled_step_with_state_capture_and_8_bit_state(fused):
    mx.random.seed(3)
    model_a = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    model_a.set_dtype(mx.bfloat16)
    model_b = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    model_b.update(model_a.parameters())
    x, y = mx.random.normal((16, 8)).astype(mx.bfloat16), mx.random.normal((16, 2))

    def loss_fn(model):
        return nn.losses.mse_loss(model(x).astype(mx.float32), y)

    arguments = dict(EIGHT_BIT, fused=fused)
    opt_a, opt_b = RMSprop(**arguments), RMSprop(**arguments)
    state = [model_a.state, opt_a.state]

    def step(model, optimizer):
        loss, grads = nn.value_and_grad(model, loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    compiled = mx.compile(lambda: step(model_a, opt_a), inputs=state, outputs=state)
    for _ in range(4):
        compiled()
        step(model_b, opt_b)
        mx.eval(state, model_b.state, opt_b.state)
    assert opt_a.state["layers"][0]["weight"]["v"].dtype == mx.uint8
    assert_trees_equal(model_a.parameters(), model_b.parameters())
    assert_trees_equal(opt_a.state, opt_b.state)


def test_8_bit_state_round_trips_through_tree_flatten_deepcopy_and_pickle():
    import copy
    import pickle

    optimizer = RMSprop(**EIGHT_BIT)
    # Without the float64 parameter: MLX 0.32 pickles a float64 array as float32.
    params = {k: v for k, v in storage_params().items() if k != "f64"}
    params = storage_run(optimizer, steps=3, params=params)
    grads = [random_like(params, np.random.default_rng(9 + i)) for i in range(3)]
    twins = [
        copy.deepcopy(optimizer),
        pickle.loads(pickle.dumps(optimizer)),
    ]
    flattened = RMSprop(**EIGHT_BIT)
    flattened.state = tree_unflatten(tree_flatten(optimizer.state))
    twins.append(flattened)
    expected = run_steps(optimizer, params, grads)
    for twin in twins:
        assert_trees_equal(run_steps(twin, params, grads), expected)
        assert_trees_equal(twin.state, optimizer.state)


def test_multi_optimizer_with_8_bit_state():
    def split(tree):
        big = {k: v for k, v in tree.items() if k in ("w", "odd")}
        return big, {k: v for k, v in tree.items() if k not in ("w", "odd")}

    multi = optim.MultiOptimizer(
        [RMSprop(**EIGHT_BIT), RMSprop(0.01, stochastic_rounding=True)],
        [lambda path, _: path.split(".")[0] in ("w", "odd")],
    )
    alone_big, alone_rest = RMSprop(**EIGHT_BIT), RMSprop(0.01, stochastic_rounding=True)
    params = model_params(mx.bfloat16)
    big, rest = split(params)
    rng = np.random.default_rng(6)
    for _ in range(4):
        grads = random_like(params, rng)
        params = multi.apply_gradients(grads, params)
        grads_big, grads_rest = split(grads)
        big = alone_big.apply_gradients(grads_big, big)
        rest = alone_rest.apply_gradients(grads_rest, rest)
    assert_trees_equal(params, {**big, **rest})
    assert_trees_equal(multi.state["states"][0], alone_big.state)
    assert multi.state["states"][0]["w"]["v"].dtype == mx.uint8


def test_apply_single_with_8_bit_state_is_the_first_parameter_of_a_step():
    arguments = dict(EIGHT_BIT, min_quantized_size=0)
    single = RMSprop(**arguments)
    single.state["step"] = mx.array(1, mx.uint64)  # as MLX's apply_gradients leaves it
    state: dict = {}
    parameter = mx.linspace(-1, 1, 40).astype(mx.bfloat16).reshape(5, 8)
    gradient = mx.linspace(2, -3, 40).astype(mx.bfloat16).reshape(5, 8)
    got = single.apply_single(gradient, parameter, state)
    tree = RMSprop(**arguments)
    want = tree.apply_gradients({"p": gradient}, {"p": parameter})["p"]
    assert_trees_equal({"p": got, **state}, {"p": want, **tree.state["p"]})


def test_8_bit_state_minimises_a_small_problem():
    mx.random.seed(0)
    x = mx.random.normal((64, 4))
    y = x @ mx.array([[1.0], [-2.0], [0.5], [3.0]])
    model = nn.Linear(4, 1)
    optimizer = RMSprop(0.01, state_bits=8, min_quantized_size=0)
    loss_and_grad = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(x), y))
    first = loss_and_grad(model)[0].item()
    for _ in range(400):
        loss, grads = loss_and_grad(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    assert optimizer.state["weight"]["v"].dtype == mx.uint8
    assert loss.item() < 1e-3 * first


def test_a_float64_gradient_of_an_8_bit_parameter_is_computed_in_float32():
    optimizer = RMSprop(0.01, state_bits=8, min_quantized_size=0)
    twin = RMSprop(0.01, state_bits=8, min_quantized_size=0)
    parameter = mx.linspace(-1, 1, 12).reshape(3, 4)
    gradient = mx.linspace(0.5, -0.25, 12).reshape(3, 4)
    got = optimizer.apply_gradients({"p": gradient.astype(mx.float64)}, {"p": parameter})["p"]
    want = twin.apply_gradients({"p": gradient}, {"p": parameter})["p"]
    assert_trees_equal({"p": got, **optimizer.state["p"]}, {"p": want, **twin.state["p"]})
