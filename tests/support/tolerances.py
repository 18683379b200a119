"""The tests' view of the package's tolerance table (``mlx_rmsprop.tolerance``: the entries and
why each is what it is), and which framework peers must match bit for bit."""

from __future__ import annotations

from mlx_rmsprop.tolerance import RTOL, compare

__all__ = ["EXACT_PEERS", "RTOL", "assert_close"]

# MLX and Keras evaluate the update in the same order as the reference: compared bit for bit.
EXACT_PEERS = ("mlx", "keras")


def assert_close(actual, expected, dtype: str, what: str, rtol: float | None = None) -> None:
    mismatch = compare(actual, expected, dtype, rtol)
    assert mismatch is None, f"{what}: {mismatch}"
