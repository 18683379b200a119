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
from mlx_rmsprop.paths.kernels import source
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
    factor_variants,
    pairwise_option_sets,
    plan_variant,
    verification_plan,
)
from mlx_rmsprop.paths.probe import quantized_state, update_arguments
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
        dataclasses.replace(v, small=True, small_scales=v.options.quantized_state) for v in variants
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
    "combination",
    list(enumerate(dtype_combinations())),
    ids=lambda c: "-".join(_dtype_name(x) for x in c[1]),
)
def test_every_dtype_combination_pairwise_options(emulator, combination, small):
    # The plan's rows for this dtype combination: the pairwise option sets with the storage
    # flags (8-bit state in turn at every block size and both scale classes, stochastic
    # rounding), each on the shapes of its size classes.
    # Parameters of more than 7 blocks (up to 9213 elements) take one of their two shapes.
    k, dtypes = combination
    turn = 2 * k + small
    for row, options in enumerate(pairwise_option_sets(storage=True)):
        variant = plan_variant(options, dtypes, small, turn + row)
        shapes = shapes_for(variant)
        if options.quantized_state and not variant.small_scales:
            shapes = [shapes[(turn + row) % len(shapes)]]
        for j, shape in enumerate(shapes):
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
    # float32 large-array rows the first part already holds, then the kernels reading clip
    # factors: every (buffer layout, stochastic rounding) in both classes of the matrix, then
    # the accumulating kernels: every (buffer layout, stochastic rounding) in both size classes.
    assert len(dtype_combinations()) == 15
    plan = verification_plan()
    pairwise = pairwise_option_sets(storage=True)
    repeats = sum(1 for o in pairwise if not (o.quantized_state or o.stochastic_rounding))
    layouts = {(o.state_keys, o.stochastic_rounding) for o in option_space(storage=True)}
    factors = accumulating = 2 * len(layouts)
    expected = len(option_space()) + 15 * 2 * len(pairwise) - repeats + factors + accumulating
    assert len(plan) == expected
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
    with pytest.raises(AssertionError, match=r"elements differ, first .* vs np.float32\(nan\)"):
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

        def run_update(scalars, parameter, gradient, state, variant=variant, **arguments):
            call = plan(variant.options, scalars, parameter, gradient, state, **arguments)
            return call.unpack(emulator.run(call))

        pool = shapes_for(variant)
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
    """The pairwise option sets (storage flags included, 8-bit state at the block sizes of
    the plan's first rows) in float32 and bfloat16 and ``centred_unclipped``."""
    variants = [
        plan_variant(o, dtypes, False, row)
        for row, o in enumerate(pairwise_option_sets(storage=True))
        for dtypes in [(mx.float32,) * 3, (mx.bfloat16, mx.float32, mx.bfloat16)]
    ]
    return list(dict.fromkeys(variants + centred_unclipped()))


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
        plan_variant(options, dtypes, small, k + row)
        for k, (dtypes, small) in enumerate(itertools.product(dtype_combinations(), (False, True)))
        for row, options in enumerate(pairwise_option_sets(storage=True))
    ]
    assert len(variants) == 15 * 2 * len(pairwise_option_sets(storage=True))
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


# --- 8-bit state and stochastic rounding --------------------------------------------------

BACKENDS = [
    "metal",
    pytest.param("cuda", marks=pytest.mark.skipif(NO_CUDA_HEADERS, reason=NO_CUDA_REASON)),
]
# Every flag that changes what is stored: all three moment buffers 8-bit, the gate (step 2
# skips: codes and scales must come back unchanged), the EMA (the one float state buffer,
# here float16: rounded stochastically) and a bfloat16 parameter (rounded stochastically).
STORAGE_OPTIONS = UpdateOptions(
    centered=True,
    momentum=True,
    nesterov=True,
    bias_correction=True,
    gated=True,
    ema=True,
    quantized_state=True,
    stochastic_rounding=True,
)


# Sizes per block size: 0-d, 1, under a block, a block, a partial last block, several blocks
# and a 2-D non-contiguous one, and more than 7 blocks (scales no longer in Metal's
# constant address space).
def storage_shapes(block: int) -> list[tuple[tuple[int, ...], bool]]:
    return [
        ((), False),
        ((1,), False),
        ((5,), False),
        ((block - 1,), False),
        ((block,), False),
        ((2 * block + 3,), False),
        ((3, block // 2 + 1), True),
        ((8 * block + 5,), False),
    ]


def storage_variant(shape: tuple[int, ...], block: int, options=STORAGE_OPTIONS) -> Variant:
    size = math.prod(shape)
    options = dataclasses.replace(options, block_size=block)
    return Variant(
        options,
        mx.bfloat16,
        mx.float16,
        mx.float16,
        small=size < 8,
        small_scales=-(-size // block) < 8,
    )


def storage_emulator(backend: str, blocks, options=STORAGE_OPTIONS) -> Emulator:
    variants = {
        storage_variant(shape, block, options)
        for block in blocks
        for shape, _ in storage_shapes(block)
    }
    return Emulator(sorted(variants, key=str), BUILD_DIR, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_8_bit_state_and_stochastic_rounding_every_block_size(backend):
    # Every block size of the spec at every awkward size, 3 steps (the update gate is 0 on step
    # 2), against the reference bit for bit: codes, scales, the EMA and the parameter.
    emulator = storage_emulator(backend, BLOCK_SIZES)
    for k, block in enumerate(BLOCK_SIZES):
        for j, (shape, transposed) in enumerate(storage_shapes(block)):
            variant = storage_variant(shape, block)
            inputs = verification_inputs(variant, shape, seed=10 * k + j, transposed=transposed)
            what = f"{backend} block {block} shape {shape} transposed={transposed}"
            run_steps(emulator, variant, inputs, STEPS, what)


def special_blocks(block: int) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """A parameter of 5 blocks and a partial one: block 0 all zero (gradient and state, so the
    new v and grad_avg are zero: scale 0), block 1 with a NaN gradient (NaN scale), block 2 an
    overflowing one (v's scale inf), block 3 a negative zero gradient over zero state, block 4
    and the partial block ordinary values."""
    size = 5 * block + 3
    variant = storage_variant((size,), block)
    rng = np.random.default_rng(block)
    p = rng.normal(0.0, 1.0, size).astype(np.float32)
    g = rng.uniform(-1.0, 1.0, size).astype(np.float32)
    moments = {
        "v": rng.uniform(0.5, 2.0, size).astype(np.float32),
        "grad_avg": rng.uniform(-0.05, 0.05, size).astype(np.float32),
        "momentum_buffer": rng.normal(0.0, 0.1, size).astype(np.float32),
    }
    for zero in (slice(0, block), slice(3 * block, 4 * block)):
        g[zero] = 0.0
        for values in moments.values():
            values[zero] = 0.0
    g[3 * block : 4 * block] = -0.0
    g[block + 3] = math.nan
    g[2 * block + 1] = 1e30
    state = {key: mx.array(values) for key, values in moments.items()}
    state["ema"] = mx.array(p + np.float32(0.01)).astype(mx.float16)
    return (
        mx.array(p).astype(mx.bfloat16),
        mx.array(g).astype(mx.float16),
        quantized_state(variant, state),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_8_bit_state_zero_nan_and_inf_blocks(backend):
    emulator = storage_emulator(backend, (32, 64))
    for block in (32, 64):
        inputs = special_blocks(block)
        variant = storage_variant(inputs[0].shape, block)
        _, _, state = run_steps(emulator, variant, inputs, 1, f"{backend} {block}")
        # The blocks did what they are there for after a step: a zero, a NaN and an infinite
        # scale of v; a zero grad_avg block's codes (signed table: the midpoint 0 is not below
        # 0, so code 127) stand for -0.
        scales = np.array(state["v_scale"])
        assert scales[0] == 0.0 and np.isnan(scales[1]) and np.isinf(scales[2]), scales
        assert (np.array(state["grad_avg"])[:block] == 127).all()
        # Then further steps from there (the infinite scale spreads to its block).
        run_steps(emulator, variant, inputs, STEPS, f"{backend} {block}")


def test_8_bit_state_gate_keeps_codes_and_scales():
    # With the update gate at 0 the codes and scales come back bit for bit (with the gate at 1
    # the same inputs change them: the gate is what keeps them).
    block = 32
    emulator = storage_emulator("metal", (block,))
    variant = storage_variant((3 * block + 5,), block)
    parameter, gradient, state = verification_inputs(variant, (3 * block + 5,), seed=4)
    scalars = step_scalars(2)
    assert scalars[11].item() == 0.0  # Scalar.UPDATE_GATE
    call = plan(variant.options, scalars, parameter, gradient, state, index=3)
    _, new_state = call.unpack(emulator.run(call))
    for key in ("v", "grad_avg", "momentum_buffer"):
        assert_same(new_state[key], state[key], key)
        assert_same(new_state[f"{key}_scale"], state[f"{key}_scale"], f"{key}_scale")
    open_gate = step_scalars(1)
    call = plan(variant.options, open_gate, parameter, gradient, state, index=3)
    _, updated = call.unpack(emulator.run(call))
    for key in ("v", "grad_avg", "momentum_buffer"):
        assert not same_bits(updated[key], state[key]).all(), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_rounds_and_follows_the_index(backend):
    # Not vacuous: stochastic rounding stores some elements away from round-to-nearest, and
    # another parameter position draws other bits; every result the reference's.
    options = UpdateOptions(momentum=True, ema=True, stochastic_rounding=True)
    variant = Variant(options, mx.bfloat16, mx.float32, mx.float16)
    emulator = Emulator([variant], BUILD_DIR, backend=backend)
    parameter, gradient, state = verification_inputs(variant, (4099,), seed=5)
    scalars = step_scalars(1)
    results = []
    for index in (0, 1):
        call = plan(options, scalars, parameter, gradient, state, index=index)
        new_parameter, new_state = call.unpack(emulator.run(call))
        expected = rmsprop_reference(options, scalars, parameter, gradient, state, index=index)
        assert_same(new_parameter, expected[0], f"parameter, index {index}")
        for key in options.state_keys:
            assert_same(new_state[key], expected[1][key], f"{key}, index {index}")
        results.append((new_parameter, new_state))
    nearest = rmsprop_reference(
        dataclasses.replace(options, stochastic_rounding=False), scalars, parameter, gradient, state
    )
    for (new_parameter, new_state), _ in zip(results, range(2), strict=True):
        assert not same_bits(new_parameter, nearest[0]).all()
        assert not same_bits(new_state["v"], nearest[1]["v"]).all()
        assert not same_bits(new_state["ema"], nearest[1]["ema"]).all()
    assert not same_bits(results[0][0], results[1][0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_threadgroup_results_do_not_depend_on_thread_order(backend):
    # Between two barriers the emulation runs a group's threads in increasing or in decreasing
    # order: a kernel without a race gives the same bits both ways.
    emulator = storage_emulator(backend, (64,))
    variant = storage_variant((5 * 64 + 3,), 64)
    inputs = verification_inputs(variant, (5 * 64 + 3,), seed=2)
    for order in (0, 1):
        run_steps(emulator, variant, inputs, STEPS, f"{backend} order {order}", order)


def missing_barrier_caught(tmp_path: Path, backend: str) -> None:
    block = 64
    emulator = Emulator([storage_variant((5 * block + 3,), block)], tmp_path, backend=backend)
    variant = storage_variant((5 * block + 3,), block)
    inputs = special_blocks(block)
    run_steps(emulator, variant, inputs, STEPS, f"{backend} planted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_emulation_catches_a_missing_barrier(tmp_path, mutate_source, backend):
    # The barrier between writing the block's magnitudes to threadgroup memory and the
    # reduction reading them, removed: a thread then reads slots other threads have not
    # written yet, and the scales come out wrong. The barriers are real in the emulation, so
    # this must fail.
    mutate_source(
        "    block_magnitude[slot] = active ? RMS_BITS_FLOAT(magnitude_bits) : 0.0f;\n"
        "  }\n"
        "  RMS_GROUP_BARRIER();\n",
        "    block_magnitude[slot] = active ? RMS_BITS_FLOAT(magnitude_bits) : 0.0f;\n  }\n",
    )
    with pytest.raises(AssertionError, match="elements differ"):
        missing_barrier_caught(tmp_path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_emulation_catches_threads_that_skip_a_barrier(tmp_path, mutate_source, backend):
    # Threads past the end of the parameter returning early, as without 8-bit state: the
    # rest of their group then waits at a barrier they never reach (undefined on a GPU), which
    # the emulation reports.
    mutate_source(
        "if constexpr (!QUANTIZED_STATE) {\n  if (!active)", "if constexpr (true) {\n  if (!active)"
    )
    with pytest.raises(AssertionError, match="ended while others waited at a barrier"):
        missing_barrier_caught(tmp_path, backend)


def test_empty_parameter_with_8_bit_state_launches_nothing():
    def launch(call):
        raise AssertionError("an empty parameter must not launch a kernel")

    options = dataclasses.replace(STORAGE_OPTIONS, block_size=32)
    parameter = mx.zeros((0, 3), mx.bfloat16)
    variant = storage_variant((0, 3), 32)
    _, gradient, state = verification_inputs(variant, (0, 3), seed=0)
    new_parameter, new_state = make_update(launch)(
        options, step_scalars(1), parameter, gradient, state, index=2
    )
    expected = rmsprop_reference(options, step_scalars(1), parameter, gradient, state, index=2)
    assert new_parameter.shape == (0, 3)
    for key in options.state_keys:
        assert new_state[key].shape == expected[1][key].shape
        assert new_state[key].dtype == expected[1][key].dtype


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_storage_variant_of_the_plan_at_every_shape(backend):
    # The storage rows of the verification plan (every dtype combination and size class), at
    # every shape of their classes, 3 steps, both thread orders: bit for bit. The accumulating
    # ones run in test_kernel_accumulation.py, with their accumulator.
    plan = [
        v
        for v in verification_plan()
        if (v.options.quantized_state or v.options.stochastic_rounding) and not v.accumulates
    ]
    emulator = Emulator(plan, BUILD_DIR, backend=backend)
    for k, variant in enumerate(plan):
        for j, shape in enumerate(shapes_for(variant)):
            run_emulated(emulator, variant, shape, seed=k + j, steps=STEPS, order=(k + j) % 2)


# --- per-parameter clip factors -------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_factors_every_layout(backend):
    # The plan's kernels that read their clip factors from the factors matrix (every buffer
    # layout, with and without stochastic rounding, both address-space classes of the matrix)
    # on two shapes of their size classes, 3 steps, at a row neither first nor last
    # (probe.update_arguments): bit for bit the reference's.
    plan = [v for v in verification_plan() if v.factors and not v.accumulates]
    assert plan == factor_variants()
    assert {v.small_factors for v in plan} == {False, True}
    assert {v.small for v in plan} == {False, True}
    emulator = Emulator(plan, BUILD_DIR, backend=backend)
    for k, variant in enumerate(plan):
        for j, shape in enumerate(shapes_for(variant)[:2]):
            run_emulated(emulator, variant, shape, seed=k + j, steps=STEPS)


# Every row another clip (multiplier, divisor) pair: 5 parameters' factors, one row per index.
FACTORS = mx.array([[0.5, 1.25], [1.0, 3.0], [0.75, 0.5], [2.0, 7.0], [1.0, 1.0]], mx.float32)
FACTOR_OPTIONS = UpdateOptions(scale_gradient=True, momentum=True, ema=True)


def factor_emulator(backend: str) -> tuple[Emulator, Variant]:
    variant = Variant(
        FACTOR_OPTIONS, mx.bfloat16, mx.float32, mx.float16, factors=True, small_factors=False
    )
    return Emulator([variant], BUILD_DIR, backend=backend), variant


def run_at_each_row(emulator: Emulator, variant: Variant, factors: mx.array) -> list:
    """The emulated kernel at every row of ``factors`` on one input, each result compared bit
    for bit with the reference at that row; returns the new parameters."""
    parameter, gradient, state = verification_inputs(variant, (4099,), seed=6)
    scalars = step_scalars(1)
    results = []
    for index in range(factors.shape[0]):
        call = plan(FACTOR_OPTIONS, scalars, parameter, gradient, state, index, factors)
        assert call.variant == variant and call.inputs[-1].dtype == mx.float32
        new_parameter, new_state = call.unpack(emulator.run(call))
        expected = rmsprop_reference(
            FACTOR_OPTIONS, scalars, parameter, gradient, state, index=index, factors=factors
        )
        assert_same(new_parameter, expected[0], f"parameter, row {index}")
        for key in FACTOR_OPTIONS.state_keys:
            assert_same(new_state[key], expected[1][key], f"{key}, row {index}")
        results.append(new_parameter)
    return results


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_factors_follow_the_index(backend):
    # Each parameter position reads its own row: every row gives the reference's result at
    # that row, and the rows' results differ (a kernel reading another row fails).
    emulator, variant = factor_emulator(backend)
    results = run_at_each_row(emulator, variant, FACTORS)
    for k in range(1, len(results)):
        assert not same_bits(results[k], results[0]).all(), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_clip_factors_are_rounded_as_the_reference_rounds_them(backend):
    # A tree mixing float32 and float64 arithmetic has float64 factors; a float32 parameter
    # reads its row as float32 (reference: factors[index, k].astype(float32)). Entries that
    # float32 cannot hold (0.1, 1/3, a tie between two float32 values) round the same way.
    emulator, variant = factor_emulator(backend)
    tie = 1.0 + 2.0**-24  # halfway between 1 and the next float32: rounds to even, 1.0
    wide = mx.array([[0.1, 1 / 3], [tie, 0.7], [3.0, 1.1], [0.2, 1e-3]], mx.float64)
    run_at_each_row(emulator, variant, wide)


def test_clip_factors_reading_row_0_is_caught(monkeypatch):
    # The parity tests above are worth something only if a kernel that reads the wrong row
    # fails them: here every parameter reads row 0.
    lines = tuple(
        line.replace("size_t(parameter_position) +", "size_t(0u) +") for line in source.FACTOR_LINES
    )
    assert lines != source.FACTOR_LINES
    monkeypatch.setattr(source, "FACTOR_LINES", lines)
    source.kernel_body.cache_clear()
    try:
        variant = Variant(
            FACTOR_OPTIONS, mx.bfloat16, mx.float32, mx.float16, factors=True, small_factors=False
        )
        with tempfile.TemporaryDirectory() as directory:
            mutant = Emulator([variant], Path(directory))
            with pytest.raises(AssertionError, match="row 1: .*elements differ"):
                run_at_each_row(mutant, variant, FACTORS)
    finally:
        monkeypatch.undo()
        source.kernel_body.cache_clear()


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_factor_row_past_the_matrix_reads_nothing(backend):
    # The launcher refuses such an index; a kernel handed one anyway takes NaN factors (its
    # bounds guard) instead of reading past the matrix: every parameter element turns NaN.
    emulator, variant = factor_emulator(backend)
    parameter, gradient, state = verification_inputs(variant, (300,), seed=1)
    call = plan(FACTOR_OPTIONS, step_scalars(1), parameter, gradient, state, 4, FACTORS)
    position = variant.input_names.index("index")
    inputs = list(call.inputs)
    inputs[position] = mx.array([FACTORS.shape[0]], mx.uint32)
    new_parameter, _ = call.unpack(emulator.run(dataclasses.replace(call, inputs=tuple(inputs))))
    assert np.isnan(np.array(new_parameter.astype(mx.float32))).all()


@pytest.mark.parametrize(
    "index, factors, message",
    [
        (5, FACTORS, r"index must be a row of factors \(0 to 4\), got 5"),
        (0, FACTORS.reshape(-1), r"factors must be a float32 or float64 matrix .* got .*\(10,\)"),
        (0, FACTORS.reshape(2, 5), r"of shape \(parameters, 2\), got .*\(2, 5\)"),
        (0, FACTORS.astype(mx.float16), r"got mlx.core.float16 \(5, 2\)"),
    ],
    ids=["index", "vector", "columns", "dtype"],
)
def test_bad_clip_factors_are_refused(index, factors, message):
    def launch(call):
        raise AssertionError("no launch with bad factors")

    update = make_update(launch)
    parameter = mx.ones((6,))
    state = {"v": mx.ones((6,))}
    for size in (6, 0):  # an empty parameter launches nothing, and is refused all the same
        with pytest.raises(ValueError, match=message):
            update(
                UpdateOptions(scale_gradient=True),
                step_scalars(1),
                parameter[:size],
                parameter[:size],
                {"v": state["v"][:size]},
                index=index,
                factors=factors,
            )
