"""Whether the native CPU path runs on this machine, for tests that cover every path.

Where it is not built (no C++ toolchain at install time) its tests are skipped with the reason,
except under CI (``CI`` set), whose machine builds it: there a missing native path fails.
"""

from __future__ import annotations

import os

import pytest

from mlx_rmsprop.paths import native

NATIVE_STATUS = native.status()
NATIVE_AVAILABLE = not NATIVE_STATUS.startswith("not available")
REQUIRED = bool(os.environ.get("CI"))

requires_native = pytest.mark.skipif(
    not NATIVE_AVAILABLE and not REQUIRED, reason=f"native CPU path {NATIVE_STATUS}"
)


def native_path() -> object:
    """``"native"`` as a parameter of a path-parametrised test."""
    return pytest.param("native", marks=requires_native)
