"""benchmarks/native_state_bits.py on a tiny size: its output and the arithmetic of its state
bytes (timings are never asserted)."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from benchmarks import native_state_bits
from mlx_rmsprop.spec import UpdateOptions

from native_available import requires_native


@requires_native
def test_prints_one_comparison_per_option_set():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = native_state_bits.main(
            ["--log2-size", "10", "--rounds", "2", "--options", "", "--options", "momentum"]
        )
    assert status == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("native CPU path: ")
    assert [line.split(":")[0] for line in lines[1:]] == ["defaults", "momentum"]
    for line in lines[1:]:
        assert "2^10 elements, 2 rounds" in line and "8-bit/float32 wall " in line
    # v (and momentum_buffer) as 1024 uint8 codes and 4 float32 scales against 1024 float32.
    assert lines[1].endswith(f"state bytes {(1024 + 16) / 4096:.3f}x")


@requires_native
def test_compare_keeps_the_options_and_pairs_every_round():
    result = native_state_bits.compare(UpdateOptions(centered=True), 1 << 9, rounds=3)
    assert result.options == UpdateOptions(centered=True)
    assert result.float32_state_bytes == 2 * 4 * 512
    assert result.bits8_state_bytes == 2 * (512 + 2 * 4)
    assert result.ratio[0] <= result.ratio[1] <= result.ratio[2]


def test_unknown_option_names_the_choices():
    with pytest.raises(argparse.ArgumentTypeError, match="unknown option.*centred"):
        native_state_bits.parse_options("centred")
