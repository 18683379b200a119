"""What MLX's own optimizers allow and users port: copy.deepcopy and pickle at any time, and
mx.grad / mx.vjp / mx.jvp / mx.vmap through an optimizer step, on every path.

Copies must continue bit for bit with the original. Transforms on the fused CPU paths are
compared with ``fused=False`` (plain reference ops, differentiated by MLX itself) bit for bit:
the native primitive's transforms run the reference's ops (mlx_rmsprop/paths/native/transforms.cpp).
The Metal/CUDA kernels have no transforms in MLX (docs/transforms.md).
"""

from __future__ import annotations

import copy
import pickle

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_rmsprop import RMSprop
from mlx_rmsprop.paths.kernels import metal
from mlx_rmsprop.paths.kernels.launch import make_update
from mlx_rmsprop.reference import rmsprop_reference

from native_available import native_path

PATHS = [False, "compiled", native_path()]

# Every code-selecting option appears in at least one configuration.
CONFIGS = {
    "mlx": {},
    "centered-momentum": {"centered": True, "momentum": 0.9, "weight_decay": 0.01},
    "keras": {
        "eps_in_sqrt": True,
        "lr_in_momentum": True,
        "momentum": 0.5,
        "nesterov": True,
        "decoupled_weight_decay": True,
        "weight_decay": 0.1,
    },
    "optax": {"bias_correction": True, "maximize": True, "clipvalue": 0.4},
    "pipeline": {
        "loss_scale_factor": 4.0,
        "clipnorm": 0.5,
        "skip_nonfinite": True,
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 2,
    },
}


def parameters(seed=0, batch=()):
    rng = np.random.default_rng(seed)
    shapes = {"w": (3, 2), "b": (2,), "s": ()}
    return {k: mx.array(rng.standard_normal(batch + s), mx.float32) for k, s in shapes.items()}


def flat(tree):
    return dict(tree_flatten(tree))


def bits(array):
    """The bit patterns of ``array`` (so -0.0 differs from 0.0 and NaN compares equal)."""
    return array.view({1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[array.itemsize])


def assert_bitwise(actual, expected):
    actual, expected = flat(actual), flat(expected)
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        assert mx.array_equal(bits(actual[key]), bits(value)).item(), key


def halving(step):
    """A schedule that pickles (a lambda or MLX's closures do not, for MLX's RMSprop either)."""
    return 0.05 * mx.power(0.5, step.astype(mx.float32))


def configured(fused, config="centered-momentum", learning_rate=0.05):
    optimizer = RMSprop(learning_rate, fused=fused, **CONFIGS[config])
    optimizer.exclude_from_weight_decay(var_names=["b"])
    return optimizer


def gradient_sequence(steps, seed=1):
    return [parameters(seed + i) for i in range(steps)]


def pickled(optimizer):
    return pickle.loads(pickle.dumps(optimizer))


# -- copy.deepcopy and pickle -----------------------------------------------------------------


@pytest.mark.parametrize("duplicate", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("steps_before", [0, 3])
@pytest.mark.parametrize("learning_rate", [0.05, halving], ids=["constant", "schedule"])
@pytest.mark.parametrize("fused", PATHS)
def test_copy_continues_bit_identically(fused, learning_rate, steps_before, duplicate):
    original = configured(fused, learning_rate=learning_rate)
    params = parameters()
    grads = gradient_sequence(steps_before + 4)
    for g in grads[:steps_before]:
        params = original.apply_gradients(g, params)
    mx.eval(params, original.state)

    twin = duplicate(original)
    assert twin.path == original.path
    twin_params = params
    for g in grads[steps_before:]:
        params = original.apply_gradients(g, params)
        twin_params = twin.apply_gradients(g, twin_params)
        mx.eval(params, twin_params, original.state, twin.state)
    assert_bitwise(twin_params, params)
    # Every buffer, the step, the learning rate and the skip counter.
    assert_bitwise(twin.state, original.state)


@pytest.mark.parametrize("fused", PATHS)
def test_copies_do_not_share_state(fused):
    original = configured(fused)
    params = original.apply_gradients(parameters(1), parameters())
    twin = copy.deepcopy(original)
    twin.apply_gradients(parameters(2), params)
    mx.eval(twin.state)
    assert original.step.item() == 1 and twin.step.item() == 2


@pytest.mark.parametrize("fused", PATHS)
def test_lambda_schedule_deep_copies_and_refuses_pickle_as_mlx_does(fused):
    original = RMSprop(lambda step: 0.01 / (1 + step), fused=fused)
    params = original.apply_gradients(parameters(1), parameters())
    twin = copy.deepcopy(original)
    grads = parameters(2)
    assert_bitwise(twin.apply_gradients(grads, params), original.apply_gradients(grads, params))

    builtin = optim.RMSprop(lambda step: 0.01 / (1 + step))
    builtin.apply_gradients(parameters(1), parameters())
    with pytest.raises(Exception) as builtin_error:
        pickle.dumps(builtin)
    with pytest.raises(type(builtin_error.value), match="lambda"):
        pickle.dumps(original)


# -- function transforms ------------------------------------------------------------------------


def two_steps(fused, config):
    """The parameters after two updates from fresh state, as a function of the parameters,
    both steps' gradients and the learning rate (the second step reads the first's state)."""

    def run(params, grads, learning_rate):
        optimizer = RMSprop(0.05, fused=fused, **CONFIGS[config])
        optimizer.state["learning_rate"] = learning_rate
        for g in grads:
            params = optimizer.apply_gradients(g, params)
        return params

    return run


def squared_norm(tree):
    return sum((leaf * leaf).sum() for leaf in flat(tree).values())


def loss_of(fused, config):
    step = two_steps(fused, config)

    def loss(params, grads, learning_rate):
        return squared_norm(step(params, grads, learning_rate))

    return loss


TRANSFORM_PATHS = ["compiled", native_path()]
LEARNING_RATE = mx.array(0.05)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("fused", TRANSFORM_PATHS)
def test_grad_through_steps_equals_plain_ops(fused, config):
    params, grads = parameters(), gradient_sequence(2)
    argnums = (0, 1, 2)  # parameters, gradients, learning rate
    expected = mx.grad(loss_of(False, config), argnums=argnums)(params, grads, LEARNING_RATE)
    actual = mx.grad(loss_of(fused, config), argnums=argnums)(params, grads, LEARNING_RATE)
    assert_bitwise(actual, expected)
    assert all(np.isfinite(np.array(leaf)).all() for leaf in flat(actual).values())


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float64])
@pytest.mark.parametrize("fused", TRANSFORM_PATHS)
def test_grad_in_other_dtypes_equals_plain_ops(fused, dtype):
    # Half-precision parameters convert to and from float32 arithmetic; float64 computes in
    # float64 (float64 state, float64 scalars).
    def cast(tree):
        return tree_map(lambda a: a.astype(dtype), tree)

    params, grads = cast(parameters()), [cast(g) for g in gradient_sequence(2)]
    learning_rate = LEARNING_RATE.astype(mx.float64) if dtype == mx.float64 else LEARNING_RATE
    argnums = (0, 1, 2)
    expected = mx.grad(loss_of(False, "centered-momentum"), argnums=argnums)(
        params, grads, learning_rate
    )
    actual = mx.grad(loss_of(fused, "centered-momentum"), argnums=argnums)(
        params, grads, learning_rate
    )
    assert_bitwise(actual, expected)
    assert flat(actual)["0.w"].dtype == dtype


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("fused", TRANSFORM_PATHS)
def test_vjp_and_jvp_through_steps_equal_plain_ops(fused, config):
    params, grads = parameters(), gradient_sequence(2)

    def as_function(path):
        step = two_steps(path, config)
        return lambda p, g0, g1, lr: list(flat(step(p, [g0, g1], lr)).values())

    primals = [params, *grads, LEARNING_RATE]
    cotangents = [mx.ones_like(leaf) for leaf in flat(params).values()]
    tangents = [parameters(7), parameters(8), parameters(9), mx.array(0.5)]

    def both(path):
        function = as_function(path)
        flat_function = lambda *leaves: function(*unflatten(leaves))  # noqa: E731
        leaves = flatten(primals)
        return (
            mx.vjp(flat_function, leaves, cotangents),
            mx.jvp(flat_function, leaves, flatten(tangents)),
        )

    expected, actual = both(False), both(fused)
    assert_bitwise(actual, expected)


def flatten(trees):
    return [
        leaf
        for tree in trees
        for leaf in (flat(tree).values() if isinstance(tree, dict) else [tree])
    ]


def unflatten(leaves):
    """Inverse of ``flatten`` for [params, grads0, grads1, learning_rate]."""
    keys = list(flat(parameters()))
    n = len(keys)
    trees = [dict(zip(keys, leaves[i * n : (i + 1) * n], strict=True)) for i in range(3)]
    return (*trees, leaves[3 * n])


@pytest.mark.parametrize("config", ["centered-momentum", "keras", "pipeline"])
@pytest.mark.parametrize("fused", TRANSFORM_PATHS)
@pytest.mark.parametrize("batched", ["parameters", "parameters+gradients", "learning_rate"])
def test_vmap_over_a_batch_equals_each_entry(batched, fused, config):
    batch = 3
    params, grads, learning_rate = parameters(), gradient_sequence(2), LEARNING_RATE
    if batched == "learning_rate":
        # Per-entry scalars: the native vmap runs the reference's ops instead of the primitive.
        learning_rate = mx.array([0.01, 0.05, 0.1], mx.float32)
    else:
        params = parameters(batch=(batch,))
    if batched == "parameters+gradients":
        grads = [parameters(seed, batch=(batch,)) for seed in (11, 12)]
    in_axes = tuple(
        0 if name in batched.split("+") else None
        for name in ("parameters", "gradients", "learning_rate")
    )

    def batched_run(path):
        return mx.vmap(two_steps(path, config), in_axes=in_axes)(params, grads, learning_rate)

    def entry(tree, axis, i):
        return tree if axis is None else tree_map(lambda a: a[i], tree)

    actual = batched_run(fused)
    assert_bitwise(actual, batched_run(False))
    # Each entry as its own unbatched update (same path).
    for i in range(batch):
        args = [
            entry(x, axis, i)
            for x, axis in zip((params, grads, learning_rate), in_axes, strict=True)
        ]
        assert_bitwise(entry(actual, 0, i), two_steps(fused, config)(*args))


# -- the kernel paths (Metal, CUDA): the real launcher with a stand-in kernel ---------------------


def kernel_stand_in(call):
    """Computes what the kernel computes, from the launch MLX would be given."""
    options = call.variant.options
    parameter, gradient, *buffers, scalars = call.inputs
    state = dict(zip(options.state_keys, buffers, strict=True))
    new_parameter, new_state = rmsprop_reference(options, scalars, parameter, gradient, state)
    outputs = [new_parameter, *(new_state[key] for key in options.state_keys)]
    return [o.reshape(shape) for o, shape in zip(outputs, call.output_shapes, strict=True)]


@pytest.mark.parametrize("duplicate", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
def test_kernel_path_copies_continue_bit_identically(monkeypatch, duplicate):
    # The launcher's update function is a closure, and the step is compiled (compile_step).
    monkeypatch.setattr(metal, "load", lambda: make_update(kernel_stand_in))
    original = configured("metal")
    params = original.apply_gradients(parameters(1), parameters())
    twin = duplicate(original)
    assert twin.path == "metal"
    grads = parameters(2)
    assert_bitwise(twin.apply_gradients(grads, params), original.apply_gradients(grads, params))
    assert_bitwise(twin.state, original.state)


def test_grad_through_8_bit_state_and_stochastic_rounding_steps():
    # Codes and the rounding choice carry no derivative; the scales and the straight-through
    # rounding do, so the gradient exists, is finite, and the compiled path agrees bit for bit.
    config = dict(
        state_bits=8, min_quantized_size=0, stochastic_rounding=True, centered=True, momentum=0.9
    )
    rng = np.random.default_rng(3)
    params = {"w": mx.array(rng.standard_normal((8, 40)), mx.bfloat16)}
    grads = [{"w": mx.array(rng.standard_normal((8, 40)), mx.bfloat16)} for _ in range(2)]

    def loss(fused):
        def run(params, learning_rate):
            optimizer = RMSprop(0.05, fused=fused, **config)
            optimizer.state["learning_rate"] = learning_rate
            for g in grads:
                params = optimizer.apply_gradients(g, params)
            return squared_norm({"w": params["w"].astype(mx.float32)})

        return run

    expected = mx.grad(loss(False), argnums=(0, 1))(params, LEARNING_RATE)
    actual = mx.grad(loss("compiled"), argnums=(0, 1))(params, LEARNING_RATE)
    assert_bitwise(actual, expected)
    assert np.isfinite(np.array(expected[0]["w"].astype(mx.float32))).all()
    assert np.count_nonzero(np.array(expected[0]["w"].astype(mx.float32))) > 0
