"""Command line: ``python -m mlx_rmsprop {check,bench} ...``.

Each subcommand lives in its own module, imported only when run:
``check`` in :mod:`mlx_rmsprop.check`, ``bench`` in :mod:`mlx_rmsprop.bench`; each exposes
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "check": (
        "mlx_rmsprop.check",
        "verify every update path on this machine against the reference",
    ),
    "bench": ("mlx_rmsprop.bench", "time one optimizer step against MLX, PyTorch and optax"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_rmsprop")
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
