"""The native CPU update against the reference: every option combination, every dtype mix,
awkward sizes and layouts, special values, gates, and its behaviour as a graph node (compile,
donation). float32 and float64 arithmetic is compared bit for bit: the native loop performs the
reference's IEEE operations in the reference's order, and casts exactly as MLX's astype does."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop.paths import native
from mlx_rmsprop.reference import rmsprop_reference
from mlx_rmsprop.spec import FLAGS, STORAGE_FLAGS, Scalar, UpdateOptions, option_space

from native_available import requires_native

pytestmark = requires_native

# The flags that pick the native loop's template instantiation (select_core); the others (the
# gradient preparation, the gates, the EMA) are per-chunk passes.
CORE_FLAGS = (
    "centered",
    "momentum",
    "nesterov",
    "eps_in_sqrt",
    "lr_in_momentum",
    "decoupled_decay",
    "bias_correction",
)
EVERYTHING = UpdateOptions(
    centered=True,
    momentum=True,
    nesterov=True,
    eps_in_sqrt=True,
    lr_in_momentum=True,
    coupled_decay=True,
    maximize=True,
    bias_correction=True,
    scale_gradient=True,
    clip_value=True,
    gated=True,
    ema=True,
)
OPTION_SETS = {
    "defaults": UpdateOptions(),
    "everything": EVERYTHING,
    "keras-like": UpdateOptions(
        momentum=True, eps_in_sqrt=True, lr_in_momentum=True, decoupled_decay=True
    ),
    "torch-like": UpdateOptions(centered=True, momentum=True, coupled_decay=True, maximize=True),
}


def scalars_for(
    options: UpdateOptions,
    dtype: mx.Dtype = mx.float32,
    *,
    step: int = 3,
    gate: float = 1.0,
    ema_gate: float = 1.0,
    overwrite: float = 0.0,
    rounding_key: int = 0,
) -> mx.array:
    alpha = 0.9
    values = {
        Scalar.LR: 0.01,
        Scalar.ALPHA: alpha,
        Scalar.ONE_MINUS_ALPHA: 1.0 - alpha,
        Scalar.EPS: 1e-6,
        Scalar.MOMENTUM: 0.8,
        Scalar.WEIGHT_DECAY: 0.05,
        Scalar.BIAS_CORRECTION: 1.0 - alpha**step if options.bias_correction else 1.0,
        Scalar.GRAD_DIVISOR: 4.0,
        Scalar.CLIP_MULTIPLIER: 0.7,
        Scalar.CLIP_DIVISOR: 1.3,
        Scalar.CLIP_VALUE: 0.5,
        Scalar.UPDATE_GATE: gate,
        Scalar.EMA_MOMENTUM: 0.99,
        Scalar.EMA_ONE_MINUS_MOMENTUM: 1.0 - 0.99,
        Scalar.EMA_GATE: ema_gate,
        Scalar.EMA_OVERWRITE: overwrite,
        Scalar.ROUNDING_KEY: rounding_key,
    }
    return mx.array([values[index] for index in Scalar], dtype)


def random_inputs(options, shape, seed, parameter_dtype, gradient_dtype, state_dtype):
    rng = np.random.default_rng(seed)

    def draw(scale, dtype, positive=False):
        values = rng.standard_normal(shape) * scale
        return mx.array(np.abs(values) if positive else values).astype(dtype)

    parameter = draw(1.0, parameter_dtype)
    # Scaled so that clipping at 0.5 changes some entries and leaves others.
    gradient = draw(2.0, gradient_dtype)
    state = {}
    for key in options.state_keys:
        state[key] = draw(0.3, state_dtype, positive=(key == "v"))
    return parameter, gradient, state


def as_numpy(array: mx.array) -> np.ndarray:
    return np.asarray(array.astype(mx.float64) if array.dtype == mx.bfloat16 else array)


def assert_same(actual: mx.array, expected: mx.array, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = as_numpy(actual), as_numpy(expected)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    assert same.all(), (
        f"{what}: {np.count_nonzero(~same)} of {a.size} entries differ, first at "
        f"{np.argwhere(~same)[0].tolist()}: {a[~same][0]!r} != {e[~same][0]!r}"
    )


def assert_steps_match(options, scalars, parameter, gradients, state, what):
    """Runs the native update and the reference side by side for each gradient in turn, each
    feeding on its own outputs, and compares the parameter and every buffer after each step."""
    ours_parameter, ours_state = parameter, dict(state)
    ref_parameter, ref_state = parameter, dict(state)
    for step, gradient in enumerate(gradients):
        ours_parameter, ours_state = native.update(
            options, scalars, ours_parameter, gradient, ours_state
        )
        ref_parameter, ref_state = rmsprop_reference(
            options, scalars, ref_parameter, gradient, ref_state
        )
        mx.eval(ours_parameter, ours_state, ref_parameter, ref_state)
        assert set(ours_state) == set(ref_state)
        assert_same(ours_parameter, ref_parameter, f"{what} step {step} parameter")
        for key in ref_state:
            assert_same(ours_state[key], ref_state[key], f"{what} step {step} {key}")


def _core(options: UpdateOptions) -> tuple[bool, ...]:
    return tuple(getattr(options, name) for name in CORE_FLAGS)


def _core_label(core: tuple[bool, ...]) -> str:
    return ",".join(name for name, on in zip(CORE_FLAGS, core, strict=True) if on) or "plain"


# option_space() grouped by instantiation: one test per instantiation, its passes crossed inside.
OPTIONS_BY_CORE: dict[tuple[bool, ...], list[UpdateOptions]] = {}
for _options in option_space():
    OPTIONS_BY_CORE.setdefault(_core(_options), []).append(_options)


@pytest.mark.parametrize("core", list(OPTIONS_BY_CORE), ids=_core_label)
def test_every_option_combination_is_bit_exact(core):
    # Together the cases run every option set of spec.option_space().
    for options in OPTIONS_BY_CORE[core]:
        parameter, gradient, state = random_inputs(
            options, (301,), 0, mx.float32, mx.float32, mx.float32
        )
        gradients = [gradient, gradient * -3.0]
        assert_steps_match(options, scalars_for(options), parameter, gradients, state, options)


SIZES = [(), (0,), (0, 3), (1,), (7,), (3, 5, 7), (513,), (1025,)]
# Around the size where the update is split across threads, and a split with a ragged end.
PARALLEL_SIZES = [(65536 - 1,), (65536,), (2 * 65536 + 37,)]
DTYPE_MIXES = {
    # name: parameter, gradient, state, arithmetic
    "float32": (mx.float32, mx.float32, mx.float32, mx.float32),
    "float16": (mx.float16, mx.float16, mx.float32, mx.float32),
    "bfloat16": (mx.bfloat16, mx.bfloat16, mx.float32, mx.float32),
    "float64": (mx.float64, mx.float64, mx.float64, mx.float64),
    "float16-bf16grad-f16state": (mx.float16, mx.bfloat16, mx.float16, mx.float32),
    "bfloat16-f32grad-bf16state": (mx.bfloat16, mx.float32, mx.bfloat16, mx.float32),
    "float32-in-float64": (mx.float32, mx.float32, mx.float32, mx.float64),
    "float16-in-float64": (mx.float16, mx.float16, mx.float16, mx.float64),
    "float64-f32grad-f32state": (mx.float64, mx.float32, mx.float32, mx.float64),
}


# Every option set at the small sizes; the threaded sizes with the set that runs every pass.
SIZE_CASES = [
    pytest.param(shape, dtypes, options, id=f"{shape}-{dtype_name}-{option_name}")
    for shape in SIZES
    for dtype_name, dtypes in DTYPE_MIXES.items()
    for option_name, options in OPTION_SETS.items()
] + [
    pytest.param(shape, dtypes, EVERYTHING, id=f"{shape}-{dtype_name}-everything")
    for shape in PARALLEL_SIZES
    for dtype_name, dtypes in DTYPE_MIXES.items()
]


@pytest.mark.parametrize("shape, dtypes, options", SIZE_CASES)
def test_dtypes_and_sizes_match_reference(shape, dtypes, options):
    parameter_dtype, gradient_dtype, state_dtype, compute = dtypes
    parameter, gradient, state = random_inputs(
        options, shape, 1, parameter_dtype, gradient_dtype, state_dtype
    )
    gradients = [gradient, (gradient * 0.5 - 1.0).astype(gradient_dtype), gradient]
    scalars = scalars_for(options, compute)
    assert_steps_match(options, scalars, parameter, gradients, state, f"{shape} {dtypes}")


def test_strided_inputs_match_reference_and_stay_unchanged():
    options = OPTION_SETS["torch-like"]
    base = mx.array(np.random.default_rng(2).standard_normal((6, 10)).astype(np.float32))
    parameter = base.T  # (10, 6), column-major view
    gradient = mx.array(np.random.default_rng(3).standard_normal((10, 12)).astype(np.float32))
    gradient = gradient[:, ::2]  # every other column
    state = {
        "v": mx.broadcast_to(mx.array(0.25), (10, 6)),  # stride 0
        "grad_avg": mx.zeros((12, 6))[1:11],  # offset into a larger buffer
        "momentum_buffer": mx.ones((10, 6)).astype(mx.float16).astype(mx.float32),
    }
    kept = {name: np.array(value) for name, value in [("parameter", parameter), *state.items()]}
    assert_steps_match(options, scalars_for(options), parameter, [gradient], state, "strided")
    for name, value in [("parameter", parameter), *state.items()]:
        np.testing.assert_array_equal(np.array(value), kept[name], err_msg=name)


@pytest.mark.parametrize("clip", [False, True], ids=["", "clip_value"])
def test_nan_and_inf_propagate_as_in_the_reference(clip):
    options = UpdateOptions(centered=True, momentum=True, clip_value=clip)
    specials = [np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0, 1e-40]
    gradient = mx.array(np.array(specials * 3, dtype=np.float32))
    parameter = mx.array(np.linspace(-1, 1, gradient.size, dtype=np.float32))
    state = {
        "v": mx.zeros(gradient.shape),
        # grad_avg^2 > v: the centred variance is negative before the clamp at 0.
        "grad_avg": mx.full(gradient.shape, 3.0),
        "momentum_buffer": mx.array(np.array([np.nan, 1.0, np.inf] * 8, dtype=np.float32)),
    }
    scalars = scalars_for(options)
    assert_steps_match(options, scalars, parameter, [gradient, gradient], state, "specials")


def test_nan_clip_value_propagates():
    options = UpdateOptions(clip_value=True)
    scalars = mx.array(
        [
            np.nan if index == Scalar.CLIP_VALUE else value
            for index, value in enumerate(scalars_for(options).tolist())
        ],
        mx.float32,
    )
    parameter, gradient, state = random_inputs(options, (9,), 4, *[mx.float32] * 3)
    assert_steps_match(options, scalars, parameter, [gradient], state, "NaN clip value")


@pytest.mark.parametrize(
    "gate, ema_gate, overwrite",
    [
        (0.0, 1.0, 0.0),
        (0.0, 0.0, 1.0),
        (1.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        (np.nan, 1.0, 0.0),
        (0.0, np.nan, np.nan),
        (-0.0, 1.0, 0.0),
    ],
)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=str)
def test_gates_and_ema_match_reference(gate, ema_gate, overwrite, dtype):
    options = EVERYTHING
    parameter, gradient, state = random_inputs(options, (70,), 5, dtype, dtype, mx.float32)
    scalars = scalars_for(options, gate=gate, ema_gate=ema_gate, overwrite=overwrite)
    assert_steps_match(options, scalars, parameter, [gradient, gradient], state, "gates")


def test_closed_gate_returns_the_inputs_exactly():
    options = UpdateOptions(momentum=True, gated=True)
    parameter, gradient, state = random_inputs(options, (1000,), 6, *[mx.float32] * 3)
    mx.eval(parameter, state)
    held = [np.array(parameter), *(np.array(state[key]) for key in options.state_keys)]
    new_parameter, new_state = native.update(
        options, scalars_for(options, gate=0.0), parameter, gradient, state
    )
    mx.eval(new_parameter, new_state)
    outputs = [new_parameter, *(new_state[key] for key in options.state_keys)]
    for before, after in zip(held, outputs, strict=True):
        np.testing.assert_array_equal(np.array(after), before)


def _update_fn(options):
    def update(scalars, parameter, gradient, v):
        new_parameter, new_state = native.update(options, scalars, parameter, gradient, {"v": v})
        return new_parameter, new_state["v"]

    return update


@pytest.mark.parametrize("shapeless", [False, True], ids=["compile", "compile-shapeless"])
def test_runs_inside_mx_compile(shapeless):
    options = UpdateOptions()
    compiled = mx.compile(_update_fn(options), shapeless=shapeless)
    for shape in [(5,), (3, 4)]:
        parameter, gradient, state = random_inputs(options, shape, 7, *[mx.float32] * 3)
        scalars = scalars_for(options)
        got = compiled(scalars, parameter, gradient, state["v"])
        expected_parameter, expected_state = rmsprop_reference(
            options, scalars, parameter, gradient, state
        )
        assert_same(got[0], expected_parameter, f"compiled {shape} parameter")
        assert_same(got[1], expected_state["v"], f"compiled {shape} v")


def test_identical_updates_in_one_compiled_graph_are_merged_correctly():
    options = UpdateOptions(momentum=True)
    parameter, gradient, state = random_inputs(options, (33,), 8, *[mx.float32] * 3)
    scalars = scalars_for(options)

    def twice(parameter, gradient, v, buf):
        state = {"v": v, "momentum_buffer": buf}
        first = native.update(options, scalars, parameter, gradient, state)
        second = native.update(options, scalars, parameter, gradient, state)
        return first[0], second[0], first[1]["v"], second[1]["momentum_buffer"]

    got = mx.compile(twice)(parameter, gradient, state["v"], state["momentum_buffer"])
    expected_parameter, expected_state = rmsprop_reference(
        options, scalars, parameter, gradient, state
    )
    for value, expected in zip(
        got,
        [
            expected_parameter,
            expected_parameter,
            expected_state["v"],
            expected_state["momentum_buffer"],
        ],
        strict=True,
    ):
        assert_same(value, expected, "merged update")


def test_gradient_from_the_same_lazy_graph():
    options = UpdateOptions(centered=True)
    parameter, _, state = random_inputs(options, (64,), 9, *[mx.float32] * 3)
    gradient = mx.grad(lambda p: (mx.sin(p) * p).sum())(parameter)  # not evaluated yet
    scalars = scalars_for(options)
    new_parameter, new_state = native.update(options, scalars, parameter, gradient, state)
    expected_parameter, expected_state = rmsprop_reference(
        options, scalars, parameter, gradient, state
    )
    assert_same(new_parameter, expected_parameter, "lazy gradient parameter")
    assert_same(new_state["grad_avg"], expected_state["grad_avg"], "lazy gradient grad_avg")


def _with_flag(name: str) -> UpdateOptions:
    """The option set of spec.option_space() with flag ``name`` on and the fewest others."""
    sets = [options for options in option_space() if getattr(options, name)]
    return min(sets, key=lambda options: sum(getattr(options, f) for f in FLAGS))


@pytest.mark.parametrize("flag", [name for name in FLAGS if name not in STORAGE_FLAGS])
def test_every_flag_differentiates_as_the_reference(flag):
    # The primitive's vjp runs transforms.cpp, a fourth copy of the update: each flag of the
    # spec, a new one included, must reach it (cotangents bit for bit). The storage flags:
    # test_native_storage.py.
    options = _with_flag(flag)
    parameter, gradient, state = random_inputs(options, (37,), 13, *[mx.float32] * 3)
    scalars = scalars_for(options)
    keys = options.state_keys

    def through(update):
        def step(parameter, gradient, *buffers):
            new_parameter, new_state = update(
                options, scalars, parameter, gradient, dict(zip(keys, buffers, strict=True))
            )
            return [new_parameter, *(new_state[key] for key in keys)]

        return step

    primals = [parameter, gradient, *(state[key] for key in keys)]
    cotangents = [mx.full(parameter.shape, 0.5 + k, mx.float32) for k in range(1 + len(keys))]
    ours = mx.vjp(through(native.update), primals, cotangents)
    expected = mx.vjp(through(rmsprop_reference), primals, cotangents)
    for part, (actual, wanted) in enumerate(zip(ours, expected, strict=True)):
        for k, (a, e) in enumerate(zip(actual, wanted, strict=True)):
            assert_same(a, e, f"{flag}: vjp part {part} entry {k}")


def _address(array: mx.array) -> int:
    view = np.array(array, copy=False)
    return view.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=str)
def test_released_buffers_are_updated_in_place(dtype):
    options = UpdateOptions(momentum=True)
    parameter, gradient, state = random_inputs(options, (4096,), 10, dtype, dtype, mx.float32)
    mx.eval(parameter, gradient, state)
    before = [_address(parameter), *(_address(state[key]) for key in options.state_keys)]
    expected = rmsprop_reference(options, scalars_for(options), parameter, gradient, state)
    mx.eval(expected)
    # The caller drops its references: the update may reuse the memory.
    parameter, state = native.update(options, scalars_for(options), parameter, gradient, state)
    mx.eval(parameter, state)
    after = [_address(parameter), *(_address(state[key]) for key in options.state_keys)]
    assert after == before
    assert_same(parameter, expected[0], "in-place parameter")


def test_held_buffers_are_never_overwritten():
    options = UpdateOptions(momentum=True)
    parameter, gradient, state = random_inputs(options, (4096,), 11, *[mx.float32] * 3)
    mx.eval(parameter, gradient, state)
    kept = [np.array(parameter), *(np.array(state[key]) for key in options.state_keys)]
    new_parameter, new_state = native.update(
        options, scalars_for(options), parameter, gradient, state
    )
    mx.eval(new_parameter, new_state)
    assert _address(new_parameter) != _address(parameter)
    for held, array in zip(
        kept, [parameter, *(state[key] for key in options.state_keys)], strict=True
    ):
        np.testing.assert_array_equal(np.array(array), held)


def test_same_array_as_parameter_and_buffer_is_not_donated_twice():
    options = UpdateOptions(ema=True)
    parameter, gradient, state = random_inputs(options, (300,), 12, *[mx.float32] * 3)
    state["ema"] = parameter  # one array in two roles
    expected = rmsprop_reference(options, scalars_for(options), parameter, gradient, state)
    got = native.update(options, scalars_for(options), parameter, gradient, state)
    del parameter, state
    assert_same(got[0], expected[0], "parameter")
    assert_same(got[1]["ema"], expected[1]["ema"], "ema")


_ERROR_CASES = {
    "short scalars": (
        lambda s, p, g, st: (s[:3], g, p, [st], 0),
        f"scalars must be a float32 or float64 vector of {len(Scalar)} entries, got shape (3,) and "
        "dtype float32",
    ),
    "float16 scalars": (
        lambda s, p, g, st: (s.astype(mx.float16), g, p, [st], 0),
        f"scalars must be a float32 or float64 vector of {len(Scalar)} entries, got shape "
        f"({len(Scalar)},) and "
        "dtype float16",
    ),
    "gradient shape": (
        lambda s, p, g, st: (s, g[:2], p, [st], 0),
        "gradient must be a floating array shaped like the parameter (shape (4,) and dtype "
        "float32), got shape (2,) and dtype float32",
    ),
    "integer parameter": (
        lambda s, p, g, st: (s, g, p.astype(mx.int32), [st], 0),
        "parameter must be float16, bfloat16, float32 or float64, got shape (4,) and dtype int32",
    ),
    "missing buffer": (
        lambda s, p, g, st: (s, g, p, [st], 2),
        "state must hold 2 buffers for these flags, got 1",
    ),
    "state shape": (
        lambda s, p, g, st: (s, g, p, [st.reshape(2, 2)], 0),
        "state[0] (v) must be a floating array shaped like the parameter (shape (4,) and dtype "
        "float32), got shape (2, 2) and dtype float32",
    ),
    "unknown flag": (lambda s, p, g, st: (s, g, p, [st], 1 << 20), "flags has unknown bits: "),
    # The spec's invariants, with the spec's messages (spec.h is generated from it).
    "nesterov alone": (
        lambda s, p, g, st: (s, g, p, [st], 4),
        "flags: nesterov=True requires momentum=True, got momentum=False",
    ),
    "lr_in_momentum alone": (
        lambda s, p, g, st: (s, g, p, [st], 16),
        "flags: lr_in_momentum=True requires momentum=True, got momentum=False",
    ),
    "both decays": (
        lambda s, p, g, st: (s, g, p, [st], 32 | 64),
        "flags: coupled_decay=True and decoupled_decay=True exclude each other",
    ),
}


@pytest.mark.parametrize("case", list(_ERROR_CASES))
def test_bad_arguments_name_the_argument_and_value(case):
    from mlx_rmsprop.paths.native import _ext

    make_args, message = _ERROR_CASES[case]
    scalars = scalars_for(UpdateOptions())
    args = make_args(scalars, mx.zeros((4,)), mx.ones((4,)), mx.zeros((4,)))
    with pytest.raises(ValueError) as error:
        _ext.update(*args)
    assert str(error.value).startswith("[rmsprop_update] " + message)


_ACCUMULATION_ERRORS = {
    "negative steps": (
        {"accumulation_steps": -3},
        "accumulation_steps must be 0 (off) or at least 2, got -3",
    ),
    "one step": ({"accumulation_steps": 1}, "accumulation_steps must be 0 (off) or at least 2"),
    "infinite loss scale": (
        {"accumulation_steps": 2, "loss_scale": float("inf")},
        "loss_scale must be finite and >= 0 (0: none), got inf",
    ),
    "negative loss scale": (
        {"accumulation_steps": 2, "loss_scale": -1.0},
        "loss_scale must be finite and >= 0 (0: none), got -1",
    ),
    "no accumulator": (
        {"accumulation_steps": 2},
        "accumulator and accumulation_gates must be given exactly when accumulation_steps > 0",
    ),
    "accumulator without steps": (
        {"accumulator": "zeros"},
        "accumulator and accumulation_gates must be given exactly when accumulation_steps > 0",
    ),
    "accumulator shape": (
        {"accumulation_steps": 2, "accumulator": "short"},
        "accumulator must be a floating array shaped like the parameter (shape (4,) and dtype "
        "float32), got shape (3,) and dtype float32",
    ),
    "gates": (
        {"accumulation_steps": 2, "accumulator": "zeros", "accumulation_gates": "int"},
        "accumulation_gates must be a float32 vector of 2 entries (applies, skip), got shape "
        "(2,) and dtype int32",
    ),
}


@pytest.mark.parametrize("case", list(_ACCUMULATION_ERRORS))
def test_bad_accumulation_arguments_name_the_argument_and_value(case):
    from mlx_rmsprop.paths.native import _ext

    settings, message = _ACCUMULATION_ERRORS[case]
    arrays = {
        "zeros": mx.zeros((4,)),
        "short": mx.zeros((3,)),
        "int": mx.zeros((2,), mx.int32),
    }
    kwargs = {key: arrays.get(value, value) for key, value in settings.items()}
    if kwargs.get("accumulator") is not None and "accumulation_gates" not in kwargs:
        kwargs["accumulation_gates"] = mx.zeros((2,))
    scalars = scalars_for(UpdateOptions())
    with pytest.raises(ValueError) as error:
        _ext.update(scalars, mx.zeros((4,)), mx.ones((4,)), [mx.zeros((4,))], 0, **kwargs)
    assert str(error.value).startswith("[rmsprop_update] " + message)


def test_optimizer_steps_update_parameters_and_state_in_place():
    # Through RMSprop: the whole step is one compiled call, and no leftover reference to the
    # old parameters (or state) may keep MLX from donating them.
    from mlx_rmsprop import RMSprop

    optimizer = RMSprop(1e-3, momentum=0.9, fused="native")
    parameters = {"layer": {"weight": mx.random.normal((64, 65)), "bias": mx.zeros((65,))}}
    gradients = {"layer": {"weight": mx.ones((64, 65)), "bias": mx.ones((65,))}}
    optimizer.init(parameters)
    mx.eval(parameters, gradients, optimizer.state)
    for _ in range(3):
        layer, state = parameters["layer"], optimizer.state["layer"]
        before = [_address(layer[key]) for key in ("weight", "bias")]
        before += [_address(state["weight"][key]) for key in ("v", "momentum_buffer")]
        del layer, state
        parameters = optimizer.apply_gradients(gradients, parameters)
        mx.eval(parameters, optimizer.state)
        layer, state = parameters["layer"], optimizer.state["layer"]
        after = [_address(layer[key]) for key in ("weight", "bias")]
        after += [_address(state["weight"][key]) for key in ("v", "momentum_buffer")]
        del layer, state
        assert after == before
