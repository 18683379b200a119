"""Every hyperparameter error, pinned word for word: the argument, the allowed range, the value."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop import RMSprop

CASES = [
    ({"learning_rate": -0.1}, "learning_rate must be finite and >= 0, got -0.1"),
    ({"learning_rate": float("nan")}, "learning_rate must be finite and >= 0, got nan"),
    ({"learning_rate": float("inf")}, "learning_rate must be finite and >= 0, got inf"),
    (
        {"learning_rate": "0.1"},
        "learning_rate must be a number, a schedule (callable of the step) "
        "or a scalar floating mx.array, got '0.1'",
    ),
    (
        {"learning_rate": None},
        "learning_rate must be a number, a schedule (callable of the step) "
        "or a scalar floating mx.array, got None",
    ),
    (
        {"learning_rate": True},
        "learning_rate must be a number, a schedule (callable of the step) "
        "or a scalar floating mx.array, got True",
    ),
    (
        {"learning_rate": mx.array([0.1, 0.2])},
        "learning_rate must be a number, a schedule "
        "(callable of the step) or a scalar floating mx.array, got array(shape=(2,), "
        "dtype=mlx.core.float32)",
    ),
    (
        {"learning_rate": mx.array(1, mx.int32)},
        "learning_rate must be a number, a schedule "
        "(callable of the step) or a scalar floating mx.array, got array(shape=(), "
        "dtype=mlx.core.int32)",
    ),
    ({"learning_rate": mx.array(-1.0)}, "learning_rate must be finite and >= 0, got -1.0"),
    ({"alpha": 1.5}, "alpha must be in [0, 1], got 1.5"),
    ({"alpha": -0.1}, "alpha must be in [0, 1], got -0.1"),
    ({"alpha": float("nan")}, "alpha must be finite, got nan"),
    ({"alpha": "0.9"}, "alpha must be a real number, got '0.9'"),
    (
        {"alpha": mx.array(0.9)},
        "alpha must be a real number, got array(shape=(), dtype=mlx.core.float32)",
    ),
    ({"eps": 0.0}, "eps must be >0, got 0.0"),
    ({"eps": -1e-8}, "eps must be >0, got -1e-08"),
    ({"eps": float("inf")}, "eps must be finite, got inf"),
    ({"momentum": 1.5}, "momentum must be in [0, 1], got 1.5"),
    ({"momentum": -0.5}, "momentum must be in [0, 1], got -0.5"),
    ({"momentum": True}, "momentum must be a real number, got True"),
    ({"weight_decay": -0.01}, "weight_decay must be >= 0, got -0.01"),
    ({"initial_accumulator_value": -1.0}, "initial_accumulator_value must be >= 0, got -1.0"),
    ({"nesterov": True}, "nesterov=True requires momentum > 0, got momentum=0.0"),
    (
        {"bias_correction": True, "alpha": 1.0},
        "bias_correction=True requires alpha < 1 in float32 (the "
        "correction 1 - alpha**t would be 0), got alpha=1.0",
    ),
    # Values as the float32 update computes with them.
    (
        {"bias_correction": True, "alpha": 0.99999999},
        "bias_correction=True requires alpha < 1 in float32 (the correction 1 - alpha**t "
        "would be 0), got alpha=0.99999999 (1.0 in float32)",
    ),
    (
        {"eps": 1e-46},
        "eps must be >0 in float32 (at least 1.4e-45, the update computes in float32), "
        "got 1e-46, which rounds to 0",
    ),
    (
        {"eps": 1e39},
        "eps must be finite in float32 (|value| <= 3.4028235e+38, the update computes in "
        "float32), got 1e+39",
    ),
    (
        {"weight_decay": 1e39},
        "weight_decay must be finite in float32 (|value| <= 3.4028235e+38, the update "
        "computes in float32), got 1e+39",
    ),
    (
        {"initial_accumulator_value": 4e38},
        "initial_accumulator_value must be finite in float32 (|value| <= 3.4028235e+38, the "
        "update computes in float32), got 4e+38",
    ),
    (
        {"learning_rate": 1e39},
        "learning_rate must be finite in float32 (<= 3.4028235e+38, the update computes in "
        "float32), got 1e+39",
    ),
    (
        {"loss_scale_factor": 1e-46},
        "loss_scale_factor must be >0 in float32 (at least 1.4e-45, the update computes in "
        "float32), got 1e-46, which rounds to 0",
    ),
    (
        {"clipnorm": 1e-50},
        "clipnorm must be >0 in float32 (at least 1.4e-45, the update computes in "
        "float32), got 1e-50, which rounds to 0",
    ),
    ({"centered": "False"}, "centered must be True or False, got 'False'"),
    ({"maximize": 1}, "maximize must be True or False, got 1"),
    ({"eps_in_sqrt": None}, "eps_in_sqrt must be True or False, got None"),
    ({"lr_in_momentum": "yes"}, "lr_in_momentum must be True or False, got 'yes'"),
    ({"decoupled_weight_decay": 0}, "decoupled_weight_decay must be True or False, got 0"),
    ({"bias_correction": []}, "bias_correction must be True or False, got []"),
    (
        {"state_dtype": mx.int32},
        "state_dtype must be None or one of mx.float16, mx.bfloat16, "
        "mx.float32, mx.float64, got mlx.core.int32",
    ),
    (
        {"state_dtype": "float32"},
        "state_dtype must be None or one of mx.float16, mx.bfloat16, "
        "mx.float32, mx.float64, got 'float32'",
    ),
    ({"fused": "fast"}, "fused must be one of 'auto', False, 'compiled'"),
    ({"fused": True}, "fused must be one of 'auto', False, 'compiled'"),
    ({"fused": 0}, "fused must be one of 'auto', False, 'compiled'"),
]
# The list of paths grows with the paths this build registers; its start and the value are pinned.
FUSED_TAIL = {"fast": ", got 'fast'", True: ", got True", 0: ", got 0"}


@pytest.mark.parametrize("kwargs, message", CASES, ids=[m for _, m in CASES])
def test_invalid_hyperparameter_is_refused_with_its_name_range_and_value(kwargs, message):
    kwargs = {"learning_rate": 0.01, **kwargs}
    pattern = "^" + re.escape(message)
    if "fused" in kwargs:
        pattern += ".*" + re.escape(FUSED_TAIL[kwargs["fused"]]) + "$"
    with pytest.raises(ValueError, match=pattern):
        RMSprop(**kwargs)


PRESET_CASES = [
    (RMSprop.from_torch, {"lr": -1.0}, "lr must be finite and >= 0, got -1.0"),
    (RMSprop.from_torch, {"alpha": 2.0}, "alpha must be in [0, 1], got 2.0"),
    (RMSprop.from_torch, {"weight_decay": -1}, "weight_decay must be >= 0, got -1.0"),
    (RMSprop.from_keras, {"rho": 1.1}, "rho must be in [0, 1], got 1.1"),
    (RMSprop.from_keras, {"epsilon": -1e-7}, "epsilon must be >= 0, got -1e-07"),
    (RMSprop.from_torch, {"eps": -1e-8}, "eps must be >= 0, got -1e-08"),
    (
        RMSprop.from_optax,
        {"learning_rate": 0.1, "bias_correction": True, "decay": 0.99999999},
        "bias_correction=True requires alpha < 1 in float32",
    ),
    (RMSprop.from_keras, {"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
    (
        RMSprop.from_optax,
        {"learning_rate": 0.1, "decay": -0.5},
        "decay must be in [0, 1], got -0.5",
    ),
    (
        RMSprop.from_optax,
        {"learning_rate": 0.1, "initial_scale": -1.0},
        "initial_scale must be >= 0, got -1.0",
    ),
    (
        RMSprop.from_optax,
        {"learning_rate": 0.1, "nesterov": True},
        # optax's momentum=None reaches the constructor as its momentum=0.0.
        "nesterov=True requires momentum > 0, got momentum=0.0",
    ),
    (
        RMSprop.from_optax,
        {"learning_rate": 0.1, "eps_in_sqrt": "no"},
        "eps_in_sqrt must be True or False, got 'no'",
    ),
    (RMSprop.from_tensorflow, {"decay": 3}, "decay must be in [0, 1], got 3.0"),
    (RMSprop.from_tensorflow, {"epsilon": -1e-10}, "epsilon must be >= 0, got -1e-10"),
]


@pytest.mark.parametrize("preset, kwargs, message", PRESET_CASES, ids=[m for *_, m in PRESET_CASES])
def test_presets_name_the_frameworks_own_argument(preset, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        preset(**kwargs)


def test_presets_refuse_unknown_arguments():
    with pytest.raises(TypeError, match="unexpected argument"):
        RMSprop.from_torch(lr=0.1, betas=(0.9, 0.999))


def test_hyperparameters_are_read_only():
    optimizer = RMSprop(0.1)
    with pytest.raises(AttributeError):
        optimizer.alpha = 0.5
    optimizer.learning_rate = 0.05  # the learning rate stays settable, as in MLX
    assert optimizer.learning_rate.item() == pytest.approx(0.05)


def test_valid_edges_are_accepted():
    RMSprop(0.0, alpha=0.0, momentum=1.0, weight_decay=0.0)
    RMSprop(mx.array(0.1, mx.float64), alpha=1.0)
    RMSprop(lambda step: 0.1, nesterov=True, momentum=0.5)
    # The smallest values that stay positive in float32, and the largest that stay finite.
    RMSprop(0.1, eps=1.5e-45, alpha=0.9999999, bias_correction=True, weight_decay=3.4e38)


@pytest.mark.parametrize(
    "value",
    [
        1,
        np.float32(0.5),
        np.float64(0.5),
        np.int64(1),
        0.5,
        mx.array(0.5),
        mx.array(1),
        np.array(0.5),
        np.array([2], np.int32),
    ],
    ids=[
        "int",
        "numpy.float32",
        "numpy.float64",
        "numpy.int64",
        "float",
        "mx.array",
        "integer mx.array",
        "0-d numpy array",
        "size-1 integer numpy array",
    ],
)
def test_a_schedule_may_return_any_real_scalar_the_constructor_accepts(value):
    scheduled = RMSprop(lambda step: value, momentum=0.5)
    constant = RMSprop(float(np.asarray(value).reshape(())), momentum=0.5)
    params = {"w": mx.array([1.0, -2.0])}
    grads = {"w": mx.array([0.3, 0.4])}
    for _ in range(2):
        got = scheduled.apply_gradients(grads, params)
        expected = constant.apply_gradients(grads, params)
        params = got
        np.testing.assert_array_equal(np.array(got["w"]), np.array(expected["w"]))
    assert scheduled.learning_rate.dtype == mx.float32
