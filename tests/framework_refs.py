"""Replaying trajectories recorded from the real frameworks (tests/data/*_refs.{json,npz}).

Each case names its framework ("peer") and its configuration in that framework's own argument
names; ``optimizer_for`` builds the ``RMSprop`` preset that claims to reproduce it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_rmsprop import RMSprop

DATA = Path(__file__).parent / "data"

# Our state key for each framework's state name (suffix match), and the sign relating them:
# optax's momentum trace accumulates the negated update.
# Keras names its slots "<variable>_<slot>" and optax "<chain index>.<State>.<field>": the name
# is matched after dropping those prefixes ("w_velocity" -> "velocity", "0.X.nu" -> "nu").
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
    },
    "mlx": {"v": ("v", 1)},
    "tf_kernel_numpy": {"ms": ("v", 1), "mg": ("grad_avg", 1), "mom": ("momentum_buffer", 1)},
}


def _their_slot(peer: str, name: str) -> str:
    if peer == "optax":
        return name.rsplit(".", 1)[-1]
    if peer == "keras":
        return name.split("_", 1)[1] if name.startswith("w_") else name
    return name


@dataclass
class Case:
    id: str
    peer: str
    config: dict
    dtype: str
    params: np.ndarray  # (steps + 1, *shape)
    grads: np.ndarray  # (steps, *shape), float64
    state: dict[str, tuple[np.ndarray, int]]  # our key -> (final value, sign)
    info: dict
    learning_rates: np.ndarray | None  # per step, when the case ran a schedule


def load_cases(name: str = "rmsprop_vector_refs") -> list[Case]:
    meta = json.loads((DATA / f"{name}.json").read_text())
    arrays = np.load(DATA / f"{name}.npz")
    cases = []
    for entry in meta["cases"]:
        problem = entry["problem"]
        state = {}
        for their_name, key in entry["state_keys"].items():
            slot = _their_slot(entry["peer"], their_name)
            if slot in STATE_NAMES[entry["peer"]]:
                ours, sign = STATE_NAMES[entry["peer"]][slot]
                state[ours] = (arrays[key], sign)
        cases.append(
            Case(
                id=entry["id"],
                peer=entry["peer"],
                config=dict(entry["config"]),
                dtype=entry["dtype"],
                params=arrays[entry["params_key"]],
                grads=arrays[f"problem__{problem}__grads"],
                state=state,
                info=entry,
                learning_rates=arrays[entry["lrs_key"]] if "lrs_key" in entry else None,
            )
        )
    return cases


def _learning_rate(value, dtype: str):
    # A float64 learning rate array keeps float64 replays exact; a Python float is held in
    # float32 (MLX's convention), which the float64 tolerance would otherwise have to absorb.
    return mx.array(value, mx.float64) if dtype == "float64" else value


def recorded_schedule(learning_rates: np.ndarray, dtype: str):
    """A schedule returning, at step t, the learning rate the peer used at its step t: the
    replay then tests the optimizer, not how each peer evaluates pow()."""
    table = mx.array(learning_rates, dtype=mx.float64 if dtype == "float64" else mx.float32)
    return lambda step: table[step]


def optimizer_for(case: Case, fused, exact_lr: bool = True, **extra) -> RMSprop:
    config = dict(case.config)
    lr_key = {"torch": "lr", "tf_kernel_numpy": "lr"}.get(case.peer, "learning_rate")
    if case.learning_rates is not None:
        # The recorded values are exact in float64; only MLX keeps them in a float32 array.
        lr_dtype = "float32" if case.peer == "mlx" else "float64"
        config[lr_key] = recorded_schedule(case.learning_rates, lr_dtype)
    elif lr_key in config and exact_lr:
        config[lr_key] = _learning_rate(config[lr_key], case.dtype)
    if case.peer == "torch":
        if "lr" not in config and exact_lr:
            config["lr"] = _learning_rate(0.01, case.dtype)
        return RMSprop.from_torch(**config, fused=fused, **extra)
    if case.peer == "optax":
        return RMSprop.from_optax(**config, fused=fused, **extra)
    if case.peer == "keras":
        if "learning_rate" not in config and exact_lr:
            config["learning_rate"] = _learning_rate(0.001, case.dtype)
        return RMSprop.from_keras(**config, fused=fused, **extra)
    if case.peer == "mlx":
        if case.learning_rates is None:
            # MLX's built-in keeps its learning rate in float32: replay it the same way.
            config["learning_rate"] = case.config["learning_rate"]
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


def replay(case: Case, optimizer: RMSprop) -> tuple[np.ndarray, dict]:
    """Run the case's gradient sequence; return the parameter trajectory and final state."""
    dtype = getattr(mx, case.dtype)
    params = {"w": mx.array(case.params[0], dtype=dtype)}
    trajectory = [np.array(params["w"])]
    for grad in case.grads:
        params = optimizer.apply_gradients({"w": mx.array(grad, dtype=dtype)}, params)
        mx.eval(params, optimizer.state)
        trajectory.append(np.array(params["w"]))
    state = {key: np.array(value) for key, value in optimizer.state["w"].items()}
    return np.stack(trajectory), state
