"""Randomised checks (hypothesis, kept small): every path agrees with the reference within the
tolerance table, checkpoints round-trip exactly; and a long float16 soak run."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop, load_state, save_state
from mlx_rmsprop.paths import availability

from option_grid import full_product
from tolerances import assert_close

RUNNABLE = [n for n, reason in availability().items() if reason is None and n != "reference"]
DTYPES = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "float64": mx.float64,
}
SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
PIPELINE = st.sampled_from(
    [
        {},
        {"clipvalue": 0.3},
        {"clipnorm": 0.5},
        {"global_clipnorm": 1.0, "loss_scale_factor": 2.0},
        {"gradient_accumulation_steps": 2},
        {"use_ema": True, "ema_overwrite_frequency": 2},
        {"skip_nonfinite": True},
    ]
)
# The constructor's projection of spec.option_space() (option_grid), so only valid sets.
CONFIGS = st.sampled_from(full_product())


# What each randomised test draws.
DRAWS = {
    "config": CONFIGS,
    "pipeline": PIPELINE,
    "dtype": st.sampled_from(list(DTYPES)),
    "shape": SHAPES,
    "seed": st.integers(0, 2**16),
}


def run(config, dtype, shape, fused, seed, steps=4):
    rng = np.random.default_rng(seed)
    optimizer = RMSprop(0.02, alpha=0.9, fused=fused, **config)
    params = {"p": mx.array(rng.standard_normal(shape), dtype=dtype)}
    for _ in range(steps):
        grads = {"p": mx.array(rng.standard_normal(shape), dtype=dtype)}
        params = optimizer.apply_gradients(grads, params)
    mx.eval(params, optimizer.state)
    return optimizer, params


def flat(optimizer, params):
    out = {f"param.{k}": v for k, v in tree_flatten(params)}
    out.update(
        {k: v for k, v in tree_flatten(optimizer.state) if k not in ("step", "skipped_steps")}
    )
    return out


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**DRAWS)
def test_every_path_agrees_with_the_reference(config, pipeline, dtype, shape, seed):
    expected = flat(*run({**config, **pipeline}, DTYPES[dtype], shape, False, seed))
    for path in RUNNABLE:
        got = flat(*run({**config, **pipeline}, DTYPES[dtype], shape, path, seed))
        assert got.keys() == expected.keys()
        for key, value in got.items():
            name = str(value.dtype).split(".")[-1]
            assert_close(
                np.array(value.astype(mx.float64)),
                np.array(expected[key].astype(mx.float64)),
                name,
                what=f"{path} {key}",
                rtol=0.0 if path in ("compiled", "native") else None,
            )


@settings(max_examples=15, deadline=None)
@given(**DRAWS)
def test_save_and_load_round_trip_exactly(tmp_path_factory, config, pipeline, dtype, shape, seed):
    optimizer, params = run({**config, **pipeline}, DTYPES[dtype], shape, False, seed, steps=3)
    path = save_state(optimizer, tmp_path_factory.mktemp("ckpt") / "state.safetensors")
    restored = RMSprop(0.02, alpha=0.9, fused=False, **config, **pipeline)
    load_state(restored, path, params)
    original, loaded = dict(tree_flatten(optimizer.state)), dict(tree_flatten(restored.state))
    assert original.keys() == loaded.keys()
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype, key
        assert np.array_equal(
            np.array(loaded[key].astype(mx.float64) if value.dtype == mx.bfloat16 else loaded[key]),
            np.array(value.astype(mx.float64) if value.dtype == mx.bfloat16 else value),
            equal_nan=True,
        ), key


def test_soak_5000_float16_steps_stay_finite_and_learn():
    mx.random.seed(0)
    x = mx.random.normal((256, 8))
    y = mx.sin(x @ mx.random.normal((8, 1)))
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    model.set_dtype(mx.float16)
    optimizer = RMSprop(1e-3, momentum=0.9, centered=True, skip_nonfinite=True)

    def loss_fn(m):
        return nn.losses.mse_loss(m(x.astype(mx.float16)).astype(mx.float32), y)

    state = [model.state, optimizer.state]

    @mx.compile
    def step():
        loss, g = nn.value_and_grad(model, loss_fn)(model)
        optimizer.update(model, g)
        return loss

    optimizer.init(model.trainable_parameters())
    step = mx.compile(
        step.__wrapped__ if hasattr(step, "__wrapped__") else step, inputs=state, outputs=state
    )
    first = loss_fn(model).item()
    losses = []
    for _ in range(5000):
        losses.append(step())
        if len(losses) == 100:
            mx.eval(losses, state)
            losses = [losses[-1]]
    mx.eval(state)
    final = loss_fn(model).item()
    for key, value in tree_flatten(model.parameters()):
        assert value.dtype == mx.float16, key
        assert np.isfinite(np.array(value)).all(), key
    for key, value in tree_flatten(optimizer.state):
        if key not in ("step", "skipped_steps", "learning_rate"):
            assert value.dtype == mx.float32, key
            assert np.isfinite(np.array(value)).all(), key
    assert optimizer.step.item() + optimizer.skipped_steps.item() == 5000
    assert final < 0.2 * first
