"""The code-table study: how well each candidate 8-bit code (``tables.candidates()``) stores
the optimizer state of a real run, and how a training run with it ends.

1. Record: train a workload with float32 state, then take every ``v`` (and, from a run with
   momentum, every ``momentum_buffer``) of the tensors that would be quantized.
2. Reconstruct each recorded buffer through the package's format (blocks of 256, absmax
   scale, nearest code by midpoints) with each table, and measure the relative error of
   ``sqrt(v)`` (what divides the gradient), of the momentum, and the share of nonzero values
   stored as zero (a zero ``v`` turns ``g / (sqrt(v) + eps)`` into ``g / eps`` once ``g`` is
   small; a zero momentum loses the direction).
3. Train the workload again with the state kept in each table
   (:class:`~.emulation.CodedStateRMSprop`) and report the final loss.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop

from .emulation import MIN_QUANTIZED_SIZE, CodedStateRMSprop, TableCodec
from .tables import candidates
from .workloads import WORKLOADS

# The momentum recording adds PyTorch-form momentum 0.9 to the workload at a tenth of its
# learning rate (the same effective step size).
MOMENTUM = 0.9


def _momentum_hyper(hyper: dict) -> dict:
    return {**hyper, "learning_rate": hyper["learning_rate"] / 10, "momentum": MOMENTUM}


def record(workload: str, steps: int | None, seed: int) -> dict[str, list[np.ndarray]]:
    """The float32 ``v`` of a plain run and the ``momentum_buffer`` of a momentum run of
    ``workload``, for every tensor of at least ``MIN_QUANTIZED_SIZE`` elements."""
    chosen = WORKLOADS[workload]
    found: dict[str, list[np.ndarray]] = {"v": [], "momentum_buffer": []}
    for key, make in (
        ("v", lambda hyper: RMSprop(**hyper)),
        ("momentum_buffer", lambda hyper: RMSprop(**_momentum_hyper(hyper))),
    ):
        outcome = chosen.run(make, mx.float32, steps, seed, keep_optimizer=True)
        for name, value in tree_flatten(outcome.optimizer.state):
            if name.endswith("." + key) and value.size >= MIN_QUANTIZED_SIZE:
                found[key].append(np.array(value, np.float32))
    return found


def reconstruction(values: list[np.ndarray], table: np.ndarray, signed: bool) -> dict:
    """Errors of storing ``values`` with ``table`` (blocks of 256), over the nonzero values:
    the median and 99th percentile relative error of ``sqrt(v)`` (unsigned) or of the value
    (signed); the share stored as zero; the share stored at less than half their magnitude
    (zero included: for ``v`` the dangerous direction, a step more than 1.4 times too large)
    and at more than twice it (values below the code's range, raised to its smallest code:
    for ``v`` a smaller, safe step)."""
    codec = TableCodec(table)
    errors, zeroed, small, large, count = [], 0, 0, 0, 0
    for value in values:
        stored = np.array(codec.decode(codec.encode(mx.array(value)), value.shape))
        nonzero = value != 0
        x, y = value[nonzero].astype(np.float64), stored[nonzero].astype(np.float64)
        if signed:
            errors.append(np.abs(y - x) / np.abs(x))
        else:
            errors.append(np.abs(np.sqrt(y) - np.sqrt(x)) / np.sqrt(x))
        zeroed += int(np.count_nonzero(y == 0))
        small += int(np.count_nonzero(np.abs(y) < np.abs(x) / 2))
        large += int(np.count_nonzero(np.abs(y) > 2 * np.abs(x)))
        count += int(x.size)
    every = np.concatenate(errors) if errors else np.zeros(0)
    return {
        "median_relative_error": float(np.median(every)) if every.size else 0.0,
        "p99_relative_error": float(np.percentile(every, 99)) if every.size else 0.0,
        "zeroed_share": zeroed / count if count else 0.0,
        "too_small_share": small / count if count else 0.0,
        "too_large_share": large / count if count else 0.0,
        "values": count,
    }


def study(
    workloads: tuple[str, ...] = ("mnist",),
    steps: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    train: bool = True,
) -> dict:
    """Every candidate table on every workload: the reconstruction errors of the state
    recorded from it (``recorded[workload][table]``) and the final loss of a run keeping the
    state in that table (``final_loss[table][workload]``, None when it diverged)."""
    tables = candidates()
    result: dict = {"recorded": {}, "final_loss": {name: {} for name in tables} if train else {}}
    for workload in workloads:
        progress(f"codes: recording the float32 state of {workload}")
        recorded = record(workload, steps, seed)
        result["recorded"][workload] = {
            name: {
                "v": reconstruction(recorded["v"], unsigned, signed=False),
                "momentum_buffer": reconstruction(recorded["momentum_buffer"], signed, True),
            }
            for name, (unsigned, signed) in tables.items()
        }
        for name, (unsigned, signed) in tables.items() if train else ():
            progress(f"codes: {name} on {workload}")

            def make(hyper, unsigned=unsigned, signed=signed):
                return CodedStateRMSprop(
                    **hyper, codec=TableCodec(unsigned), momentum_codec=TableCodec(signed)
                )

            outcome = WORKLOADS[workload].run(make, mx.float32, steps, seed)
            result["final_loss"][name][workload] = outcome.final_loss if outcome.finite else None
    return result
