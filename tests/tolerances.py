"""The tolerance table every parity test uses, and why each entry is what it is."""

from __future__ import annotations

import numpy as np

# Relative tolerance per dtype, scaled by the largest magnitude of the expected array (so that
# entries crossing zero are judged against the array's scale, not their own).
#  - MLX and Keras evaluate the update in the same order we do: compared bit for bit
#    (EXACT_PEERS).
#  - PyTorch, optax and TF associate differently (lr*(g/d) vs (lr*g)/d, rsqrt vs 1/sqrt, TF's
#    ms + (g^2 - ms)(1 - rho)): a few ulps a step. Worst case measured over the recorded
#    20-step trajectories (with a x1000 gradient spike): 4.6e-16 in float64, 2.5e-7 in
#    float32; the table leaves 4x headroom.
#  - float16 / bfloat16 parameters: arithmetic is float32, the result is rounded once per step
#    to the parameter dtype (half an ulp: 2^-11 resp. 2^-8 relative), which can flip at most one
#    rounding per step.
RTOL = {
    "float64": 2e-15,
    "float32": 1e-6,
    "float16": 2e-3,
    "bfloat16": 1.6e-2,
}


EXACT_PEERS = ("mlx", "keras")


def assert_close(actual, expected, dtype: str, what: str, rtol: float | None = None) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = np.isfinite(expected)
    assert np.array_equal(finite, np.isfinite(actual)), f"{what}: non-finite entries differ"
    assert np.array_equal(expected[~finite], actual[~finite], equal_nan=True), (
        f"{what}: non-finite entries differ"
    )
    if not finite.any():
        return
    rtol = RTOL[dtype] if rtol is None else rtol
    scale = max(np.abs(expected[finite]).max(), np.finfo(np.float64).tiny)
    error = np.abs(actual[finite] - expected[finite]).max() / scale
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:.3g} ({dtype})"
