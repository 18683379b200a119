"""An independent NumPy statement of issue 17's storage rules (8-bit block codes, stochastic
rounding) and of one float32 RMSprop step that uses them, written from the rules in
mlx_rmsprop/spec.py and docs, not from mlx_rmsprop's MLX code: codes by ``searchsorted``
instead of a binary search, bfloat16 by integer bit arithmetic, float16 neighbours by
``np.nextafter``. The reference, the native op and the kernels are all checked against it.

float16/bfloat16 values travel as their uint16 bit patterns (``"float16"``/``"bfloat16"``
formats); :func:`decode` turns them into float32.
"""

from __future__ import annotations

import numpy as np

from mlx_rmsprop.spec import (
    ROUNDING_OUTPUT_STRIDE,
    ROUNDING_TENSOR_STRIDE,
    code_midpoints,
    code_table,
    scale_key,
)

HALF_FORMATS = ("float16", "bfloat16")


def mix32(x: np.ndarray) -> np.ndarray:
    """spec.mix32 on a uint32 NumPy array (NumPy array arithmetic wraps modulo 2^32)."""
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x21F0AAAD)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0xD35A2D97)
    return x ^ (x >> np.uint32(15))


def rounding_bits(size: int, key: int, index: int, output: int) -> np.ndarray:
    """The uint32 random bits of elements 0..size-1 (row-major) of one output."""
    mask = 0xFFFFFFFF
    tensor_key = int(mix32(np.array([(key + ROUNDING_TENSOR_STRIDE * (index + 1)) & mask]))[0])
    stream = np.uint32((tensor_key + ROUNDING_OUTPUT_STRIDE * output) & mask)
    j = (np.arange(size, dtype=np.uint64) & mask).astype(np.uint32)
    return mix32(mix32(j) ^ stream)


def decode(bits: np.ndarray, fmt: str) -> np.ndarray:
    """float32 values of uint16 ``bits`` in ``fmt``."""
    bits = np.asarray(bits, dtype=np.uint16)
    if fmt == "float16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_nearest(x: np.ndarray, fmt: str) -> np.ndarray:
    """uint16 bits of float32 ``x`` rounded to nearest even in ``fmt`` (NaN: a quiet NaN)."""
    x = np.asarray(x, dtype=np.float32)
    if fmt == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).view(np.uint16)
    word = x.view(np.uint32).astype(np.uint64)
    rounded = ((word + 0x7FFF + ((word >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((word >> 16) | 0x40).astype(np.uint16)
    return np.where(np.isnan(x), quiet_nan, rounded)


def _toward_zero(x: np.ndarray, fmt: str) -> np.ndarray:
    """uint16 bits of the largest-magnitude value of ``fmt`` not above |x|, x's sign (finite x)."""
    if fmt == "bfloat16":
        return (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    nearest = x.astype(np.float16)
    too_far = np.abs(nearest.astype(np.float32)) > np.abs(x)
    towards = np.nextafter(nearest, np.float16(0.0) * np.sign(nearest))
    # nextafter towards +0 from a negative value: keep the sign of x.
    return np.where(too_far, towards, nearest).view(np.uint16)


def stochastic_round(x: np.ndarray, fmt: str, key: int, index: int, output: int) -> np.ndarray:
    """uint16 bits of float32 ``x`` rounded stochastically to ``fmt`` by the spec's rule."""
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(-1)
    nearest = round_nearest(flat, fmt)
    y = decode(nearest, fmt)
    exact = np.isnan(flat) | (y == flat) | np.isinf(y)
    safe = np.where(exact, np.float32(0.0), flat)
    lo = _toward_zero(safe, fmt)
    hi = lo + np.uint16(1)
    low, high = np.abs(decode(lo, fmt)), np.abs(decode(hi, fmt))
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = (np.abs(safe) - low) / (high - low)
    draw = (rounding_bits(flat.size, key, index, output) >> np.uint32(8)).astype(
        np.float32
    ) * np.float32(2.0**-24)
    result = np.where(exact, nearest, np.where(draw < frac, hi, lo))
    return result.astype(np.uint16).reshape(x.shape)


def quantize(values: np.ndarray, key: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 codes of values' shape, float32 scales per block) for buffer ``key``."""
    x = np.asarray(values, dtype=np.float32).reshape(-1)
    midpoints = np.array(code_midpoints(code_table(key)), dtype=np.float32)
    codes = np.zeros(x.size, dtype=np.uint8)
    scales = np.zeros(-(-x.size // block_size), dtype=np.float32)
    for block in range(scales.size):
        part = x[block * block_size : (block + 1) * block_size]
        scale = np.float32(np.nan) if np.isnan(part).any() else np.abs(part).max()
        scales[block] = scale
        with np.errstate(invalid="ignore", divide="ignore"):
            y = np.zeros_like(part) if scale == 0 else part / scale
        code = np.searchsorted(midpoints, y, side="left")
        codes[block * block_size : (block + 1) * block_size] = np.where(np.isnan(y), 0, code)
    return codes.reshape(np.shape(values)), scales


def dequantize(codes: np.ndarray, scales: np.ndarray, key: str, block_size: int) -> np.ndarray:
    """float32 values of ``codes`` with per-block ``scales`` for buffer ``key``."""
    table = np.array(code_table(key), dtype=np.float32)
    flat = np.asarray(codes).reshape(-1)
    per_element = np.repeat(np.asarray(scales, dtype=np.float32), block_size)[: flat.size]
    return (table[flat] * per_element).reshape(np.shape(codes))


def rmsprop_step(
    config: dict,
    hyper: dict,
    parameter: np.ndarray,
    fmt: str,
    gradient: np.ndarray,
    state: dict,
    *,
    index: int = 0,
) -> tuple[np.ndarray, dict]:
    """One float32 RMSprop step with 8-bit state and stochastic rounding.

    ``config``: ``centered``, ``momentum``, ``nesterov``, ``lr_in_momentum``, ``eps_in_sqrt``,
    ``quantized``, ``block_size``, ``stochastic_rounding``, ``state_format`` (format of float
    state buffers). ``hyper``: float32 ``lr``, ``alpha``, ``one_minus_alpha``, ``eps``, ``mu``,
    ``gate`` (0 or 1), ``key`` (the 24-bit rounding key). ``parameter`` holds float32 values
    (``fmt == "float32"``) or uint16 bits. ``state`` holds, per buffer, codes and
    ``*_scale`` arrays when quantized, else values/bits in ``state_format``. Operations run in
    the order of the reference's equations, each rounded to float32."""
    f32 = np.float32
    block = config.get("block_size", 256)
    state_format = config.get("state_format", "float32")
    keys = ["v"] + (["grad_avg"] if config.get("centered") else [])
    keys += ["momentum_buffer"] if config.get("momentum") else []
    state_keys = [
        k for key in keys for k in ([key, scale_key(key)] if config.get("quantized") else [key])
    ]

    def load(value: np.ndarray, form: str) -> np.ndarray:
        return np.asarray(value, f32) if form == "float32" else decode(value, form)

    def read(key: str) -> np.ndarray:
        if config.get("quantized"):
            return dequantize(state[key], state[scale_key(key)], key, block)
        return load(state[key], state_format)

    def store(value: np.ndarray, form: str, output: int) -> np.ndarray:
        if form == "float32":
            return value.astype(f32)
        if config.get("stochastic_rounding"):
            return stochastic_round(value, form, int(hyper["key"]), index, output)
        return round_nearest(value, form)

    lr, alpha, one_minus_alpha = (
        f32(hyper["lr"]),
        f32(hyper["alpha"]),
        f32(hyper["one_minus_alpha"]),
    )
    eps, mu = f32(hyper["eps"]), f32(hyper.get("mu", 0.0))
    p = load(parameter, fmt)
    g = np.asarray(gradient, f32)
    with np.errstate(all="ignore"):
        new = {"v": alpha * read("v") + one_minus_alpha * (g * g)}
        variance = new["v"]
        if config.get("centered"):
            new["grad_avg"] = alpha * read("grad_avg") + one_minus_alpha * g
            variance = np.maximum(variance - new["grad_avg"] * new["grad_avg"], f32(0.0))
        denom = np.sqrt(variance + eps) if config.get("eps_in_sqrt") else np.sqrt(variance) + eps
        if config.get("momentum"):
            if config.get("lr_in_momentum"):
                increment = lr * g / denom
                new["momentum_buffer"] = mu * read("momentum_buffer") + increment
                buf = new["momentum_buffer"]
                delta = increment + mu * buf if config.get("nesterov") else buf
            else:
                direction = g / denom
                new["momentum_buffer"] = mu * read("momentum_buffer") + direction
                buf = new["momentum_buffer"]
                delta = lr * (direction + mu * buf) if config.get("nesterov") else lr * buf
        else:
            delta = lr * g / denom
        p_new = p - delta
    keep = hyper.get("gate", 1) == 0
    if keep:
        return np.array(parameter), {key: np.array(value) for key, value in state.items()}
    out = {}
    for key, value in new.items():
        if config.get("quantized"):
            out[key], out[scale_key(key)] = quantize(value, key, block)
        else:
            out[key] = store(value, state_format, 1 + state_keys.index(key))
    return store(p_new, fmt, 0), out
