"""``mlx_rmsprop.config``: the constructor's arguments validated and derived once, in one frozen
object that the optimizer's properties, ``get_config`` and the step functions read."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re

import mlx.core as mx
import pytest

from mlx_rmsprop import RMSprop
from mlx_rmsprop.config import RMSpropConfig
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
