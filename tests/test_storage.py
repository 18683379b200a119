"""The storage rules (mlx_rmsprop.storage): 8-bit block codes and stochastic rounding, against
the spec's tables and hash and against the independent NumPy statement (storage_numpy)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop import storage
from mlx_rmsprop.spec import (
    GRAD_AVG,
    ROUNDING_OUTPUT_STRIDE,
    ROUNDING_TENSOR_STRIDE,
    SIGNED_CODE,
    UNSIGNED_CODE,
    V,
    code_midpoints,
    code_table,
    mix32,
)

import storage_numpy

KEYS = (V, GRAD_AVG)
HALF = {"float16": mx.float16, "bfloat16": mx.bfloat16}
RNG = np.random.default_rng(17)


def spread(n: int, key: str) -> np.ndarray:
    """Values over many octaves (v: non-negative)."""
    x = RNG.standard_normal(n) * 10.0 ** RNG.integers(-9, 9, n)
    return (np.abs(x) if key == V else x).astype(np.float32)


def quantized(x: np.ndarray | mx.array, key: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    codes, scales = storage.quantize(mx.array(x), code_table(key), block)
    return np.array(codes), np.array(scales)


def bits(x: mx.array) -> np.ndarray:
    return np.array(x.view(mx.uint16))


# --- quantize / dequantize ------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("scale", [1.0, 0.25, 2.0**40])
def test_every_code_round_trips(key, scale):
    table = np.array(code_table(key), dtype=np.float32)
    values = table * np.float32(scale)  # the block's max |x| is 1 * scale: its scale exactly
    codes, scales = quantized(values, key, 256)
    assert np.array_equal(codes, np.arange(256))
    assert scales.tolist() == [np.float32(scale)]
    back = storage.dequantize(mx.array(codes), mx.array(scales), code_table(key), 256)
    assert np.array_equal(np.array(back), values)


@pytest.mark.parametrize("key", KEYS)
def test_a_value_on_a_midpoint_takes_the_lower_code(key):
    midpoints = np.array(code_midpoints(code_table(key)), dtype=np.float32)
    # 1.0 fixes the block's scale at 1, so y == x.
    on = np.concatenate([midpoints, [1.0]]).astype(np.float32)
    above = np.concatenate([np.nextafter(midpoints, np.float32(2.0)), [1.0]]).astype(np.float32)
    assert np.array_equal(quantized(on, key, 256)[0][:255], np.arange(255))
    assert np.array_equal(quantized(above, key, 256)[0][:255], np.arange(1, 256))


def test_code_tables_have_no_zero_and_increase():
    for table in (UNSIGNED_CODE, SIGNED_CODE):
        assert all(low < high for low, high in zip(table, table[1:], strict=False))
        assert 0.0 not in table
    # Signed: zero sits on the middle midpoint, so it takes the smallest negative code.
    assert code_midpoints(SIGNED_CODE)[127] == 0.0


@pytest.mark.parametrize("key", KEYS)
def test_nan_makes_its_block_scale_nan_and_every_code_zero(key):
    values = spread(64, key)
    values[40] = np.nan
    codes, scales = quantized(values, key, 32)
    assert scales[0] == np.abs(values[:32]).max()
    assert math.isnan(scales[1])
    assert np.all(codes[32:] == 0)
    assert np.array_equal(codes[:32], storage_numpy.quantize(values[:32], key, 32)[0])


@pytest.mark.parametrize(("key", "inf"), [(V, np.inf), (GRAD_AVG, np.inf), (GRAD_AVG, -np.inf)])
def test_inf_makes_its_block_scale_inf(key, inf):
    values = spread(32, key)
    values[5] = inf
    codes, scales = quantized(values, key, 32)
    assert scales.tolist() == [np.inf]
    # inf / inf is NaN: code 0; finite / inf is 0: the code of 0.
    zero_code = 0 if key == V else 127
    assert codes[5] == 0
    assert np.all(np.delete(codes, 5) == zero_code)


@pytest.mark.parametrize("key", KEYS)
def test_an_all_zero_block_has_scale_zero_and_reads_back_zero(key):
    values = np.concatenate([np.zeros(32), spread(32, key)]).astype(np.float32)
    codes, scales = quantized(values, key, 32)
    assert scales[0] == 0.0
    assert np.all(codes[:32] == (0 if key == V else 127))
    back = np.array(storage.dequantize(mx.array(codes), mx.array(scales), code_table(key), 32))
    assert np.all(back[:32] == 0.0)


@pytest.mark.parametrize("key", KEYS)
def test_a_partial_last_block_uses_only_its_own_elements(key):
    values = spread(300, key)
    values[10] = 1e30  # in the first block only
    codes, scales = quantized(values, key, 256)
    assert scales.shape == (2,)
    assert scales[1] == np.abs(values[256:]).max()
    expected_codes, expected_scales = storage_numpy.quantize(values, key, 256)
    assert np.array_equal(codes, expected_codes)
    assert np.array_equal(scales, expected_scales)


@pytest.mark.parametrize("key", KEYS)
def test_a_0d_buffer_is_one_block(key):
    codes, scales = storage.quantize(mx.array(0.5), code_table(key), 64)
    assert codes.shape == () and codes.dtype == mx.uint8 and codes.item() == 255
    assert scales.shape == (1,) and scales.item() == 0.5
    back = storage.dequantize(codes, scales, code_table(key), 64)
    assert back.shape == () and back.dtype == mx.float32 and back.item() == 0.5


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_an_empty_buffer_has_no_blocks(shape):
    codes, scales = storage.quantize(mx.zeros(shape), UNSIGNED_CODE, 32)
    assert codes.shape == shape and codes.dtype == mx.uint8
    assert scales.shape == (0,) and scales.dtype == mx.float32
    back = storage.dequantize(codes, scales, UNSIGNED_CODE, 32)
    assert back.shape == shape and back.dtype == mx.float32


@pytest.mark.parametrize("key", KEYS)
def test_blocks_follow_the_logical_row_major_order_of_non_contiguous_inputs(key):
    base = spread(37 * 41, key).reshape(37, 41)
    transposed = mx.array(base).T
    strided = mx.array(base)[::2, 1::3]
    for view, copy in ((transposed, base.T), (strided, base[::2, 1::3])):
        codes, scales = quantized(view, key, 64)
        expected_codes, expected_scales = storage_numpy.quantize(
            np.ascontiguousarray(copy), key, 64
        )
        assert np.array_equal(codes, expected_codes)
        assert np.array_equal(scales, expected_scales)
        back = storage.dequantize(mx.array(codes), mx.array(scales), code_table(key), 64)
        assert np.array_equal(
            np.array(back), storage_numpy.dequantize(expected_codes, expected_scales, key, 64)
        )
    # Codes read through a non-contiguous view dequantize in their logical order too.
    codes = mx.array(RNG.integers(0, 256, (40, 64)).astype(np.uint8))
    scales = mx.array(RNG.random(40).astype(np.float32))
    view = codes.T
    expected = storage_numpy.dequantize(np.array(codes).T.copy(), np.array(scales), key, 64)
    assert np.array_equal(np.array(storage.dequantize(view, scales, code_table(key), 64)), expected)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("block", [32, 256, 1024])
def test_matches_the_numpy_statement_on_random_blocks(key, block):
    values = spread(3 * block + 17, key)
    values[::97] = 0.0
    codes, scales = quantized(values, key, block)
    expected_codes, expected_scales = storage_numpy.quantize(values, key, block)
    assert np.array_equal(codes, expected_codes)
    assert np.array_equal(scales, expected_scales)
    back = storage.dequantize(mx.array(codes), mx.array(scales), code_table(key), block)
    assert np.array_equal(np.array(back), storage_numpy.dequantize(codes, scales, key, block))


@pytest.mark.parametrize("key", KEYS)
def test_round_trip_error_is_within_half_a_code_step(key):
    # Neighbouring codes differ by the ratio r; nearest-by-midpoint is off by at most half a
    # step, (r - 1) / 2 of |x|, above the smallest code and by the smallest code below it.
    octaves = 32 / 255 if key == V else 24 / 127
    ratio = 2.0**octaves
    values = spread(8192, key)
    codes, scales = quantized(values, key, 256)
    back = np.array(storage.dequantize(mx.array(codes), mx.array(scales), code_table(key), 256))
    per_element = np.repeat(scales, 256)[: values.size].astype(np.float64)
    error = np.abs(back.astype(np.float64) - values)
    smallest = min(abs(t) for t in code_table(key))
    bound = np.abs(values) * (ratio - 1) / 2 * (1 + 1e-6) + smallest * per_element
    assert np.all(error <= bound)
    large = np.abs(values) >= smallest * per_element
    assert np.max(error[large] / np.abs(values[large])) > (ratio - 1) / 2 * 0.9  # bound is tight


@pytest.mark.parametrize("key", KEYS)
def test_compiled_quantize_and_dequantize_are_bit_identical(key):
    values = mx.array(spread(1000, key))
    table = code_table(key)
    eager = storage.quantize(values, table, 128)
    compiled = mx.compile(lambda x: storage.quantize(x, table, 128))(values)
    for a, b in zip(eager, compiled, strict=True):
        assert np.array_equal(np.array(a), np.array(b))
    round_trip = mx.compile(lambda c, s: storage.dequantize(c, s, table, 128))(*eager)
    assert np.array_equal(np.array(round_trip), np.array(storage.dequantize(*eager, table, 128)))


def test_quantize_and_dequantize_refuse_bad_arguments():
    codes, scales = storage.quantize(mx.ones((10,)), UNSIGNED_CODE, 4)
    with pytest.raises(ValueError, match=r"^block_size must be a positive int, got 0$"):
        storage.quantize(mx.ones((10,)), UNSIGNED_CODE, 0)
    with pytest.raises(ValueError, match=r"^block_size must be a positive int, got True$"):
        storage.dequantize(codes, scales, UNSIGNED_CODE, True)
    with pytest.raises(ValueError, match=r"^table must hold 256 codes, got 3$"):
        storage.quantize(mx.ones((10,)), (0.5, 0.75, 1.0), 4)
    with pytest.raises(ValueError, match=r"^codes must be uint8, got mlx.core.float32$"):
        storage.dequantize(mx.ones((10,)), scales, UNSIGNED_CODE, 4)
    message = (
        r"^scales must be float32 of shape \(3,\) for 10 codes in blocks of 4, "
        r"got mlx.core.float32 of shape \(2,\)$"
    )
    with pytest.raises(ValueError, match=message):
        storage.dequantize(codes, scales[:2], UNSIGNED_CODE, 4)
    message = r"^scales must be float32 of shape \(3,\) .* got mlx.core.float16 of shape \(3,\)$"
    with pytest.raises(ValueError, match=message):
        storage.dequantize(codes, scales.astype(mx.float16), UNSIGNED_CODE, 4)


# --- the rounding hash -----------------------------------------------------------------------


def test_mix32_equals_the_spec():
    samples = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, *RNG.integers(0, 2**32, 200).tolist()]
    ours = np.array(storage.mix32(mx.array(samples, dtype=mx.uint32))).tolist()
    assert ours == [mix32(x) for x in samples]


def test_rounding_bits_follow_the_spec_formula():
    key, index, output, shape = 0xABCDEF, 5, 3, (7, 9)
    ours = np.array(storage.rounding_bits(shape, mx.array(float(key)), index, output))
    tensor_key = mix32(key + ROUNDING_TENSOR_STRIDE * (index + 1))
    stream = (tensor_key + ROUNDING_OUTPUT_STRIDE * output) & 0xFFFFFFFF
    expected = [mix32(mix32(j) ^ stream) for j in range(63)]
    assert ours.shape == shape
    assert ours.reshape(-1).tolist() == expected
    assert np.array_equal(ours.reshape(-1), storage_numpy.rounding_bits(63, key, index, output))


def test_rounding_bits_differ_by_key_index_and_output():
    reference = np.array(storage.rounding_bits((4096,), mx.array(7.0), 0, 0))
    for key, index, output in ((8, 0, 0), (7, 1, 0), (7, 0, 1), (7, 0, 2)):
        other = np.array(storage.rounding_bits((4096,), mx.array(float(key)), index, output))
        assert np.mean(other == reference) < 0.01, (key, index, output)
    # Elements differ from one another (the counter is the element index).
    assert len(np.unique(reference)) > 4090


def test_mix32_and_rounding_bits_refuse_bad_arguments():
    with pytest.raises(ValueError, match=r"^mix32 needs a uint32 array, got mlx.core.int32$"):
        storage.mix32(mx.array([1, 2]))
    with pytest.raises(ValueError, match=r"^index must be a non-negative int, got -1$"):
        storage.rounding_bits((3,), mx.array(0.0), -1, 0)
    with pytest.raises(ValueError, match=r"^output must be a non-negative int, got 1.0$"):
        storage.rounding_bits((3,), mx.array(0.0), 0, 1.0)


# --- stochastic rounding ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", HALF)
def test_stochastic_round_matches_the_numpy_statement(fmt):
    x = (RNG.standard_normal(20000) * 10.0 ** RNG.integers(-10, 7, 20000)).astype(np.float32)
    x[:6] = [np.nan, np.inf, -np.inf, 1e6, -70000.0, 0.0]
    ours = bits(storage.stochastic_round(mx.array(x), HALF[fmt], mx.array(4242.0), 2, 1))
    expected = storage_numpy.stochastic_round(x, fmt, 4242, 2, 1)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], expected[~nan])
    assert np.isnan(storage_numpy.decode(ours[nan], fmt)).all()


def gap_and_fraction(x: float, fmt: str) -> tuple[float, float]:
    """Neighbours lo <= |x| <= hi in fmt; returns (hi - lo, (|x| - lo) / (hi - lo))."""
    lo_bits = storage_numpy.round_nearest(np.array([abs(x)], np.float32), fmt)
    lo = float(storage_numpy.decode(lo_bits, fmt)[0])
    if lo > abs(x):
        lo_bits = lo_bits - np.uint16(1)
        lo = float(storage_numpy.decode(lo_bits, fmt)[0])
    hi = float(storage_numpy.decode(lo_bits + np.uint16(1), fmt)[0])
    return hi - lo, (abs(x) - lo) / (hi - lo)


CASES = {
    # normal values at several fractions of the gap, both signs, and subnormals
    "float16": [1.0 + 2.0**-12, -3.0 - 0.3 * 2.0**-9, 1000.0 + 0.9 * 0.5, 3e-6, -2.5e-7],
    "bfloat16": [1.0 + 2.0**-9, -3.0 - 0.3 * 2.0**-6, 1e30 * (1 + 0.9 * 2.0**-7), 3e-39, -7e-40],
}


@pytest.mark.parametrize("fmt", HALF)
@pytest.mark.parametrize("case", range(5))
def test_stochastic_rounding_is_unbiased(fmt, case):
    x = float(np.float32(CASES[fmt][case]))
    draws = 1 << 16
    gap, fraction = gap_and_fraction(x, fmt)
    assert 0.0 < fraction < 1.0
    for key in (1.0, 977.0):
        rounded = storage.stochastic_round(mx.full((draws,), x), HALF[fmt], mx.array(key), 0, 0)
        values = np.array(rounded.astype(mx.float32)).astype(np.float64)
        assert set(np.unique(np.abs(values))) <= {
            abs(x) - fraction * gap,
            abs(x) + (1 - fraction) * gap,
        }
        # Each draw is lo or hi, hi with probability fraction (to 2^-24): 6 standard errors.
        bound = 6 * gap * math.sqrt(fraction * (1 - fraction) / draws) + gap * 2.0**-24
        assert abs(values.mean() - x) <= bound, (values.mean(), x, bound)


@pytest.mark.parametrize("fmt", HALF)
def test_representable_values_nan_and_inf_are_stored_as_they_are(fmt):
    exact = storage_numpy.decode(RNG.integers(0, 0x7C00, 4096).astype(np.uint16), fmt)
    exact = np.concatenate([exact, -exact, [0.0, -0.0, np.inf, -np.inf]]).astype(np.float32)
    rounded = storage.stochastic_round(mx.array(exact), HALF[fmt], mx.array(99.0), 0, 0)
    assert np.array_equal(bits(rounded), bits(mx.array(exact).astype(HALF[fmt])))
    nan = storage.stochastic_round(mx.array([np.nan, -np.nan]), HALF[fmt], mx.array(99.0), 0, 0)
    assert np.isnan(np.array(nan.astype(mx.float32))).all()


@pytest.mark.parametrize(
    ("fmt", "largest", "beyond"),
    [("float16", 65504.0, 65519.0), ("bfloat16", 3.3895313892515355e38, 3.39e38)],
)
def test_overflow_keeps_round_to_nearest(fmt, largest, beyond):
    draws = 4096
    # Between the largest finite value and the rounding threshold: always the largest (its
    # next value away from zero is Inf, whose fraction is 0).
    below = storage.stochastic_round(mx.full((draws,), beyond), HALF[fmt], mx.array(3.0), 0, 0)
    assert np.all(np.array(below.astype(mx.float32)) == np.float32(largest))
    # Rounding to nearest overflows: Inf, as round-to-nearest stores it.
    huge = storage.stochastic_round(
        mx.full((draws,), -3e38 if fmt == "float16" else -3.4e38), HALF[fmt], mx.array(3.0), 0, 0
    )
    assert np.all(np.array(huge.astype(mx.float32)) == -np.inf)


def test_stochastic_round_under_compile_is_bit_identical():
    x = mx.array((RNG.standard_normal(5000) * 10.0 ** RNG.integers(-9, 5, 5000)).astype(np.float32))
    key = mx.array(123456.0)
    for dtype in HALF.values():
        eager = storage.stochastic_round(x, dtype, key, 4, 2)
        compiled = mx.compile(lambda a, k, d=dtype: storage.stochastic_round(a, d, k, 4, 2))(x, key)
        assert np.array_equal(bits(eager), bits(compiled))


def test_stochastic_round_refuses_bad_arguments():
    with pytest.raises(
        ValueError, match=r"^stochastic_round rounds float32 results, got mlx.core.float16$"
    ):
        storage.stochastic_round(mx.ones((2,), mx.float16), mx.bfloat16, mx.array(0.0), 0, 0)
    with pytest.raises(
        ValueError, match=r"^stochastic_round stores float16 or bfloat16, got mlx.core.float32$"
    ):
        storage.stochastic_round(mx.ones((2,)), mx.float32, mx.array(0.0), 0, 0)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_stochastic_rounding_differentiates_like_the_nearest_cast(dtype):
    # Straight-through, as x.astype(dtype) differentiates; the choice carries no derivative.
    x = mx.array([1.001, 2.3, -0.7, -1e-42, 0.0, 3e-5, -65504.5])
    key = mx.array(77.0)

    def rounded(values):
        return storage.stochastic_round(values * 3, dtype, key, 2, 1).astype(mx.float32).sum()

    def nearest(values):
        return (values * 3).astype(dtype).astype(mx.float32).sum()

    assert mx.array_equal(mx.grad(rounded)(x), mx.grad(nearest)(x))
    tangent = mx.linspace(-1, 1, x.size)
    (jvp_rounded,) = mx.jvp(
        lambda v: storage.stochastic_round(v, dtype, key, 0, 0), [x], [tangent]
    )[1]
    assert mx.array_equal(jvp_rounded, tangent.astype(dtype))
    # The derivative path leaves the values bit for bit as they were.
    values = storage.stochastic_round(x, dtype, key, 0, 0)
    batched = mx.vmap(lambda v: storage.stochastic_round(v, dtype, key, 0, 0))(mx.stack([x, x]))
    assert np.array_equal(np.array(batched[0].view(mx.uint16)), np.array(values.view(mx.uint16)))


def test_8_bit_buffers_differentiate_through_their_scales():
    values = mx.linspace(0.0, 3.0, 300)

    def round_trip(v):
        codes, scales = storage.quantize(v, UNSIGNED_CODE, 256)
        return storage.dequantize(codes, scales, UNSIGNED_CODE, 256).sum()

    gradient = mx.grad(round_trip)(values)
    # Only each block's largest element moves its scale; the codes are constants.
    assert np.count_nonzero(np.array(gradient)) == 2
    assert mx.isfinite(mx.jvp(round_trip, [values], [mx.ones_like(values)])[1][0]).item()
