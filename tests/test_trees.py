"""Mismatched trees are refused with the parameter's path, before any state changes."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop


def params():
    return {"layers": [{"weight": mx.ones((3, 2)), "bias": mx.zeros((2,))}], "scale": mx.ones(())}


def grads():
    return {"layers": [{"weight": mx.ones((3, 2)), "bias": mx.ones((2,))}], "scale": mx.ones(())}


def snapshot(optimizer):
    return {k: np.array(v) for k, v in tree_flatten(optimizer.state)}


CASES = [
    (
        "shape",
        lambda g: g["layers"][0].update(weight=mx.ones((2, 3))),
        ValueError,
        "gradient 'layers.0.weight' has shape (2, 3) but its parameter has shape (3, 2)",
    ),
    (
        "extra key",
        lambda g: g.update(missing=mx.ones((2,))),
        ValueError,
        "gradient 'missing' has no matching parameter",
    ),
    (
        "integer gradient",
        lambda g: g["layers"][0].update(bias=mx.ones((2,), mx.int32)),
        TypeError,
        "gradient 'layers.0.bias' has dtype mlx.core.int32; RMSprop updates real floating arrays "
        "only (float16, bfloat16, float32, float64)",
    ),
    (
        "complex gradient",
        lambda g: g.update(scale=mx.array(1 + 1j)),
        TypeError,
        "gradient 'scale' has dtype mlx.core.complex64; RMSprop updates real floating arrays only",
    ),
    (
        "not an array",
        lambda g: g.update(scale=1.0),
        TypeError,
        "gradient 'scale' must be an mx.array, got float",
    ),
    (
        "structure",
        lambda g: g.update(layers={"0": mx.ones(())}),
        ValueError,
        "gradient 'layers' is a dict but the parameter there is a list",
    ),
    (
        "list length",
        lambda g: g["layers"].append({"weight": mx.ones((1,))}),
        ValueError,
        "gradient 'layers' has 2 entries but the parameter list has 1",
    ),
]


@pytest.mark.parametrize("name, corrupt, error, message", CASES, ids=[c[0] for c in CASES])
def test_mismatch_names_the_path_and_changes_nothing(name, corrupt, error, message):
    optimizer = RMSprop(0.1, momentum=0.9)
    current = optimizer.apply_gradients(grads(), params())
    before = snapshot(optimizer)
    bad = grads()
    corrupt(bad)
    with pytest.raises(error, match="^" + re.escape(message)):
        optimizer.apply_gradients(bad, current)
    after = snapshot(optimizer)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_integer_parameter_is_refused():
    with pytest.raises(TypeError, match="^parameter 'n' has dtype mlx.core.int32"):
        RMSprop(0.1).apply_gradients({"n": mx.ones((2,))}, {"n": mx.ones((2,), mx.int32)})


def test_gradient_tree_may_be_a_subset_of_the_parameters():
    optimizer = RMSprop(0.1)
    new = optimizer.apply_gradients({"scale": mx.ones(())}, params())
    assert list(new) == ["scale"]


def test_state_from_another_model_is_refused():
    optimizer = RMSprop(0.1)
    optimizer.apply_gradients(grads(), params())
    other = RMSprop(0.1)
    other.apply_gradients(
        {"layers": [{"weight": mx.ones((5,)), "bias": mx.ones((2,))}], "scale": mx.ones(())},
        {"layers": [{"weight": mx.ones((5,)), "bias": mx.ones((2,))}], "scale": mx.ones(())},
    )
    optimizer.state = other.state
    with pytest.raises(
        ValueError,
        match="^optimizer state 'layers.0.weight.v' has shape \\(5,\\) "
        "but its parameter has shape \\(3, 2\\): it belongs to another model",
    ):
        optimizer.apply_gradients(grads(), params())


def test_state_from_another_configuration_is_refused():
    plain = RMSprop(0.1)
    plain.apply_gradients(grads(), params())
    centered = RMSprop(0.1, centered=True)
    centered.state = plain.state
    with pytest.raises(
        ValueError,
        match=re.escape(
            "optimizer state for 'layers.0.weight' has keys ['v'], but this configuration uses "
            "['v', 'grad_avg']: it was made by another configuration"
        ),
    ):
        centered.apply_gradients(grads(), params())
