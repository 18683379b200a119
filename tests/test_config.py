"""``mlx_rmsprop.config``: the constructor's arguments validated and derived once, in one frozen
object that the optimizer's properties, ``get_config`` and the step functions read."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop import RMSprop
from mlx_rmsprop.config import STORAGE_DEFAULTS, RMSpropConfig, _rebuilt
from mlx_rmsprop.paths import FUSED_CHOICES
from mlx_rmsprop.spec import Scalar


def _fused_documentation() -> str:
    doc = RMSprop.__doc__
    start = doc.index("        fused:")
    return " ".join(doc[start : doc.index("        skip_nonfinite:", start)].split())


def test_the_docstring_documents_every_fused_value_and_says_which_are_not_fused():
    documented = _fused_documentation()
    for value in FUSED_CHOICES:
        written = f"``{value}``" if value is False else f'``"{value}"``'
        assert written in documented, value
    assert '``"compiled"``, not fused' in documented
    assert "``False``, neither fused nor compiled" in documented


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"momentum": 0.9, "centered": True, "weight_decay": 0.01},
        {"momentum": 0.5, "nesterov": True, "eps_in_sqrt": True, "bias_correction": True},
        {"weight_decay": 0.1, "decoupled_weight_decay": True, "use_ema": True},
        {"gradient_accumulation_steps": 3, "loss_scale_factor": 8.0, "clipnorm": 1.0},
        {"skip_nonfinite": True, "clipvalue": 0.5, "state_dtype": mx.float16},
        {
            "state_bits": 8,
            "state_block_size": 64,
            "min_quantized_size": 0,
            "stochastic_rounding": True,
            "rounding_seed": 9,
        },
    ],
)
def test_properties_and_get_config_read_the_configuration(arguments):
    optimizer = RMSprop(0.01, **arguments)
    config = optimizer._config
    assert isinstance(config, RMSpropConfig)
    for name in ("alpha", "eps", "momentum", "weight_decay", "initial_accumulator_value"):
        assert getattr(optimizer, name) == getattr(config, name)
    for name, value in config.flags.items():
        assert getattr(optimizer, name) is value
    assert optimizer.pipeline is config.pipeline
    assert optimizer.state_keys == config.state_keys
    assert config.options.state_keys == config.state_keys[: len(config.options.state_keys)]
    assert len(config.constants) == len(Scalar)
    assert config.constants[Scalar.ALPHA] == config.alpha
    assert config.constants[Scalar.EPS] == config.eps
    assert optimizer.get_config() == {
        "learning_rate": pytest.approx(0.01),
        **config.arguments(),
        "exclude_from_weight_decay": [],
        "name": "rmsprop",
    }
    # Frozen: changing a hyperparameter would leave the compiled update behind it.
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.eps = 1.0
    for twin in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert twin._config == config


def test_a_preset_epsilon_of_zero_reaches_the_constants():
    optimizer = RMSprop.from_tensorflow(learning_rate=0.1, epsilon=0.0)
    assert optimizer.eps == 0.0
    assert optimizer._config.constants[Scalar.EPS] == 0.0


def test_the_config_builder_keeps_the_constructor_messages():
    with pytest.raises(ValueError, match=re.escape("nesterov=True requires momentum > 0")):
        RMSprop(0.1, nesterov=True)
    with pytest.raises(ValueError, match=re.escape("name must be a string, got 3")):
        RMSprop(0.1, name=3)


def test_an_optimizer_with_a_state_dtype_can_be_copied_and_pickled():
    # mx.Dtype itself cannot be pickled: main refused both with "cannot pickle 'Dtype' object".
    optimizer = RMSprop(0.1, momentum=0.9, state_dtype=mx.bfloat16)
    parameters = {"w": mx.array([1.0, -2.0, 3.0])}
    gradients = {"w": mx.array([0.5, 0.25, -1.0])}
    optimizer.apply_gradients(gradients, parameters)
    twins = [copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))]
    expected = optimizer.apply_gradients(gradients, parameters)["w"]
    for twin in twins:
        assert twin.state_dtype == mx.bfloat16
        assert twin.state["w"]["v"].dtype == mx.bfloat16
        assert mx.array_equal(twin.apply_gradients(gradients, parameters)["w"], expected)


# --- the storage arguments (issue 17) ------------------------------------------------------

STORAGE_CASES = [
    ({"state_bits": 16}, "state_bits must be one of 8, 32, got 16"),
    ({"state_bits": 8.0}, "state_bits must be one of 8, 32, got 8.0"),
    ({"state_bits": True}, "state_bits must be one of 8, 32, got True"),
    ({"state_bits": "8"}, "state_bits must be one of 8, 32, got '8'"),
    (
        {"state_block_size": 100},
        "state_block_size must be one of 32, 64, 128, 256, 512, 1024, got 100",
    ),
    (
        {"state_block_size": 2048},
        "state_block_size must be one of 32, 64, 128, 256, 512, 1024, got 2048",
    ),
    (
        {"state_block_size": 256.0},
        "state_block_size must be one of 32, 64, 128, 256, 512, 1024, got 256.0",
    ),
    ({"min_quantized_size": -1}, "min_quantized_size must be an integer >= 0, got -1"),
    ({"min_quantized_size": 4096.0}, "min_quantized_size must be an integer >= 0, got 4096.0"),
    ({"min_quantized_size": None}, "min_quantized_size must be an integer >= 0, got None"),
    ({"stochastic_rounding": 1}, "stochastic_rounding must be True or False, got 1"),
    ({"stochastic_rounding": "yes"}, "stochastic_rounding must be True or False, got 'yes'"),
    ({"rounding_seed": -1}, "rounding_seed must be an integer in [0, 4294967295], got -1"),
    (
        {"rounding_seed": 2**32},
        "rounding_seed must be an integer in [0, 4294967295], got 4294967296",
    ),
    ({"rounding_seed": 1.5}, "rounding_seed must be an integer in [0, 4294967295], got 1.5"),
    ({"rounding_seed": False}, "rounding_seed must be an integer in [0, 4294967295], got False"),
    (
        {"state_bits": 8, "state_dtype": mx.float64},
        "state_bits=8 requires float32 arithmetic, which state_dtype=mx.float64 turns into "
        "float64: use state_dtype None, mx.float32, mx.float16 or mx.bfloat16",
    ),
]


@pytest.mark.parametrize("kwargs, message", STORAGE_CASES, ids=[m for _, m in STORAGE_CASES])
def test_storage_arguments_are_refused_with_their_name_allowed_values_and_value(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        RMSprop(0.1, **kwargs)


def test_storage_arguments_take_numpy_integers_and_their_edges():
    optimizer = RMSprop(
        0.1,
        state_bits=np.int64(8),
        state_block_size=np.int32(1024),
        min_quantized_size=np.uint64(0),
        stochastic_rounding=True,
        rounding_seed=np.uint32(2**32 - 1),
    )
    config = optimizer.get_config()
    for key, value in (
        ("state_bits", 8),
        ("state_block_size", 1024),
        ("min_quantized_size", 0),
        ("rounding_seed", 2**32 - 1),
    ):
        assert config[key] == value and type(config[key]) is int, key
    assert optimizer.state["rounding_seed"].dtype == mx.uint32
    assert optimizer.state["rounding_seed"].item() == 2**32 - 1
    assert RMSprop(0.1, state_block_size=32).state_block_size == 32


def test_storage_arguments_reach_get_config_repr_copies_and_pickles():
    arguments = {
        "state_bits": 8,
        "state_block_size": 64,
        "min_quantized_size": 10,
        "stochastic_rounding": True,
        "rounding_seed": 7,
    }
    optimizer = RMSprop(0.1, **arguments)
    config = optimizer.get_config()
    assert {key: config[key] for key in STORAGE_DEFAULTS} == arguments
    names = list(config)
    # In the constructor's order: after state_dtype, before fused.
    assert names[names.index("state_dtype") + 1 : names.index("fused")] == list(arguments)
    assert (
        "state_dtype=None, state_bits=8, state_block_size=64, min_quantized_size=10, "
        "stochastic_rounding=True, rounding_seed=7, fused="
    ) in repr(optimizer)
    rebuilt = RMSprop(
        **{k: v for k, v in config.items() if k != "exclude_from_weight_decay"}
    ).get_config()
    assert rebuilt == config
    for twin in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert twin.get_config() == config
        assert twin.state["rounding_seed"].dtype == mx.uint32
        assert twin.state["rounding_seed"].item() == 7
    # Without stochastic rounding there is no seed in the state.
    assert "rounding_seed" not in RMSprop(0.1, rounding_seed=7).state


def test_a_configuration_pickled_before_the_storage_arguments_gets_their_defaults():
    config = RMSprop(0.1, momentum=0.9)._config
    fields = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.name not in STORAGE_DEFAULTS
    }
    rebuilt = _rebuilt(fields)
    assert {key: getattr(rebuilt, key) for key in STORAGE_DEFAULTS} == STORAGE_DEFAULTS
    assert rebuilt == config


@pytest.mark.parametrize(
    "arguments, shape, dtype, quantized",
    [
        ({"state_bits": 8}, (64, 64), mx.float32, True),  # 4096 elements: the default minimum
        ({"state_bits": 8}, (4095,), mx.float32, False),
        ({"state_bits": 8}, (64, 64), mx.bfloat16, True),
        ({"state_bits": 8}, (64, 64), mx.float64, False),
        ({"state_bits": 32}, (64, 64), mx.float32, False),
        ({"state_bits": 8, "min_quantized_size": 0}, (), mx.float16, True),
        ({"state_bits": 8, "min_quantized_size": 0}, (0, 3), mx.float32, True),
        ({"state_bits": 8, "min_quantized_size": 1}, (0, 3), mx.float32, False),
    ],
)
def test_a_parameter_is_quantized_when_8_bit_large_enough_and_not_float64(
    arguments, shape, dtype, quantized
):
    config = RMSprop(0.1, momentum=0.9, centered=True, use_ema=True, **arguments)._config
    layout = config.layout(shape, dtype)
    assert layout.quantized is quantized
    if quantized:
        assert layout.keys == (
            "v",
            "v_scale",
            "grad_avg",
            "grad_avg_scale",
            "momentum_buffer",
            "momentum_buffer_scale",
            "ema",
        )
        assert layout.dtype("v") == mx.uint8 and layout.dtype("grad_avg_scale") == mx.float32
        assert layout.dtype("ema") is None
    else:
        assert layout.keys == config.state_keys == ("v", "grad_avg", "momentum_buffer", "ema")


def test_the_per_parameter_options_carry_the_storage_flags():
    config = RMSprop(0.1, momentum=0.9, state_bits=8, state_block_size=128)._config
    quantized = config.parameter_options(True, True)
    assert quantized.quantized_state and quantized.stochastic_rounding
    assert quantized.block_size == 128
    assert quantized.state_keys == ("v", "v_scale", "momentum_buffer", "momentum_buffer_scale")
    plain = config.parameter_options(False, False)
    assert plain == config.options and plain.block_size == 0


@pytest.mark.parametrize(
    "arguments, parameter_dtype, rounds",
    [
        ({}, mx.bfloat16, True),
        ({}, mx.float16, True),
        ({}, mx.float32, False),
        ({}, mx.float64, False),
        ({"state_dtype": mx.bfloat16}, mx.float32, True),  # v is stored as bfloat16
        # 8-bit: codes and scales are never rounded; the EMA is a float store, the accumulator
        # the step function's own (to nearest).
        ({"state_bits": 8, "state_dtype": mx.bfloat16}, mx.float32, False),
        ({"state_bits": 8, "state_dtype": mx.bfloat16, "use_ema": True}, mx.float32, True),
        (
            {"state_bits": 8, "state_dtype": mx.float16, "gradient_accumulation_steps": 2},
            mx.float32,
            False,
        ),
        ({"stochastic_rounding": False}, mx.bfloat16, False),
    ],
)
def test_a_parameter_rounds_stochastically_only_where_it_stores_float16_or_bfloat16(
    arguments, parameter_dtype, rounds
):
    optimizer = RMSprop(0.1, **{"stochastic_rounding": True, "min_quantized_size": 0, **arguments})
    parameter = mx.ones((4, 4), parameter_dtype)
    state: dict = {}
    optimizer.init_single(parameter, state)
    layout = optimizer.state_layout(parameter)
    assert optimizer._config.rounds(layout, parameter, state) is rounds
