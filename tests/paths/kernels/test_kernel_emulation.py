"""The Metal kernel, run on the CPU: the exact translation units MLX generates, compiled with g++
against tests/support/metal_emulation/metal_shim.h, every thread of the launcher's grid, compared with
rmsprop_reference on the parameter and every state buffer.

Coverage (mlx_rmsprop.paths.kernels.variants.verification_plan): every option set in float32, and
for each of the 15 dtype combinations x both address-space classes a pairwise covering set of
option sets; sizes 0-d, 1, odd, tails, 2-D/3-D, non-contiguous; three steps each. The kernel
evaluates the update in the reference's order, so under IEEE float32 (g++ with
-ffp-contract=off) the results must be identical bit for bit: rtol 0.

The CUDA twin runs the same way (g++ with CUDA's own headers, whole blocks as MLX launches
them) on the variants its nvcc check compiles, and both backends run the threads that matter
for a parameter of 2^32 + 36 elements on sparse memory-mapped files.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import math
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop.check import (
    SHAPES,
    STEPS,
    shapes_for,
    step_scalars,
    verification_inputs,
    verify,
)
from mlx_rmsprop.paths.kernels.launch import (
    MAX_1D_GRID,
    ROW_WIDTH,
    THREADGROUP,
    grid_for,
    kernel_shape,
    make_update,
    plan,
)
from mlx_rmsprop.paths.kernels.source import Variant
from mlx_rmsprop.paths.kernels.variants import (
    dtype_combinations,
    every_flag_on,
    pairwise_option_sets,
    plan_variant,
    verification_plan,
)
from mlx_rmsprop.paths.probe import update_arguments
from mlx_rmsprop.reference import rmsprop_reference
from mlx_rmsprop.spec import BLOCK_SIZES, FLAGS, UpdateOptions, option_space

from metal_emulation.harness import (
    CUDA_INCLUDE,
    LAUNCH_SIZES,
    NUMPY_STORAGE,
    Emulator,
    _from_numpy,
    _to_numpy,
    compile_library,
    cpu_has_fma,
    cuda_variants,
    mlx_cuda_launch,
)
from tolerances import assert_close

BUILD_DIR = Path(tempfile.gettempdir()) / "mlx_rmsprop_emulation"
LAYOUTS = sorted({options.state_keys for options in option_space()})


NO_CUDA_HEADERS = not (CUDA_INCLUDE / "cuda_fp16.h").exists()
NO_CUDA_REASON = f"CUDA's headers (cuda_fp16.h) are not installed under {CUDA_INCLUDE}"


@pytest.fixture(scope="module")
def emulator() -> Emulator:
    return Emulator(verification_plan(), BUILD_DIR)


@pytest.fixture(scope="module")
def cuda_emulator() -> Emulator:
    # CUDA has no address-space classes, but the launcher's plan still tells small from large.
    variants = cuda_variants()
    variants += [
        dataclasses.replace(v, small=True, small_scales=v.options.quantized_state)
        for v in variants
    ]
    return Emulator(variants, BUILD_DIR, backend="cuda")


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def same_bits(actual: mx.array, expected: mx.array) -> np.ndarray:
    """Element-wise: the same stored bits, or both NaN (payloads may differ)."""
    a, e = _to_numpy(actual).reshape(-1), _to_numpy(expected).reshape(-1)
    nan = np.zeros(a.shape, bool)
    if actual.dtype in (mx.float32, mx.float16, mx.bfloat16):
        nan = np.isnan(np.array(actual.astype(mx.float32)).reshape(-1)) & np.isnan(
            np.array(expected.astype(mx.float32)).reshape(-1)
        )
    return (a.view(np.uint8).reshape(len(a), -1) == e.view(np.uint8).reshape(len(e), -1)).all(
        axis=1
    ) | nan


def assert_same(actual: mx.array, expected: mx.array, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    same = same_bits(actual, expected)
    if not same.all():
        k = int(np.flatnonzero(~same)[0])
        got = np.array(actual.astype(mx.float32)).reshape(-1)[k]
        wanted = np.array(expected.astype(mx.float32)).reshape(-1)[k]
        raise AssertionError(
            f"{what}: {int((~same).sum())} elements differ, first [{k}]: {got!r} vs {wanted!r}"
        )


def run_steps(
    emulator: Emulator,
    variant: Variant,
    inputs: tuple,
    steps: int,
    what: str,
    order: int = 0,
    scalars_for=step_scalars,
) -> tuple:
    """``steps`` steps of the emulated kernel from ``inputs``, each compared bit for bit with
    the reference on the same inputs (every output: the parameter, every buffer, codes and
    scales), each starting from the kernel's previous outputs. Returns the last outputs."""
    parameter, gradient, state = inputs
    arguments = update_arguments(variant)
    for step in range(1, steps + 1):
        scalars = scalars_for(step)
        call = plan(variant.options, scalars, parameter, gradient, state, **arguments)
        assert call is not None and call.variant == variant, (call and call.variant, variant)
        new_parameter, new_state = call.unpack(emulator.run(call, order))
        expected_parameter, expected_state = rmsprop_reference(
            variant.options, scalars, parameter, gradient, state, **arguments
        )
        assert_same(new_parameter, expected_parameter, f"{what} step={step}: parameter")
        assert new_state.keys() == expected_state.keys()
        for key, value in expected_state.items():
            assert_same(new_state[key], value, f"{what} step={step}: {key}")
        parameter, state = new_parameter, new_state
    return parameter, gradient, state


def run_emulated(
    emulator: Emulator, variant: Variant, shape, seed: int, steps: int, order: int = 0
) -> None:
    """``steps`` steps of the emulated kernel on check's inputs for ``shape``, compared bit for
    bit with the reference (``run_steps``)."""
    transposed = len(shape) >= 2 and seed % 2 == 0
    inputs = verification_inputs(variant, shape, seed, transposed)
    what = f"{variant} shape={shape} transposed={transposed}"
    run_steps(emulator, variant, inputs, steps, what, order)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda keys: "+".join(keys))
def test_every_option_set_float32(emulator, layout):
    # Every option set of spec.option_space(), split by buffer layout; each runs one shape of the
    # rotation.
    options = [o for o in option_space() if o.state_keys == layout]
    shapes = SHAPES[False]
    for k, option_set in enumerate(options):
        run_emulated(emulator, Variant(option_set), shapes[k % len(shapes)], seed=k, steps=2)


@pytest.mark.parametrize("small", [False, True], ids=["size>=8", "size<8"])
@pytest.mark.parametrize(
    "combination", list(enumerate(dtype_combinations())), ids=lambda c: "-".join(
        _dtype_name(x) for x in c[1]
    )
)
def test_every_dtype_combination_pairwise_options(emulator, combination, small):
    # The plan's rows for this dtype combination: the pairwise option sets with the storage
    # flags (8-bit state in turn at every block size and both scale classes, stochastic
    # rounding), each on the shapes of its size classes.
    k, dtypes = combination
    turn = 2 * k + small
    for row, options in enumerate(pairwise_option_sets(storage=True)):
        variant = plan_variant(options, dtypes, small, turn + row)
        for j, shape in enumerate(shapes_for(variant)):
            run_emulated(emulator, variant, shape, seed=row + j, steps=STEPS)


@pytest.mark.skipif(NO_CUDA_HEADERS, reason=NO_CUDA_REASON)
def test_cuda_twin_run_on_the_cpu(cuda_emulator):
    # The CUDA translation units, compiled by g++ with CUDA's own __half/__nv_bfloat16, run
    # block by block as MLX's CUDA backend launches them: whole blocks of 256 threads, so the
    # body's bounds guard is exercised on every size that is not a multiple of 256.
    for k, variant in enumerate(cuda_variants()):
        for small in (False, True):
            quantized = variant.options.quantized_state
            small_scales = quantized and (small or variant.small_scales)
            sized = dataclasses.replace(variant, small=small, small_scales=small_scales)
            pool = shapes_for(sized)
            run_emulated(cuda_emulator, sized, pool[k % len(pool)], k, STEPS)


def test_plan_counts():
    # Every option set once in float32, then the pairwise sets of the whole space (storage
    # flags included) for the 15 dtype combinations and 2 address-space classes, less the
    # float32 large-array rows the first part already holds.
    assert len(dtype_combinations()) == 15
    plan = verification_plan()
    pairwise = pairwise_option_sets(storage=True)
    repeats = sum(1 for o in pairwise if not (o.quantized_state or o.stochastic_rounding))
    assert len(plan) == len(option_space()) + 15 * 2 * len(pairwise) - repeats
    for storage in (False, True):
        covered = set()
        for options in pairwise_option_sets(storage):
            covered |= set(itertools.combinations([(n, getattr(options, n)) for n in FLAGS], 2))
        # Every (flag, value) pair some valid option set holds.
        possible = set()
        for options in option_space(storage):
            possible |= set(itertools.combinations([(n, getattr(options, n)) for n in FLAGS], 2))
        assert covered == possible
    # 4 value pairs for each two flags, less the 3 the invariants forbid (nesterov or
    # lr_in_momentum without momentum, both decays).
    assert len(possible) == 4 * math.comb(len(FLAGS), 2) - 3
    # 8-bit state: every block size, both scale classes of large parameters, and stochastic
    # rounding with every parameter dtype.
    quantized = [v for v in plan if v.options.quantized_state]
    assert {v.options.block_size for v in quantized} == set(BLOCK_SIZES)
    assert {(v.small, v.small_scales) for v in quantized} == {
        (True, True),
        (False, True),
        (False, False),
    }
    rounding = [v for v in plan if v.options.stochastic_rounding]
    assert {v.parameter_dtype for v in rounding} == {mx.float32, mx.float16, mx.bfloat16}


def test_empty_parameter_launches_nothing():
    def launch(call):
        raise AssertionError("an empty parameter must not launch a kernel")

    update = make_update(launch)
    options = UpdateOptions(centered=True, momentum=True)
    for shape in [(0,), (3, 0)]:
        parameter = mx.zeros(shape, mx.float16)
        state = {key: mx.zeros(shape) for key in options.state_keys}
        new_parameter, new_state = update(
            options, step_scalars(1), parameter, mx.zeros(shape), state
        )
        assert new_parameter.shape == shape and new_parameter.dtype == mx.float16
        assert {k: (v.shape, v.dtype) for k, v in new_state.items()} == {
            k: (shape, mx.float32) for k in options.state_keys
        }


@pytest.mark.parametrize(
    "parameter_dtype, gradient_dtype, state_dtypes, scalars_dtype",
    [
        (mx.float64, mx.float64, (mx.float64, mx.float64), mx.float64),
        (mx.float32, mx.float32, (mx.float64, mx.float64), mx.float64),
        (mx.float32, mx.float32, (mx.float32, mx.float16), mx.float32),
    ],
    ids=["float64", "float64-state", "mixed-state-dtypes"],
)
def test_unsupported_inputs_take_the_reference(
    parameter_dtype, gradient_dtype, state_dtypes, scalars_dtype
):
    def launch(call):
        raise AssertionError("the kernel must not run on these inputs")

    options = UpdateOptions(centered=True)
    scalars = step_scalars(1).astype(scalars_dtype)
    parameter = mx.array([1.0, -2.0, 3.0], parameter_dtype)
    gradient = mx.array([0.5, 0.25, -1.0], gradient_dtype)
    state = {
        key: mx.array([1.0, 1.0, 1.0], dtype)
        for key, dtype in zip(options.state_keys, state_dtypes, strict=True)
    }
    assert plan(options, scalars, parameter, gradient, state) is None
    actual = make_update(launch)(options, scalars, parameter, gradient, state)
    expected = rmsprop_reference(options, scalars, parameter, gradient, state)
    assert mx.array_equal(actual[0], expected[0]).item()
    for key in options.state_keys:
        assert actual[1][key].dtype == expected[1][key].dtype
        assert mx.array_equal(actual[1][key], expected[1][key]).item()


def test_shim_rounds_like_mlx(tmp_path):
    # The shim's float16/bfloat16 conversions against MLX's own, on ties (round half to
    # even), the largest finite values, overflow to infinity, subnormals, NaN and infinities.
    bits = np.concatenate(
        [
            np.arange(0, 1 << 16, 7, dtype=np.uint32) << 16,  # exact bfloat16 values
            (np.arange(0, 1 << 16, 7, dtype=np.uint32) << 16) | 0x8000,  # bfloat16 ties
            (np.arange(0, 1 << 16, 13, dtype=np.uint32) << 16) | 0x7FFF,  # just below ties
            np.random.default_rng(0).integers(0, 1 << 32, 200_000, dtype=np.uint32),
            np.array([0x7F7FFFFF, 0x477FE000, 0x477FF000, 0x38800000, 0x33800000], np.uint32),
        ]
    )
    values = bits.view(np.float32)
    library = tmp_path / "convert.so"
    code = tmp_path / "convert.cpp"
    code.write_text(
        '#include "metal_shim.h"\n'
        'extern "C" void to_bf16(const float* x, uint16_t* y, long n) {\n'
        "  for (long i = 0; i < n; ++i) y[i] = static_cast<bfloat16_t>(x[i]).bits; }\n"
        'extern "C" void to_f16(const float* x, float16_t* y, long n) {\n'
        "  for (long i = 0; i < n; ++i) y[i] = static_cast<float16_t>(x[i]); }\n"
    )
    compile_library(code, library)
    functions = ctypes.CDLL(str(library))
    bf16 = np.zeros(len(values), np.uint16)
    f16 = np.zeros(len(values), np.float16)
    for function, output in ((functions.to_bf16, bf16), (functions.to_f16, f16)):
        function(
            ctypes.c_void_p(values.ctypes.data),
            ctypes.c_void_p(output.ctypes.data),
            ctypes.c_long(len(values)),
        )

    expected_bf16 = _to_numpy(mx.array(values).astype(mx.bfloat16))
    nan = np.isnan(values)
    assert np.array_equal(bf16[~nan], expected_bf16[~nan])
    assert np.isnan(_from_numpy(bf16[nan], mx.bfloat16).astype(mx.float32)).all()
    expected_f16 = np.array(mx.array(values).astype(mx.float16))
    assert np.array_equal(f16.view(np.uint16)[~nan], expected_f16.view(np.uint16)[~nan])
    assert np.isnan(f16[nan]).all()


# The thread positions (x, y) of a 2-D grid with rows of 2^30 threads that matter for a
# parameter of 2^32 + 36 elements: the first and last threads of rows, the first indices that
# no longer fit in 31 and in 32 bits, the last element, and threads past the end.
ROW = 2**30
LARGE_SHAPE = (4, ROW + 9)
LARGE_POSITIONS = [
    (0, 0),
    (1, 0),
    (ROW - 1, 0),
    (0, 1),
    (ROW - 1, 1),  # index 2^31 - 1
    (0, 2),  # index 2^31: negative as a 32-bit int
    (ROW - 1, 3),  # index 2^32 - 1
    (0, 4),  # index 2^32: 0 as a 32-bit unsigned
    (1, 4),
    (35, 4),  # the last element
    (36, 4),  # past the end: must write nothing
    (ROW - 1, 4),
]


def run_past_2_31_elements(build_dir: Path, data_dir: Path, backend: str = "metal") -> None:
    """Emulate the threads of LARGE_POSITIONS for a parameter of 2^32 + 36 elements and check
    what they wrote against the reference, and that nothing else was written."""
    size = math.prod(LARGE_SHAPE)
    options = UpdateOptions(
        centered=True, momentum=True, ema=True, gated=True, decoupled_decay=True
    )
    variant = Variant(options, mx.float16, mx.bfloat16, mx.float32)
    emulator = Emulator([variant], build_dir, chunks=1, backend=backend)

    # Sparse memory-mapped files: 150 GiB of address space, a few pages touched.
    guard = 4096
    buffers = [
        np.memmap(data_dir / f"{name}.bin", NUMPY_STORAGE[dtype], "w+", shape=(size + guard,))
        for name, dtype in zip(
            variant.input_names[:-1] + variant.output_names,
            variant.input_dtypes[:-1] + variant.output_dtypes,
            strict=True,
        )
    ]
    inputs = buffers[: len(variant.input_names) - 1]
    outputs = buffers[len(variant.input_names) - 1 :]
    indices = [y * ROW + x for x, y in LARGE_POSITIONS]
    inside = [i for i in indices if i < size]
    parameter, gradient, state = verification_inputs(variant, (len(inside),), seed=3)
    for buffer, values in zip(inputs, [parameter, gradient, *state.values()], strict=True):
        buffer[inside] = _to_numpy(values)
    scalars = step_scalars(1)
    positions = np.array([(x, y, 0) for x, y in LARGE_POSITIONS], np.uint32)
    emulator.run_buffers(
        variant, [*inputs, _to_numpy(scalars), *outputs], LARGE_SHAPE, grid_for(size), positions
    )

    expected_parameter, expected_state = rmsprop_reference(
        options, scalars, parameter, gradient, state
    )
    # Nothing written past the end, nor anywhere else (a wrapped index would land low).
    untouched = [i for i in range(size - 2, size + guard) if i not in inside]
    untouched += [2, 3, ROW - 2, ROW + 1, 2**31 - 2, 2**31 + 1, 2**32 - 2, 2**32 + 2]
    for buffer, expected, dtype in zip(
        outputs, [expected_parameter, *expected_state.values()], variant.output_dtypes, strict=True
    ):
        actual = _from_numpy(np.array(buffer[inside]), dtype)
        assert mx.array_equal(actual, expected, equal_nan=True).item(), "wrong values"
        assert not np.array(buffer[untouched]).view(np.uint8).any(), "stray writes"


def test_grid_and_index_past_2_31_elements(tmp_path):
    size = math.prod(LARGE_SHAPE)
    assert kernel_shape(LARGE_SHAPE) == LARGE_SHAPE
    assert grid_for(size) == (ROW, 5, 1)
    run_past_2_31_elements(BUILD_DIR, tmp_path)


@pytest.mark.skipif(NO_CUDA_HEADERS, reason=NO_CUDA_REASON)
def test_cuda_index_past_2_31_elements(tmp_path):
    run_past_2_31_elements(BUILD_DIR, tmp_path, backend="cuda")


def test_emulation_catches_metal_max_min(tmp_path, mutate_source):
    # The emulation is only worth something if it fails on a wrong kernel. Metal's max/min
    # return the non-NaN operand: a clip written with them would turn NaN gradients into the
    # clip bound. The shim implements Metal's semantics, so this mutation must be caught.
    mutate_source(
        "  g = isnan(g) ? g : (g > low ? g : low);\n"
        "  g = isnan(g) ? g : (g < clip_value ? g : clip_value);\n",
        "  g = min(max(g, low), clip_value);\n",
    )
    variant = Variant(UpdateOptions(clip_value=True))
    mutant = Emulator([variant], tmp_path)
    with pytest.raises(AssertionError, match="non-finite entries differ"):
        for seed in range(4):
            run_emulated(mutant, variant, (257,), seed=seed, steps=1)


@pytest.mark.parametrize(
    "backend, old, new, index_line",
    [
        (
            "metal",
            "const size_t i = size_t(thread_position_in_grid.y)",
            "const uint i = (",
            "metal",
        ),
        ("metal", "size_t n = 1;", "uint n = 1;", None),
        ("cuda", "(size_t(blockIdx.y) * gridDim.x + blockIdx.x)", "size_t(blockIdx.x)", "cuda"),
    ],
    ids=["metal-32-bit-index", "metal-32-bit-count", "cuda-rows-ignored"],
)
def test_emulation_catches_wrong_indexing(tmp_path, mutate_source, backend, old, new, index_line):
    if backend == "cuda" and NO_CUDA_HEADERS:
        pytest.skip(NO_CUDA_REASON)
    mutate_source(old, new, index_line)
    with pytest.raises(AssertionError):
        run_past_2_31_elements(tmp_path / "build", tmp_path, backend)


def test_mlx_cuda_launch_arithmetic_never_overflows():
    assert MAX_1D_GRID == 2**31 - 256
    for size in LAUNCH_SIZES:
        grid = grid_for(size)
        blocks, block = mlx_cuda_launch(grid)  # MLX's signed 32-bit arithmetic, or raises
        width, rows, _ = grid
        if rows == 1:
            assert blocks[0] * block[0] >= size > blocks[0] * block[0] - block[0], size
        else:
            # Whole blocks tile each row exactly: the row pitch is ROW_WIDTH on both backends.
            assert width == ROW_WIDTH and blocks[0] * block[0] == ROW_WIDTH, size
            assert (rows - 1) * ROW_WIDTH < size <= rows * ROW_WIDTH, size
    # The replay itself: MLX's arithmetic overflows for the 1-D grids the launcher avoids.
    for size in (MAX_1D_GRID + 1, 2**31 - 1):
        with pytest.raises(OverflowError, match="overflows int"):
            mlx_cuda_launch((size, 1, 1))
    assert mlx_cuda_launch((MAX_1D_GRID, 1, 1)) == ((2**23 - 1, 1, 1), (THREADGROUP[0], 1, 1))


NO_FUSING_REASON = "the fusing emulation needs CUDA's headers and a CPU with FMA instructions"
NO_FUSING = NO_CUDA_HEADERS or not cpu_has_fma()


def fusing_failures(variants: list[Variant], build_dir: Path) -> list[tuple[Variant, dict]]:
    """``check``'s own verification (its shapes, steps, inputs and tolerance table) of the CUDA kernels built as the fusing emulation."""
    emulator = Emulator(variants, build_dir, backend="cuda", fusing=True)
    failures = []
    for k, variant in enumerate(variants):

        def run_update(scalars, parameter, gradient, state, variant=variant):
            call = plan(variant.options, scalars, parameter, gradient, state)
            return call.unpack(emulator.run(call))

        pool = SHAPES[variant.small]
        shapes = [pool[(k + j) % len(pool)] for j in range(2)]
        errors, failure = verify(variant, run_update, shapes, seed=k)
        if failure is not None:
            failures.append((variant, failure))
    return failures


def centred_unclipped() -> list[Variant]:
    """Every centred buffer layout with every flag on but the gradient clipping and scaling, in
    float32: the kernels a fused multiply-add breaks (where g^2 overflows)."""
    return [
        Variant(dataclasses.replace(every_flag_on(keys), clip_value=False, scale_gradient=False))
        for keys in LAYOUTS
        if "grad_avg" in keys
    ]


def fusing_sample() -> list[Variant]:
    """The pairwise option sets in float32 and ``centred_unclipped``."""
    return [Variant(o) for o in pairwise_option_sets()] + centred_unclipped()


@pytest.mark.skipif(NO_FUSING, reason=NO_FUSING_REASON)
def test_fusing_emulation_passes_check():
    # A compiler that fuses every a*b + c it may: the primitives leave it nothing to fuse.
    assert fusing_failures(fusing_sample(), BUILD_DIR) == []


@pytest.mark.slow
@pytest.mark.skipif(NO_FUSING, reason=NO_FUSING_REASON)
def test_fusing_emulation_passes_check_quick_plan():
    # The variants of `check --quick` on a GPU: 15 dtype combinations x both size classes x
    # the pairwise option sets.
    variants = [
        Variant(o, p, g, s, small)
        for (p, g, s), small in itertools.product(dtype_combinations(), (False, True))
        for o in pairwise_option_sets()
    ]
    assert len(variants) == 15 * 2 * len(pairwise_option_sets())
    assert fusing_failures(variants, BUILD_DIR) == []


@pytest.mark.skipif(NO_FUSING, reason=NO_FUSING_REASON)
def test_fusing_emulation_catches_a_plain_multiply_add(tmp_path, mutate_source):
    # The centred variance written with plain operators: the fusing emulation contracts it,
    # and check's verification must then fail (g^2 overflowing to inf: the reference gives
    # inf - inf = NaN, the fused multiply-add a finite or infinite value).
    mutate_source(
        "RMS_SUB(variance, RMS_MUL(grad_avg_hat, grad_avg_hat))",
        "variance - grad_avg_hat * grad_avg_hat",
    )
    assert fusing_failures(centred_unclipped(), tmp_path)
