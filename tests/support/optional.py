"""Optional test dependencies (mlx-lm, NVRTC and MLX's CUDA headers): a test that needs one is
skipped where it is missing, except under CI (``CI`` set), whose ``.ci/run`` installs them all:
there a missing dependency fails the test instead of hiding it behind a skip."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRED = bool(os.environ.get("CI"))


def module(name: str) -> ModuleType:
    """``name`` imported; skipped without it (failed under CI)."""
    if REQUIRED:
        return importlib.import_module(name)
    return pytest.importorskip(name)


def unless_missing(missing: str | None) -> pytest.MarkDecorator:
    """A skip mark for ``missing`` (a reason, or ``None`` when present); under CI a missing
    dependency raises at collection instead."""
    if missing is not None and REQUIRED:
        raise RuntimeError(f"CI installs every optional test dependency (.ci/run): {missing}")
    return pytest.mark.skipif(missing is not None, reason=str(missing))
