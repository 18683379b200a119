"""Runs training steps in its own process, for the resume tests: optionally restores a
checkpoint first, then saves one (and the parameters) at the end.

    python checkpoint_worker.py CONFIG_JSON START STOP WORKDIR [--resume]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rmsprop import RMSprop, load_state, save_state

SHAPES = {"layers.0.weight": (6, 5), "layers.0.bias": (5,), "head": (5, 3), "scale": ()}


def build(config: dict) -> RMSprop:
    config = dict(config)
    preset = config.pop("preset", None)
    exclude = config.pop("exclude", None)
    if isinstance(config.get("state_dtype"), str):
        config["state_dtype"] = getattr(mx, config["state_dtype"])
    if config.get("learning_rate") == "cosine":
        config["learning_rate"] = optim.cosine_decay(0.1, 40)
    factory = {
        "keras": RMSprop.from_keras,
        "optax": RMSprop.from_optax,
        "torch": RMSprop.from_torch,
    }
    optimizer = factory[preset](**config) if preset else RMSprop(**config)
    if exclude:
        optimizer.exclude_from_weight_decay(var_names=exclude)
    return optimizer


def initial_parameters(dtype) -> dict:
    rng = np.random.default_rng(0)
    flat = [(k, mx.array(rng.standard_normal(s), dtype=dtype)) for k, s in SHAPES.items()]
    return tree_unflatten(flat)


def gradients(step: int, dtype, nonfinite_step: int | None) -> dict:
    rng = np.random.default_rng(1000 + step)
    flat = [(k, mx.array(rng.standard_normal(s), dtype=dtype)) for k, s in SHAPES.items()]
    if step == nonfinite_step:
        flat[0] = (flat[0][0], flat[0][1] * np.nan)
    return tree_unflatten(flat)


def run(config: dict, start: int, stop: int, optimizer: RMSprop, params: dict) -> dict:
    dtype = getattr(mx, config.get("_dtype", "float32"))
    for step in range(start, stop):
        params = optimizer.apply_gradients(
            gradients(step, dtype, config.get("_nonfinite_step")), params
        )
        mx.eval(params, optimizer.state)
    return params


def main() -> None:
    config, start, stop, workdir = (
        json.loads(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        Path(sys.argv[4]),
    )
    resume = "--resume" in sys.argv
    build_args = {k: v for k, v in config.items() if not k.startswith("_")}
    optimizer = build(build_args)
    dtype = getattr(mx, config.get("_dtype", "float32"))
    if resume:
        params = tree_unflatten(list(mx.load(str(workdir / "params.safetensors")).items()))
        load_state(optimizer, workdir / "optimizer.safetensors", params)
    else:
        params = initial_parameters(dtype)
    params = run(config, start, stop, optimizer, params)
    mx.save_safetensors(str(workdir / "params.safetensors"), dict(tree_flatten(params)))
    save_state(optimizer, workdir / "optimizer.safetensors")


if __name__ == "__main__":
    main()
