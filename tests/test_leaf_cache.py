"""Steps over unchanged trees skip the per-leaf checks (trees.LeafCache): every change of the
trees must still be found and refused with the same path-naming error, before anything
changes, however many steps came before and however often the bad call is repeated."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop, trees

from native_available import native_path

# The paths whose step function is compiled: the ones that use the cache.
CACHED_PATHS = ["compiled", native_path()]


def params():
    return {
        "layers": [{"weight": mx.ones((3, 2)), "bias": mx.zeros((2,))}],
        "scale": mx.ones(()),
    }


def grads(scale=1.0):
    return {
        "layers": [{"weight": mx.full((3, 2), scale), "bias": mx.full((2,), scale)}],
        "scale": mx.array(scale),
    }


def snapshot(optimizer):
    return {k: np.array(v) for k, v in tree_flatten(optimizer.state)}


def trained(fused, steps=3, **kwargs):
    optimizer = RMSprop(0.1, momentum=0.9, fused=fused, **kwargs)
    current = params()
    for step in range(steps):
        current = optimizer.apply_gradients(grads(1.0 + step), current)
        mx.eval(current, optimizer.state)
    return optimizer, current


def set_in(tree, path, value):
    *parents, last = path
    for key in parents:
        tree = tree[key]
    tree[last] = value


GRADIENT_CHANGES = [
    (
        "gradient shape",
        lambda g, p: set_in(g, ("layers", 0, "weight"), mx.ones((2, 3))),
        ValueError,
        "gradient 'layers.0.weight' has shape (2, 3) but its parameter has shape (3, 2)",
    ),
    (
        "parameter shape",
        lambda g, p: set_in(p, ("layers", 0, "bias"), mx.ones((3,))),
        ValueError,
        "gradient 'layers.0.bias' has shape (2,) but its parameter has shape (3,)",
    ),
    (
        "both shapes",
        lambda g, p: (set_in(g, ("scale",), mx.ones((2,))), set_in(p, ("scale",), mx.ones((2,)))),
        ValueError,
        "optimizer state 'scale.v' has shape () but its parameter has shape (2,): it belongs "
        "to another model",
    ),
    (
        "gradient dtype",
        lambda g, p: set_in(g, ("layers", 0, "bias"), mx.ones((2,), mx.int32)),
        TypeError,
        "gradient 'layers.0.bias' has dtype mlx.core.int32",
    ),
    (
        "parameter dtype",
        lambda g, p: set_in(p, ("scale",), mx.array(1, mx.int32)),
        TypeError,
        "parameter 'scale' has dtype mlx.core.int32",
    ),
    (
        "added key",
        lambda g, p: g.update(missing=mx.ones((2,))),
        ValueError,
        "gradient 'missing' has no matching parameter",
    ),
    (
        "not an array",
        lambda g, p: g.update(scale=1.0),
        TypeError,
        "gradient 'scale' must be an mx.array, got float",
    ),
    (
        "list length",
        lambda g, p: g["layers"].append({"weight": mx.ones((1,))}),
        ValueError,
        "gradient 'layers' has 2 entries but the parameter list has 1",
    ),
]


@pytest.mark.parametrize("fused", CACHED_PATHS)
@pytest.mark.parametrize(
    "name, change, error, message", GRADIENT_CHANGES, ids=[c[0] for c in GRADIENT_CHANGES]
)
def test_a_changed_tree_after_cached_steps_is_refused_every_time(
    name, change, error, message, fused
):
    optimizer, current = trained(fused)
    before = snapshot(optimizer)
    for _ in range(3):  # also once its compiled step has been traced for the bad shapes
        bad_grads, bad_params = grads(), dict(current, layers=[dict(current["layers"][0])])
        change(bad_grads, bad_params)
        with pytest.raises(error, match="^" + re.escape(message)):
            optimizer.apply_gradients(bad_grads, bad_params)
        after = snapshot(optimizer)
        assert before.keys() == after.keys()
        assert all(np.array_equal(before[k], after[k]) for k in before)
    # The good trees still train, exactly as without the refused calls.
    reference, expected = trained(fused, steps=4)
    current = optimizer.apply_gradients(grads(4.0), current)
    for (key, ours), (_, theirs) in zip(
        tree_flatten((current, optimizer.state)),
        tree_flatten((expected, reference.state)),
        strict=True,
    ):
        assert np.array_equal(np.array(ours), np.array(theirs)), key


STATE_CHANGES = [
    (
        "buffer replaced",
        lambda s: s["layers"][0]["weight"].update(v=mx.ones((5,))),
        ValueError,
        "optimizer state 'layers.0.weight.v' has shape (5,) but its parameter has shape (3, 2)",
    ),
    (
        "buffer dtype",
        lambda s: s["layers"][0]["bias"].update(momentum_buffer=mx.ones((2,), mx.int32)),
        TypeError,
        "optimizer state 'layers.0.bias.momentum_buffer' has dtype mlx.core.int32",
    ),
    (
        "key removed",
        lambda s: s["scale"].pop("momentum_buffer"),
        ValueError,
        "optimizer state for 'scale' has keys ['v'], but this configuration uses "
        "['v', 'momentum_buffer']",
    ),
    (
        "node replaced",
        lambda s: s["layers"].__setitem__(0, {"weight": {"v": mx.ones(())}, "bias": {}}),
        ValueError,
        "optimizer state for 'layers.0.weight' has keys ['v'], but this configuration uses "
        "['v', 'momentum_buffer']",
    ),
]


@pytest.mark.parametrize("fused", CACHED_PATHS)
@pytest.mark.parametrize(
    "name, change, error, message", STATE_CHANGES, ids=[c[0] for c in STATE_CHANGES]
)
def test_a_changed_state_after_cached_steps_is_refused(name, change, error, message, fused):
    optimizer, current = trained(fused)
    change(optimizer.state)
    with pytest.raises(error, match="^" + re.escape(message)):
        optimizer.apply_gradients(grads(), current)


@pytest.mark.parametrize("fused", CACHED_PATHS)
def test_unchanged_trees_skip_the_checks_and_changed_ones_do_not(fused, monkeypatch):
    optimizer, current = trained(fused, steps=1)
    checked = []
    real_gather = trees.gather
    monkeypatch.setattr(
        "mlx_rmsprop.optimizer.gather", lambda *a, **k: checked.append(1) or real_gather(*a, **k)
    )
    for step in range(3):
        current = optimizer.apply_gradients(grads(2.0 + step), current)
    assert checked == []
    # A parameter added mid-training: the checked walk runs once and gives it its state.
    grown = dict(current, extra=mx.zeros((4,)))
    current = optimizer.apply_gradients(dict(grads(), extra=mx.ones((4,))), grown)
    assert checked == [1]
    assert optimizer.state["extra"]["v"].shape == (4,)
    current = optimizer.apply_gradients(dict(grads(), extra=mx.ones((4,))), current)
    assert checked == [1]


@pytest.mark.parametrize("fused", CACHED_PATHS)
def test_buffers_put_in_the_same_nodes_are_used_not_the_cached_ones(fused):
    optimizer, current = trained(fused, steps=2)
    other, other_current = trained(fused, steps=5)
    # The state of another run put in place of each buffer, in the same nodes.
    for key_path, value in tree_flatten(other.state):
        *parents, last = key_path.split(".")
        node = optimizer.state
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    ours = optimizer.apply_gradients(grads(9.0), other_current)
    theirs = other.apply_gradients(grads(9.0), other_current)
    for (key, a), (_, b) in zip(
        tree_flatten((ours, optimizer.state)), tree_flatten((theirs, other.state)), strict=True
    ):
        assert np.array_equal(np.array(a), np.array(b)), key


def test_moved_keys_keep_their_own_weight_decay_exclusion():
    # The same state nodes visited in another order under other keys: the structure key
    # differs, so the paths (and the decay exclusion they select) are found again.
    optimizer = RMSprop(0.1, weight_decay=0.5, fused="compiled")
    optimizer.exclude_from_weight_decay(var_names=["^b$"])
    current = {"a": mx.ones((2,)), "b": mx.ones((2,))}
    current = optimizer.apply_gradients({"a": mx.ones((2,)), "b": mx.ones((2,))}, current)
    state = optimizer.state
    state["a"], state["b"] = state["b"], state["a"]
    swapped = {"b": current["a"], "a": current["b"]}
    reference = RMSprop(0.1, weight_decay=0.5, fused="compiled")
    reference.exclude_from_weight_decay(var_names=["^b$"])
    reference.state.update({key: dict(state[key]) for key in ("a", "b")})
    new = optimizer.apply_gradients({"b": mx.ones((2,)), "a": mx.ones((2,))}, swapped)
    expected = reference.apply_gradients({"b": mx.ones((2,)), "a": mx.ones((2,))}, swapped)
    for key in ("a", "b"):
        assert np.array_equal(np.array(new[key]), np.array(expected[key])), key


@pytest.mark.parametrize("fused", CACHED_PATHS)
@pytest.mark.parametrize("accumulation", [None, 2], ids=["plain", "accumulating"])
def test_a_dtype_change_the_checks_accept_takes_the_step_function_for_it(fused, accumulation):
    # bfloat16 parameters round stochastically, float32 ones do not: another step function.
    # With accumulation the update that accumulates must be counted as traced too.
    def run(cached):
        optimizer = RMSprop(
            0.1,
            stochastic_rounding=True,
            rounding_seed=7,
            fused=fused,
            gradient_accumulation_steps=accumulation,
        )
        current = {"w": mx.ones((8,)) / 3}
        for step in range(4):
            if not cached:
                optimizer._leaves = None
            if step == 2:
                current = {"w": current["w"].astype(mx.bfloat16)}
            gradient = mx.full((8,), 0.1 * (step + 1), current["w"].dtype)
            current = optimizer.apply_gradients({"w": gradient}, current)
            mx.eval(current, optimizer.state)
        return tree_flatten((current, optimizer.state))

    for (key, ours), (_, theirs) in zip(run(True), run(False), strict=True):
        assert ours.dtype == theirs.dtype, key
        assert np.array_equal(
            np.array(ours.astype(mx.float32)), np.array(theirs.astype(mx.float32))
        ), key


@pytest.mark.parametrize("fused", CACHED_PATHS)
def test_a_state_in_another_key_order_trains_under_a_users_compile(fused):
    # A state read from a file may list a parameter's buffers in another order. Under
    # mx.compile(..., outputs=optimizer.state) MLX writes the outputs back in the state's own
    # order: reordering the nodes in place swapped v and momentum_buffer (NaN on resume).
    def run(reverse):
        optimizer = RMSprop(0.01, momentum=0.9, fused=fused)
        holder = {"params": {"w": mx.ones((4,)), "b": mx.zeros((3,))}}
        optimizer.init(holder["params"])
        if reverse:
            for node in (optimizer.state["w"], optimizer.state["b"]):
                items = list(node.items())[::-1]
                node.clear()
                node.update(items)
        order = {key: tuple(optimizer.state[key]) for key in ("w", "b")}
        captured = [holder, optimizer.state]

        def step(gradients):
            holder["params"] = optimizer.apply_gradients(gradients, holder["params"])

        compiled = mx.compile(step, inputs=captured, outputs=captured)
        for index in range(5):
            compiled({"w": mx.full((4,), 0.1 * (index + 1)), "b": mx.full((3,), -0.2)})
            mx.eval(captured)
        assert {key: tuple(optimizer.state[key]) for key in ("w", "b")} == order
        return {
            key: {name: np.array(value) for name, value in optimizer.state[key].items()}
            for key in ("w", "b")
        }

    reordered, plain = run(True), run(False)
    for key in ("w", "b"):
        for name in plain[key]:
            assert np.array_equal(reordered[key][name], plain[key][name]), (key, name)
