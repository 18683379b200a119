"""The 8-bit code tables the code-table study compares: the package's zero-free logarithmic
codes (``mlx_rmsprop.spec``), the same with other octave ranges, the same with a zero, a
linear code and bitsandbytes' dynamic map. Each entry is ``(unsigned table for v, signed table
for grad_avg and the momentum buffer)``, 256 sorted float32 values in [-1, 1]."""

from __future__ import annotations

import numpy as np

from mlx_rmsprop import spec


def logarithmic(octaves: float, signed: bool) -> np.ndarray:
    """Geometric codes spanning ``octaves`` octaves below 1, without a zero: unsigned,
    ``2^(-octaves (255 - c) / 255)``; signed, 128 magnitudes ``2^(-octaves c / 127)`` with
    both signs (``spec.UNSIGNED_CODE``/``SIGNED_CODE`` are 32 and 24 octaves)."""
    if not signed:
        return (2.0 ** (-octaves * (255 - np.arange(256)) / 255)).astype(np.float32)
    magnitudes = (2.0 ** (-octaves * np.arange(128) / 127)).astype(np.float32)
    return np.concatenate([-magnitudes, magnitudes[::-1]])


def with_zero(unsigned: np.ndarray, signed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smallest unsigned code, and the negative signed code nearest zero, replaced by 0:
    what a code that can store zero does to small values."""
    unsigned, signed = unsigned.copy(), signed.copy()
    unsigned[0] = 0.0
    signed[127] = 0.0
    return unsigned, signed


def linear(signed: bool) -> np.ndarray:
    """Evenly spaced codes: ``c / 255``, or 256 values from -1 to 1."""
    return np.linspace(-1.0 if signed else 0.0, 1.0, 256).astype(np.float32)


def dynamic_map(signed: bool, exponent_bits: int = 7) -> np.ndarray:
    """bitsandbytes' dynamic map (``create_dynamic_map``, the default of its 8-bit
    optimizers): for each decade ``10^(i - 6)``, i = 0..6, the midpoints of ``2^i`` (signed)
    or ``2^(i+1)`` (unsigned) equal steps of [0.1, 1] scaled by the decade, each magnitude with
    both signs when signed; plus 0 and 1. Its smallest nonzero magnitude is 3.25e-7 of the
    block's largest unsigned (21.6 octaves), 5.5e-7 signed, and it holds a zero."""
    values = [0.0, 1.0]
    for i in range(exponent_bits):
        count = 2**i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1.0, count + 1)
        means = 10.0 ** (i - (exponent_bits - 1)) * (edges[:-1] + edges[1:]) / 2
        values += list(means)
        if signed:
            values += list(-means)
    table = np.sort(np.array(values, np.float64)).astype(np.float32)
    assert table.shape == (256,), table.shape
    return table


def candidates() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every table pair the study measures, by name; the package's first."""
    ours = (np.array(spec.UNSIGNED_CODE, np.float32), np.array(spec.SIGNED_CODE, np.float32))
    pairs = {
        f"log {spec.UNSIGNED_CODE_OCTAVES}/{spec.SIGNED_CODE_OCTAVES} octaves (ours)": ours,
    }
    for v_octaves, m_octaves in ((16, 16), (24, 16), (48, 32), (64, 48)):
        pairs[f"log {v_octaves}/{m_octaves} octaves"] = (
            logarithmic(v_octaves, False),
            logarithmic(m_octaves, True),
        )
    pairs["ours with a zero code"] = with_zero(*ours)
    pairs["bitsandbytes dynamic map"] = (dynamic_map(False), dynamic_map(True))
    pairs["linear"] = (linear(False), linear(True))
    return pairs
