"""Record RMSprop trajectories from the real frameworks for the parity tests.

Needs the optional peers (``pip install -e '.[parity]'``: PyTorch 2.13.0 CPU, optax, Keras 3 on
JAX). Writes ``tests/data/<name>.{json,npz}`` in the format of the shared reference set, which
``framework_refs.load_cases`` reads:

    python tools/generate_refs.py schedules    # exponential-decay learning rates, (3, 4) problem
    python tools/generate_refs.py keras_pipeline  # Keras' clipping, accumulation, EMA, ... on
                                                  # two variables, "w" (3, 4) and "bias" (4,)

Each case stores the parameter after every step (``params[t+1]`` after step ``t``) and every
state buffer after the last step, under the framework's own names.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
SEED = 4321
STEPS = 20
ZERO_STEP, LARGE_STEP, TINY_STEP = 4, 9, 14
SCHEDULE = {"kind": "exponential", "initial": 0.01, "rate": 0.8}


def gradient_problem(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """x0 and a gradient sequence with a zero, a x1000 and a x1e-6 step."""
    rng = np.random.default_rng(SEED)
    x0 = rng.standard_normal(shape)
    grads = rng.standard_normal((STEPS, *shape))
    grads[ZERO_STEP] = 0.0
    grads[LARGE_STEP] *= 1e3
    grads[TINY_STEP] *= 1e-6
    return x0, grads


def schedule_value(step: int) -> float:
    return SCHEDULE["initial"] * SCHEDULE["rate"] ** step


def run_torch(config: dict, dtype: str, x0, grads):
    import torch

    torch_dtype = getattr(torch, dtype)
    weight = torch.nn.Parameter(torch.tensor(x0, dtype=torch_dtype))
    optimizer = torch.optim.RMSprop([weight], lr=SCHEDULE["initial"], foreach=False, **config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: SCHEDULE["rate"] ** step)
    params, lrs = [weight.detach().numpy().copy()], []
    for grad in grads:
        weight.grad = torch.tensor(grad, dtype=torch_dtype)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        params.append(weight.detach().numpy().copy())
    state = {k: np.asarray(v) for k, v in optimizer.state[weight].items()}
    return np.stack(params), state, np.array(lrs, dtype=np.float64)


def run_optax(config: dict, dtype: str, x0, grads):
    import jax
    import jax.numpy as jnp
    import optax

    schedule = optax.exponential_decay(SCHEDULE["initial"], 1, SCHEDULE["rate"])
    transform = optax.rmsprop(schedule, **config)
    x = jnp.asarray(x0, dtype=dtype)
    state = transform.init(x)
    params, lrs = [np.asarray(x)], []
    for step, grad in enumerate(grads):
        # optax calls the schedule with its int32 count, which makes the value float32 even
        # in float64 runs: record exactly that.
        lrs.append(float(np.asarray(schedule(jnp.asarray(step, jnp.int32)))))
        updates, state = transform.update(jnp.asarray(grad, dtype=dtype), state, x)
        x = optax.apply_updates(x, updates)
        params.append(np.asarray(x))
    flat = {}
    for index, part in enumerate(state):
        for field in getattr(part, "_fields", ()):
            flat[f"{index}.{type(part).__name__}.{field}"] = np.asarray(getattr(part, field))
    del jax
    return np.stack(params), flat, np.array(lrs, dtype=np.float64)


def run_keras(config: dict, dtype: str, x0, grads):
    import keras

    keras.config.set_floatx(dtype)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        SCHEDULE["initial"], decay_steps=1, decay_rate=SCHEDULE["rate"]
    )
    variable = keras.Variable(np.asarray(x0, dtype=dtype), name="w", dtype=dtype)
    optimizer = keras.optimizers.RMSprop(learning_rate=schedule, **config)
    optimizer.build([variable])
    params, lrs = [np.asarray(variable.numpy())], []
    for grad in grads:
        lrs.append(float(np.asarray(optimizer.learning_rate)))
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(grad.astype(dtype)), variable)])
        params.append(np.asarray(variable.numpy()))
    state = {v.path.split("/")[-1]: np.asarray(v.numpy()) for v in optimizer.variables}
    return np.stack(params), state, np.array(lrs, dtype=np.float64)


def run_mlx(config: dict, dtype: str, x0, grads):
    import mlx.core as mx
    import mlx.optimizers as optim

    mlx_dtype = getattr(mx, dtype)
    optimizer = optim.RMSprop(
        learning_rate=optim.exponential_decay(SCHEDULE["initial"], SCHEDULE["rate"]), **config
    )
    params = {"w": mx.array(x0, dtype=mlx_dtype)}
    trajectory, lrs = [np.array(params["w"])], []
    for grad in grads:
        params = optimizer.apply_gradients({"w": mx.array(grad, dtype=mlx_dtype)}, params)
        mx.eval(params, optimizer.state)
        lrs.append(optimizer.learning_rate.item())
        trajectory.append(np.array(params["w"]))
    state = {"v": np.array(optimizer.state["w"]["v"])}
    return np.stack(trajectory), state, np.array(lrs, dtype=np.float64)


SCHEDULE_CASES = [
    ("torch", "default", {}),
    ("torch", "mom0.9", {"momentum": 0.9}),
    ("torch", "centered_mom0.9_wd0.1", {"centered": True, "momentum": 0.9, "weight_decay": 0.1}),
    ("optax", "mom0.9", {"momentum": 0.9}),
    ("optax", "mom0.9_nesterov", {"momentum": 0.9, "nesterov": True}),
    ("optax", "bias_correction_mom0.9", {"bias_correction": True, "momentum": 0.9}),
    ("optax", "epsout_centered", {"eps_in_sqrt": False, "centered": True}),
    ("keras", "mom0.9", {"momentum": 0.9}),
    ("keras", "centered_mom0.9", {"centered": True, "momentum": 0.9}),
    ("keras", "wd0.1_mom0.9", {"weight_decay": 0.1, "momentum": 0.9}),
    ("mlx", "default", {}),
]
RUNNERS = {"torch": run_torch, "optax": run_optax, "keras": run_keras, "mlx": run_mlx}


def record_run(arrays: dict, case_id: str, state: dict, lrs: np.ndarray) -> dict[str, str]:
    """Store a run's learning rates and final state; return {state name: array key}."""
    arrays[f"{case_id}__lrs"] = lrs
    state_keys = {}
    for name, value in state.items():
        arrays[f"{case_id}__state__{name}"] = value
        state_keys[name] = f"{case_id}__state__{name}"
    return state_keys


def versions() -> dict:
    found = {"numpy": np.__version__, "python": platform.python_version()}
    for name in ("torch", "jax", "optax", "keras", "mlx"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except ImportError:
            found[name] = "not installed"
    return found


def generate_schedules() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    problem, shape = "matrix", (3, 4)
    x0, grads = gradient_problem(shape)
    arrays = {f"problem__{problem}__x0": x0, f"problem__{problem}__grads": grads}
    cases = []
    for peer, label, config in SCHEDULE_CASES:
        for dtype in ("float64", "float32"):
            case_id = f"{peer}__sched_{label}__{problem}__{dtype}"
            params, state, lrs = RUNNERS[peer](config, dtype, x0, grads)
            arrays[f"{case_id}__params"] = params
            state_keys = record_run(arrays, case_id, state, lrs)
            cases.append(
                {
                    "id": case_id,
                    "peer": peer,
                    "label": label,
                    "config": config,
                    "lr_schedule": SCHEDULE,
                    "problem": problem,
                    "shape": list(shape),
                    "dtype": dtype,
                    "steps": STEPS,
                    "params_key": f"{case_id}__params",
                    "lrs_key": f"{case_id}__lrs",
                    "state_keys": state_keys,
                    "finite": bool(np.isfinite(params).all()),
                }
            )
            print(f"{case_id}: final {params[-1].ravel()[:3]}")
    meta = {
        "versions": versions(),
        "seed": SEED,
        "steps": STEPS,
        "gradient_sequence": {
            "rng": "numpy.random.default_rng(SEED): x0 = standard_normal(shape), grads = "
            "standard_normal((T,)+shape)",
            "zero_step": ZERO_STEP,
            "large_step": LARGE_STEP,
            "large_factor": 1e3,
            "tiny_step": TINY_STEP,
            "tiny_factor": 1e-6,
        },
        "lr_schedule": "learning rate at step t (0-based) = initial * rate**t in every peer "
        "(torch LambdaLR, optax/Keras exponential decay with 1 transition step, MLX "
        "exponential_decay); each case records the value the peer used at every step "
        "(<id>__lrs), so a replay tests the optimizer, not the peer's pow()",
    }
    write(
        "schedule_refs",
        {"meta": meta, "problems": {problem: {"shape": list(shape)}}, "cases": cases},
        arrays,
    )


def write(name: str, meta: dict, arrays: dict) -> None:
    DATA.mkdir(exist_ok=True)
    np.savez_compressed(DATA / f"{name}.npz", **arrays)
    (DATA / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {DATA / name}.json/.npz: {len(meta['cases'])} cases")


PIPELINE_CASES = [
    ("lsf4", {"loss_scale_factor": 4.0}),
    ("accum3_mom0.9", {"gradient_accumulation_steps": 3, "momentum": 0.9}),
    (
        "accum2_lsf8_clipnorm1",
        {"gradient_accumulation_steps": 2, "loss_scale_factor": 8.0, "clipnorm": 1.0},
    ),
    ("clipnorm1_lsf2", {"clipnorm": 1.0, "loss_scale_factor": 2.0}),
    ("clipnorm0.3_centered", {"clipnorm": 0.3, "centered": True}),
    ("global_clipnorm1", {"global_clipnorm": 1.0}),
    ("global_clipnorm0.3_mom0.9", {"global_clipnorm": 0.3, "momentum": 0.9}),
    ("clipvalue0.5_centered_mom0.9", {"clipvalue": 0.5, "centered": True, "momentum": 0.9}),
    ("wd0.1_exclude_bias_mom0.9", {"weight_decay": 0.1, "momentum": 0.9}, ["bias"]),
    ("ema0.9", {"use_ema": True, "ema_momentum": 0.9}),
    ("ema_overwrite3", {"use_ema": True, "ema_overwrite_frequency": 3}),
    (
        "ema_overwrite2_accum2",
        {"use_ema": True, "ema_overwrite_frequency": 2, "gradient_accumulation_steps": 2},
    ),
    (
        "everything_schedule",
        {
            "loss_scale_factor": 2.0,
            "gradient_accumulation_steps": 2,
            "global_clipnorm": 0.5,
            "weight_decay": 0.05,
            "use_ema": True,
            "ema_momentum": 0.95,
            "ema_overwrite_frequency": 4,
            "centered": True,
            "momentum": 0.9,
        },
        ["bias"],
        True,
    ),
]
PIPELINE_VARIABLES = {"w": (3, 4), "bias": (4,)}


def run_keras_pipeline(config, exclude, use_schedule, dtype, x0s, grads):
    import keras

    keras.config.set_floatx(dtype)
    learning_rate = config.pop("learning_rate", 0.01)
    if use_schedule:
        learning_rate = keras.optimizers.schedules.ExponentialDecay(
            SCHEDULE["initial"], decay_steps=1, decay_rate=SCHEDULE["rate"]
        )
    variables = {
        name: keras.Variable(np.asarray(x0, dtype=dtype), name=name, dtype=dtype)
        for name, x0 in x0s.items()
    }
    optimizer = keras.optimizers.RMSprop(learning_rate=learning_rate, **config)
    if exclude:
        optimizer.exclude_from_weight_decay(var_names=exclude)
    optimizer.build(list(variables.values()))
    params = {name: [np.asarray(v.numpy())] for name, v in variables.items()}
    lrs = []
    for t in range(STEPS):
        lrs.append(float(np.asarray(optimizer.learning_rate)))
        optimizer.apply_gradients(
            [
                (keras.ops.convert_to_tensor(grads[name][t].astype(dtype)), v)
                for name, v in variables.items()
            ]
        )
        for name, v in variables.items():
            params[name].append(np.asarray(v.numpy()))
    state = {v.path.split("/")[-1]: np.asarray(v.numpy()) for v in optimizer.variables}
    return {k: np.stack(v) for k, v in params.items()}, state, np.array(lrs, dtype=np.float64)


def generate_keras_pipeline() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    problem = "two_variables"
    x0s, grads, arrays = {}, {}, {}
    for index, (name, shape) in enumerate(PIPELINE_VARIABLES.items()):
        rng = np.random.default_rng(SEED + index)
        x0s[name] = rng.standard_normal(shape)
        grads[name] = rng.standard_normal((STEPS, *shape))
        grads[name][ZERO_STEP] = 0.0
        grads[name][LARGE_STEP] *= 1e3
        grads[name][TINY_STEP] *= 1e-6
        arrays[f"problem__{problem}__x0__{name}"] = x0s[name]
        arrays[f"problem__{problem}__grads__{name}"] = grads[name]
    cases = []
    for label, config, *rest in PIPELINE_CASES:
        exclude = rest[0] if rest else None
        use_schedule = rest[1] if len(rest) > 1 else False
        for dtype in ("float64", "float32"):
            case_id = f"keras__{label}__{problem}__{dtype}"
            params, state, lrs = run_keras_pipeline(
                dict(config), exclude, use_schedule, dtype, x0s, grads
            )
            for name, trajectory in params.items():
                arrays[f"{case_id}__params__{name}"] = trajectory
            state_keys = record_run(arrays, case_id, state, lrs)
            cases.append(
                {
                    "id": case_id,
                    "peer": "keras",
                    "label": label,
                    "config": config,
                    "exclude_from_weight_decay": exclude,
                    "lr_schedule": SCHEDULE if use_schedule else None,
                    "problem": problem,
                    "variables": {k: list(v) for k, v in PIPELINE_VARIABLES.items()},
                    "dtype": dtype,
                    "steps": STEPS,
                    "params_key": f"{case_id}__params",
                    "lrs_key": f"{case_id}__lrs",
                    "state_keys": state_keys,
                    "finite": bool(all(np.isfinite(p).all() for p in params.values())),
                }
            )
            print(f"{case_id}: final w {params['w'][-1].ravel()[:3]}")
    meta = {
        "versions": versions(),
        "seed": SEED,
        "steps": STEPS,
        "gradient_sequence": {
            "rng": "per variable i (in order w, bias): numpy.random.default_rng(SEED + i), "
            "x0 = standard_normal(shape), grads = standard_normal((T,)+shape)",
            "zero_step": ZERO_STEP,
            "large_step": LARGE_STEP,
            "large_factor": 1e3,
            "tiny_step": TINY_STEP,
            "tiny_factor": 1e-6,
        },
        "params_layout": "<id>__params__<variable>: (T+1, *shape); the learning rate Keras "
        "used at each call is <id>__lrs",
    }
    problems = {problem: {"variables": {k: list(v) for k, v in PIPELINE_VARIABLES.items()}}}
    write("keras_pipeline_refs", {"meta": meta, "problems": problems, "cases": cases}, arrays)


GENERATORS = {"schedules": generate_schedules, "keras_pipeline": generate_keras_pipeline}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=sorted(GENERATORS), nargs="+")
    for which in parser.parse_args().which:
        GENERATORS[which]()
