"""Replaying trajectories recorded from the real frameworks (tests/data/*_refs.{json,npz}).

Each case names its framework ("peer") and its configuration in that framework's own argument
names; ``optimizer_for`` builds the ``RMSprop`` preset that claims to reproduce it. A case has
one variable ``w`` or, for the Keras pipeline cases, several (``w`` and ``bias``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_rmsprop import RMSprop

DATA = Path(__file__).resolve().parents[1] / "data"

# Our state key for each framework's slot name, and the sign relating them (optax's momentum
# trace accumulates the negated update). Keras names its slots "<variable>_<slot>" and optax
# "<chain index>.<State>.<field>": the slot is matched after dropping those prefixes.
STATE_NAMES = {
    "torch": {
        "square_avg": ("v", 1),
        "grad_avg": ("grad_avg", 1),
        "momentum_buffer": ("momentum_buffer", 1),
    },
    "optax": {"nu": ("v", 1), "mu": ("grad_avg", 1), "trace": ("momentum_buffer", -1)},
    "keras": {
        "velocity": ("v", 1),
        "average_gradient": ("grad_avg", 1),
        "momentum": ("momentum_buffer", 1),
        "average": ("ema", 1),
        "gradient_accumulator": ("accumulated_gradient", 1),
    },
    "mlx": {"v": ("v", 1)},
    "tf_kernel_numpy": {"ms": ("v", 1), "mg": ("grad_avg", 1), "mom": ("momentum_buffer", 1)},
}


@dataclass
class Variable:
    params: np.ndarray  # (steps + 1, *shape): the start and the value after every step
    grads: np.ndarray  # (steps, *shape), float64


@dataclass
class Case:
    id: str
    peer: str
    config: dict
    dtype: str
    variables: dict[str, Variable]
    state: dict[tuple[str, str], tuple[np.ndarray, int]]  # (variable, our key) -> (value, sign)
    info: dict
    learning_rates: np.ndarray | None  # per step, when the case ran a schedule


def _slot(peer: str, name: str, variables) -> tuple[str, str] | None:
    """(variable, slot) for one of the framework's state names, or None for counters."""
    if peer == "optax":
        return "w", name.rsplit(".", 1)[-1]
    if peer == "keras":
        for variable in variables:
            if name.startswith(variable + "_"):
                return variable, name[len(variable) + 1 :]
        return None
    return "w", name


def load_cases(name: str = "rmsprop_vector_refs") -> list[Case]:
    meta = json.loads((DATA / f"{name}.json").read_text())
    arrays = np.load(DATA / f"{name}.npz")
    cases = []
    for entry in meta["cases"]:
        problem = entry["problem"]
        if "variables" in entry:
            variables = {
                var: Variable(
                    arrays[f"{entry['params_key']}__{var}"],
                    arrays[f"problem__{problem}__grads__{var}"],
                )
                for var in entry["variables"]
            }
        else:
            variables = {
                "w": Variable(arrays[entry["params_key"]], arrays[f"problem__{problem}__grads"])
            }
        state = {}
        for their_name, key in entry["state_keys"].items():
            found = _slot(entry["peer"], their_name, variables)
            if found and found[1] in STATE_NAMES[entry["peer"]]:
                ours, sign = STATE_NAMES[entry["peer"]][found[1]]
                state[(found[0], ours)] = (arrays[key], sign)
        cases.append(
            Case(
                id=entry["id"],
                peer=entry["peer"],
                config=dict(entry["config"]),
                dtype=entry["dtype"],
                variables=variables,
                state=state,
                info=entry,
                learning_rates=arrays[entry["lrs_key"]] if "lrs_key" in entry else None,
            )
        )
    return cases


def recorded_schedule(learning_rates: np.ndarray, dtype: str):
    """A schedule returning, at step t, the learning rate the peer used at its step t: the
    replay then tests the optimizer, not how each peer evaluates pow()."""
    table = mx.array(learning_rates, dtype=mx.float64 if dtype == "float64" else mx.float32)
    return lambda step: table[step]


def _learning_rate(value, dtype: str):
    # A float64 learning rate array keeps float64 replays exact; a Python float is held in
    # float32 (MLX's convention), which the float64 tolerance would otherwise have to absorb.
    return mx.array(value, mx.float64) if dtype == "float64" else value


def optimizer_for(case: Case, fused, **extra) -> RMSprop:
    config = dict(case.config)
    lr_key = {"torch": "lr", "tf_kernel_numpy": "lr"}.get(case.peer, "learning_rate")
    default_lr = {"torch": 0.01, "keras": 0.001}.get(case.peer)
    if case.learning_rates is not None and (case.info.get("lr_schedule") or case.peer != "mlx"):
        # The recorded values are exact in float64; only MLX keeps them in a float32 array.
        lr_dtype = "float32" if case.peer == "mlx" else "float64"
        config[lr_key] = recorded_schedule(case.learning_rates, lr_dtype)
    elif case.peer == "mlx":
        pass  # MLX's built-in keeps its learning rate in float32: replay it the same way.
    elif lr_key in config:
        config[lr_key] = _learning_rate(config[lr_key], case.dtype)
    elif default_lr is not None:
        config[lr_key] = _learning_rate(default_lr, case.dtype)

    if case.peer == "torch":
        return RMSprop.from_torch(**config, fused=fused, **extra)
    if case.peer == "optax":
        return RMSprop.from_optax(**config, fused=fused, **extra)
    if case.peer == "keras":
        optimizer = RMSprop.from_keras(**config, fused=fused, **extra)
        if case.info.get("exclude_from_weight_decay"):
            optimizer.exclude_from_weight_decay(var_names=case.info["exclude_from_weight_decay"])
        return optimizer
    if case.peer == "mlx":
        return RMSprop(**config, fused=fused, **extra)
    if case.peer == "tf_kernel_numpy":
        lr = config.pop("lr")
        if case.info["ms_init"] == 1.0:
            return RMSprop.from_tensorflow(
                lr,
                decay=config["rho"],
                momentum=config["momentum"],
                epsilon=config["epsilon"],
                centered=case.info["centered"],
                fused=fused,
                **extra,
            )
        # The raw ApplyRMSProp op with a zero-initialised accumulator (Keras 2 slots).
        return RMSprop(
            lr,
            alpha=config["rho"],
            eps=config["epsilon"],
            momentum=config["momentum"],
            centered=case.info["centered"],
            eps_in_sqrt=True,
            lr_in_momentum=True,
            fused=fused,
            **extra,
        )
    raise AssertionError(f"unknown peer {case.peer}")


def replay(case: Case, optimizer: RMSprop) -> tuple[dict[str, np.ndarray], dict]:
    """Run the case's gradient sequence; return each variable's trajectory and the final
    state as {(variable, key): value}."""
    dtype = getattr(mx, case.dtype)
    params = {name: mx.array(var.params[0], dtype=dtype) for name, var in case.variables.items()}
    trajectories = {name: [np.array(value)] for name, value in params.items()}
    steps = len(next(iter(case.variables.values())).grads)
    for t in range(steps):
        grads = {name: mx.array(var.grads[t], dtype=dtype) for name, var in case.variables.items()}
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
        for name, value in params.items():
            trajectories[name].append(np.array(value))
    state = {
        (name, key): np.array(value)
        for name in case.variables
        for key, value in optimizer.state[name].items()
    }
    return {name: np.stack(t) for name, t in trajectories.items()}, state
