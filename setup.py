"""Builds the optional native CPU update, ``mlx_rmsprop.paths.native._ext``; everything else about
the package is declared in pyproject.toml.

The module is compiled with CMake against the mlx of the build environment (MLX's C++ extension
mechanism: its headers, libmlx and CMake config ship in the ``mlx`` wheel) and stamped with that
mlx version and the digest of its sources. When it cannot be built here (no C++ compiler, no
Python headers, an mlx without its CMake config) the package installs without it, and
``fused="auto"`` uses the compiled path; ``python -m mlx_rmsprop check`` says why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE_DIR = Path(__file__).resolve().parent / "mlx_rmsprop" / "paths" / "native"


def _native_sources():
    """``mlx_rmsprop/paths/native/sources.py`` loaded by path (importing it as part of the
    package would import mlx_rmsprop and everything it imports)."""
    spec = importlib.util.spec_from_file_location("_mlx_rmsprop_sources", NATIVE_DIR / "sources.py")
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
        import mlx.core
        import nanobind

        target = Path(self.get_ext_fullpath(extension.name)).resolve()
        # A fresh tree every time: a cached one may point at headers of an earlier, deleted
        # isolated build environment.
        build_dir = Path(self.build_temp).resolve() / "native-cmake"
        shutil.rmtree(build_dir, ignore_errors=True)
        output_dir = build_dir / "out"
        mlx_cmake_dir = Path(mlx.__path__[0]) / "share" / "cmake" / "MLX"
        digest = _native_sources().source_digest(NATIVE_DIR)
        subprocess.run(
            [
                "cmake",
                "-S",
                str(NATIVE_DIR),
                "-B",
                str(build_dir),
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-DMLX_ROOT={mlx_cmake_dir}",
                f"-Dnanobind_ROOT={nanobind.cmake_dir()}",
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
                f"-DMLX_RMSPROP_MLX_VERSION={mlx.core.__version__}",
                f"-DMLX_RMSPROP_SOURCE_DIGEST={digest}",
            ],
            check=True,
        )
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--config", "Release", f"-j{os.cpu_count() or 1}"],
            check=True,
        )
        # nanobind names a stable-ABI module _ext.abi3.so; setuptools expects its own suffix.
        (built,) = [path for path in output_dir.glob("_ext.*") if path.suffix in (".so", ".pyd")]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)


if __name__ == "__main__":
    setup(
        ext_modules=[Extension("mlx_rmsprop.paths.native._ext", sources=[])],
        cmdclass={"build_ext": OptionalNativeBuild},
    )
