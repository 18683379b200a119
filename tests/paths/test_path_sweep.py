"""Every path that runs on this machine against the plain reference ops: configurations x dtypes
x awkward shapes (0-d, empty, odd, non-contiguous and broadcast views), many steps, parameter and
every state buffer."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_rmsprop import RMSprop
from mlx_rmsprop.paths import availability

from option_grid import label, pairwise
from tolerances import assert_close

# Paths compared with fused=False. The compiled path runs the same ops through mx.compile and is
# expected to match bit for bit, and so is the native C++ op (same IEEE operations, same order).
PATH_RTOL = {"compiled": 0.0, "native": 0.0}
RUNNABLE = [
    name for name, reason in availability().items() if reason is None and name != "reference"
]

# (parameter dtype, gradient dtype, state_dtype argument)
DTYPES = [
    (mx.float32, mx.float32, None),
    (mx.float16, mx.float16, None),
    (mx.bfloat16, mx.bfloat16, None),
    (mx.bfloat16, mx.float32, None),
    (mx.float16, mx.float16, mx.float16),
    (mx.bfloat16, mx.bfloat16, mx.bfloat16),
    (mx.float64, mx.float64, None),
]
STEPS = 6


def make_tree(dtype, rng):
    base = {
        "scalar": rng.standard_normal(()),
        "empty": np.zeros((0, 3)),
        "one": rng.standard_normal((1,)),
        "odd": rng.standard_normal((33, 5)),
        "cube": rng.standard_normal((2, 3, 7)),
    }
    tree = {k: mx.array(v, dtype=dtype) for k, v in base.items()}
    # Non-contiguous parameter: a transposed view.
    tree["transposed"] = mx.array(rng.standard_normal((5, 9)), dtype=dtype).T
    return tree


# Keras' pipeline and non-finite skipping, each on top of a different update configuration.
PIPELINE_CONFIGS = [
    {"clipvalue": 0.5, "centered": True},
    {"clipnorm": 0.7, "loss_scale_factor": 4.0, "momentum": 0.9},
    {"global_clipnorm": 1.5, "eps_in_sqrt": True, "lr_in_momentum": True, "momentum": 0.5},
    {"gradient_accumulation_steps": 2, "use_ema": True, "ema_overwrite_frequency": 2},
    {"loss_scale_factor": 8.0, "gradient_accumulation_steps": 3, "weight_decay": 0.1},
    {"use_ema": True, "ema_momentum": 0.8, "weight_decay": 0.05, "decoupled_weight_decay": True},
    {"skip_nonfinite": True, "momentum": 0.9, "centered": True, "use_ema": True},
]
NONFINITE_STEP = 3


def make_grads(tree, dtype, rng, step, nonfinite=False):
    scale = 0.0 if step == 2 else 1.0
    grads = tree_map(lambda a: mx.array(scale * rng.standard_normal(a.shape), dtype=dtype), tree)
    if nonfinite and step == NONFINITE_STEP:
        grads["one"] = mx.array([np.inf], dtype=dtype)
    # Non-contiguous gradient: every other row of a larger array.
    grads["odd"] = mx.array(scale * rng.standard_normal((66, 5)), dtype=dtype)[::2]
    # Broadcast view: one row repeated (stride 0).
    row = mx.array(scale * rng.standard_normal((1, 3, 7)), dtype=dtype)
    grads["cube"] = mx.broadcast_to(row, (2, 3, 7))
    return grads


def run(config, dtypes, fused):
    param_dtype, grad_dtype, state_dtype = dtypes
    rng = np.random.default_rng(11)
    optimizer = RMSprop(0.01, alpha=0.9, state_dtype=state_dtype, fused=fused, **config)
    params = make_tree(param_dtype, rng)
    nonfinite = config.get("skip_nonfinite", False)
    for step in range(STEPS):
        grads = make_grads(params, grad_dtype, rng, step, nonfinite)
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
    return params, optimizer.state


def dtype_id(dtypes):
    return "-".join(str(d).split(".")[-1] if d is not None else "auto" for d in dtypes)


@pytest.mark.parametrize("path", RUNNABLE)
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", pairwise() + PIPELINE_CONFIGS, ids=label)
def test_path_matches_reference(path, dtypes, config):
    expected_params, expected_state = run(config, dtypes, fused=False)
    params, state = run(config, dtypes, fused=path)
    rtol = PATH_RTOL.get(path)
    for tree, expected in ((params, expected_params), (state, expected_state)):
        flat, flat_expected = dict(tree_flatten(tree)), dict(tree_flatten(expected))
        assert flat.keys() == flat_expected.keys()
        for key, value in flat.items():
            assert value.dtype == flat_expected[key].dtype, key
            assert value.shape == flat_expected[key].shape, key
            dtype_name = str(value.dtype).split(".")[-1]
            if dtype_name not in ("float16", "bfloat16", "float32", "float64"):
                continue  # the step counter
            assert_close(
                np.array(value.astype(mx.float64) if dtype_name != "float64" else value),
                np.array(flat_expected[key].astype(mx.float64)),
                dtype_name,
                what=f"{path} {label(config)} {key}",
                rtol=rtol,
            )
