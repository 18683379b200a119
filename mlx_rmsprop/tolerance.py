"""How far a result may be from the reference: the one tolerance table and the one comparator,
used by ``python -m mlx_rmsprop check``, by ``fused="auto"``'s probe of each kernel variant
and by the test suite.

An array passes when its NaN and infinite entries are exactly the expected ones and its finite
entries differ from the expected ones by at most ``RTOL[dtype]`` times the largest finite
magnitude of the expected array (so that entries crossing zero are judged against the array's
scale, not their own). ``RTOL`` is indexed by the dtype of the array compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

__all__ = ["RTOL", "Mismatch", "compare", "relative_error"]

RTOL = {
    # float64: the framework-parity tests only (PyTorch, optax, TF run the update in float64 on
    # the CPU; the kernels do not compute in float64). They associate differently from the
    # reference (lr*(g/d) vs (lr*g)/d, rsqrt vs 1/sqrt, TF's ms + (g^2 - ms)(1 - rho)): a few
    # ulps a step; worst measured over the recorded 20-step trajectories 4.6e-16, x4 headroom.
    "float64": 2e-15,
    # float32: the same reassociation in the framework-parity tests (worst measured 2.5e-7,
    # x4 headroom), and any GPU kernel that rounds an operation differently from the reference
    # (a contracted a*b + c moves a result by an ulp or so). The kernels are built to round
    # exactly as the reference does, so on a correct device they meet 0; the table is what
    # `check` and the probe accept, and `check`'s inputs keep the centred variance away from
    # cancellation so that an ulp there stays an ulp in the result.
    "float32": 1e-6,
    # float16 / bfloat16 buffers: arithmetic is float32, each store rounds once to the buffer's
    # dtype (half an ulp: 2^-11 resp. 2^-8 relative). An ulp of float32 difference before the
    # store can flip that rounding: one ulp of the 16-bit type, relative to the array's scale.
    "float16": 2e-3,
    "bfloat16": 1.6e-2,
    # uint8: the codes of 8-bit state (relative to the largest code, 255 for a block's
    # largest element). An ulp of float32 difference before requantizing can move a value
    # across a midpoint: one code.
    "uint8": 4e-3,
}


@dataclass(frozen=True)
class Mismatch:
    """Why an array fails: the first element that does, its values, and the array's error."""

    index: tuple[int, ...]
    actual: float
    expected: float
    error: float
    rtol: float
    reason: str

    def __str__(self) -> str:
        where = f"element {self.index}" if self.index else "the scalar"
        return f"{where}: {self.actual!r} (expected {self.expected!r}), {self.reason}"


def _host(array: object) -> np.ndarray:
    if isinstance(array, mx.array):
        # float64 holds float16, bfloat16 and float32 values exactly.
        if array.dtype != mx.float64:
            array = array.astype(mx.float32)
        return np.array(array, np.float64)
    return np.asarray(array, np.float64)


def relative_error(actual: object, expected: object) -> float:
    """Largest difference of the finite entries relative to the largest finite magnitude of
    ``expected``; infinite when the shapes (or, for MLX arrays, the dtypes) differ or the
    non-finite entries do."""
    mismatch = compare(actual, expected, rtol=math.inf)
    if mismatch is not None:
        return math.inf
    return _error(_host(actual), _host(expected))[0]


def _error(a: np.ndarray, e: np.ndarray) -> tuple[float, np.ndarray]:
    finite = np.isfinite(e)
    deviation = np.zeros(e.shape)
    deviation[finite] = np.abs(a[finite] - e[finite])
    if not finite.any():
        return 0.0, deviation
    scale = max(np.abs(e[finite]).max(), np.finfo(np.float64).tiny)
    return float(deviation.max() / scale), deviation / scale


def compare(
    actual: object, expected: object, dtype: str | None = None, rtol: float | None = None
) -> Mismatch | None:
    """``None`` when ``actual`` passes against ``expected`` under ``RTOL[dtype]`` (or
    ``rtol``), else the first failing element. ``dtype`` defaults to the expected MLX array's
    dtype; ``rtol=0`` asks for equality (NaN where expected NaN)."""
    if isinstance(actual, mx.array) and isinstance(expected, mx.array):
        if actual.dtype != expected.dtype:
            return Mismatch(
                (), math.nan, math.nan, math.inf, 0.0, f"dtype {actual.dtype} != {expected.dtype}"
            )
    if dtype is None:
        dtype = str(getattr(expected, "dtype", "float64")).split(".")[-1]
    if rtol is None:
        rtol = RTOL[dtype]
    a, e = _host(actual), _host(expected)
    if a.shape != e.shape:
        return Mismatch((), math.nan, math.nan, math.inf, rtol, f"shape {a.shape} != {e.shape}")
    finite = np.isfinite(e)
    same_special = np.where(finite, np.isfinite(a), (a == e) | (np.isnan(a) & np.isnan(e)))
    if not same_special.all():
        index = np.unravel_index(np.argmin(same_special), e.shape)
        return Mismatch(
            tuple(int(k) for k in index),
            float(a[index]),
            float(e[index]),
            math.inf,
            rtol,
            "non-finite entries differ (NaN or infinity where the reference has another value, "
            "or the other way round)",
        )
    error, per_element = _error(a, e)
    if error <= rtol:
        return None
    index = np.unravel_index(np.argmax(per_element > rtol), e.shape)
    return Mismatch(
        tuple(int(k) for k in index),
        float(a[index]),
        float(e[index]),
        error,
        rtol,
        f"relative error {error:.3g} > {rtol:g} ({dtype}; largest over the array, relative "
        "to its largest finite magnitude)",
    )
