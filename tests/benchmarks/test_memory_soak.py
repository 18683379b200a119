"""A 5,000-step soak of the memory-saving configuration: bfloat16 weights, 8-bit optimizer
state, stochastic rounding, on the main job's MLP (the memory benchmark's ``mnist``
workload). Nothing may become NaN or Inf, the state must stay in codes, and the loss must
fall."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from benchmarks.memory.configurations import CONFIGURATIONS
from benchmarks.memory.workloads import WORKLOADS

STEPS = 5000


@pytest.mark.slow
def test_bf16_weights_with_8bit_state_and_stochastic_rounding_train_for_5000_steps():
    configuration = CONFIGURATIONS["bf16-8bit-sr"]
    outcome = WORKLOADS["mnist"].run(
        configuration.optimizer, configuration.weights, STEPS, seed=0, keep_optimizer=True
    )
    assert outcome.finite
    assert all(math.isfinite(loss) for loss in outcome.curve)
    assert outcome.curve_steps[-1] == STEPS
    # The first window's mean loss is about ln(10) = 2.3; ten epochs bring it far below.
    assert outcome.curve[-1] < 0.25 * outcome.curve[0]
    assert outcome.accuracy > 0.9
    state = dict(tree_flatten(outcome.optimizer.state))
    codes = [key for key, value in state.items() if value.dtype == mx.uint8]
    assert codes, "no tensor of the MLP kept its state in 8-bit codes"
    for key in codes:
        scales = state[key + "_scale"]
        assert bool(mx.all(mx.isfinite(scales)).item()), key
