"""Mismatched trees are refused with the parameter's path, before any state changes; the
trees MLX's optimizers accept (non-array attributes, parameters added mid-training) train."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rmsprop import RMSprop
from mlx_rmsprop.optimizer import _constant_codes
from mlx_rmsprop.spec import code_table
from mlx_rmsprop.storage import dequantize, quantize

from native_available import native_path
from tiny_models import tiny_llama


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


# --- Trees MLX's optimizers accept: non-array attributes, parameters added mid-training ---

EVERY_PATH = [False, "compiled", native_path()]


class WithStrings(nn.Module):
    """What mlx-lm's models keep: strings in a list (``layer_types``) and in a dict. In
    ``model.parameters()`` and the gradients they are ``{}``; ``Optimizer.update`` passes the
    module itself as the parameters, where they are the strings."""

    def __init__(self):
        super().__init__()
        self.layer_types = ["full_attention", "sliding_attention"]
        self.settings = {"rope": "default", "kind": "llama"}
        self.layers = [nn.Linear(4, 4), nn.Linear(4, 2)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def train_module(model, optimizer, steps=4):
    rng = np.random.default_rng(5)
    x = mx.array(rng.standard_normal((8, 4)), mx.float32)
    loss_and_grad = nn.value_and_grad(model, lambda m, x: (m(x) ** 2).mean())
    for _ in range(steps):
        _, grads = loss_and_grad(model, x)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    return model


def seeded(cls, *args):
    mx.random.seed(11)
    return cls(*args)


def assert_same_parameters(a, b):
    flat_a, flat_b = tree_flatten(a.parameters()), tree_flatten(b.parameters())
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    for (key, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=key)


@pytest.mark.parametrize("fused", EVERY_PATH, ids=lambda f: f"fused={f}")
def test_module_with_string_attributes_trains_as_mlx_rmsprop_does(fused):
    ours = train_module(seeded(WithStrings), RMSprop(0.01, fused=fused))
    builtin = train_module(seeded(WithStrings), optim.RMSprop(0.01))
    assert ours.layer_types == ["full_attention", "sliding_attention"]
    assert ours.settings == {"rope": "default", "kind": "llama"}
    assert_same_parameters(ours, builtin)


def test_an_empty_gradient_subtree_is_skipped_and_a_real_mismatch_still_named():
    params = {"names": ["a", "b"], "w": mx.ones((2,))}
    grads = {"names": [{}, {}], "w": mx.ones((2,))}
    new = RMSprop(0.1).apply_gradients(grads, params)
    assert new["names"] == [{}, {}]  # shaped like the gradients, as MLX's tree_map returns it
    with pytest.raises(
        ValueError, match="^gradient 'names.0' is an array but the parameter there is a str"
    ):
        RMSprop(0.1).apply_gradients({"names": [mx.ones((2,))]}, params)
    with pytest.raises(ValueError, match="^gradient 'gone' has no matching parameter"):
        RMSprop(0.1).apply_gradients({"gone": mx.ones((2,))}, params)


NEW_PARAMETER_CONFIGS = {
    "mlx-default": {"learning_rate": 0.01},
    "centered-momentum-decay": {
        "learning_rate": 0.01,
        "momentum": 0.9,
        "centered": True,
        "weight_decay": 0.1,
    },
}


def random_tree(shapes, seed):
    rng = np.random.default_rng(seed)
    return {k: mx.array(rng.standard_normal(s), mx.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("fused", EVERY_PATH, ids=lambda f: f"fused={f}")
@pytest.mark.parametrize("config", list(NEW_PARAMETER_CONFIGS))
def test_a_parameter_added_mid_training_starts_as_a_fresh_optimizer_would(config, fused):
    kwargs = dict(NEW_PARAMETER_CONFIGS[config], fused=fused)
    optimizer = RMSprop(**kwargs)
    params = random_tree({"a": (3, 2)}, 0)
    for step in range(3):
        params = optimizer.apply_gradients(random_tree({"a": (3, 2)}, 10 + step), params)
    # Gradual unfreezing / a new head: "head" (a nested dict) and a list entry appear.
    new = random_tree({"w": (4,), "b": ()}, 1)
    grown = {**params, "head": {"w": new["w"]}, "blocks": [{}, {"b": new["b"]}]}
    grads = random_tree({"a": (3, 2), "w": (4,), "b": ()}, 20)
    grown_grads = {"a": grads["a"], "head": {"w": grads["w"]}, "blocks": [{}, {"b": grads["b"]}]}
    expected_a = RMSprop(**kwargs)
    expected_a.state = tree_unflatten(tree_flatten(optimizer.state))
    expected_a_params = expected_a.apply_gradients({"a": grads["a"]}, params)

    result = optimizer.apply_gradients(grown_grads, grown)

    fresh = RMSprop(**kwargs)
    fresh_result = fresh.apply_gradients(
        {"w": grads["w"], "b": grads["b"]}, {"w": new["w"], "b": new["b"]}
    )
    pairs = [
        (result["a"], expected_a_params["a"]),
        (result["head"]["w"], fresh_result["w"]),
        (result["blocks"][1]["b"], fresh_result["b"]),
    ]
    for key in optimizer.state_keys:
        pairs += [
            (optimizer.state["a"][key], expected_a.state["a"][key]),
            (optimizer.state["head"]["w"][key], fresh.state["w"][key]),
            (optimizer.state["blocks"][1]["b"][key], fresh.state["b"][key]),
        ]
    for got, want in pairs:
        np.testing.assert_array_equal(np.array(got), np.array(want))
    assert optimizer.state["blocks"][0] == {}
    assert optimizer.step.item() == 4


def test_apply_single_creates_the_state_of_a_new_parameter():
    optimizer = RMSprop(0.01, momentum=0.9)
    optimizer.state["step"] = mx.array(1, mx.uint64)  # as MLX's apply_gradients leaves it
    state: dict = {}
    got = optimizer.apply_single(mx.full((3,), 0.5), mx.ones((3,)), state)
    fresh = RMSprop(0.01, momentum=0.9)
    want = fresh.apply_gradients({"p": mx.full((3,), 0.5)}, {"p": mx.ones((3,))})["p"]
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert sorted(state) == ["momentum_buffer", "v"]


def test_a_new_parameter_gets_no_state_when_the_step_is_refused():
    optimizer = RMSprop(0.1)
    params = optimizer.apply_gradients({"a": mx.ones((2,))}, {"a": mx.ones((2,))})
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="^gradient 'a' has shape \\(3,\\)"):
        optimizer.apply_gradients(
            {"new": mx.ones((2,)), "a": mx.ones((3,))}, {"new": mx.ones((2,)), **params}
        )
    assert "new" not in optimizer.state
    assert snapshot(optimizer).keys() == before.keys()


def train_llama(model, optimizer, steps=3):
    tokens = mx.array([[1, 5, 2, 7, 3, 9, 4, 11]])
    loss_and_grad = nn.value_and_grad(
        model, lambda m, x: nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()
    )
    for _ in range(steps):
        _, grads = loss_and_grad(model, tokens)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    return model


@pytest.mark.parametrize("fused", EVERY_PATH, ids=lambda f: f"fused={f}")
def test_mlx_lm_llama_with_layer_types_trains_as_mlx_rmsprop_does(fused):
    ours = train_llama(tiny_llama(), RMSprop(0.01, fused=fused))
    builtin = train_llama(tiny_llama(), optim.RMSprop(0.01))
    assert ours.model.layer_types == ["full_attention", "sliding_attention"]
    assert_same_parameters(ours, builtin)


# --- 8-bit state: each parameter's own layout ----------------------------------------------


def eight_bit(**arguments):
    return RMSprop(
        0.1,
        momentum=0.9,
        **{"state_bits": 8, "state_block_size": 32, "min_quantized_size": 6, **arguments},
    )


def mixed_params():
    # weight: 6 elements (8-bit), bias and scale below the threshold, table 70 elements in 3
    # blocks, float64 never 8-bit.
    return {
        **params(),
        "table": mx.full((7, 10), 0.5),
        "double": mx.ones((3, 4), mx.float64),
        "empty": mx.zeros((0, 8)),
    }


def test_a_mixed_tree_gets_codes_and_scales_for_its_large_parameters_only():
    optimizer = eight_bit(initial_accumulator_value=0.25, use_ema=True)
    tree = mixed_params()
    optimizer.init(tree)
    state = optimizer.state
    weight, table = state["layers"][0]["weight"], state["table"]
    for buffers, shape, blocks in ((weight, (3, 2), 1), (table, (7, 10), 3)):
        assert list(buffers) == [
            "v",
            "v_scale",
            "momentum_buffer",
            "momentum_buffer_scale",
            "ema",
        ]
        for key in ("v", "momentum_buffer"):
            assert buffers[key].dtype == mx.uint8 and buffers[key].shape == shape
            assert buffers[f"{key}_scale"].dtype == mx.float32
            assert buffers[f"{key}_scale"].shape == (blocks,)
        assert buffers["ema"].dtype == mx.float32
    for name, dtype in (("scale", mx.float32), ("double", mx.float64), ("empty", mx.float32)):
        assert list(state[name]) == ["v", "momentum_buffer", "ema"], name
        assert state[name]["v"].dtype == dtype, name
    assert list(state["layers"][0]["bias"]) == ["v", "momentum_buffer", "ema"]
    # The 8-bit start values read back as the float start values: v at 0.25, the buffer at 0.
    for key, start in (("v", 0.25), ("momentum_buffer", 0.0)):
        values = dequantize(table[key], table[f"{key}_scale"], code_table(key), 32)
        np.testing.assert_array_equal(np.array(values), np.full((7, 10), start, np.float32))


@pytest.mark.parametrize("shape", [(), (0,), (1,), (31,), (32,), (33,), (4, 25)])
@pytest.mark.parametrize("key", ["v", "grad_avg", "momentum_buffer"])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 1e-30, 3.4e38])
def test_initial_codes_are_what_the_normative_quantize_gives(shape, key, value):
    codes, scales = _constant_codes(key, shape, value, 32)
    want_codes, want_scales = quantize(mx.full(shape, value, mx.float32), code_table(key), 32)
    assert codes.dtype == want_codes.dtype and codes.shape == want_codes.shape
    assert scales.dtype == want_scales.dtype and scales.shape == want_scales.shape
    np.testing.assert_array_equal(np.array(codes), np.array(want_codes))
    np.testing.assert_array_equal(np.array(scales), np.array(want_scales))


def with_state(optimizer, change):
    """``optimizer`` after one step on mixed_params, with ``change(state)`` applied."""
    tree = mixed_params()
    optimizer.apply_gradients({"table": mx.ones((7, 10))}, tree)
    change(optimizer.state)
    return tree


LAYOUT_CASES = [
    (
        "float state in an 8-bit optimizer",
        lambda state: state.update(
            table={"v": mx.zeros((7, 10)), "momentum_buffer": mx.zeros((7, 10))}
        ),
        ValueError,
        "optimizer state for 'table' has keys ['momentum_buffer', 'v'], but this configuration "
        "uses ['v', 'v_scale', 'momentum_buffer', 'momentum_buffer_scale'] (8-bit state, for a "
        "parameter of 70 elements): it was made by another configuration",
    ),
    (
        "codes of another dtype",
        lambda state: state["table"].update(v=state["table"]["v"].astype(mx.float32)),
        TypeError,
        "optimizer state 'table.v' has dtype mlx.core.float32; 8-bit state keeps uint8 codes there",
    ),
    (
        "scales of another dtype",
        lambda state: state["table"].update(v_scale=state["table"]["v_scale"].astype(mx.float16)),
        TypeError,
        "optimizer state 'table.v_scale' has dtype mlx.core.float16; 8-bit state keeps float32 "
        "scales there",
    ),
    (
        "scales of another block size",
        lambda state: state["table"].update(v_scale=mx.ones((2,))),
        ValueError,
        "optimizer state 'table.v_scale' has shape (2,) but its parameter (shape (7, 10)) in "
        "blocks of 32 has 3 scales: it belongs to another model or block size",
    ),
    (
        "codes of another shape",
        lambda state: state["table"].update(momentum_buffer=mx.zeros((10, 7), mx.uint8)),
        ValueError,
        "optimizer state 'table.momentum_buffer' has shape (10, 7) but its parameter has shape "
        "(7, 10): it belongs to another model",
    ),
]


@pytest.mark.parametrize(
    "name, change, error, message", LAYOUT_CASES, ids=[case[0] for case in LAYOUT_CASES]
)
def test_state_of_another_layout_is_refused_by_path_and_nothing_changes(
    name, change, error, message
):
    optimizer = eight_bit()
    tree = with_state(optimizer, change)
    before = snapshot(optimizer)
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        optimizer.apply_gradients({"table": mx.ones((7, 10))}, tree)
    after = snapshot(optimizer)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    # apply_single checks the same way.
    with pytest.raises(
        error,
        match="^"
        + re.escape(message.replace("'table'", "at the tree root").replace("'table.", "'")),
    ):
        optimizer.apply_single(mx.ones((7, 10)), tree["table"], optimizer.state["table"])


def test_8_bit_state_in_a_float_optimizer_is_refused():
    source = eight_bit()
    tree = mixed_params()
    source.init(tree)
    target = RMSprop(0.1, momentum=0.9)
    target.state = source.state
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "optimizer state for 'layers.0.weight' has keys ['momentum_buffer', "
            "'momentum_buffer_scale', 'v', 'v_scale'], but this configuration uses ['v', "
            "'momentum_buffer']: it was made by another configuration"
        ),
    ):
        target.apply_gradients(grads(), tree)
