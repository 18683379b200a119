"""What the quality runs compare: the weight dtype and how the optimizer stores its state."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlx_rmsprop import RMSprop

from .emulation import AffineCodec, CodedStateRMSprop


@dataclass(frozen=True)
class Configuration:
    """One column of the quality table. ``hyper`` (the workload's RMSprop arguments) is the
    same for every configuration; only the weight dtype and the state storage differ."""

    key: str
    label: str
    weights: mx.Dtype
    state_bits: int = 32
    stochastic_rounding: bool = False
    # The naive baseline: v through mx.quantize (affine, 8 bits, groups of 64).
    naive: bool = False

    def optimizer(self, hyper: dict) -> RMSprop | CodedStateRMSprop:
        if self.naive:
            return CodedStateRMSprop(**hyper, codec=AffineCodec(group_size=64, bits=8))
        extra = {}
        # Passed only when they differ from the defaults, so that the float32 configurations
        # also run on a build without the 8-bit arguments.
        if self.state_bits != 32:
            extra["state_bits"] = self.state_bits
        if self.stochastic_rounding:
            extra["stochastic_rounding"] = True
        return RMSprop(**hyper, **extra)


CONFIGURATIONS: dict[str, Configuration] = {
    c.key: c
    for c in (
        Configuration("float32", "float32 weights, float32 state", mx.float32),
        Configuration("8bit", "float32 weights, 8-bit state", mx.float32, state_bits=8),
        Configuration("bf16", "bf16 weights, round to nearest", mx.bfloat16),
        Configuration(
            "bf16-sr", "bf16 weights, stochastic rounding", mx.bfloat16, stochastic_rounding=True
        ),
        Configuration(
            "bf16-8bit-sr",
            "bf16 weights, 8-bit state, stochastic rounding",
            mx.bfloat16,
            state_bits=8,
            stochastic_rounding=True,
        ),
        Configuration(
            "naive",
            "naive: v through mx.quantize (affine, 8-bit, group 64)",
            mx.float32,
            naive=True,
        ),
    )
}
