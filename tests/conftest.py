"""The suite is laid out like the project: ``tests/paths/`` for the update paths (``kernels/``,
``native/``), ``tests/benchmarks/`` and ``tests/examples/`` for those folders, and a test file
per package module at the top. Helpers the tests share (reference trajectories, the Metal and
CUDA emulation, option grids, tolerances, optional dependencies) live in ``tests/support/``,
which this file puts on ``sys.path`` so that every test imports them by name."""

import sys
from pathlib import Path

SUPPORT = str(Path(__file__).resolve().parent / "support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)
