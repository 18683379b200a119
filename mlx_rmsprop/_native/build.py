"""How the native module ``_ext`` is compiled from the sources in this directory: CMake against a
given mlx and nanobind, stamped with the mlx version and the source digest.

Two callers: ``setup.py`` at install time (into the package), and :mod:`mlx_rmsprop.native` at
run time, when the installed module was built against another mlx (into the per-user cache).
Like ``__init__.py`` beside it, this module imports nothing but the standard library, so
``setup.py`` can load it by path.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import urllib.parse
import urllib.request
from pathlib import Path

# The nanobind that mlx's own bindings are built with (mlx 0.32.x: nanobind 3, internals ABI
# v22): a module built with another one cannot exchange arrays with mlx.core.
NANOBIND_REQUIREMENT = "nanobind==3.1.0"
CMAKE_REQUIREMENT = "cmake>=3.18"
# pyproject.toml's build requirements but mlx (a test keeps the two equal): what a build
# without pip's isolation needs installed.
BUILD_REQUIREMENTS = ("setuptools>=77", "wheel", CMAKE_REQUIREMENT, NANOBIND_REQUIREMENT)
COMPILERS = ("c++", "g++", "clang++")


class MissingTool(RuntimeError):
    """A tool the build needs is not installed; the message names it."""


def find_cmake() -> str:
    """The ``cmake`` executable: the PyPI package's when it is importable (its version meets
    pyproject's requirement, and a venv's bin directory need not be on PATH), else PATH's."""
    try:
        import cmake  # the PyPI package: a cmake binary in a wheel
    except ImportError:
        pass
    else:
        executable = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if executable.is_file():
            return str(executable)
    found = shutil.which("cmake")
    if found is None:
        raise MissingTool(
            f"no cmake (neither the `cmake` Python package nor cmake on PATH; "
            f"`pip install '{CMAKE_REQUIREMENT}'` provides it)"
        )
    return found


def nanobind_cmake_dir() -> str:
    """nanobind's CMake package directory, from the installed Python package."""
    try:
        import nanobind
    except ImportError:
        raise MissingTool(
            f"nanobind is not installed (`pip install {NANOBIND_REQUIREMENT}` provides it)"
        ) from None
    return nanobind.cmake_dir()


def check_compiler_and_headers() -> None:
    """What CMake would otherwise report after a long configure step: a C++ compiler (``CXX``
    or one of COMPILERS on PATH) and the headers of this Python."""
    compiler = os.environ.get("CXX")
    if not compiler and not any(shutil.which(name) for name in COMPILERS):
        raise MissingTool(
            f"no C++ compiler (CXX is unset and none of {', '.join(COMPILERS)} is on PATH)"
        )
    include = Path(sysconfig.get_path("include"))
    if not (include / "Python.h").is_file():
        raise MissingTool(f"no Python headers (no Python.h in {include}; e.g. python3-dev)")


def compile_extension(
    source_dir: Path,
    build_dir: Path,
    output_dir: Path,
    *,
    cmake: str,
    mlx_version: str,
    mlx_package_dir: Path,
    nanobind_dir: str,
    source_digest: str,
    link_mlx_lib_dir: bool = False,
    log=None,
) -> Path:
    """Configure and build ``_ext`` from ``source_dir`` in a fresh ``build_dir``; returns the
    module file, written to ``output_dir``. ``link_mlx_lib_dir``: add ``mlx_package_dir/lib`` to
    the module's library search path (for a module that does not live in the site-packages of
    that mlx; an install-time build must not record its temporary build environment). ``log``:
    a binary file that receives CMake's and the compiler's output (inherited stdout/stderr when
    ``None``). Raises ``subprocess.CalledProcessError`` when a step fails."""
    # A fresh tree every time: a cached one may point at headers of an earlier, deleted
    # isolated build environment.
    shutil.rmtree(build_dir, ignore_errors=True)
    output = {"stdout": log, "stderr": subprocess.STDOUT} if log is not None else {}
    subprocess.run(
        [
            cmake,
            "-S",
            str(source_dir),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMLX_ROOT={mlx_package_dir / 'share' / 'cmake' / 'MLX'}",
            f"-Dnanobind_ROOT={nanobind_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            f"-DMLX_RMSPROP_MLX_VERSION={mlx_version}",
            f"-DMLX_RMSPROP_SOURCE_DIGEST={source_digest}",
        ]
        + ([f"-DMLX_RMSPROP_MLX_LIB_DIR={mlx_package_dir / 'lib'}"] if link_mlx_lib_dir else []),
        check=True,
        **output,
    )
    subprocess.run(
        [cmake, "--build", str(build_dir), "--config", "Release", f"-j{os.cpu_count() or 1}"],
        check=True,
        **output,
    )
    # nanobind names a stable-ABI module _ext.abi3.so, otherwise _ext.<python tag>.so.
    (built,) = [path for path in output_dir.glob("_ext.*") if path.suffix in (".so", ".pyd")]
    return built


def rebuild_command() -> str:
    """The shell command that reinstalls mlx-rmsprop with its module built against the installed
    mlx: pip's isolated build would compile against the newest mlx instead, and a build without
    isolation needs the build requirements installed first. ``--no-deps`` leaves mlx as it is."""
    python = shlex.quote(sys.executable)
    checkout, editable = _checkout()
    target = shlex.quote(str(checkout)) if checkout else "<your mlx-rmsprop checkout>"
    requirements = " ".join(shlex.quote(requirement) for requirement in BUILD_REQUIREMENTS)
    return (
        f"{python} -m pip install {requirements} && {python} -m pip install "
        f"--no-build-isolation --no-deps --force-reinstall {'-e ' if editable else ''}{target}"
    )


def _checkout() -> tuple[Path | None, bool]:
    """The source tree this package was installed from, and whether the install is editable:
    the tree around this file when it is one (editable install, or run from a checkout), else
    the directory pip recorded (``direct_url.json``, PEP 610) if it still exists."""
    here = Path(__file__).resolve().parents[2]
    if (here / "setup.py").is_file() and (here / "pyproject.toml").is_file():
        return here, True
    try:
        recorded = importlib.metadata.distribution("mlx-rmsprop").read_text("direct_url.json")
        origin = json.loads(recorded or "{}")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None, False
    url = urllib.parse.urlparse(origin.get("url", ""))
    if url.scheme != "file":
        return None, False
    path = Path(urllib.request.url2pathname(url.path))
    if not (path / "setup.py").is_file():
        return None, False
    return path, bool(origin.get("dir_info", {}).get("editable", False))
