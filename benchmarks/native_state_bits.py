"""The native CPU update with 8-bit state against float32 state, side by side in one run.

Issue 17's speed target: on the native path a 2^24-element step with 8-bit state is no slower
than 1.15x the float32-state step. Both configurations (same options, same float32 parameter
and gradients) are prepared once; then the two steps alternate, the order swapping every round,
so that a busy machine slows both alike, and each round gives a paired ratio. Reported: the
median step time of each, and the median (20th-80th percentile) of the paired ratios, in wall
time and in process CPU time (both threads; on a machine shared with other work the CPU time
is the steadier of the two).

    python -m benchmarks.native_state_bits            # 2^24 elements, default and centered+momentum
    python -m benchmarks.native_state_bits --log2-size 20 --rounds 40 --options momentum
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlx_rmsprop import storage
from mlx_rmsprop.paths import native
from mlx_rmsprop.spec import (
    DEFAULT_BLOCK_SIZE,
    FLAGS,
    NUM_SCALARS,
    QUANTIZED_KEYS,
    Scalar,
    UpdateOptions,
    code_table,
    scale_key,
)

DEFAULT_OPTION_SETS = ("", "centered,momentum")
WARMUP_ROUNDS = 2


def scalars() -> mx.array:
    values = [0.0] * NUM_SCALARS
    values[Scalar.LR], values[Scalar.ALPHA], values[Scalar.ONE_MINUS_ALPHA] = 1e-3, 0.99, 0.01
    values[Scalar.EPS], values[Scalar.MOMENTUM] = 1e-8, 0.9
    for entry in (Scalar.BIAS_CORRECTION, Scalar.GRAD_DIVISOR, Scalar.CLIP_MULTIPLIER):
        values[entry] = 1.0
    values[Scalar.CLIP_DIVISOR] = values[Scalar.UPDATE_GATE] = 1.0
    return mx.array(values, mx.float32)


def parse_options(text: str) -> UpdateOptions:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in FLAGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown option(s) {unknown}; choose from {FLAGS}")
    return UpdateOptions(**dict.fromkeys(names, True))


class Stepper:
    """One parameter and its state on the native path; ``step()`` applies one update (donating
    the old buffers) and returns once the results exist."""

    def __init__(self, options: UpdateOptions, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.options = options
        self.scalars = scalars()
        self.parameter = mx.array(rng.standard_normal(size, dtype=np.float32))
        self.gradients = [mx.array(rng.standard_normal(size, dtype=np.float32)) for _ in "ab"]
        self.state = {}
        for key in options.state_keys:
            if key.endswith("_scale"):
                continue
            values = rng.standard_normal(size, dtype=np.float32) * np.float32(1e-2)
            values = np.abs(values) if key == "v" else values
            if options.quantized_state and key in QUANTIZED_KEYS:
                codes, scales = storage.quantize(
                    mx.array(values), code_table(key), options.block_size
                )
                self.state[key], self.state[scale_key(key)] = codes, scales
            else:
                self.state[key] = mx.array(values)
        mx.eval(self.parameter, self.gradients, self.state)
        self.count = 0

    def step(self) -> None:
        gradient = self.gradients[self.count % 2]
        self.count += 1
        parameter, state = self.parameter, self.state
        # Only the update holds the old arrays, so the native op updates them in place.
        self.parameter = self.state = None
        self.parameter, self.state = native.update(
            self.options, self.scalars, parameter, gradient, state
        )
        del parameter, state
        mx.eval(self.parameter, self.state)

    def state_bytes(self) -> int:
        return sum(value.nbytes for value in self.state.values())


@dataclasses.dataclass(frozen=True)
class Comparison:
    options: UpdateOptions
    size: int
    rounds: int
    float32_ms: float  # median wall time per step
    bits8_ms: float
    ratio: tuple[float, float, float]  # paired wall-time ratio: p20, median, p80
    cpu_ratio: tuple[float, float, float]  # the same in process CPU time
    float32_state_bytes: int
    bits8_state_bytes: int


def timed(step: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(options: UpdateOptions, size: int, rounds: int) -> Comparison:
    """Interleaved steps of ``options`` with float32 state and with 8-bit state."""
    plain = dataclasses.replace(options, quantized_state=False, block_size=0)
    bits8 = dataclasses.replace(options, quantized_state=True, block_size=DEFAULT_BLOCK_SIZE)
    steppers = [Stepper(plain, size, seed=1), Stepper(bits8, size, seed=1)]
    samples: list[list[tuple[float, float]]] = [[], []]
    for round_index in range(WARMUP_ROUNDS + rounds):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        times = {which: timed(steppers[which].step) for which in order}
        if round_index >= WARMUP_ROUNDS:
            for which in (0, 1):
                samples[which].append(times[which])
    wall = np.array([[sample[0] for sample in column] for column in samples])
    cpu = np.array([[sample[1] for sample in column] for column in samples])

    def spread(values: np.ndarray) -> tuple[float, float, float]:
        p20, median, p80 = np.percentile(values, [20, 50, 80])
        return float(p20), float(median), float(p80)

    return Comparison(
        options=plain,
        size=size,
        rounds=rounds,
        float32_ms=float(np.median(wall[0])) * 1e3,
        bits8_ms=float(np.median(wall[1])) * 1e3,
        ratio=spread(wall[1] / wall[0]),
        cpu_ratio=spread(cpu[1] / np.maximum(cpu[0], 1e-9)),
        float32_state_bytes=steppers[0].state_bytes(),
        bits8_state_bytes=steppers[1].state_bytes(),
    )


def describe(result: Comparison) -> str:
    names = ",".join(name for name in FLAGS if getattr(result.options, name)) or "defaults"
    p20, median, p80 = result.ratio
    c20, cpu_median, c80 = result.cpu_ratio
    return (
        f"{names}: 2^{result.size.bit_length() - 1} elements, {result.rounds} rounds | "
        f"float32 state {result.float32_ms:.1f} ms, 8-bit state {result.bits8_ms:.1f} ms | "
        f"8-bit/float32 wall {median:.3f} [{p20:.3f}, {p80:.3f}], "
        f"CPU {cpu_median:.3f} [{c20:.3f}, {c80:.3f}] | state bytes "
        f"{result.bits8_state_bytes / result.float32_state_bytes:.3f}x"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2-size", type=int, default=24, help="elements: 2^N (default 24)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument(
        "--options",
        type=parse_options,
        action="append",
        help="comma-separated UpdateOptions flags, repeatable (default: defaults, and "
        "centered,momentum)",
    )
    args = parser.parse_args(argv)
    mx.set_default_device(mx.cpu)
    native.load()
    option_sets = args.options or [parse_options(text) for text in DEFAULT_OPTION_SETS]
    print(f"native CPU path: {native.status()}; storage loops: {native._loaded().storage_loops()}")
    for options in option_sets:
        print(describe(compare(options, 1 << args.log2_size, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
