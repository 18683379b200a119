"""The per-user cache of native modules rebuilt on first use.

When the module installed with the package does not match the running mlx (another version:
libmlx's C++ ABI differs) or the sources beside it, :mod:`mlx_rmsprop.native` builds one
against the running mlx into

    $XDG_CACHE_HOME/mlx_rmsprop/native/<mlx version>-<source digest>-<python tag>-<machine>/

(``~/.cache`` when ``XDG_CACHE_HOME`` is unset), once per key: in a temporary directory beside
it that is renamed into place when complete, under a file lock so that concurrent processes
build it once. A failed build leaves its log as ``<key>.failed.log`` and is not retried (each
try costs about a minute) until that file is deleted. ``MLX_RMSPROP_NATIVE_REBUILD=0`` turns
rebuilding off.

Standard library only, like the rest of this package's Python files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from . import build

REBUILD_VARIABLE = "MLX_RMSPROP_NATIVE_REBUILD"

logger = logging.getLogger("mlx_rmsprop.native")


def cache_root() -> Path:
    """Where rebuilt modules live: ``$XDG_CACHE_HOME/mlx_rmsprop/native`` (an unset or relative
    ``XDG_CACHE_HOME`` means ``~/.cache``, as the XDG base directory specification says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "mlx_rmsprop" / "native"


def entry(mlx_version: str, source_digest: str) -> Path:
    """The directory of the module built from sources ``source_digest`` against
    ``mlx_version``, for this Python and machine (a home directory may be shared)."""
    key = f"{mlx_version}-{source_digest}-{sys.implementation.cache_tag}-{platform.machine()}"
    return cache_root() / key


def module_file(directory: Path) -> Path:
    """The module file in a complete cache entry."""
    modules = [path for path in directory.glob("_ext.*") if path.suffix in (".so", ".pyd")]
    if len(modules) != 1:
        raise RuntimeError(
            f"the cache entry {directory} holds {len(modules)} modules instead of one (delete "
            "it to rebuild)"
        )
    return modules[0]


def ensure_built(
    directory: Path,
    *,
    mlx_version: str,
    mlx_package_dir: Path,
    source_dir: Path,
    source_digest: str,
    why: str,
) -> None:
    """Build the module into ``directory`` unless it is there, saying so with ``why`` (what is
    wrong with the installed one) at warning level first: it takes a minute. ``RuntimeError``
    saying why it cannot be built (rebuilding switched off, a missing tool, an unwritable cache,
    an earlier failure, a failure)."""
    if directory.is_dir():
        return
    if os.environ.get(REBUILD_VARIABLE) == "0":
        raise RuntimeError(f"rebuilding it on first use is switched off ({REBUILD_VARIABLE}=0)")
    try:
        build.check_compiler_and_headers()
        cmake = build.find_cmake()
        nanobind_dir = build.nanobind_cmake_dir()
    except build.MissingTool as error:
        raise RuntimeError(f"it cannot be rebuilt here: {error}") from None
    try:
        _build_locked(
            directory,
            cmake,
            nanobind_dir,
            mlx_version=mlx_version,
            mlx_package_dir=mlx_package_dir,
            source_dir=source_dir,
            source_digest=source_digest,
            why=why,
        )
    except OSError as error:  # the cache directory cannot be written, for one
        raise RuntimeError(f"it cannot be rebuilt into {directory} ({error})") from None


def _build_locked(
    directory: Path,
    cmake: str,
    nanobind_dir: str,
    *,
    mlx_version: str,
    mlx_package_dir: Path,
    source_dir: Path,
    source_digest: str,
    why: str,
) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(directory.with_name(directory.name + ".lock")):
        if directory.is_dir():  # another process built it while this one waited
            return
        failed_log = directory.with_name(directory.name + ".failed.log")
        if failed_log.exists():
            raise RuntimeError(
                f"rebuilding it into {directory} failed before (log: {failed_log}; delete "
                "that file to try again)"
            )
        logger.warning(
            "mlx-rmsprop: %s; rebuilding it against mlx %s into %s (once; about a minute)",
            why,
            mlx_version,
            directory,
        )
        with tempfile.TemporaryDirectory(prefix=f".{directory.name}.", dir=directory.parent) as t:
            scratch = Path(t)
            log_path = scratch / "build.log"
            try:
                with open(log_path, "wb") as log:
                    built = build.compile_extension(
                        source_dir,
                        scratch / "cmake",
                        scratch / "out",
                        cmake=cmake,
                        mlx_version=mlx_version,
                        mlx_package_dir=mlx_package_dir,
                        nanobind_dir=nanobind_dir,
                        source_digest=source_digest,
                        link_mlx_lib_dir=True,
                        log=log,
                    )
            except (subprocess.CalledProcessError, OSError, ValueError) as error:
                shutil.copyfile(log_path, failed_log)
                raise RuntimeError(
                    f"rebuilding it into {directory} failed ({error}; log: {failed_log}; delete "
                    "that file to try again)"
                ) from None
            complete = scratch / "complete"
            complete.mkdir()
            shutil.copy2(built, complete / built.name)
            shutil.copy2(log_path, complete / "build.log")
            # Atomic: readers see no directory or a complete one.
            os.rename(complete, directory)
        logger.info("rebuilt the native CPU update into %s", directory)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for the duration of the block.
    Without ``fcntl`` (Windows) there is no lock; the rename still keeps each entry whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
