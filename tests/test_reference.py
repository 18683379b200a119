"""Every combination of the constructor's update-rule options (spec.option_space() projected onto
constructor arguments, see option_grid) in float64 against the independent NumPy statement, with a
decaying learning rate; the compiled path on a pairwise covering subset. The storage options
(8-bit state, stochastic rounding) bit for bit against storage_numpy, over several steps."""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop import RMSprop, storage
from mlx_rmsprop.reference import rmsprop_reference
from mlx_rmsprop.spec import (
    NUM_SCALARS,
    Scalar,
    UpdateOptions,
    code_table,
    rounding_step_key,
    scale_key,
)

import storage_numpy
from numpy_conventions import numpy_rmsprop
from option_grid import full_product, label, pairwise
from tolerances import assert_close

STEPS = 12
RNG = np.random.default_rng(7)
X0 = RNG.standard_normal((4, 3))
GRADS = RNG.standard_normal((STEPS, 4, 3))
GRADS[3] = 0.0  # a zero step: v decays, the update must stay finite
GRADS[6] *= 1e3
LRS = 0.05 * 0.85 ** np.arange(STEPS)


def run_ours(config: dict, fused) -> tuple[np.ndarray, dict]:
    table = mx.array(LRS, mx.float64)
    optimizer = RMSprop(lambda step: table[step], alpha=0.9, eps=1e-6, fused=fused, **config)
    params = {"w": mx.array(X0, mx.float64)}
    trajectory = [X0]
    for grad in GRADS:
        params = optimizer.apply_gradients({"w": mx.array(grad, mx.float64)}, params)
        mx.eval(params, optimizer.state)
        trajectory.append(np.array(params["w"]))
    return np.stack(trajectory), {k: np.array(v) for k, v in optimizer.state["w"].items()}


def check(config: dict, fused) -> None:
    expected, expected_state = numpy_rmsprop({**config, "alpha": 0.9, "eps": 1e-6}, X0, GRADS, LRS)
    trajectory, state = run_ours(config, fused)
    assert_close(trajectory, expected, "float64", what=f"{label(config)} parameters")
    assert state.keys() == expected_state.keys()
    for key in state:
        assert_close(state[key], expected_state[key], "float64", what=f"{label(config)} {key}")


@pytest.mark.slow
def test_every_option_combination_reference_ops():
    for config in full_product():
        check(config, fused=False)


@pytest.mark.parametrize("config", pairwise(), ids=label)
def test_pairwise_combinations_compiled(config):
    check(config, fused="compiled")


# --- storage: 8-bit state and stochastic rounding (float32 arithmetic, bit for bit) ----------

STORAGE_RULES = [
    {},
    {"centered": True},
    {"momentum": True, "nesterov": True},
    {"momentum": True, "lr_in_momentum": True, "eps_in_sqrt": True},
    {"centered": True, "momentum": True, "lr_in_momentum": True, "nesterov": True},
]
# (label, quantized, stochastic rounding, parameter format, float state format)
STORAGE_MODES = [
    ("8bit-f32", True, False, "float32", "float32"),
    ("8bit-bf16-sr", True, True, "bfloat16", "float32"),
    ("bf16-sr-bf16-state", False, True, "bfloat16", "bfloat16"),
    ("f16-sr-f32-state", False, True, "float16", "float32"),
    ("bf16-nearest-bf16-state", False, False, "bfloat16", "bfloat16"),
]
FORMATS = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
BLOCK = 32
HYPER = {"lr": 0.01, "alpha": 0.9, "one_minus_alpha": 0.1, "eps": 1e-6, "mu": 0.9}
SEED = 1234


def storage_scalars(hyper: dict, gate: float = 1.0) -> mx.array:
    values = [0.0] * NUM_SCALARS
    values[Scalar.LR], values[Scalar.ALPHA] = hyper["lr"], hyper["alpha"]
    values[Scalar.ONE_MINUS_ALPHA], values[Scalar.EPS] = hyper["one_minus_alpha"], hyper["eps"]
    values[Scalar.MOMENTUM] = hyper["mu"]
    for entry in (Scalar.BIAS_CORRECTION, Scalar.GRAD_DIVISOR, Scalar.CLIP_MULTIPLIER):
        values[entry] = 1.0
    values[Scalar.CLIP_DIVISOR] = 1.0
    values[Scalar.UPDATE_GATE] = gate
    values[Scalar.ROUNDING_KEY] = hyper["key"]
    return mx.array(values, mx.float32)


def to_mlx(value: np.ndarray, fmt: str) -> mx.array:
    """NumPy float32 values or uint16 bits (storage_numpy's forms) as an MLX array."""
    if fmt == "float32" or value.dtype in (np.uint8, np.float32):
        return mx.array(value)
    return mx.array(value).view(FORMATS[fmt])


def from_mlx(value: mx.array) -> np.ndarray:
    if value.dtype in (mx.float16, mx.bfloat16):
        return np.array(value.view(mx.uint16))
    return np.array(value)


def initial_storage(rule: dict, mode: tuple, shape: tuple) -> tuple[np.ndarray, dict, dict]:
    """(parameter in NumPy form, NumPy state, storage_numpy config) from fixed random values."""
    _, quantized, rounding, fmt, state_format = mode
    rng = np.random.default_rng(3)
    config = {
        **rule,
        "quantized": quantized,
        "block_size": BLOCK,
        "stochastic_rounding": rounding,
        "state_format": state_format,
    }
    values = {
        "v": np.abs(rng.standard_normal(shape)).astype(np.float32) * np.float32(1e-3),
        "grad_avg": rng.standard_normal(shape).astype(np.float32) * np.float32(1e-2),
        "momentum_buffer": rng.standard_normal(shape).astype(np.float32) * np.float32(1e-2),
    }
    keys = ["v"] + ["grad_avg"] * bool(rule.get("centered"))
    keys += ["momentum_buffer"] * bool(rule.get("momentum"))
    state = {}
    for key in keys:
        if quantized:
            state[key], state[scale_key(key)] = storage_numpy.quantize(values[key], key, BLOCK)
        elif state_format == "float32":
            state[key] = values[key]
        else:
            state[key] = storage_numpy.round_nearest(values[key], state_format)
    x0 = rng.standard_normal(shape).astype(np.float32)
    parameter = x0 if fmt == "float32" else storage_numpy.round_nearest(x0, fmt)
    return parameter, state, config


def run_storage_steps(
    rule: dict, mode: tuple, shape: tuple, fused: bool, steps: int = 6, grad_format="float32"
):
    """Run reference and NumPy statement side by side; assert every output bit-identical."""
    label, quantized, rounding, fmt, _ = mode
    parameter, state, config = initial_storage(rule, mode, shape)
    options = UpdateOptions(
        centered=rule.get("centered", False),
        momentum=rule.get("momentum", False),
        nesterov=rule.get("nesterov", False),
        lr_in_momentum=rule.get("lr_in_momentum", False),
        eps_in_sqrt=rule.get("eps_in_sqrt", False),
        quantized_state=quantized,
        stochastic_rounding=rounding,
        block_size=BLOCK if quantized else 0,
    )
    update = functools.partial(rmsprop_reference, options, index=2)
    if fused:
        update = mx.compile(update)
    ours_p = to_mlx(parameter, fmt)
    ours_state = {key: to_mlx(value, config["state_format"]) for key, value in state.items()}
    assert tuple(ours_state) == options.state_keys
    rng = np.random.default_rng(5)
    for t in range(1, steps + 1):
        hyper = {**HYPER, "key": rounding_step_key(SEED, t) if rounding else 0}
        g = rng.standard_normal(shape).astype(np.float32) * np.float32(10.0 ** (t % 3 - 1))
        ours_g = mx.array(g)
        if grad_format != "float32":
            g_bits = storage_numpy.round_nearest(g, grad_format)
            g, ours_g = storage_numpy.decode(g_bits, grad_format), to_mlx(g_bits, grad_format)
        parameter, state = storage_numpy.rmsprop_step(
            config, hyper, parameter, fmt, g, state, index=2
        )
        ours_p, ours_state = update(storage_scalars(hyper), ours_p, ours_g, ours_state)
        what = f"{label} {rule} {shape} step {t}"
        assert ours_p.dtype == FORMATS[fmt], what
        assert np.array_equal(from_mlx(ours_p), parameter), what
        assert tuple(ours_state) == options.state_keys, what
        for key, value in state.items():
            assert ours_state[key].dtype == to_mlx(value, config["state_format"]).dtype, what
            assert np.array_equal(from_mlx(ours_state[key]), value, equal_nan=True), f"{what} {key}"
    return ours_p, ours_state


@pytest.mark.parametrize("mode", STORAGE_MODES, ids=lambda mode: mode[0])
@pytest.mark.parametrize("rule", STORAGE_RULES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "compiled"])
def test_storage_steps_match_the_numpy_statement(rule, mode, fused):
    run_storage_steps(rule, mode, (5, 13), fused)


@pytest.mark.parametrize("mode", STORAGE_MODES[:3], ids=lambda mode: mode[0])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (BLOCK,), (2 * BLOCK + 1,)], ids=str)
def test_storage_awkward_sizes(shape, mode):
    run_storage_steps({"centered": True, "momentum": True}, mode, shape, fused=False, steps=3)


@pytest.mark.parametrize("grad_format", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", [STORAGE_MODES[1], STORAGE_MODES[3]], ids=lambda mode: mode[0])
def test_storage_with_half_precision_gradients(mode, grad_format):
    rule = {"centered": True, "momentum": True}
    run_storage_steps(rule, mode, (5, 13), fused=True, steps=3, grad_format=grad_format)


def test_storage_reads_non_contiguous_inputs_in_logical_order():
    mode = STORAGE_MODES[1]
    rule = {"momentum": True}
    options = UpdateOptions(
        momentum=True, quantized_state=True, stochastic_rounding=True, block_size=BLOCK
    )
    parameter, state, config = initial_storage(rule, mode, (13, 5))
    hyper = {**HYPER, "key": 77}
    g = np.random.default_rng(8).standard_normal((13, 5)).astype(np.float32)
    expected_p, expected_state = storage_numpy.rmsprop_step(
        config, hyper, parameter, "bfloat16", g, state
    )
    # Transposed views of transposed copies: the same logical arrays, not row-major in memory.
    ours_p, ours_state = rmsprop_reference(
        options,
        storage_scalars(hyper),
        mx.array(parameter.T.copy()).view(mx.bfloat16).T,
        mx.array(g.T.copy()).T,
        {
            key: mx.array(value.T.copy()).T if value.ndim == 2 else mx.array(value)
            for key, value in state.items()
        },
    )
    assert np.array_equal(from_mlx(ours_p), expected_p)
    for key, value in expected_state.items():
        assert np.array_equal(from_mlx(ours_state[key]), value), key


@pytest.mark.parametrize("mode", STORAGE_MODES[:3], ids=lambda mode: mode[0])
def test_gate_zero_keeps_codes_scales_and_parameter_bits(mode):
    label, quantized, rounding, fmt, _ = mode
    parameter, state, config = initial_storage({"centered": True, "momentum": True}, mode, (70,))
    options = UpdateOptions(
        centered=True,
        momentum=True,
        gated=True,
        quantized_state=quantized,
        stochastic_rounding=rounding,
        block_size=BLOCK if quantized else 0,
    )
    p = to_mlx(parameter, fmt)
    buffers = {key: to_mlx(value, config["state_format"]) for key, value in state.items()}
    g = mx.array(np.random.default_rng(9).standard_normal(70).astype(np.float32))
    hyper = {**HYPER, "key": 4321}
    kept_p, kept = rmsprop_reference(options, storage_scalars(hyper, gate=0.0), p, g, buffers)
    assert np.array_equal(from_mlx(kept_p), from_mlx(p)), label
    for key in options.state_keys:
        assert np.array_equal(from_mlx(kept[key]), from_mlx(buffers[key])), (label, key)
    # With the gate at 1 every output changes: the comparison above can fail.
    moved_p, moved = rmsprop_reference(options, storage_scalars(hyper), p, g, buffers)
    assert not np.array_equal(from_mlx(moved_p), from_mlx(p))
    for key in options.state_keys:
        assert not np.array_equal(from_mlx(moved[key]), from_mlx(buffers[key])), (label, key)


def test_stochastic_rounding_depends_on_index_and_key():
    options = UpdateOptions(stochastic_rounding=True)
    rng = np.random.default_rng(10)
    p = mx.array(rng.standard_normal(4096).astype(np.float32)).astype(mx.bfloat16)
    g = mx.array(rng.standard_normal(4096).astype(np.float32))
    state = {"v": mx.ones((4096,), mx.bfloat16)}

    def rounded(key: int, index: int) -> np.ndarray:
        scalars = storage_scalars({**HYPER, "key": key})
        return from_mlx(rmsprop_reference(options, scalars, p, g, state, index=index)[0])

    base = rounded(5, 0)
    assert np.array_equal(base, rounded(5, 0))
    assert not np.array_equal(base, rounded(5, 1))
    assert not np.array_equal(base, rounded(6, 0))
    # float64 arithmetic rounds to nearest: no key or index changes the result.
    scalars = storage_scalars({**HYPER, "key": 5}).astype(mx.float64)
    nearest = [
        from_mlx(rmsprop_reference(options, scalars, p, g, state, index=i)[0]) for i in (0, 1)
    ]
    assert np.array_equal(*nearest)


def test_quantized_state_refuses_float64_arithmetic_and_bad_inputs():
    options = UpdateOptions(quantized_state=True, block_size=BLOCK)
    scalars = storage_scalars({**HYPER, "key": 0})
    p = mx.zeros((40,))
    state = dict(zip(("v", "v_scale"), storage.quantize(p, code_table("v"), BLOCK), strict=True))
    message = r"^quantized_state needs float32 arithmetic \(scalars of dtype float32\), got mlx.core.float64$"
    with pytest.raises(ValueError, match=message):
        rmsprop_reference(options, scalars.astype(mx.float64), p, p, state)
    with pytest.raises(ValueError, match=r"^index must be a non-negative int, got -1$"):
        rmsprop_reference(options, scalars, p, p, state, index=-1)
    bad = {"v": state["v"].reshape(4, 10), "v_scale": state["v_scale"]}
    message = r"^state\['v'\] must have the parameter's shape \(40,\), got \(4, 10\)$"
    with pytest.raises(ValueError, match=message):
        rmsprop_reference(options, scalars, p, p, bad)
