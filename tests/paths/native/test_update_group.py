"""Several parameters' native updates as one node (``native.updates``, ``_ext.update_group``)
against one node per parameter (``native.update``, itself tested against the reference), bit
for bit: members that differ in options, storage flags, dtypes, sizes and layout, over several
steps; the clip factors and the accumulating update; in-place updates; the function
transforms; the binding's argument checks; and which parameters share a node.

The node must be right for any members, so most tests group every parameter they update
(``one_group``), whatever the size rule of ``native.group_bounds`` would do."""

from __future__ import annotations

import dataclasses
import io
import re

import mlx.core as mx
import numpy as np
import pytest
from test_native_parity import EVERYTHING, OPTION_SETS, _address, assert_same, scalars_for
from test_native_storage import initial_state, step_scalars

from mlx_rmsprop.paths import native
from mlx_rmsprop.spec import ACCUMULATOR, UpdateOptions

from native_available import requires_native

pytestmark = requires_native


@pytest.fixture
def one_group(monkeypatch):
    """``native.updates`` builds all the parameters it is given as one node."""
    monkeypatch.setattr(native, "group_bounds", lambda sizes, split_from: [(0, len(sizes))])


EIGHT_BIT = UpdateOptions(momentum=True, quantized_state=True, block_size=64)
ROUNDED = UpdateOptions(centered=True, stochastic_rounding=True)

# (options, shape, parameter dtype, gradient dtype, state dtype, compute dtype): sizes on both
# sides of a worker part (32,768 elements) and of the threaded threshold (65,536), 0-d, empty.
MEMBERS = [
    (OPTION_SETS["defaults"], (7,), mx.float32, mx.float32, mx.float32, mx.float32),
    (EVERYTHING, (65536 + 37,), mx.bfloat16, mx.float16, mx.float32, mx.float32),
    (OPTION_SETS["keras-like"], (), mx.float16, mx.float32, mx.float16, mx.float32),
    (EIGHT_BIT, (3, 1000), mx.float32, mx.bfloat16, mx.float32, mx.float32),
    (OPTION_SETS["torch-like"], (0, 3), mx.float32, mx.float32, mx.float32, mx.float32),
    (ROUNDED, (2 * 32768 + 5,), mx.bfloat16, mx.float32, mx.bfloat16, mx.float32),
    (OPTION_SETS["torch-like"], (513,), mx.float64, mx.float32, mx.float64, mx.float64),
    (EVERYTHING, (40000,), mx.float32, mx.float32, mx.float32, mx.float32),
]


def make_members(members, seed, *, transposed=False, accumulator_dtype=None):
    """Each member's (options, parameter, state, gradients for three steps, compute dtype,
    accumulator or None). With ``transposed``, 2-d gradients are strided (a transpose)."""
    rng = np.random.default_rng(seed)
    made = []
    for options, shape, parameter_dtype, gradient_dtype, state_dtype, compute in members:
        parameter = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(parameter_dtype)
        state = initial_state(options, shape, rng, state_dtype)
        gradients = []
        for step in range(3):
            values = rng.standard_normal(shape[::-1] if transposed else shape) * 2.0 * 10.0**-step
            gradient = mx.array(values.astype(np.float32)).astype(gradient_dtype)
            gradients.append(gradient.T if transposed else gradient)
        accumulator = None
        if accumulator_dtype is not None:
            accumulator = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(
                accumulator_dtype
            )
        made.append((options, parameter, state, gradients, compute, accumulator))
    return made


def scalars_of(options, compute, step, member):
    # Scalars that differ per member (the learning rate), as the members of a group may.
    scalars = step_scalars(options, compute, step)
    return scalars * mx.array(1.0 + member / 8, compute)


def run_both(members, *, first=0, factors=None, gates=None, loss_scale=0.0, steps=2):
    """Three steps of the group and of one node per parameter, each on its own outputs;
    compares every parameter and state array after each step."""
    parameters = [member[1] for member in members]
    states = [dict(member[2]) for member in members]
    if gates is not None:
        for state, member in zip(states, members, strict=True):
            state[ACCUMULATOR] = member[5]
    ours = (parameters, states)
    single = (parameters, states)
    for step in range(1, 4):
        options = [member[0] for member in members]
        vectors = [scalars_of(member[0], member[4], step, m) for m, member in enumerate(members)]
        gradients = [member[3][step - 1] for member in members]
        accumulation = None if gates is None else (gates, loss_scale, steps)
        ours = native.updates(
            options,
            vectors,
            ours[0],
            gradients,
            ours[1],
            first=first,
            factors=factors,
            accumulation=accumulation,
        )
        single = one_node_each(options, vectors, *single, gradients, first, factors, accumulation)
        mx.eval(ours, single)
        for m in range(len(members)):
            what = f"step {step} member {m}"
            assert_same(ours[0][m], single[0][m], f"{what} parameter")
            assert list(ours[1][m]) == list(single[1][m]), what
            for key in single[1][m]:
                assert_same(ours[1][m][key], single[1][m][key], f"{what} {key}")
    return ours


def one_node_each(options, vectors, parameters, states, gradients, first, factors, accumulation):
    new_parameters, new_states = [], []
    by_index = {} if factors is None else {"factors": factors}
    for m, (o, vector, parameter, state, gradient) in enumerate(
        zip(options, vectors, parameters, states, gradients, strict=True)
    ):
        buffers = {key: state[key] for key in o.state_keys}
        if accumulation is None:
            new_parameter, new_state = native.update(
                o, vector, parameter, gradient, buffers, index=first + m, **by_index
            )
        else:
            gates, loss_scale, steps = accumulation
            new_parameter, new_state, accumulator = native.accumulating_update(
                o,
                vector,
                parameter,
                gradient,
                buffers,
                state[ACCUMULATOR],
                gates,
                loss_scale,
                steps,
                index=first + m,
                **by_index,
            )
            new_state = {**new_state, ACCUMULATOR: accumulator}
        new_parameters.append(new_parameter)
        new_states.append(new_state)
    return new_parameters, new_states


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
def test_mixed_members_match_one_node_per_parameter(transposed, one_group):
    members = MEMBERS if not transposed else [m for m in MEMBERS if len(m[1]) == 2]
    run_both(make_members(members, 1, transposed=transposed), first=5)


@pytest.mark.parametrize("size", [3, 40000, 70000])
def test_each_member_reads_its_own_clip_factors(size, one_group):
    options = dataclasses.replace(OPTION_SETS["defaults"], scale_gradient=True)
    members = [(options, (size + k,), *[mx.float32] * 4) for k in range(5)]
    factors = mx.array(np.random.default_rng(2).uniform(0.2, 2.0, (9, 2)).astype(np.float32))
    run_both(make_members(members, 2), first=3, factors=factors)


@pytest.mark.parametrize("applies, skip", [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)])
def test_accumulating_members_match_one_node_per_parameter(applies, skip, one_group):
    members = [
        (OPTION_SETS["keras-like"], (50000,), *[mx.float32] * 4),
        (EVERYTHING, (17,), mx.bfloat16, mx.float16, mx.float32, mx.float32),
        (OPTION_SETS["defaults"], (40000,), *[mx.float32] * 4),
    ]
    gates = mx.array([applies, skip], mx.float32)
    run_both(make_members(members, 3, accumulator_dtype=mx.float32), gates=gates, loss_scale=4.0)


def update_nodes(outputs) -> list[str]:
    """The update nodes of the graph of ``outputs``, in the order of MLX's DOT export."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return re.findall(r'label ="(RMSpropUpdate\w*)"', dot.getvalue())


SPLIT = 65536  # what the module reports as PARALLEL_THRESHOLD (checked below)
LIMIT = native.GROUP_ELEMENTS


@pytest.mark.parametrize(
    "sizes, bounds",
    [
        ([], []),
        ([4], [(0, 1)]),
        # Parameters the workers do not split each have a node.
        ([4, 4, 4], [(0, 1), (1, 2), (2, 3)]),
        ([SPLIT - 1, SPLIT - 1], [(0, 1), (1, 2)]),
        # Split ones group, GROUP_PARAMETERS at most, and a small one ends a group.
        ([SPLIT] * 3 + [4] + [SPLIT] * 2, [(0, 3), (3, 4), (4, 6)]),
        ([SPLIT] * 17, [(0, 8), (8, 16), (16, 17)]),
        # No group passes GROUP_ELEMENTS; a larger parameter is alone.
        ([LIMIT // 2] * 3, [(0, 2), (2, 3)]),
        ([LIMIT // 2 + 1] * 2, [(0, 1), (1, 2)]),
        ([SPLIT, 2 * LIMIT, SPLIT], [(0, 1), (1, 2), (2, 3)]),
    ],
)
def test_group_bounds(sizes, bounds):
    assert native.GROUP_PARAMETERS == 8
    assert native.group_bounds(sizes, SPLIT) == bounds


def test_a_step_builds_the_nodes_group_bounds_gives():
    assert native._loaded().PARALLEL_THRESHOLD == SPLIT
    sizes = [SPLIT] * 10 + [7, 3] + [2 * SPLIT] * 2
    options = UpdateOptions()
    new_parameters, new_states = native.updates(
        [options] * len(sizes),
        [scalars_for(options)] * len(sizes),
        [mx.zeros((size,)) for size in sizes],
        [mx.ones((size,)) for size in sizes],
        [{"v": mx.zeros((size,))} for size in sizes],
    )
    # (0, 8), (8, 10), (10, 11), (11, 12), (12, 14): a parameter alone is a plain update node.
    assert (
        sorted(update_nodes(new_parameters)) == ["RMSpropUpdate"] * 2 + ["RMSpropUpdateGroup"] * 3
    )
    assert [p.size for p in new_parameters] == sizes
    assert [list(state) for state in new_states] == [["v"]] * len(sizes)


def test_released_buffers_are_updated_in_place_and_held_ones_are_not(one_group):
    options = UpdateOptions(momentum=True)
    members = make_members([(options, (70000,), *[mx.float32] * 4)] * 3, 4)
    parameters = [member[1] for member in members]
    states = [member[2] for member in members]
    gradients = [member[3][0] for member in members]
    mx.eval(parameters, states, gradients)
    held = np.array(parameters[1])
    kept = parameters[1]
    addresses = [
        [_address(p), *(_address(s[key]) for key in options.state_keys)]
        for p, s in zip(parameters, states, strict=True)
    ]
    vectors = [scalars_for(options)] * 3
    del members
    parameters, states = native.updates([options] * 3, vectors, parameters, gradients, states)
    mx.eval(parameters, states)
    after = [
        [_address(p), *(_address(s[key]) for key in options.state_keys)]
        for p, s in zip(parameters, states, strict=True)
    ]
    # The parameter the caller still holds keeps its values and gets new memory; everything
    # else is updated where it lies.
    assert after[0] == addresses[0] and after[2] == addresses[2]
    assert after[1][0] != addresses[1][0] and after[1][1:] == addresses[1][1:]
    np.testing.assert_array_equal(np.array(kept), held)


def group_step(options):
    """(parameters, gradients, *buffers) -> every output, for three parameters in one group."""
    keys = options.state_keys

    def step(p0, p1, p2, g0, g1, g2, *buffers):
        states = [dict(zip(keys, buffers[k::3], strict=True)) for k in range(3)]
        vectors = [scalars_for(options, step=2) * (1 + k) for k in range(3)]
        new_parameters, new_states = native.updates(
            [options] * 3, vectors, [p0, p1, p2], [g0, g1, g2], states
        )
        return new_parameters + [state[key] for key in keys for state in new_states]

    return step


def single_step(options):
    keys = options.state_keys

    def step(p0, p1, p2, g0, g1, g2, *buffers):
        outputs = []
        states = []
        for k, (p, g) in enumerate(zip((p0, p1, p2), (g0, g1, g2), strict=True)):
            state = dict(zip(keys, buffers[k::3], strict=True))
            new_parameter, new_state = native.update(
                options, scalars_for(options, step=2) * (1 + k), p, g, state, index=k
            )
            outputs.append(new_parameter)
            states.append(new_state)
        return outputs + [state[key] for key in keys for state in states]

    return step


def transform_inputs(options, seed):
    members = make_members([(options, (5, 6), *[mx.float32] * 4)] * 3, seed)
    parameters = [member[1] for member in members]
    gradients = [member[3][0] for member in members]
    buffers = [member[2][key] for key in options.state_keys for member in members]
    return [*parameters, *gradients, *buffers]


@pytest.mark.parametrize("name", ["defaults", "everything"])
def test_transforms_are_the_members_transforms(name, one_group):
    options = OPTION_SETS[name]
    primals = transform_inputs(options, 5)
    outputs = len(group_step(options)(*primals))
    cotangents = [mx.full((5, 6), 0.25 * (k + 1)) for k in range(outputs)]

    ours = mx.vjp(group_step(options), primals, cotangents)
    expected = mx.vjp(single_step(options), primals, cotangents)
    for part, (actual, wanted) in enumerate(zip(ours, expected, strict=True)):
        for k, (a, e) in enumerate(zip(actual, wanted, strict=True)):
            assert_same(a, e, f"vjp part {part} entry {k}")

    # Derivatives with respect to one member's inputs only: the others' are zero.
    only_second = mx.grad(
        lambda p1: mx.sum(mx.stack(group_step(options)(primals[0], p1, *primals[2:])[:3]))
    )(primals[1])
    wanted = mx.grad(
        lambda p1: mx.sum(mx.stack(single_step(options)(primals[0], p1, *primals[2:])[:3]))
    )(primals[1])
    assert_same(only_second, wanted, "grad of one member")

    tangents = [mx.full((5, 6), 0.5 - 0.1 * k) for k in range(len(primals))]
    ours = mx.jvp(group_step(options), primals, tangents)
    expected = mx.jvp(single_step(options), primals, tangents)
    for part, (actual, wanted) in enumerate(zip(ours, expected, strict=True)):
        for k, (a, e) in enumerate(zip(actual, wanted, strict=True)):
            assert_same(a, e, f"jvp part {part} entry {k}")

    batched = [mx.stack([x, x * 0.5]) for x in primals]
    ours = mx.vmap(group_step(options))(*batched)
    expected = mx.vmap(single_step(options))(*batched)
    for k, (a, e) in enumerate(zip(ours, expected, strict=True)):
        assert_same(a, e, f"vmap output {k}")


def test_group_binding_checks_its_lists():
    extension = native._loaded()
    options = UpdateOptions()
    with pytest.raises(ValueError, match=r"update_group takes one scalars, gradient, .* got 2"):
        extension.update_group(
            [scalars_for(options)],
            [mx.zeros(3)] * 2,
            [mx.zeros(3)] * 2,
            [[mx.zeros(3)]] * 2,
            [0, 0],
            [0, 0],
            [0, 1],
        )
    # A bad member is refused with the message of the one-parameter update.
    with pytest.raises(ValueError, match=r"\[rmsprop_update\] state\[0\] \(v\) must be a "):
        native.updates(
            [options] * 2,
            [scalars_for(options)] * 2,
            [mx.zeros(3), mx.zeros(4)],
            [mx.zeros(3), mx.zeros(4)],
            [{"v": mx.zeros(3)}, {"v": mx.zeros(5)}],
        )


def split_tree(count: int, seed: int) -> dict[str, mx.array]:
    rng = np.random.default_rng(seed)
    shapes = [(256, 256), (16, 4100), (300, 300)]
    return {
        f"p{k}": mx.array(rng.standard_normal(shapes[k % 3]).astype(np.float32))
        for k in range(count)
    }


@pytest.mark.parametrize("config", ["plain", "full"])
def test_optimizer_steps_on_grouped_parameters_match_plain_ops(config):
    from mlx_rmsprop import RMSprop

    options = {}
    if config == "full":
        options = {
            "use_ema": True,
            "skip_nonfinite": True,
            "clipnorm": 1.0,
            "gradient_accumulation_steps": 2,
        }
    params = split_tree(11, 6)  # two groups of 8 and 3
    trajectories = []
    for fused in ("native", False):
        optimizer = RMSprop.from_keras(learning_rate=0.01, momentum=0.5, fused=fused, **options)
        current = params
        for step in range(4):
            current = optimizer.apply_gradients(split_tree(11, 10 + step), current)
            mx.eval(current, optimizer.state)
        trajectories.append((current, optimizer.state))
    (ours, ours_state), (plain, plain_state) = trajectories
    for key in plain:
        assert_same(ours[key], plain[key], key)
        for name, buffer in plain_state[key].items():
            assert_same(ours_state[key][name], buffer, f"{key} {name}")


def test_learning_rate_gradient_through_grouped_updates_matches_plain_ops():
    # Members share the scalars vector: its cotangents must add up in the reference's order.
    from mlx_rmsprop import RMSprop

    params, grads = split_tree(5, 7), split_tree(5, 8)

    def loss(fused):
        def of(learning_rate):
            optimizer = RMSprop(learning_rate, centered=True, fused=fused)
            new = optimizer.apply_gradients(grads, params)
            return sum(mx.sum(new[key] * new[key]) for key in new)

        return of

    learning_rate = mx.array(0.05)
    assert_same(
        mx.grad(loss("native"))(learning_rate), mx.grad(loss(False))(learning_rate), "d/dlr"
    )


@pytest.mark.parametrize("batched", [0, 1, 2])
def test_vmap_over_one_members_parameter(batched, one_group):
    # The other members have nothing batched: their outputs are unbatched, as with a node each.
    options = OPTION_SETS["everything"]
    primals = transform_inputs(options, 6)

    def along(step):
        def function(parameter):
            arguments = list(primals)
            arguments[batched] = parameter
            return step(options)(*arguments)

        return function

    stacked = mx.stack([primals[batched], primals[batched] * 0.5])
    ours = mx.vmap(along(group_step))(stacked)
    expected = mx.vmap(along(single_step))(stacked)
    for k, (a, e) in enumerate(zip(ours, expected, strict=True)):
        assert_same(a, e, f"vmap output {k}")


def test_members_a_transform_does_not_touch_are_not_transformed(one_group):
    # An 8-bit member cannot be differentiated or batched; a transform of another member of
    # its group must not try.
    rng = np.random.default_rng(7)
    members = [EIGHT_BIT, UpdateOptions()]
    parameters = [mx.array(rng.standard_normal((4, 64)).astype(np.float32)) for _ in members]
    gradients = [mx.array(rng.standard_normal((4, 64)).astype(np.float32)) for _ in members]
    states = [initial_state(options, (4, 64), rng, mx.float32) for options in members]
    vectors = [scalars_for(options) for options in members]

    def grouped(second):
        new_parameters, _ = native.updates(
            members, vectors, [parameters[0], second], gradients, states
        )
        return new_parameters

    def alone(second):
        return native.update(members[1], vectors[1], second, gradients[1], states[1], index=1)[0]

    tangent = mx.full((4, 64), 0.25)
    (ours_first, ours_second), (ours_tangent_first, ours_tangent_second) = mx.jvp(
        lambda second: grouped(second), [parameters[1]], [tangent]
    )
    (expected,), (expected_tangent,) = mx.jvp(
        lambda second: [alone(second)], [parameters[1]], [tangent]
    )
    assert_same(ours_second, expected, "jvp primal")
    assert_same(ours_tangent_second, expected_tangent, "jvp tangent")
    assert_same(ours_tangent_first, mx.zeros_like(parameters[0]), "untouched member's tangent")

    stacked = mx.stack([parameters[1], parameters[1] * 2.0])
    ours_batched = mx.vmap(lambda second: grouped(second)[1])(stacked)
    assert_same(ours_batched, mx.vmap(alone)(stacked), "vmap")
    ours_grad = mx.grad(lambda second: mx.sum(grouped(second)[1]))(parameters[1])
    assert_same(ours_grad, mx.grad(lambda second: mx.sum(alone(second)))(parameters[1]), "grad")
