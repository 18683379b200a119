"""The CUDA kernels compiled exactly as MLX's CUDA backend compiles them (NVRTC, MLX's options,
its device headers and CCCL: see cuda_nvrtc.py), and the PTX checked for every instruction
that would break bit equality with the reference: fused multiply-adds, multiplies/adds/
subtracts the code generator may still fuse (no rounding modifier), approximate square roots
or divisions and subnormal flushing.

By default a representative subset (the pairwise option sets in float32 and one kernel with
every option and mixed dtypes, in one NVRTC program); ``-m slow`` compiles all the kernels of
the CUDA emulation and nvcc tests (every dtype combination with the pairwise option sets,
every buffer layout with every flag on).
"""

from __future__ import annotations

import dataclasses
import os
import re
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest

from mlx_rmsprop.paths.kernels.source import Variant, cuda_kernel_name, translation_unit
from mlx_rmsprop.paths.kernels.variants import every_flag_on, pairwise_option_sets
from mlx_rmsprop.spec import UpdateOptions

import cuda_nvrtc
import optional
from metal_emulation.harness import cuda_variants

MISSING = cuda_nvrtc.missing()
pytestmark = optional.unless_missing(MISSING and f"NVRTC check: {MISSING}")

ALL_BUFFERS = ("v", "grad_avg", "momentum_buffer", "ema")
ALL_QUANTIZED = (
    "v",
    "v_scale",
    "grad_avg",
    "grad_avg_scale",
    "momentum_buffer",
    "momentum_buffer_scale",
    "ema",
)


def representative_variants() -> list[Variant]:
    """The pairwise option sets (storage flags included) in float32, and every buffer with
    every flag on, float and 8-bit, rounding stochastically to bfloat16/float16, the latter
    also reading per-parameter clip factors and also accumulating gradients (into bfloat16,
    float16 and float32 accumulators)."""
    variants = [Variant(options) for options in pairwise_option_sets(storage=True)]
    variants += [
        Variant(every_flag_on(ALL_BUFFERS), mx.bfloat16, mx.float16, mx.float32),
        Variant(every_flag_on(ALL_BUFFERS, True), mx.bfloat16, mx.float16, mx.float16),
        Variant(every_flag_on(ALL_QUANTIZED, True), mx.float16, mx.float32, mx.bfloat16),
    ]
    every = variants[-3:]
    variants += [dataclasses.replace(v, factors=True) for v in every]
    variants += [
        dataclasses.replace(v, accumulator_dtype=dtype)
        for v, dtype in zip(every, (mx.bfloat16, mx.float16, mx.float32), strict=True)
    ]
    return list(dict.fromkeys(variants))


def compile_kernels(variants: list[Variant], programs: int = 1) -> dict[str, str]:
    """The PTX of each kernel (by kernel name), ``programs`` NVRTC programs compiled side by
    side (MLX compiles one per kernel; one program for many kernels only saves the header
    parsing, each kernel is compiled on its own)."""
    # One definition per kernel: variants that differ only in block size share it.
    variants = list({cuda_kernel_name(v): v for v in variants}.values())
    chunks = [variants[k::programs] for k in range(programs)]

    def build(chunk: list[Variant]) -> str:
        return cuda_nvrtc.compile_ptx(
            "".join(translation_unit(v, "cuda") for v in chunk), "rmsprop_kernels"
        )

    with ThreadPoolExecutor(programs) as pool:
        text = "".join(pool.map(build, chunks))
    entries = re.split(r"(?=^\.visible \.entry )", text, flags=re.M)[1:]
    kernels = {}
    for variant in variants:
        name = cuda_kernel_name(variant)
        # NVRTC mangles the name (namespace mlx::core::cu): <length><name> in the symbol, the
        # exact length telling it from a longer name it begins.
        symbol = re.compile(rf"\.visible \.entry \w*?(?<!\d){len(name)}{name}")
        matching = [e for e in entries if symbol.match(e)]
        assert len(matching) == 1, f"{name}: {len(matching)} entries in the PTX"
        kernels[name] = matching[0]
    return kernels


def assert_no_hazards(kernels: dict[str, str]) -> None:
    bad = {name: dict(cuda_nvrtc.contraction_hazards(ptx)) for name, ptx in kernels.items()}
    bad = {name: hazards for name, hazards in bad.items() if hazards}
    assert not bad, f"{len(bad)} kernels with fusable or approximate float32 arithmetic: {bad}"
    for name, ptx in kernels.items():
        counts = cuda_nvrtc.float_instructions(ptx)
        # The arithmetic is there, in its IEEE-rounded form (the check is not vacuous).
        assert counts["mul.rn.f32"] and counts["add.rn.f32"] and counts["sqrt.rn.f32"], name


def test_ptx_has_no_contraction_or_approximation():
    variants = representative_variants()
    kernels = compile_kernels(variants)
    assert_no_hazards(kernels)
    # 8-bit state reduces each block across the threads of the CUDA block: __syncthreads()
    # is there (barrier.sync / bar.sync), and nowhere else.
    for variant in variants:
        ptx = kernels[cuda_kernel_name(variant)]
        barriers = len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx))
        assert (barriers > 0) == variant.options.quantized_state, cuda_kernel_name(variant)


@pytest.mark.slow
def test_ptx_of_every_emulated_cuda_kernel():
    variants = cuda_variants()
    assert_no_hazards(compile_kernels(variants, programs=os.cpu_count() or 1))


# Each regression a future edit could bring in, and the instruction it must show up as.
PLANTED = {
    # A plain multiply-add: NVRTC contracts it (MLX passes no --fmad=false).
    "plain-multiply-add": (
        "RMS_ADD(RMS_MUL(alpha, v_old), RMS_MUL(one_minus_alpha, RMS_MUL(g, g)))",
        "alpha * v_old + one_minus_alpha * RMS_MUL(g, g)",
        [],
        "fma.rn.f32",
    ),
    # The plain sqrt, under an option a future MLX (or a user's build) might pass: approximate,
    # while __fsqrt_rn stays IEEE under it.
    "fast-sqrt": (
        "RMS_SQRT(RMS_ADD(variance, eps))",
        "sqrt(RMS_ADD(variance, eps))",
        ["--prec-sqrt=false"],
        "sqrt.approx.f32",
    ),
    # CUDA's fast division intrinsic.
    "fast-division": (
        "RMS_DIV(RMS_MUL(lr, g), denom)",
        "__fdividef(RMS_MUL(lr, g), denom)",
        [],
        "div.approx.f32",
    ),
}


@pytest.mark.parametrize("planted", PLANTED, ids=list(PLANTED))
def test_ptx_check_catches_planted_regressions(mutate_source, planted):
    old, new, extra_options, hazard = PLANTED[planted]
    variant = Variant(UpdateOptions(eps_in_sqrt=True))
    options = cuda_nvrtc.nvrtc_options() + extra_options
    if extra_options:  # the real body under these options (MLX's own: the test above)
        unit = translation_unit(variant, "cuda")
        assert not cuda_nvrtc.contraction_hazards(cuda_nvrtc.compile_ptx(unit, "clean", options))
    mutate_source(old, new)
    ptx = cuda_nvrtc.compile_ptx(translation_unit(variant, "cuda"), "planted", options)
    hazards = cuda_nvrtc.contraction_hazards(ptx)
    assert hazards[hazard], (hazards, cuda_nvrtc.float_instructions(ptx))
