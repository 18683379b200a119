"""C++ sources of the native CPU update (the ``_ext`` module built from them by ``setup.py``),
and the digest that ties a built module to the sources it was compiled from.

This module imports nothing but the standard library: ``setup.py`` loads it by path to stamp the
digest into the build, and the loader (:mod:`mlx_rmsprop.paths.native`) compares that stamp with the
sources beside it, so an editable checkout never runs a module built from older sources.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
SOURCE_FILES = (
    "CMakeLists.txt",
    "accumulation.h",
    "bindings.cpp",
    "dtype_spans.h",
    "gradient_statistics.cpp",
    "gradient_statistics.h",
    "half_convert.h",
    "input_hold.h",
    "rmsprop_update.cpp",
    "rmsprop_update.h",
    "spec.h",
    "storage.h",
    "transforms.cpp",
    "update_kernel.h",
    "worker_pool.h",
    "worker_pool_check.h",
)


def source_digest(directory: Path = SOURCE_DIR) -> str | None:
    """SHA-256 (16 hex digits) over the C++ sources in ``directory``; ``None`` when any is
    missing (an installed wheel need not ship them)."""
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        path = directory / name
        if not path.is_file():
            return None
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
