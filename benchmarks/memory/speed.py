"""The cost of 8-bit state: one optimizer step on a single tensor with float32 state and with
8-bit state, on one path, side by side in one run (interleaved rounds, so a burst of other
load on the machine hits both alike). The figures only mean something on a quiet machine."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from mlx_rmsprop import RMSprop


def _prepare(elements: int, fused: str | bool, seed: int, **arguments):
    rng = np.random.default_rng(seed)
    parameters = {"w": mx.array(rng.standard_normal(elements, np.float32))}
    gradients = [
        {"w": mx.array(rng.standard_normal(elements, np.float32) * 1e-2)} for _ in range(2)
    ]
    optimizer = RMSprop(1e-3, fused=fused, **arguments)
    optimizer.init(parameters)
    mx.eval(parameters, gradients, optimizer.state)
    model = {"parameters": parameters, "which": 0}

    def step() -> float:
        model["which"] ^= 1
        start = time.perf_counter()
        model["parameters"] = optimizer.apply_gradients(
            gradients[model["which"]], model["parameters"]
        )
        mx.eval(model["parameters"], optimizer.state)
        return time.perf_counter() - start

    return optimizer, step


def step_speed(
    exponent: int = 24,
    fused: str | bool = "native",
    rounds: int = 5,
    steps_per_round: int = 4,
    warmup: int = 2,
    seed: int = 0,
) -> dict:
    """Seconds per step (median, 20th/80th percentiles) of float32 and 8-bit state on a
    2^``exponent``-element float32 tensor, and the ratio of the medians (8-bit / float32)."""
    elements = 1 << exponent
    setups = {
        "float32": _prepare(elements, fused, seed),
        "8-bit": _prepare(elements, fused, seed, state_bits=8),
    }
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for _, step in setups.values():
        for _ in range(warmup):
            step()
    for _ in range(rounds):
        for name, (_, step) in setups.items():
            samples[name].extend(step() for _ in range(steps_per_round))
    result = {
        "elements": elements,
        "path": setups["float32"][0].path,
        "device": str(mx.default_device()),
    }
    for name, values in samples.items():
        p20, median, p80 = np.percentile(values, [20, 50, 80])
        result[name] = {"median": median, "p20": p20, "p80": p80, "samples": values}
    result["ratio"] = result["8-bit"]["median"] / result["float32"]["median"]
    return result
