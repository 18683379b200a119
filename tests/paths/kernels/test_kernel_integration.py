"""The kernel paths in the optimizer: registration, errors where a backend is missing, the
launcher's grid arithmetic, and ``python -m mlx_rmsprop check`` on a machine without a GPU."""

from __future__ import annotations

import argparse

import mlx.core as mx
import pytest

from mlx_rmsprop import RMSprop, check, paths
from mlx_rmsprop.paths import native
from mlx_rmsprop.paths.kernels.launch import (
    MAX_GRID_DIM,
    MAX_ROWS,
    ROW_WIDTH,
    THREADGROUP,
    grid_for,
    kernel_shape,
    threadgroup_for,
)
from mlx_rmsprop.spec import BLOCK_SIZES, UpdateOptions

from metal_emulation.harness import mlx_cuda_launch

NO_METAL = not mx.metal.is_available()
NO_CUDA = not mx.cuda.is_available()


def test_kernel_paths_are_registered_and_preferred():
    assert paths.AUTO_ORDER == ("metal", "cuda", "native", "compiled")
    assert {"metal", "cuda"} <= set(paths.FUSED_CHOICES)
    # Both kernel paths compile the whole step (kernels work inside mx.compile).
    assert paths.PATHS["metal"].compile_step and paths.PATHS["cuda"].compile_step


MISSING_BACKEND = {
    "metal": (
        NO_METAL,
        r"fused='metal' cannot run on this machine: MLX's Metal backend is not available "
        r"\(mx.metal.is_available\(\) is False\); the Metal kernel needs an Apple-silicon Mac",
    ),
    "cuda": (
        NO_CUDA,
        r"fused='cuda' cannot run on this machine: MLX's CUDA backend is not available "
        r"\(mx.cuda.is_available\(\) is False\); the CUDA kernel needs an NVIDIA GPU",
    ),
}


@pytest.mark.parametrize("fused", MISSING_BACKEND)
def test_fused_kernel_without_its_backend_is_a_clear_error(fused):
    missing, message = MISSING_BACKEND[fused]
    if not missing:
        pytest.skip(f"this machine has MLX's {fused} backend")
    with pytest.raises(RuntimeError, match=message):
        RMSprop(0.1, fused=fused)


@pytest.mark.skipif(not (NO_METAL and NO_CUDA), reason="this machine has a GPU backend")
def test_auto_falls_back_to_a_cpu_path_without_a_gpu():
    reasons = paths.availability()
    assert RMSprop(0.1).path == ("native" if reasons["native"] is None else "compiled")
    assert reasons["compiled"] is None
    assert "mx.metal.is_available() is False" in reasons["metal"]
    assert "mx.cuda.is_available() is False" in reasons["cuda"]


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((), (1,)),
        ((7,), (7,)),
        ((3, 5, 2), (30,)),
        ((2, 2**30 + 9), (2, 2**30 + 9)),
        ((3, 5, 2**30), (15, 2**30)),
        ((2**20, 2**20), (2**20, 2**20)),
        # 4 * 2^29 = 2^31 does not fit, 2^29 * 3 does, times 5 again not.
        ((4, 2**29, 3, 5), (4, 3 * 2**29, 5)),
    ],
)
def test_kernel_shape_merges_dimensions_below_2_31(shape, expected):
    merged = kernel_shape(shape)
    assert merged == expected
    assert all(dim <= MAX_GRID_DIM for dim in merged)


def test_grid_for_sizes_around_2_31():
    assert grid_for(1) == (1, 1, 1)
    assert grid_for(257) == (257, 1, 1)
    assert grid_for(MAX_GRID_DIM - 255) == (MAX_GRID_DIM - 255, 1, 1)
    assert grid_for(MAX_GRID_DIM) == (ROW_WIDTH, 2, 1)
    assert grid_for(MAX_GRID_DIM + 1) == (ROW_WIDTH, 2, 1)
    assert grid_for(2**31 + 18) == (ROW_WIDTH, 3, 1)
    assert grid_for(2**32 + 36) == (ROW_WIDTH, 5, 1)
    # Rows tile whole CUDA blocks, so both backends' index lines see a pitch of ROW_WIDTH.
    assert ROW_WIDTH % THREADGROUP[0] == 0 and ROW_WIDTH <= MAX_GRID_DIM
    for size in (MAX_GRID_DIM + 1, 2**31 + 18, 5 * 2**40 + 3):
        width, rows, _ = grid_for(size)
        assert (rows - 1) * width < size <= rows * width
    assert grid_for(MAX_ROWS * ROW_WIDTH)[1] == MAX_ROWS
    with pytest.raises(ValueError, match=r"at most 70367670435840 elements per parameter, got"):
        grid_for(MAX_ROWS * ROW_WIDTH + 1)


@pytest.mark.parametrize("block", BLOCK_SIZES)
def test_grid_with_8_bit_state_holds_whole_blocks(block):
    # One threadgroup per block: the grid is rounded up to whole blocks (full threadgroups on
    # Metal as on CUDA), 1-D while MLX's signed launch arithmetic for that threadgroup holds,
    # then rows of ROW_WIDTH, a whole number of blocks each.
    assert grid_for(1, block) == (block, 1, 1)
    assert grid_for(block, block) == (block, 1, 1)
    assert grid_for(block + 1, block) == (2 * block, 1, 1)
    largest = (MAX_GRID_DIM - (block - 1)) // block * block
    assert grid_for(largest, block) == (largest, 1, 1)
    mlx_cuda_launch(grid_for(largest, block), (block, 1, 1))  # no overflow
    assert grid_for(largest + 1, block)[0] == ROW_WIDTH
    assert ROW_WIDTH % block == 0
    for size in (largest + 1, 2**32 + 36):
        grid = grid_for(size, block)
        blocks, threads = mlx_cuda_launch(grid, (block, 1, 1))
        assert threads == (block, 1, 1) and blocks[0] * block == ROW_WIDTH
        assert (grid[1] - 1) * ROW_WIDTH < size <= grid[1] * ROW_WIDTH
    options = UpdateOptions(quantized_state=True, block_size=block)
    assert threadgroup_for(options) == (block, 1, 1)
    assert threadgroup_for(UpdateOptions()) == THREADGROUP


def test_check_command_without_a_gpu_says_what_it_verified(capsys):
    if not (NO_METAL and NO_CUDA):
        pytest.skip("this machine has a GPU backend: check runs the kernels there")
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    status = check.run(parser.parse_args(["--quick"]))
    out = capsys.readouterr().out
    assert status == 0, out
    assert "No GPU kernel can run here (metal: MLX's Metal backend is not available" in out
    assert "The Metal and CUDA kernels were NOT run on this machine." in out
    cpu_paths = ["compiled"] + (["native"] if paths.availability()["native"] is None else [])
    assert f"Native CPU path: {native.status()}" in out
    assert (
        f"Verified instead: path(s) {', '.join(cpu_paths)} against the reference, 3 variants" in out
    )
    for path in cpu_paths:
        table = [line.split() for line in out.splitlines() if line.startswith(f"{path} ")]
        assert table == [[path, "float32", "float32", "float32", ">=8", "3", "0", *table[0][7:]]]
    assert f"PASS: {3 * len(cpu_paths)} variant runs, 0 failed" in out


def test_check_reports_a_failing_path(capsys, monkeypatch):
    # A path whose update is off by one ulp in the parameter must fail the check (exit 1) and
    # show the variant.
    def wrong(options, scalars, parameter, gradient, state):
        from mlx_rmsprop.reference import rmsprop_reference

        new_parameter, new_state = rmsprop_reference(options, scalars, parameter, gradient, state)
        return new_parameter * 1.001, new_state

    broken = paths.UpdatePath("broken", lambda: wrong, False, "a wrong update")
    monkeypatch.setitem(paths.PATHS, "broken", broken)
    rows = check.verify_path("broken", check._cpu_plan(quick=True), 1)
    assert sum(len(row.failures) for row in rows) == 3
    assert rows[0].errors["parameter"] > check.RTOL["float32"]
    assert rows[0].errors["v"] == 0.0
