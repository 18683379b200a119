"""Keras' training-pipeline features beyond the recorded trajectories: what each promises,
and every validation message."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop


def snapshot(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def params():
    rng = np.random.default_rng(0)
    return {
        "dense": {
            "weight": mx.array(rng.standard_normal((4, 3)), mx.float32),
            "bias": mx.array(rng.standard_normal((3,)), mx.float32),
        },
    }


def grads(seed):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "weight": mx.array(rng.standard_normal((4, 3)), mx.float32),
            "bias": mx.array(rng.standard_normal((3,)), mx.float32),
        },
    }


@pytest.mark.parametrize("fused", [False, "compiled"])
def test_accumulation_changes_nothing_until_the_nth_call(fused):
    optimizer = RMSprop.from_keras(
        learning_rate=0.1, momentum=0.9, centered=True, gradient_accumulation_steps=3, fused=fused
    )
    current = params()
    optimizer.init(current)
    for cycle in range(2):
        before = snapshot(
            {
                k: v
                for k, v in optimizer.state["dense"]["weight"].items()
                if k != "accumulated_gradient"
            }
        )
        start = snapshot(current)
        for call in range(3):
            current = optimizer.apply_gradients(grads(10 * cycle + call), current)
            mx.eval(current, optimizer.state)
            after = snapshot(
                {
                    k: v
                    for k, v in optimizer.state["dense"]["weight"].items()
                    if k != "accumulated_gradient"
                }
            )
            if call < 2:
                assert all(np.array_equal(start[k], v) for k, v in snapshot(current).items())
                assert all(np.array_equal(before[k], v) for k, v in after.items())
        assert not np.array_equal(start["dense.weight"], np.array(current["dense"]["weight"]))
        assert np.all(np.array(optimizer.state["dense"]["weight"]["accumulated_gradient"]) == 0)


def test_accumulated_update_equals_one_update_with_the_mean_gradient():
    accumulating = RMSprop(0.05, momentum=0.5, gradient_accumulation_steps=2)
    plain = RMSprop(0.05, momentum=0.5)
    start = params()
    g1, g2 = grads(1), grads(2)
    out = accumulating.apply_gradients(g1, start)
    out = accumulating.apply_gradients(g2, out)
    mean = {"dense": {k: (g1["dense"][k] + g2["dense"][k]) / 2 for k in g1["dense"]}}
    expected = plain.apply_gradients(mean, start)
    for key, value in snapshot(expected).items():
        np.testing.assert_array_equal(snapshot(out)[key], value)


def test_weight_decay_exclusion_by_path():
    optimizer = RMSprop.from_keras(learning_rate=0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["bias$"])
    reference = RMSprop.from_keras(learning_rate=0.1)
    zero = {"dense": {"weight": mx.zeros((4, 3)), "bias": mx.zeros((3,))}}
    out = optimizer.apply_gradients(zero, params())
    undecayed = reference.apply_gradients(zero, params())
    np.testing.assert_array_equal(
        np.array(out["dense"]["bias"]), np.array(undecayed["dense"]["bias"])
    )
    assert not np.array_equal(
        np.array(out["dense"]["weight"]), np.array(undecayed["dense"]["weight"])
    )


def test_ema_and_finalize_on_a_module_and_on_a_tree():
    model = nn.Linear(3, 2)
    optimizer = RMSprop.from_keras(learning_rate=0.05, use_ema=True, ema_momentum=0.5)
    x = mx.random.normal((8, 3))
    loss_and_grad = nn.value_and_grad(model, lambda m: m(x).square().sum())
    for _ in range(5):
        _, g = loss_and_grad(model)
        optimizer.update(model, g)
        mx.eval(model.parameters(), optimizer.state)
    trained = snapshot(model.trainable_parameters())
    ema = snapshot(optimizer.ema_parameters(model.trainable_parameters()))
    assert ema.keys() == trained.keys()
    assert not np.array_equal(ema["weight"], trained["weight"])  # momentum 0.5 lags behind
    assert snapshot(optimizer.finalize_variable_values(model.trainable_parameters())).keys() == (
        ema.keys()
    )
    assert optimizer.finalize_variable_values(model) is model
    for key, value in snapshot(model.trainable_parameters()).items():
        np.testing.assert_array_equal(value, ema[key])


def test_finalize_without_ema_changes_nothing_and_ema_parameters_needs_it():
    optimizer = RMSprop(0.1)
    tree = params()
    assert optimizer.finalize_variable_values(tree) is tree
    with pytest.raises(ValueError, match="^ema_parameters\\(\\) needs use_ema=True$"):
        optimizer.ema_parameters(tree)


def test_ema_of_another_model_is_refused():
    optimizer = RMSprop(0.1, use_ema=True)
    optimizer.apply_gradients({"w": mx.ones((3,))}, {"w": mx.ones((3,))})
    with pytest.raises(
        ValueError, match="the EMA has shape \\(3,\\) but the parameter has shape \\(4,\\)"
    ):
        optimizer.ema_parameters({"w": mx.ones((4,))})


def test_exclude_from_weight_decay_rules():
    optimizer = RMSprop(0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match="^var_list is not supported"):
        optimizer.exclude_from_weight_decay(var_list=[mx.ones(2)])
    with pytest.raises(ValueError, match="^var_names must be a list of strings, got 'bias'$"):
        optimizer.exclude_from_weight_decay(var_names="bias")
    with pytest.raises(ValueError, match="^var_names: '\\(' is not a regular expression"):
        optimizer.exclude_from_weight_decay(var_names=["("])
    optimizer.apply_gradients({"w": mx.ones((2,))}, {"w": mx.ones((2,))})
    with pytest.raises(
        ValueError, match="can only be configured before the optimizer's first update"
    ):
        optimizer.exclude_from_weight_decay(var_names=["bias"])


PIPELINE_ERRORS = [
    (
        {"clipnorm": 1.0, "clipvalue": 0.5},
        "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received: "
        "clipnorm=1.0, clipvalue=0.5, global_clipnorm=None",
    ),
    ({"clipnorm": 0.0}, "clipnorm must be >0, got 0.0"),
    ({"global_clipnorm": -1.0}, "global_clipnorm must be >0, got -1.0"),
    ({"clipvalue": float("inf")}, "clipvalue must be finite, got inf"),
    ({"loss_scale_factor": 0}, "loss_scale_factor must be >0, got 0.0"),
    (
        {"gradient_accumulation_steps": 1},
        "gradient_accumulation_steps must be an integer >= 2, got 1",
    ),
    (
        {"gradient_accumulation_steps": 2.0},
        "gradient_accumulation_steps must be an integer >= 2, got 2.0",
    ),
    ({"use_ema": 1}, "use_ema must be True or False, got 1"),
    ({"use_ema": True, "ema_momentum": 1.5}, "ema_momentum must be in [0, 1], got 1.5"),
    (
        {"use_ema": True, "ema_overwrite_frequency": 0},
        "ema_overwrite_frequency must be an integer >= 1, got 0",
    ),
    ({"ema_overwrite_frequency": 5}, "ema_overwrite_frequency=5 needs use_ema=True"),
    ({"skip_nonfinite": "yes"}, "skip_nonfinite must be True or False, got 'yes'"),
    ({"name": 3}, "name must be a string, got 3"),
]


@pytest.mark.parametrize("kwargs, message", PIPELINE_ERRORS, ids=[m for _, m in PIPELINE_ERRORS])
def test_pipeline_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        RMSprop(0.1, **kwargs)


def test_from_keras_takes_kerass_pipeline_names():
    optimizer = RMSprop.from_keras(
        learning_rate=0.01,
        clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=10,
        loss_scale_factor=128.0,
        gradient_accumulation_steps=4,
        name="adaptive",
    )
    assert optimizer.name == "adaptive"
    assert optimizer.pipeline.clipnorm == 1.0
    assert optimizer.pipeline.gradient_accumulation_steps == 4


@pytest.mark.parametrize("fused", [False, "compiled"])
def test_pipeline_inside_a_users_compiled_step(fused):
    config = dict(
        learning_rate=0.05,
        momentum=0.9,
        centered=True,
        clipnorm=0.5,
        loss_scale_factor=4.0,
        gradient_accumulation_steps=2,
        use_ema=True,
        ema_overwrite_frequency=3,
        weight_decay=0.01,
        fused=fused,
    )
    eager, traced = RMSprop.from_keras(**config), RMSprop.from_keras(**config)
    p_eager = p_traced = params()
    traced.init(p_traced)
    step = mx.compile(
        lambda g, p: traced.apply_gradients(g, p), inputs=traced.state, outputs=traced.state
    )
    for i in range(7):
        g = grads(i)
        p_eager = eager.apply_gradients(g, p_eager)
        p_traced = step(g, p_traced)
        mx.eval(p_eager, p_traced, eager.state, traced.state)
    for key, value in snapshot(p_eager).items():
        np.testing.assert_array_equal(snapshot(p_traced)[key], value)
    for key, value in snapshot(eager.state).items():
        np.testing.assert_array_equal(snapshot(traced.state)[key], value)
