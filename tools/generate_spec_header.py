"""Write ``mlx_rmsprop/paths/native/spec.h`` from ``mlx_rmsprop/spec.py`` (the C++ side's scalar,
flag and invariant tables), or with ``--check`` report whether the committed file is current.

Run after changing the spec, then rebuild the native extension (``pip install -e .``):
``python tools/generate_spec_header.py``. Exit status 1 from ``--check`` means stale.
"""

from __future__ import annotations

import sys

from mlx_rmsprop.spec import HEADER_PATH, header_text


def main(argv: list[str]) -> int:
    text = header_text()
    if argv == ["--check"]:
        current = HEADER_PATH.is_file() and HEADER_PATH.read_text("utf-8") == text
        print(f"{HEADER_PATH}: {'current' if current else 'stale: run without --check'}")
        return 0 if current else 1
    if argv:
        print("usage: python tools/generate_spec_header.py [--check]", file=sys.stderr)
        return 2
    HEADER_PATH.write_text(text, "utf-8")
    print(f"wrote {HEADER_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
