"""benchmarks/gpu_kernel_check.py, everything of it that runs without a GPU: it never imports
mlx; its translation units, kernel names, parameter lists and grids are the launcher's; its
plan is the CUDA emulation's; its float32 NumPy reference equals ``rmsprop_reference`` bit for
bit; its bfloat16 rounding is MLX's; and its units compile with NVRTC against the stand-in
device header it uses, with its options.

Regenerate the plan file after a change to the variants: ``python tests/benchmarks/test_gpu_kernel_check.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop.check import step_scalars
from mlx_rmsprop.paths.kernels.launch import grid_for
from mlx_rmsprop.paths.kernels.source import Variant, cuda_kernel_name, translation_unit
from mlx_rmsprop.paths.kernels.variants import every_flag_on, pairwise_option_sets
from mlx_rmsprop.paths.probe import INDEX, ROUNDING_SEED
from mlx_rmsprop.reference import rmsprop_reference
from mlx_rmsprop.spec import BLOCK_SIZES, UpdateOptions

if __name__ == "__main__":  # run as a script to regenerate the plan: tests/conftest.py not loaded
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

import cuda_nvrtc  # noqa: E402
import optional  # noqa: E402
from locations import ROOT  # noqa: E402
from metal_emulation.harness import (  # noqa: E402
    LAUNCH_SIZES,
    _from_numpy,
    _to_numpy,
    cuda_variants,
    mlx_cuda_launch,
)

SCRIPT = ROOT / "benchmarks" / "gpu_kernel_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_kernel_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


script = load_script()


def _name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def plan_rows() -> list[dict]:
    return [
        {
            "options": dataclasses.asdict(v.options),
            "dtypes": [_name(v.parameter_dtype), _name(v.gradient_dtype), _name(v.state_dtype)],
        }
        for v in cuda_variants()
    ]


def as_script_variant(variant: Variant):
    dtypes = (variant.parameter_dtype, variant.gradient_dtype, variant.state_dtype)
    return script.Variant(variant.options, *(_name(d) for d in dtypes))


def test_plan_file_is_the_emulated_cuda_set():
    assert json.loads(script.PLAN.read_text()) == plan_rows(), (
        "regenerate it: python tests/benchmarks/test_gpu_kernel_check.py"
    )
    assert len(script.load_plan()) == len(cuda_variants())


def test_script_never_imports_mlx():
    # Run where importing mlx fails, as on the GPU machines (CuPy, NVRTC, no MLX).
    code = (
        "import sys, importlib.util\n"
        "sys.modules['mlx'] = None\n"
        f"spec = importlib.util.spec_from_file_location('g', {str(SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['g'] = m\n"
        "spec.loader.exec_module(m)\n"
        "plan = m.load_plan()\n"
        "print(len(plan), len(m.translation_unit(plan[-1])))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == str(len(plan_rows()))


def test_script_units_are_the_launchers():
    for variant in cuda_variants():
        mine = as_script_variant(variant)
        assert mine.kernel_name == cuda_kernel_name(variant)
        unit = translation_unit(variant, "cuda")
        assert script.translation_unit(mine) == unit
        names = script.kernel_parameters(mine)
        assert names[0] == "parameter" and names[-1 - len(variant.options.state_keys)] == (
            "new_parameter"
        )
        assert set(names) <= {
            *variant.input_names,
            *variant.output_names,
            "parameter_shape",
            "parameter_ndim",
        }


def test_script_grid_is_the_launchers():
    for size in LAUNCH_SIZES:
        blocks, _ = mlx_cuda_launch(grid_for(size))
        assert script.grid_for(size) == (blocks[0], blocks[1]), size
        for block in BLOCK_SIZES:
            if size > 2**40:
                continue
            blocks, threads = mlx_cuda_launch(grid_for(size, block), (block, 1, 1))
            assert threads[0] == block
            assert script.grid_for(size, block) == (blocks[0], blocks[1]), (size, block)


def test_script_scalars_are_checks():
    assert (script.ROUNDING_SEED, script.INDEX) == (ROUNDING_SEED, INDEX)
    for step in (1, 2, 3):
        assert np.array_equal(script.step_scalars(step), np.array(step_scalars(step)))


def test_bfloat16_rounding_is_mlxs():
    rng = np.random.default_rng(1)
    bits = np.concatenate(
        [
            np.arange(0, 1 << 16, 3, dtype=np.uint32) << 16 | 0x8000,  # ties
            rng.integers(0, 1 << 32, 100_000, dtype=np.uint32),
        ]
    )
    values = bits.view(np.float32)
    mine = script.from_float32(values, "bfloat16")
    theirs = _to_numpy(mx.array(values).astype(mx.bfloat16))
    nan = np.isnan(values)
    assert np.array_equal(mine[~nan], theirs[~nan])
    assert np.isnan(script.to_float32(mine[nan], "bfloat16")).all()


def _to_mlx(values: np.ndarray, dtype: str) -> mx.array:
    return _from_numpy(values, getattr(mx, dtype))


def reference_steps(variant: Variant, size: int, seed: int) -> None:
    """Three steps of the script's NumPy reference and of rmsprop_reference on the script's
    inputs, compared bit for bit (any NaN equal to any NaN)."""
    mine = as_script_variant(variant)
    dtypes = (mine.parameter, mine.gradient, mine.state)
    index = script.INDEX if mine.rounding else 0
    parameter, gradient, state = script.inputs(mine, size, seed)
    for step in (1, 2, 3):
        scalars = script.step_scalars(step)
        expected = rmsprop_reference(
            variant.options,
            mx.array(scalars),
            _to_mlx(parameter, mine.parameter),
            _to_mlx(gradient, mine.gradient),
            {k: _to_mlx(v, mine.state_dtype(k)) for k, v in state.items()},
            index=index,
        )
        actual = script.numpy_reference(
            variant.options, scalars, parameter, gradient, state, dtypes, index
        )
        pairs = [("parameter", actual[0], expected[0], mine.parameter)]
        pairs += [
            (k, actual[1][k], expected[1][k], mine.state_dtype(k))
            for k in variant.options.state_keys
        ]
        for name, got, wanted, dtype in pairs:
            wanted = _to_numpy(wanted)
            assert got.dtype == wanted.dtype, name
            same = script.same_bits(got, wanted, dtype)
            assert same.all(), (
                f"{variant} size {size} step {step} {name}: "
                f"{script.to_float32(got, dtype)[~same][:3]} vs "
                f"{script.to_float32(wanted, dtype)[~same][:3]}"
            )
        parameter, state = actual[0], actual[1]


def test_numpy_reference_is_the_reference():
    # Every option value (pairwise sets, storage flags included) in every dtype combination,
    # and every buffer layout with every flag on, at the script's sizes: what the GPU run
    # compares with.
    for k, variant in enumerate(cuda_variants()):
        reference_steps(variant, script.SIZES[k % len(script.SIZES)], seed=k)


def test_numpy_storage_is_the_reference_at_every_size():
    # 8-bit state and stochastic rounding at every size the GPU run takes.
    options = every_flag_on(("v", "v_scale", "grad_avg", "grad_avg_scale", "ema"), True, 32)
    for k, size in enumerate(script.SIZES):
        reference_steps(Variant(options, mx.bfloat16, mx.float16, mx.float16), size, seed=k)
        reference_steps(Variant(options, mx.float16, mx.float32, mx.bfloat16), size, seed=k)


def test_numpy_reference_comparison_can_fail(monkeypatch):
    # A fused multiply-add in the transcription (one rounding instead of two) must show.
    variant = Variant(UpdateOptions())
    original = script.numpy_reference

    def fused(options, scalars, parameter, gradient, state, dtypes, index=0):
        result = original(options, scalars, parameter, gradient, state, dtypes, index)
        g = script.to_float32(gradient, dtypes[1]).astype(np.float64)
        v = script.to_float32(state["v"], dtypes[2]).astype(np.float64)
        alpha = np.float64(scalars[script.Scalar.ALPHA])
        one_minus_alpha = np.float64(scalars[script.Scalar.ONE_MINUS_ALPHA])
        with np.errstate(over="ignore"):  # huge test values overflow float32, as in the kernel
            v_new = (alpha * v + one_minus_alpha * (g * g)).astype(np.float32)
        return result[0], {**result[1], "v": script.from_float32(v_new, dtypes[2])}

    monkeypatch.setattr(script, "numpy_reference", fused)
    with pytest.raises(AssertionError):
        for seed in range(3):
            reference_steps(variant, 4099, seed)


def test_numpy_storage_comparison_can_fail(monkeypatch):
    # Stochastic rounding that ignores the parameter's position, and codes that round a value
    # on a midpoint up, must both show against the reference.
    options = every_flag_on(("v", "v_scale", "ema"), True, 64)
    variant = Variant(options, mx.bfloat16, mx.float32, mx.float16)
    original = script.numpy_reference

    def position_ignored(options, scalars, parameter, gradient, state, dtypes, index=0):
        return original(options, scalars, parameter, gradient, state, dtypes, 0)

    monkeypatch.setattr(script, "numpy_reference", position_ignored)
    with pytest.raises(AssertionError):
        reference_steps(variant, 4099, 0)
    monkeypatch.undo()
    real_quantize = script.quantize

    def one_code_up(values, key, block_size):
        codes, scales = real_quantize(values, key, block_size)
        return np.minimum(codes.astype(np.int64) + 1, 255).astype(np.uint8), scales

    monkeypatch.setattr(script, "quantize", one_code_up)
    with pytest.raises(AssertionError):
        reference_steps(variant, 257, 0)


@optional.unless_missing(None if cuda_nvrtc.nvrtc_path() else "nvidia-cuda-nvrtc not installed")
def test_script_units_compile_with_its_header_and_options():
    # What the script hands NVRTC on the GPU machine: its units, the stand-in device header,
    # its options (compute_90a instead of the GPU's sm_90a, for PTX). Representative subset.
    include = cuda_nvrtc.cuda_runtime_include()
    if include is None:
        pytest.skip("CUDA's runtime headers are not installed")
    variants = [Variant(o) for o in pairwise_option_sets()[:3]]
    variants.append(Variant(every_flag_on(("v", "grad_avg", "momentum_buffer", "ema"))))
    quantized = ("v", "v_scale", "grad_avg", "grad_avg_scale", "ema")
    variants.append(Variant(every_flag_on(quantized, True), mx.bfloat16, mx.float32, mx.float16))
    # One definition per kernel: the greedy covering set may already hold every flag on.
    variants = list(dict.fromkeys(variants))
    source = "".join(script.translation_unit(as_script_variant(v)) for v in variants)
    options = [
        "--device-as-default-execution-space",
        f"--gpu-architecture={cuda_nvrtc.ARCHITECTURE}",
        f"--include-path={include}",
        f"--include-path={include / 'cccl'}",
    ]
    header = (script.MLX_DEVICE_HEADER.read_bytes(), "mlx/backend/cuda/device/utils.cuh")
    ptx = cuda_nvrtc.compile_ptx(source, "script", options, headers=[header])
    assert ptx.count(".entry ") == len(variants)
    assert not cuda_nvrtc.contraction_hazards(ptx)


if __name__ == "__main__":
    rows = ",\n".join(json.dumps(row) for row in plan_rows())
    script.PLAN.write_text(f"[\n{rows}\n]\n")
    print(f"wrote {script.PLAN}")
