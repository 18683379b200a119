"""Builds the optional native CPU update, ``mlx_rmsprop._native._ext``; everything else about
the package is declared in pyproject.toml.

The module is compiled with CMake against the mlx of the build environment (MLX's C++ extension
mechanism: its headers, libmlx and CMake config ship in the ``mlx`` wheel) and stamped with that
mlx version and the digest of its sources. When it cannot be built here (no C++ compiler, no
Python headers, an mlx without its CMake config) the package installs without it, and
``fused="auto"`` uses the compiled path; ``python -m mlx_rmsprop check`` says why. When mlx is
later changed to another version, the loader rebuilds the module into a per-user cache
(:mod:`mlx_rmsprop.native`).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE_DIR = Path(__file__).resolve().parent / "mlx_rmsprop" / "_native"


def _load_by_path(name: str, path: Path):
    """A module of ``mlx_rmsprop/_native`` loaded by path (importing it as part of the package
    would import mlx_rmsprop and everything it imports)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OptionalNativeBuild(build_ext):
    """``build_ext`` that runs CMake for the native module and, if that fails, warns and leaves
    the module out instead of failing the installation."""

    def build_extensions(self) -> None:
        built = []
        for extension in self.extensions:
            try:
                self._build_with_cmake(extension)
            # Any failure of this optional build (missing tool, compile error, an mlx without
            # its CMake files) must leave a working pure-Python installation behind.
            except Exception as error:  # noqa: BLE001
                message = (
                    f"mlx-rmsprop: the native CPU update was not built ({error}); "
                    "fused='auto' will use the compiled path on the CPU"
                )
                self.warn(message)
                print(message, file=sys.stderr)
            else:
                built.append(extension)
        self.extensions = built

    def _build_with_cmake(self, extension: Extension) -> None:
        import mlx
        import mlx.core

        sources = _load_by_path("_mlx_rmsprop_sources", NATIVE_DIR / "__init__.py")
        build = _load_by_path("_mlx_rmsprop_build", NATIVE_DIR / "build.py")
        target = Path(self.get_ext_fullpath(extension.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "native-cmake"
        built = build.compile_extension(
            NATIVE_DIR,
            build_dir,
            build_dir / "out",
            cmake=build.find_cmake(),
            mlx_version=mlx.core.__version__,
            mlx_package_dir=Path(mlx.__path__[0]),
            nanobind_dir=build.nanobind_cmake_dir(),
            source_digest=sources.source_digest(NATIVE_DIR),
        )
        # nanobind names a stable-ABI module _ext.abi3.so; setuptools expects its own suffix.
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)


if __name__ == "__main__":
    setup(
        ext_modules=[Extension("mlx_rmsprop._native._ext", sources=[])],
        cmdclass={"build_ext": OptionalNativeBuild},
    )
