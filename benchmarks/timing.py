"""How a step is timed, and the memory bandwidth every GB/s figure is compared with."""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .implementations import Prepared


@dataclass(frozen=True)
class Timing:
    """Seconds per step: median and the 20th/80th percentiles of ``samples``."""

    median: float
    p20: float
    p80: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        p20, median, p80 = np.percentile(samples, [20, 50, 80])
        return cls(float(median), float(p20), float(p80), tuple(samples))


def time_steps(prepared: Prepared, count: int) -> list[float]:
    """Seconds of each of ``count`` steps of ``prepared``, whose ``step`` returns only once its
    results exist (``mx.eval``, ``block_until_ready``, a device synchronisation). The switch
    to the other gradient set happens before each step, outside the timed region."""
    samples = []
    for _ in range(count):
        prepared.next_gradients()
        start = time.perf_counter()
        prepared.step()
        samples.append(time.perf_counter() - start)
    return samples


def mlx_step_memory(prepared: Prepared) -> tuple[int, int] | None:
    """``(peak, resident)`` bytes of one MLX step: ``resident`` is what its parameters, one
    gradient set and its state hold, ``peak`` that plus the most the step allocated on top of
    what was active when it started. ``None`` for arrays outside MLX's allocator, or where MLX
    does not report memory."""
    if prepared.mlx_resident is None:
        return None
    mx.synchronize()
    mx.clear_cache()
    active = mx.get_active_memory()
    if active == 0:
        return None
    prepared.next_gradients()
    mx.reset_peak_memory()
    prepared.step()
    # The reset sets the peak to 0 and only an allocation raises it again: a step that
    # allocates nothing (every output written in place) peaks at what was already active.
    peak = max(mx.get_peak_memory(), active)
    return prepared.mlx_resident + peak - active, prepared.mlx_resident


# A row never has fewer timed steps than this (unless --repeats asks for fewer): enough for
# its 20th and 80th percentiles to differ from its extremes.
MIN_REPEATS = 5


def repeat_count(
    warmup_samples: list[float], repeats: int, budget: float, least: int = MIN_REPEATS
) -> int:
    """Timed steps for one row: ``repeats``, or as many as fit in ``budget`` seconds at the
    speed of the fastest warm-up step, but never fewer than ``least`` (nor than ``repeats``
    when that is smaller)."""
    if not warmup_samples or budget <= 0:
        return repeats
    fitting = int(budget / max(min(warmup_samples), 1e-9))
    return min(repeats, max(fitting, least))


@dataclass(frozen=True)
class Bandwidth:
    """A measured streaming bandwidth and exactly what was measured."""

    gbps: float
    method: str
    array_bytes: int
    passes: int


def numpy_bandwidth(elements: int, passes: int = 10) -> Bandwidth:
    """Host memory bandwidth: NumPy ``a += b`` on two float32 arrays of ``elements``, counting
    three array sizes per pass (read a, read b, write a), best pass of ``passes``."""
    a = np.ones(elements, np.float32)
    b = np.ones(elements, np.float32)
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        np.add(a, b, out=a)
        best = min(best, time.perf_counter() - start)
    return Bandwidth(
        3 * a.nbytes / best / 1e9, "numpy in-place a += b, float32", int(a.nbytes), passes
    )


def mlx_bandwidth(elements: int, passes: int = 10) -> Bandwidth:
    """Bandwidth of MLX's default device: ``a = a + b`` on two float32 arrays of ``elements``
    (the old ``a`` is donated, so the add streams in place), three array sizes per pass, best
    pass of ``passes``."""
    a = mx.ones((elements,), mx.float32)
    b = mx.ones((elements,), mx.float32)
    mx.eval(a, b)
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        a = a + b
        mx.eval(a)
        best = min(best, time.perf_counter() - start)
    device = mx.default_device()
    return Bandwidth(
        3 * a.nbytes / best / 1e9,
        f"mlx a = a + b on {device}, float32, old a donated",
        int(a.nbytes),
        passes,
    )
