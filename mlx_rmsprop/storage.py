"""How the update's results are stored: 8-bit block codes and stochastic rounding, in MLX ops.

These are the normative definitions (:func:`~mlx_rmsprop.reference.rmsprop_reference` calls
them; the native op and the Metal/CUDA kernels are tested bit-exact against them). The code
tables, their midpoints and the rounding hash's constants come from :mod:`mlx_rmsprop.spec`.

Quantized buffer format: ``codes`` (uint8, the buffer's shape) and ``scales`` (float32, shape
``(ceil(n / block_size),)``), block ``b`` holding the logical row-major elements
``[b * block_size, min((b + 1) * block_size, n))``; a 0-d buffer is one block of one element,
an empty one has no blocks. Everything here works on the logical row-major order, so
non-contiguous inputs need no copy by the caller.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from .spec import MIX32_MULTIPLIERS, ROUNDING_OUTPUT_STRIDE, ROUNDING_TENSOR_STRIDE, code_midpoints

__all__ = [
    "ROUNDED_DTYPES",
    "dequantize",
    "mix32",
    "quantize",
    "rounding_bits",
    "stochastic_round",
]

_MASK32 = 0xFFFFFFFF
# Float dtypes a float32 result can be stochastically rounded to.
ROUNDED_DTYPES = (mx.float16, mx.bfloat16)


@cache
def _float32_constant(values: tuple[float, ...]) -> mx.array:
    # Built once per table: a constant input of every compiled graph that uses it.
    return mx.array(values, dtype=mx.float32)


def _uint32(value: int) -> mx.array:
    return mx.array(value & _MASK32, dtype=mx.uint32)


def _uint8(value: int) -> mx.array:
    return mx.array(value, dtype=mx.uint8)


def _blocks(flat: mx.array, block_size: int) -> mx.array:
    """``flat`` (1-D) zero-padded to whole blocks, as ``(blocks, block_size)``."""
    n = flat.size
    padding = -n % block_size
    if padding:
        flat = mx.concatenate([flat, mx.zeros((padding,), dtype=flat.dtype)])
    return flat.reshape(-1, block_size)


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_table(table: tuple[float, ...]) -> None:
    if len(table) != 256:
        raise ValueError(f"table must hold 256 codes, got {len(table)}")


def dequantize(
    codes: mx.array, scales: mx.array, table: tuple[float, ...], block_size: int
) -> mx.array:
    """The float32 values that 8-bit ``codes`` with per-block ``scales`` stand for:
    ``table[code] * scales[block]`` (one float32 multiply), in the shape of ``codes``.

    Args:
        codes: uint8 codes, any shape (read in logical row-major order).
        scales: float32, shape ``(ceil(codes.size / block_size),)``.
        table: the 256-entry code table (:func:`~mlx_rmsprop.spec.code_table`).
        block_size: elements per block.
    """
    _check_block_size(block_size)
    _check_table(table)
    if codes.dtype != mx.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    blocks = -(-codes.size // block_size)
    if scales.dtype != mx.float32 or scales.shape != (blocks,):
        raise ValueError(
            f"scales must be float32 of shape ({blocks},) for {codes.size} codes in blocks of "
            f"{block_size}, got {scales.dtype} of shape {scales.shape}"
        )
    if codes.size == 0:
        return mx.zeros(codes.shape, dtype=mx.float32)
    # Codes are indices: no derivative flows through them (transforms differentiate the
    # scales, the one real-valued input), and MLX refuses a vjp with respect to indices.
    codes = mx.stop_gradient(codes)
    values = mx.take_along_axis(_float32_constant(tuple(table))[None], codes.reshape(1, -1), axis=1)
    values = values.reshape(-1)
    scaled = _blocks(values, block_size) * scales[:, None]
    return scaled.reshape(-1)[: codes.size].reshape(codes.shape)


def quantize(
    values: mx.array, table: tuple[float, ...], block_size: int
) -> tuple[mx.array, mx.array]:
    """8-bit codes and per-block scales for ``values``, the rule every path follows.

    Per block: ``scale`` = NaN if any element is NaN, else ``max |x|`` over its elements;
    ``y = 0 if scale == 0 else x / scale`` (float32 division); ``code`` = the number of
    midpoints (:func:`~mlx_rmsprop.spec.code_midpoints`) strictly below ``y``, by an 8-step
    binary search: a value on a midpoint takes the lower code and NaN takes code 0. An
    Inf makes its block's scale Inf: its finite elements get ``y = 0``, the Inf ``y = NaN``.

    Args:
        values: the buffer (any float dtype, computed on as float32), any shape.
        table: the 256-entry code table (:func:`~mlx_rmsprop.spec.code_table`).
        block_size: elements per block.

    Returns:
        ``(codes, scales)``: uint8 of ``values.shape`` and float32 of shape
        ``(ceil(values.size / block_size),)``.
    """
    _check_block_size(block_size)
    _check_table(table)
    n = values.size
    if n == 0:
        return mx.zeros(values.shape, dtype=mx.uint8), mx.zeros((0,), dtype=mx.float32)
    # Zero padding changes neither a block's max |x| nor whether it holds a NaN.
    x = _blocks(values.astype(mx.float32).reshape(-1), block_size)
    absmax = mx.max(mx.abs(x), axis=1)
    scales = mx.where(mx.any(mx.isnan(x), axis=1), mx.array(float("nan")), absmax)
    scale = scales[:, None]
    y = mx.where(scale == 0, mx.array(0.0), x / scale)
    # Binary search over the 255 midpoints: 8 lookups per element, no 255-wide comparison.
    # uint8 codes through take_along_axis on one row: several times faster on the CPU than
    # mx.take with wider indices (measured on 2^22 elements), and a quarter of the memory.
    midpoints = _float32_constant(code_midpoints(tuple(table)))[None]
    y = y.reshape(1, -1)
    codes = mx.zeros(y.shape, dtype=mx.uint8)
    for half in (128, 64, 32, 16, 8, 4, 2, 1):
        probe = mx.take_along_axis(midpoints, codes + _uint8(half - 1), axis=1)
        codes = mx.stop_gradient(codes + (y > probe).astype(mx.uint8) * _uint8(half))
    return codes.reshape(-1)[:n].reshape(values.shape), scales


def mix32(x: mx.array) -> mx.array:
    """:func:`mlx_rmsprop.spec.mix32` on uint32 arrays (wrap-around arithmetic)."""
    if x.dtype != mx.uint32:
        raise ValueError(f"mix32 needs a uint32 array, got {x.dtype}")
    x = x ^ (x >> _uint32(16))
    x = x * _uint32(MIX32_MULTIPLIERS[0])
    x = x ^ (x >> _uint32(15))
    x = x * _uint32(MIX32_MULTIPLIERS[1])
    return x ^ (x >> _uint32(15))


def rounding_bits(shape: tuple[int, ...], key: mx.array, index: int, output: int) -> mx.array:
    """The 32 random bits ``r`` of each element of output ``output`` of the parameter at
    position ``index``, as uint32 of ``shape``:
    ``r = mix32(mix32(j) ^ (mix32(key + 0x9E3779B9 (index + 1)) + 0x85EBCA6B output))``,
    ``j`` the logical row-major element index (uint32, wrapping beyond 2^32).

    Args:
        shape: the stored array's shape.
        key: this step's ``Scalar.ROUNDING_KEY``, an integer below 2^24 held in any dtype.
        index: the parameter's position in the step's parameter list (>= 0).
        output: 0 for the parameter, 1 + the position in ``state_keys`` for a state buffer.
    """
    for name, value in (("index", index), ("output", output)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    size = 1
    for extent in shape:
        size *= extent
    if size <= 1 << 32:
        j = mx.arange(size, dtype=mx.uint32)
    else:
        j = mx.arange(size, dtype=mx.uint64).astype(mx.uint32)
    tensor_key = mix32(key.astype(mx.uint32) + _uint32(ROUNDING_TENSOR_STRIDE * (index + 1)))
    stream = tensor_key + _uint32(ROUNDING_OUTPUT_STRIDE * output)
    return mix32(mix32(j) ^ stream).reshape(shape)


def stochastic_round(
    x: mx.array, dtype: mx.Dtype, key: mx.array, index: int, output: int
) -> mx.array:
    """``x`` (float32) stored as ``dtype`` (float16 or bfloat16), rounded stochastically.

    With ``y`` = ``x`` rounded to nearest even in ``dtype``: ``y`` itself when ``x`` is NaN,
    ``y == x`` or ``y`` is infinite (overflow keeps round-to-nearest). Otherwise ``lo`` and
    ``hi`` are the neighbours of ``x`` in ``dtype`` (``y`` and the next value away from zero,
    or the next value towards zero and ``y``; the same sign as ``y``), and the result is
    ``hi`` when ``(r >> 8) * 2^-24 < (|x| - |lo|) / (|hi| - |lo|)`` else ``lo``, ``r`` from
    :func:`rounding_bits`. Each operand is exact in float32, so the expected result is ``x``
    to within 2^-24 of the gap. Arguments after ``dtype`` as in :func:`rounding_bits`.
    """
    if x.dtype != mx.float32:
        raise ValueError(f"stochastic_round rounds float32 results, got {x.dtype}")
    if dtype not in ROUNDED_DTYPES:
        raise ValueError(f"stochastic_round stores float16 or bfloat16, got {dtype}")
    u = rounding_bits(x.shape, key, index, output) >> _uint32(8)
    nearest = x.astype(dtype)
    # The choice is made on values held constant: it carries no derivative (and MLX has no
    # vjp for the bit views that give the neighbours).
    held_x = mx.stop_gradient(x)
    held = mx.stop_gradient(nearest)
    y = held.astype(mx.float32)
    exact = mx.isnan(held_x) | (y == held_x) | mx.isinf(y)
    away = mx.abs(y) < mx.abs(held_x)
    bits = held.view(mx.uint16)
    one = mx.array(1, dtype=mx.uint16)
    # Unselected lanes may wrap (bits 0 - 1): harmless, `exact` or `away` discards them.
    neighbour = mx.where(away, bits + one, bits - one).view(dtype)
    lo = mx.where(away, held, neighbour)
    hi = mx.where(away, neighbour, held)
    low = mx.abs(lo.astype(mx.float32))
    frac = (mx.abs(held_x) - low) / (mx.abs(hi.astype(mx.float32)) - low)
    draw = u.astype(mx.float32) * mx.array(2.0**-24)
    chosen = mx.where(draw < frac, hi, lo)
    # Straight-through derivative, as the round-to-nearest cast has: chosen - (held - n) is
    # chosen bit for bit (n is finite in these lanes, so held - n is +0, and subtracting +0
    # keeps the sign of a zero) and differentiates as n = x.astype(dtype).
    chosen = chosen - (held - nearest)
    return mx.where(exact, nearest, chosen)
