"""RMSprop with its state kept in a chosen 8-bit format, in plain MLX ops: the baselines and
the alternative code tables the memory benchmark compares ``RMSprop(state_bits=8)`` with.

Nothing here is part of the package. :class:`CodedStateRMSprop` is MLX's optimizer contract
(``init_single``/``apply_single``) around the same float32 arithmetic as
``mlx_rmsprop.reference`` (``v = alpha v + (1 - alpha) g^2``, the step from the new float32
``v``), with ``v`` (and the momentum buffer) stored through a codec:

- :class:`TableCodec`: the package's format (uint8 codes, one float32 absmax scale per block,
  a code = the number of table midpoints below ``x / scale``) with any 256-entry table. With
  ``mlx_rmsprop.spec``'s tables it is the package's rule, restated; with others it measures
  what the table choice does.
- :class:`AffineCodec`: the naive baseline, MLX's affine ``mx.quantize`` (8 bits, groups of
  64) of the buffer, dequantized with ``mx.dequantize`` each step.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from mlx.optimizers import Optimizer

# bitsandbytes keeps tensors below 4096 elements in float32; the package does the same
# (``min_quantized_size``), and so do these baselines, so that only the format differs.
MIN_QUANTIZED_SIZE = 4096


def _midpoints(table: np.ndarray) -> np.ndarray:
    return ((table[:-1] + table[1:]) / 2).astype(np.float32)


class TableCodec:
    """Blockwise absmax quantization against a sorted 256-entry ``table`` (values in [-1, 1]):
    ``scale = max |x|`` over each block of ``block_size`` row-major elements (NaN when the
    block holds one), ``code = #{midpoints < x / scale}`` (0 for an all-zero block), and
    ``value = table[code] * scale``."""

    def __init__(self, table, block_size: int = 256):
        table = np.asarray(table, np.float32)
        if table.shape != (256,) or np.any(np.diff(table) < 0):
            raise ValueError(f"a code table needs 256 sorted values, got shape {table.shape}")
        self.table = mx.array(table)
        self.midpoints = mx.array(_midpoints(table))
        self.block_size = block_size

    def _blocks(self, x: mx.array) -> mx.array:
        n = x.size
        count = max(math.ceil(n / self.block_size), 1) if n else 0
        flat = x.reshape(-1)
        padding = count * self.block_size - n
        if padding:
            # Zeros leave a block's absmax as it is.
            flat = mx.concatenate([flat, mx.zeros((padding,), flat.dtype)])
        return flat.reshape(count, self.block_size)

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        blocks = self._blocks(x.astype(mx.float32))
        absmax = mx.max(mx.abs(blocks), axis=1)
        scale = mx.where(mx.any(mx.isnan(blocks), axis=1), mx.array(math.nan), absmax)
        scale = scale[:, None]
        y = mx.where(scale == 0, mx.array(0.0), blocks / scale)
        code = mx.zeros(y.shape, mx.uint32)
        for half in (128, 64, 32, 16, 8, 4, 2, 1):
            code = mx.where(y > self.midpoints[code + (half - 1)], code + half, code)
        codes = code.astype(mx.uint8).reshape(-1)[: x.size].reshape(x.shape)
        return {"codes": codes, "scale": scale.reshape(-1)}

    def decode(self, stored: dict[str, mx.array], shape: tuple[int, ...]) -> mx.array:
        blocks = self._blocks(self.table[stored["codes"].astype(mx.uint32)])
        values = blocks * stored["scale"][:, None]
        return values.reshape(-1)[: math.prod(shape)].reshape(shape)


class AffineCodec:
    """MLX's affine quantization (``mx.quantize``, 8 bits, ``group_size`` elements per
    scale and bias), the obvious way to store a buffer in 8 bits with MLX. Tensors are
    flattened and zero-padded to whole groups."""

    def __init__(self, group_size: int = 64, bits: int = 8):
        self.group_size = group_size
        self.bits = bits

    def encode(self, x: mx.array) -> dict[str, mx.array]:
        flat = x.astype(mx.float32).reshape(-1)
        padding = -flat.size % self.group_size
        if padding:
            flat = mx.concatenate([flat, mx.zeros((padding,), mx.float32)])
        codes, scales, biases = mx.quantize(
            flat.reshape(-1, self.group_size), group_size=self.group_size, bits=self.bits
        )
        return {"codes": codes, "scales": scales, "biases": biases}

    def decode(self, stored: dict[str, mx.array], shape: tuple[int, ...]) -> mx.array:
        values = mx.dequantize(
            stored["codes"],
            stored["scales"],
            stored["biases"],
            group_size=self.group_size,
            bits=self.bits,
        )
        return values.reshape(-1)[: math.prod(shape)].reshape(shape)


class CodedStateRMSprop(Optimizer):
    r"""RMSprop whose ``v`` (and momentum buffer) is stored through ``codec``
    (``momentum_codec``) for tensors of at least ``min_quantized_size`` elements:

    .. math::

        v \leftarrow \alpha\, \mathrm{dec}(v) + (1-\alpha) g^2,\quad
        d = \sqrt{v} + \epsilon \text{ (or } \sqrt{v + \epsilon}\text{ with eps\_in\_sqrt)},

    :math:`p \leftarrow p - \eta g / d`, or with momentum :math:`\mu`:
    :math:`b \leftarrow \mu\,\mathrm{dec}(b) + g / d`, :math:`p \leftarrow p - \eta b`; then
    the new buffers are stored as ``enc(v)``, ``enc(b)``. The arithmetic is float32 in the
    order of ``mlx_rmsprop.reference``; the parameter is cast back to its dtype."""

    def __init__(
        self,
        learning_rate: float,
        alpha: float = 0.99,
        eps: float = 1e-8,
        *,
        momentum: float = 0.0,
        eps_in_sqrt: bool = False,
        codec: TableCodec | AffineCodec,
        momentum_codec: TableCodec | AffineCodec | None = None,
        min_quantized_size: int = MIN_QUANTIZED_SIZE,
    ):
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)
        self.alpha = alpha
        self.eps = eps
        self.momentum = momentum
        self.eps_in_sqrt = eps_in_sqrt
        self.codec = codec
        self.momentum_codec = momentum_codec or codec
        self.min_quantized_size = min_quantized_size

    def _buffers(self) -> list[tuple[str, TableCodec | AffineCodec]]:
        buffers = [("v", self.codec)]
        if self.momentum > 0:
            buffers.append(("momentum_buffer", self.momentum_codec))
        return buffers

    def init_single(self, parameter: mx.array, state: dict) -> None:
        quantized = parameter.size >= self.min_quantized_size
        for key, codec in self._buffers():
            zeros = mx.zeros(parameter.shape, mx.float32)
            state[key] = codec.encode(zeros) if quantized else zeros

    def _load(self, state: dict, key: str, codec, shape) -> mx.array:
        stored = state[key]
        return codec.decode(stored, shape) if isinstance(stored, dict) else stored

    def _store(self, state: dict, key: str, codec, value: mx.array) -> None:
        state[key] = codec.encode(value) if isinstance(state[key], dict) else value

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        f32 = mx.float32
        g = gradient.astype(f32)
        p = parameter.astype(f32)
        alpha = mx.array(self.alpha, f32)
        one_minus_alpha = mx.array(1.0 - self.alpha, f32)
        eps = mx.array(self.eps, f32)
        lr = self.learning_rate.astype(f32)
        v = alpha * self._load(state, "v", self.codec, g.shape) + one_minus_alpha * mx.square(g)
        denominator = mx.sqrt(v + eps) if self.eps_in_sqrt else mx.sqrt(v) + eps
        if self.momentum > 0:
            old = self._load(state, "momentum_buffer", self.momentum_codec, g.shape)
            buffer = mx.array(self.momentum, f32) * old + g / denominator
            self._store(state, "momentum_buffer", self.momentum_codec, buffer)
            delta = lr * buffer
        else:
            delta = lr * g / denominator
        self._store(state, "v", self.codec, v)
        return (p - delta).astype(parameter.dtype)
