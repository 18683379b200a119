"""Every combination of the constructor's update-rule options (spec.option_space() projected onto
constructor arguments, see option_grid) in float64 against the independent NumPy statement, with a
decaying learning rate; the compiled path on a pairwise covering subset."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop import RMSprop

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
