"""The CUDA twin: the translation units MLX's CUDA backend would build around the shared body,
compiled with nvcc. MLX's CPU build cannot construct ``mx.fast.cuda_kernel`` and no NVIDIA GPU
is available here: this checks that the device compiler accepts the source; what it computes
is run on the CPU in test_kernel_emulation.py (the same text compiled by g++ with CUDA's
headers)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from mlx_rmsprop.paths.kernels.source import Variant, cuda_kernel_name, translation_unit
from mlx_rmsprop.paths.kernels.variants import accumulating_variants, factor_variants
from mlx_rmsprop.spec import UpdateOptions

from locations import SUPPORT
from metal_emulation.harness import cuda_variants

NVCC = shutil.which("nvcc")
# Stand-in for MLX's mlx/backend/cuda/device/utils.cuh, which the generated source includes.
CUDA_SHIM = SUPPORT / "cuda_shim"


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed here")
def test_cuda_translation_units_compile_with_nvcc(tmp_path):
    # Variants that differ only in block size (the threadgroup size) share one kernel, and so
    # do the two address-space classes of the clip factors (CUDA has none). The accumulating
    # kernels are compiled too.
    variants = [*cuda_variants(), *factor_variants(), *accumulating_variants()]
    units = {translation_unit(v, "cuda"): v for v in variants}
    variants = list(units.values())
    names = [cuda_kernel_name(v) for v in variants]
    assert len(set(names)) == len(variants)  # distinct sources have distinct names
    source = tmp_path / "rmsprop_kernels.cu"
    source.write_text("".join(translation_unit(v, "cuda") for v in variants))
    ptx = tmp_path / "rmsprop_kernels.ptx"
    # PTX for a virtual architecture, what NVRTC produces for MLX's "compute_XX" targets;
    # every warning is an error.
    command = [
        NVCC,
        "-std=c++17",
        "--ptx",
        "-arch=compute_80",
        f"-I{CUDA_SHIM}",
        "-Werror",
        "all-warnings",
        str(source),
        "-o",
        str(ptx),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]
    entries = ptx.read_text()
    assert entries.count(".entry ") == len(variants)
    for name in names:
        assert name in entries


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed here")
def test_nvcc_check_can_fail(tmp_path):
    # The compile check must reject a body that is not valid CUDA (here: Metal's primitive).
    variant = Variant(UpdateOptions())
    text = translation_unit(variant, "cuda")
    assert "__fsqrt_rn(x)" in text
    text = text.replace("__fsqrt_rn(x)", "metal::precise::sqrt(x)")
    source = tmp_path / "broken.cu"
    source.write_text(text)
    command = [NVCC, "-std=c++17", "--ptx", f"-I{CUDA_SHIM}", str(source), "-o", "/dev/null"]
    assert subprocess.run(command, capture_output=True).returncode != 0
