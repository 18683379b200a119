"""Command line: ``python -m mlx_rmsprop {check,bench} ...``.

``check`` lives in :mod:`mlx_rmsprop.check`. ``bench`` is a thin entry point to the benchmark
harness, which is not part of the installed package: it lives in ``benchmarks/`` at the root of
a clone and runs from there (``python -m benchmarks``). Each command module exposes
``add_arguments(parser)`` and ``run(args) -> int``, and is imported only to build the parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

CHECK_HELP = "verify every update path on this machine against the reference"
BENCH_HELP = "time one optimizer step against MLX, PyTorch and optax (from a clone)"


def clone_root() -> Path | None:
    """The clone this package is imported from (an editable install, or run from the clone's
    root), recognised by its ``benchmarks/`` folder; ``None`` for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "benchmarks" / "__init__.py").is_file() else None


def _benchmarks(root: Path) -> ModuleType:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module("benchmarks")
    origin = Path(module.__file__ or "").resolve().parent
    if origin != root / "benchmarks":
        raise ImportError(f"'benchmarks' resolved to {origin}, not the clone's {root}/benchmarks")
    return module


def _no_clone(args: argparse.Namespace) -> int:
    print(
        "python -m mlx_rmsprop bench runs the benchmark harness in benchmarks/, which is in the "
        "source repository, not in the installed package (this mlx_rmsprop is "
        f"{Path(__file__).resolve().parent}). Run it from the root of a clone:\n"
        "    python -m benchmarks --help\n"
        "or install the clone in development mode (pip install -e .) and run "
        "python -m mlx_rmsprop bench from anywhere.",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_rmsprop")
    commands = parser.add_subparsers(dest="command", required=True)
    check = importlib.import_module("mlx_rmsprop.check")
    check.add_arguments(commands.add_parser("check", help=CHECK_HELP, description=CHECK_HELP))
    runners = {"check": check.run}
    bench_parser = commands.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP)
    root = clone_root()
    if root is None:
        runners["bench"] = _no_clone
    else:
        benchmarks = _benchmarks(root)
        benchmarks.add_arguments(bench_parser)
        runners["bench"] = benchmarks.run
    args, unknown = parser.parse_known_args(argv)
    if unknown and runners[args.command] is not _no_clone:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
