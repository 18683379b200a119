"""Cases from other projects' own RMSprop test suites, run against this package.

Each case restates what a peer's suite expects (MLX's ``test_optimizers.py``, Keras'
``rmsprop_test.py`` and ``optimizer_test.py``, PyTorch's ``common_optimizers.py`` RMSprop
configurations and error inputs, optax's alias tests, TF's ``rmsprop_test.py``), written here
from their published expectations. Where the peer is installed, the same steps are also
compared with it live; the recorded expectations run everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import re

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_rmsprop import RMSprop

import optional


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def live(name: str):
    """Compare with the peer itself where it is installed (CI installs every peer)."""
    return optional.unless_missing(None if installed(name) else f"{name} is not installed")


def run(optimizer, start, gradients):
    params = {"x": mx.array(start, mx.float32)}
    for gradient in gradients:
        params = optimizer.apply_gradients({"x": mx.array(gradient, mx.float32)}, params)
    mx.eval(params)
    return np.array(params["x"])


# ---------------------------------------------------------------------------------------------
# MLX: python/tests/test_optimizers.py, with mlx.optimizers.RMSprop swapped for ours.


def mlx_params():
    return {"first": [mx.zeros((10,)), mx.zeros((1,))], "second": mx.zeros((1,))}


def test_mlx_explicit_init_keeps_v_at_zero_of_each_parameters_shape():
    optimizer = RMSprop(learning_rate=1e-2)
    params = mlx_params()
    optimizer.init(params)
    flat = dict(tree_flatten(optimizer.state))
    for key, value in tree_flatten(params):
        assert flat[f"{key}.v"].shape == value.shape
        assert not np.any(np.array(flat[f"{key}.v"]))


def test_mlx_implicit_init_then_v_is_one_minus_alpha_times_g_squared():
    optimizer = RMSprop(learning_rate=1e-2, alpha=0.99)
    params = mlx_params()
    grads = tree_map(lambda p: mx.ones_like(p), params)
    updated = optimizer.apply_gradients(grads, params)
    mx.eval(updated, optimizer.state)
    flat = dict(tree_flatten(optimizer.state))
    for key, g in tree_flatten(grads):
        np.testing.assert_allclose(np.array(flat[f"{key}.v"]), (1 - 0.99) * np.array(g) ** 2)
    for (_, new), (_, old) in zip(tree_flatten(updated), tree_flatten(params), strict=True):
        assert new.shape == old.shape


def test_mlx_epsilon_validation_message_matches_greater_than_zero():
    # MLX's test matches ">0" in the message; ours also names the argument and the value.
    with pytest.raises(ValueError, match=">0") as caught:
        RMSprop(learning_rate=0.1, eps=-1e-3)
    assert str(caught.value) == "eps must be >0, got -0.001"


def test_mlx_trajectory_of_the_builtin():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(6).astype(np.float32) for _ in range(5)]
    start = rng.standard_normal(6).astype(np.float32)
    ours = run(RMSprop(0.01, alpha=0.9, eps=1e-6), start, grads)
    builtin = run(optim.RMSprop(0.01, alpha=0.9, eps=1e-6), start, grads)
    np.testing.assert_allclose(ours, builtin, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Keras 3: keras/src/optimizers/rmsprop_test.py and optimizer_test.py.


def test_keras_single_step():
    optimizer = RMSprop.from_keras(learning_rate=0.5)
    got = run(optimizer, [1.0, 2.0, 3.0, 4.0], [[1.0, 6.0, 7.0, 2.0]])
    np.testing.assert_allclose(got, [-0.5811, 0.4189, 1.4189, 2.4189], rtol=1e-4, atol=1e-4)


def test_keras_centered_golden_trajectory():
    optimizer = RMSprop.from_keras(centered=True)
    golden = [0.9967, 0.9933, 0.9908, 0.9885, 0.9864]
    params = {"x": mx.ones((10,))}
    params = optimizer.apply_gradients({"x": mx.full((10,), 0.01)}, params)
    grads = {"x": mx.arange(0.1, 1.1, 0.1)[:10]}
    for expected in golden:
        np.testing.assert_allclose(np.array(params["x"]), np.full(10, expected), atol=5e-4)
        params = optimizer.apply_gradients(grads, params)


@pytest.mark.parametrize(
    "clip, equivalent",
    [({"clipnorm": 1}, [2**0.5 / 2, 2**0.5 / 2]), ({"clipvalue": 1}, [1.0, 1.0])],
    ids=["clipnorm", "clipvalue"],
)
def test_keras_clipping_of_large_gradients(clip, equivalent):
    clipped = run(RMSprop.from_keras(momentum=0.5, **clip), [0.0, 0.0], [[100.0, 100.0]] * 3)
    plain = run(RMSprop.from_keras(momentum=0.5), [0.0, 0.0], [equivalent] * 3)
    np.testing.assert_allclose(clipped, plain, rtol=1e-6)


def test_keras_one_of_three_clip_arguments_error():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received: "
            "clipnorm=1.0, clipvalue=1.0, global_clipnorm=None"
        ),
    ):
        RMSprop.from_keras(clipnorm=1.0, clipvalue=1.0)


def test_keras_attributes_code_reads():
    optimizer = RMSprop.from_keras(
        global_clipnorm=2.0,
        use_ema=True,
        ema_momentum=0.5,
        ema_overwrite_frequency=3,
        loss_scale_factor=128.0,
        gradient_accumulation_steps=4,
    )
    assert optimizer.global_clipnorm == 2.0
    assert optimizer.clipnorm is None and optimizer.clipvalue is None
    assert optimizer.use_ema is True and optimizer.ema_momentum == 0.5
    assert optimizer.ema_overwrite_frequency == 3
    assert optimizer.loss_scale_factor == 128.0
    assert optimizer.gradient_accumulation_steps == 4
    defaults = RMSprop.from_keras(clipnorm=1.0)
    assert defaults.clipnorm == 1.0 and defaults.global_clipnorm is None
    assert defaults.use_ema is False and defaults.ema_momentum == 0.99
    assert defaults.loss_scale_factor is None and defaults.gradient_accumulation_steps is None


def test_keras_scale_loss():
    scaled = RMSprop.from_keras(loss_scale_factor=4.0)
    assert scaled.scale_loss(mx.array(2.5)).item() == 10.0
    assert scaled.scale_loss(3.0) == 12.0
    loss = mx.array(2.5)
    assert RMSprop.from_keras().scale_loss(loss) is loss


def test_keras_scaled_loss_gives_the_unscaled_update():
    def loss_fn(params):
        return mx.sum(params["x"] ** 2)

    optimizer = RMSprop.from_keras(learning_rate=0.1, loss_scale_factor=1024.0)
    reference = RMSprop.from_keras(learning_rate=0.1)
    params = {"x": mx.array([1.0, -2.0, 3.0])}
    grads = mx.grad(lambda p: optimizer.scale_loss(loss_fn(p)))(params)
    plain = mx.grad(loss_fn)(params)
    got = optimizer.apply_gradients(grads, params)
    expected = reference.apply_gradients(plain, params)
    np.testing.assert_array_equal(np.array(got["x"]), np.array(expected["x"]))


# ---------------------------------------------------------------------------------------------
# TF: tensorflow/python/training/rmsprop_test.py (TF1) and the Keras-v2 rmsprop_test.py.


def sparse_minimize_step(optimizer):
    """One step on ``loss = (var0 @ x)**2`` with var0 = [[1, 2]], x = [[4], [5]]."""
    x = mx.array([[4.0], [5.0]])
    params = {"var0": mx.array([[1.0, 2.0]])}
    grads = mx.grad(lambda p: mx.sum((p["var0"] @ x) ** 2))(params)
    return np.array(optimizer.apply_gradients(grads, params)["var0"])


@pytest.mark.parametrize(
    "preset",
    [
        lambda: RMSprop.from_tensorflow(learning_rate=1.0, decay=0.0, momentum=0.0, epsilon=0.0),
        lambda: RMSprop.from_keras(learning_rate=1.0, rho=0.0, momentum=0.0, epsilon=0.0),
    ],
    ids=["tf1", "keras-v2"],
)
def test_tf_minimize_sparse_resource_variable_with_epsilon_zero(preset):
    np.testing.assert_allclose(sparse_minimize_step(preset()), [[0.0, 1.0]], atol=0.01)


def test_tf1_centered_minimize_sparse_resource_variable():
    optimizer = RMSprop.from_tensorflow(
        learning_rate=1.0, decay=0.0, momentum=0.0, epsilon=1.0, centered=True
    )
    np.testing.assert_allclose(sparse_minimize_step(optimizer), [[-111.0, -138.0]], atol=0.01)


# ---------------------------------------------------------------------------------------------
# Epsilon 0: accepted by every framework's RMSprop; 0/0 where a gradient and its average are 0.

EPSILON_ZERO = {
    "torch": lambda: RMSprop.from_torch(lr=0.01, eps=0),
    "keras": lambda: RMSprop.from_keras(learning_rate=0.01, epsilon=0),
    "optax": lambda: RMSprop.from_optax(learning_rate=0.01, eps=0.0),
    "tensorflow": lambda: RMSprop.from_tensorflow(learning_rate=0.01, epsilon=0),
}


@pytest.mark.parametrize("name", EPSILON_ZERO)
def test_epsilon_zero_is_accepted_and_reproduces_the_framework(name):
    optimizer = EPSILON_ZERO[name]()
    assert optimizer.eps == 0
    got = run(optimizer, [1.0, 1.0], [[0.0, 2.0]])
    if name == "tensorflow":
        # v starts at 1: a zero gradient gives 0 / 1 and the entry stays.
        np.testing.assert_allclose(got, [1.0, 1.0 - 0.01 * 2 / np.sqrt(0.9 + 0.1 * 4)])
        return
    # v = (1 - alpha) g^2: a zero gradient divides 0 by 0 (NaN, as in the framework); the other
    # entry steps by lr / sqrt(1 - alpha).
    alpha = 0.99 if name == "torch" else 0.9
    assert np.isnan(got[0])
    np.testing.assert_allclose(got[1], 1.0 - 0.01 / np.sqrt(1 - alpha), rtol=1e-6)


def test_main_constructor_keeps_requiring_eps_above_zero():
    with pytest.raises(ValueError, match=re.escape("eps must be >0, got 0.0")):
        RMSprop(0.01, eps=0.0)


# ---------------------------------------------------------------------------------------------
# PyTorch: torch/testing/_internal/common_optimizers.py (RMSprop configurations and error
# inputs) and test/test_optim.py.

TORCH_CONFIGS = [
    {},
    {"lr": 0.02, "weight_decay": 0.1},
    {"centered": True},
    {"momentum": 0.9},
    {"momentum": 0.9, "centered": True, "weight_decay": 0.1},
    {"maximize": True, "weight_decay": 0.1},
    {"alpha": 0.5, "eps": 0.0},
]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1e-2}, "lr must be finite and >= 0, got -0.01"),
        ({"momentum": -1.0}, "momentum must be in [0, 1], got -1.0"),
        ({"eps": -1.0}, "eps must be >= 0, got -1.0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0, got -1.0"),
        ({"alpha": -1.0}, "alpha must be in [0, 1], got -1.0"),
    ],
)
def test_torch_error_inputs_stay_refused(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        RMSprop.from_torch(**kwargs)


def torch_trajectory(config, start, grads):
    import torch

    x = torch.tensor(start, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.RMSprop([x], **{"lr": 0.01, **config})
    for g in grads:
        x.grad = torch.tensor(g, dtype=torch.float32)
        optimizer.step()
    return x.detach().numpy()


def peer_inputs():
    rng = np.random.default_rng(7)
    start = rng.standard_normal(8).astype(np.float32)
    grads = [rng.standard_normal(8).astype(np.float32) for _ in range(6)]
    for g in grads[:2]:
        g[0] = 0.0  # a zero gradient while v is 0: 0/0 where epsilon is 0
    return start, grads


@live("torch")
@pytest.mark.parametrize("config", TORCH_CONFIGS, ids=lambda c: str(c) or "defaults")
def test_torch_configurations_match_torch_live(config):
    start, grads = peer_inputs()
    ours = run(RMSprop.from_torch(**{"lr": 0.01, **config}), start, grads)
    np.testing.assert_allclose(ours, torch_trajectory(config, start, grads), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# optax: optax/_src/alias_test.py (rmsprop with and without momentum, centered, nesterov, bias
# correction, eps 0).

OPTAX_CONFIGS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"centered": True},
    {"bias_correction": True, "decay": 0.95},
    {"eps": 0.0},
    {"eps_in_sqrt": False, "initial_scale": 0.1},
]


def test_optax_alias_parabola_converges():
    # The alias tests minimise a parabola; every rmsprop variant reaches the minimum.
    target = np.array([1.0, -2.0, 3.0], np.float32)
    for config in OPTAX_CONFIGS[:-2]:
        optimizer = RMSprop.from_optax(learning_rate=0.01, **config)
        params = {"x": mx.zeros((3,))}
        for _ in range(1000):
            grads = mx.grad(lambda p: mx.sum((p["x"] - mx.array(target)) ** 2))(params)
            params = optimizer.apply_gradients(grads, params)
        np.testing.assert_allclose(np.array(params["x"]), target, atol=0.05, err_msg=str(config))


@live("optax")
@pytest.mark.parametrize("config", OPTAX_CONFIGS, ids=lambda c: str(c) or "defaults")
def test_optax_configurations_match_optax_live(config):
    import jax.numpy as jnp
    import optax

    start, grads = peer_inputs()
    transform = optax.rmsprop(learning_rate=0.01, **config)
    x = jnp.array(start)
    state = transform.init(x)
    for g in grads:
        updates, state = transform.update(jnp.array(g), state, x)
        x = optax.apply_updates(x, updates)
    ours = run(RMSprop.from_optax(learning_rate=0.01, **config), start, grads)
    np.testing.assert_allclose(ours, np.array(x), rtol=1e-5, atol=1e-6)


@live("keras")
@live("jax")  # keras runs here on the jax backend
@pytest.mark.parametrize(
    "config",
    [{}, {"momentum": 0.9, "centered": True}, {"epsilon": 0.0}, {"weight_decay": 0.1}],
    ids=lambda c: str(c) or "defaults",
)
def test_keras_configurations_match_keras_live(config):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        pytest.skip(f"keras already imported with the {keras.backend.backend()} backend")
    start, grads = peer_inputs()
    variable = keras.Variable(start)
    optimizer = keras.optimizers.RMSprop(learning_rate=0.01, **config)
    for g in grads:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
    ours = run(RMSprop.from_keras(learning_rate=0.01, **config), start, grads)
    np.testing.assert_allclose(ours, np.array(variable.value), rtol=1e-5, atol=1e-6)


def test_presets_take_their_frameworks_implementation_only_arguments():
    # torch.optim.RMSprop(..., capturable, foreach, differentiable) and TF1's
    # RMSPropOptimizer(..., use_locking, name) choose an implementation, not the numbers: the
    # presets accept them (checked as flags) and give the same trajectory.
    params = {"w": mx.array([1.0, -2.0, 0.5])}
    grads = {"w": mx.array([0.3, -0.4, 0.0])}
    for preset, extra in [
        (RMSprop.from_torch, {"capturable": True, "foreach": True, "differentiable": True}),
        (RMSprop.from_torch, {"foreach": None}),
        (RMSprop.from_tensorflow, {"use_locking": True, "name": "rms"}),
    ]:
        plain, configured = preset(), preset(**extra)
        np.testing.assert_array_equal(
            np.array(configured.apply_gradients(grads, params)["w"]),
            np.array(plain.apply_gradients(grads, params)["w"]),
        )
    assert RMSprop.from_tensorflow(name="rms").name == "rms"
    for preset, name in [
        (RMSprop.from_torch, "foreach"),
        (RMSprop.from_torch, "capturable"),
        (RMSprop.from_torch, "differentiable"),
        (RMSprop.from_tensorflow, "use_locking"),
    ]:
        with pytest.raises(ValueError, match=f"{name} must be True or False, got 'yes'"):
            preset(**{name: "yes"})
