"""The CUDA kernels compiled the way MLX's CUDA backend compiles them: NVRTC (pip package
``nvidia-cuda-nvrtc``), MLX's own NVRTC options, MLX's own device headers and CCCL (from the
``mlx-cuda-13`` wheel of the installed mlx version, which ``.ci/run`` downloads next to the
virtual environment without installing it: it would replace the CPU build's libmlx.so).

What MLX does (mlx/backend/cuda/jit_module.cpp, ``compile`` and ``include_path_args``):
``nvrtcCreateProgram`` with its device headers passed as in-memory headers named
``mlx/backend/cuda/device/*.cuh`` (embedded in libmlx.so by bin2h as ``jit_source_*``), then
``nvrtcCompileProgram`` with ``--device-as-default-execution-space``,
``--gpu-architecture=sm_XYa`` (``compute_XYa`` where NVRTC cannot emit that GPU's SASS; the
``a`` from compute capability 9 on) and the include paths: the wheel's ``mlx/include``, its
``mlx/include/cccl`` and the CUDA runtime headers (``nvidia/cu13/include`` of the pip package
or ``$CUDA_HOME/include``, else ``/usr/local/cuda/include``). No ``--fmad=false``, so NVRTC
may contract ``a*b + c``.

Here the target is ``compute_90a`` (H100), so that NVRTC returns PTX, the instructions NVVM
chose, which ptxas then turns into SASS without fusing a ``.rn`` multiply or add.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import struct
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import mlx.core as mx

ARCHITECTURE = "compute_90a"
# Where .ci/run puts the wheel (pip download --no-deps); override with MLX_CUDA_WHEEL_DIR.
WHEEL_DIR = Path(os.environ.get("MLX_CUDA_WHEEL_DIR", Path(sys.prefix) / "mlx-cuda-wheel"))
CACHE_DIR = Path(tempfile.gettempdir()) / "mlx_rmsprop_nvrtc"
# The in-memory headers MLX passes (jit_module.cpp, g_include_names / g_headers): every
# jit_source_<name> of libmlx.so that is one of these files.
DEVICE_HEADERS = (
    "atomic_ops.cuh",
    "binary_ops.cuh",
    "cast_op.cuh",
    "config.h",
    "complex.cuh",
    "cute_dequant.cuh",
    "fp16_math.cuh",
    "gemm_sm70.cuh",
    "hadamard.cuh",
    "indexing.cuh",
    "qmm_naive.cuh",
    "qmm_sm80.cuh",
    "qmm_sm90.cuh",
    "scatter_ops.cuh",
    "unary_ops.cuh",
    "ternary_ops.cuh",
    "utils.cuh",
)
CUDA_RUNTIME_DIRS = ("cu13", "cuda_runtime")


def wheel_path() -> Path | None:
    """The mlx-cuda-13 wheel of the installed mlx version, if downloaded."""
    matches = sorted(WHEEL_DIR.glob(f"mlx_cuda_13-{mx.__version__}-*.whl"))
    return matches[-1] if matches else None


def _nvidia_dirs() -> list[Path]:
    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def nvrtc_path() -> Path | None:
    """libnvrtc of the pip package nvidia-cuda-nvrtc (CUDA 13)."""
    for root in _nvidia_dirs():
        for candidate in sorted((root / "cu13" / "lib").glob("libnvrtc.so.*")):
            return candidate
    return None


def missing() -> str | None:
    """Why the NVRTC check cannot run here, or None."""
    if nvrtc_path() is None:
        return "pip package nvidia-cuda-nvrtc (CUDA 13) is not installed"
    if wheel_path() is None:
        return (
            f"the mlx-cuda-13=={mx.__version__} wheel is not under {WHEEL_DIR} "
            "(.ci/run downloads it: pip download --no-deps)"
        )
    if cuda_runtime_include() is None:
        return "CUDA's runtime headers (cuda_fp16.h) are not installed"
    return None


def cuda_runtime_include() -> Path | None:
    """MLX's order: the pip package's headers, then $CUDA_HOME / $CUDA_PATH, /usr/local/cuda."""
    candidates = [root / d / "include" for root in _nvidia_dirs() for d in CUDA_RUNTIME_DIRS]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(Path(home) / "include")
    return next((c for c in candidates if (c / "cuda_fp16.h").exists()), None)


def _elf_symbols(data: bytes, wanted: re.Pattern) -> dict[str, bytes]:
    """The bytes of every defined symbol of an ELF64 little-endian file whose name matches."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not an ELF64 LE file"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + k * shentsize) for k in range(shnum)
    ]
    found: dict[str, bytes] = {}
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][4]
        for k in range(size // entsize):
            name, _, _, index, value, length = struct.unpack_from(
                "<IBBHQQ", data, offset + k * entsize
            )
            end = data.index(b"\0", strings + name)
            symbol = data[strings + name : end].decode()
            match = wanted.search(symbol)
            if match and 0 < index < shnum and length:
                section = sections[index]
                start = section[4] + value - section[3]
                found.setdefault(match.group(1), data[start : start + length])
    return found


@dataclass(frozen=True)
class MlxHeaders:
    """MLX's in-memory device headers and the include folder extracted from its wheel."""

    names: tuple[str, ...]
    sources: tuple[bytes, ...]
    include: Path  # the wheel's mlx/include (with cccl/ inside)


@cache
def mlx_headers() -> MlxHeaders:
    wheel = wheel_path()
    assert wheel is not None, missing()
    root = CACHE_DIR / wheel.stem
    device = root / "device"
    include = root / "mlx" / "include"
    if not (root / "complete").exists():
        with zipfile.ZipFile(wheel) as archive:
            library = archive.read("mlx/lib/libmlx.so")
            # CCCL and MLX's own host headers: what --include-path names (CUTLASS and CuTe
            # are also there, for MLX's own kernels; our body does not include them).
            members = [
                name
                for name in archive.namelist()
                if name.startswith(("mlx/include/cccl/", "mlx/include/mlx/"))
            ]
            archive.extractall(root, members)
        sources = _elf_symbols(library, re.compile(r"jit_source_(\w+?)E$"))
        device.mkdir(parents=True, exist_ok=True)
        for header in DEVICE_HEADERS:
            stem = header.split(".")[0]
            assert stem in sources, f"libmlx.so has no jit_source_{stem}"
            (device / header).write_bytes(sources[stem].rstrip(b"\0"))
        (root / "complete").touch()
    return MlxHeaders(
        names=tuple(f"mlx/backend/cuda/device/{h}" for h in DEVICE_HEADERS),
        sources=tuple((device / h).read_bytes() for h in DEVICE_HEADERS),
        include=include,
    )


def nvrtc_options(architecture: str = ARCHITECTURE) -> list[str]:
    """MLX's nvrtcCompileProgram arguments (jit_module.cpp, compile)."""
    headers = mlx_headers()
    return [
        "--device-as-default-execution-space",
        f"--gpu-architecture={architecture}",
        f"--include-path={headers.include}",
        f"--include-path={headers.include / 'cccl'}",
        f"--include-path={cuda_runtime_include()}",
    ]


class NvrtcError(RuntimeError):
    pass


@cache
def _nvrtc() -> ctypes.CDLL:
    library = ctypes.CDLL(str(nvrtc_path()))
    library.nvrtcGetErrorString.restype = ctypes.c_char_p
    return library


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_ptx(
    source: str,
    name: str,
    options: list[str] | None = None,
    headers: list[tuple[bytes, str]] | None = None,
) -> str:
    """PTX of ``source`` compiled as MLX compiles a custom kernel (or with other ``options``
    and in-memory ``headers``, as (text, include name)); raises NvrtcError with the log on a
    compile error."""
    nvrtc = _nvrtc()
    if headers is None:
        mlx = mlx_headers()
        headers = list(zip(mlx.sources, mlx.names, strict=True))
    program = ctypes.c_void_p()

    def check(result: int, what: str) -> None:
        if result != 0:
            raise NvrtcError(f"{what}: {nvrtc.nvrtcGetErrorString(result).decode()}")

    count = len(headers)
    check(
        nvrtc.nvrtcCreateProgram(
            ctypes.byref(program),
            source.encode(),
            f"{name}.cu".encode(),
            count,
            (ctypes.c_char_p * count)(*(text for text, _ in headers)),
            (ctypes.c_char_p * count)(*(include.encode() for _, include in headers)),
        ),
        "nvrtcCreateProgram",
    )
    try:
        arguments = [a.encode() for a in (options or nvrtc_options())]
        result = nvrtc.nvrtcCompileProgram(
            program, len(arguments), (ctypes.c_char_p * len(arguments))(*arguments)
        )
        if result != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise NvrtcError(f"{name}: {log.value.decode(errors='replace')[-6000:]}")
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetPTX(program, ptx), "nvrtcGetPTX")
        return ptx.value.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


# Float32 arithmetic in PTX: the opcode with its modifiers (fma.rn.f32, mul.f32, add.rn.f32,
# sqrt.approx.f32, div.rn.f32, ...), excluding moves, loads, conversions and comparisons.
_FLOAT_INSTRUCTION = re.compile(
    r"^\s*(?:@!?%p\d+\s+)?((?:fma|mul|add|sub|div|sqrt|rsqrt|rcp|neg|abs|min|max)"
    r"(?:\.\w+)*\.f32)\b",
    re.M,
)


def float_instructions(ptx: str) -> Counter:
    """How often each float32 arithmetic instruction occurs in ``ptx``."""
    return Counter(_FLOAT_INSTRUCTION.findall(ptx))


def contraction_hazards(ptx: str) -> Counter:
    """The float32 instructions that break bit equality with the reference: fused
    multiply-adds; multiplies, adds and subtracts without an explicit rounding modifier (the
    PTX ISA, mul/add for floating point: without one the optimizer may treat them aggressively,
    in particular fuse mul/add sequences into fma; with .rn it treats them conservatively);
    approximate sqrt/division/reciprocal (.approx, .full) and subnormal flushing (.ftz)."""
    hazards: Counter = Counter()
    for instruction, count in float_instructions(ptx).items():
        parts = instruction.split(".")
        rounding = {"rn", "rz", "rm", "rp"} & set(parts)
        if (
            parts[0] == "fma"
            or (parts[0] in ("mul", "add", "sub") and not rounding)
            or "approx" in parts
            or "full" in parts
            or "ftz" in parts
        ):
            hazards[instruction] += count
    return hazards
