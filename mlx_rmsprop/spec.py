"""The one statement of what a fused update is told, shared by every path and every language.

Every path (plain reference ops, the compiled graph, the Metal/CUDA kernels, the native CPU op)
takes the same things: an ``UpdateOptions`` (static, selects code, part of every cache key), a
small ``scalars`` vector (data, changes per step, never part of a cache key) laid out as
``Scalar`` says, and the state buffers ``UpdateOptions.state_keys`` names. Their update
functions all have the signature ``UpdateFn``.

The invariants between options are stated here once (``REQUIREMENTS``, ``EXCLUSIONS``) and
``option_space()`` is the one enumeration of valid option sets. The C++ side does not restate
any of this: ``python tools/generate_spec_header.py`` writes ``mlx_rmsprop/paths/native/spec.h``
(X-macro lists of the scalars, the flags and the invariants), which a test keeps equal to this
module.

It imports nothing but the standard library: benchmarks/gpu_kernel_check.py loads it by path on
GPU machines where mlx_rmsprop is not installed.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mlx.core as mx


class Scalar(IntEnum):
    """Index of each per-step value in the ``scalars`` vector (dtype = the arithmetic dtype)."""

    LR = 0
    ALPHA = 1
    # 1 - alpha rounded once from float64: computing it in float32 would differ from every
    # framework, which all form (1 - alpha) in Python double precision.
    ONE_MINUS_ALPHA = 2
    EPS = 3
    MOMENTUM = 4
    WEIGHT_DECAY = 5
    # 1 - alpha**t (t = 1-based step) when bias correction is on, else 1.
    BIAS_CORRECTION = 6
    # Keras pipeline: g / loss_scale_factor, then g * CLIP_MULTIPLIER / CLIP_DIVISOR
    # (clipnorm: c / max(||g||, c); global_clipnorm: scale / 1). All 1 when unused.
    GRAD_DIVISOR = 7
    CLIP_MULTIPLIER = 8
    CLIP_DIVISOR = 9
    CLIP_VALUE = 10
    # 1: apply the update; 0: parameter and optimizer state keep their values (a skipped
    # non-finite step, or an intermediate gradient-accumulation call).
    UPDATE_GATE = 11
    EMA_MOMENTUM = 12
    EMA_ONE_MINUS_MOMENTUM = 13
    # 1: update the EMA buffer; 0: keep it (a skipped non-finite step).
    EMA_GATE = 14
    # 1: overwrite the parameter with its EMA after this step.
    EMA_OVERWRITE = 15
    # Stochastic rounding: this step's 24-bit key ``rounding_step_key(seed, t)``, an integer
    # below 2^24 and so exact in float32 and float64. 0 when unused.
    ROUNDING_KEY = 16


NUM_SCALARS = len(Scalar)

# Per-parameter state buffers, in the order the fused update takes them (``state_keys``).
V = "v"  # MLX's name for the running average of g^2
GRAD_AVG = "grad_avg"
MOMENTUM_BUFFER = "momentum_buffer"
EMA = "ema"
# Kept by the step function when gradients accumulate; no fused update reads it.
ACCUMULATOR = "accumulated_gradient"

# --- 8-bit state ----------------------------------------------------------------------------
# With ``quantized_state`` each of these buffers is kept as uint8 codes (the parameter's shape)
# and one float32 scale per block of ``block_size`` consecutive elements (row-major order),
# under ``scale_key(key)``. The EMA and the accumulator stay in full precision.
QUANTIZED_KEYS = (V, GRAD_AVG, MOMENTUM_BUFFER)
# Allowed block sizes: powers of two up to the 1024 threads of a Metal/CUDA threadgroup, which
# reduces one block.
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024)
DEFAULT_BLOCK_SIZE = 256


def scale_key(key: str) -> str:
    """The state key of the per-block scales of quantized buffer ``key``: ``v`` -> ``v_scale``."""
    return f"{key}_scale"


def _float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


# The code tables: 256 float32 values in increasing order; code c of a block with scale s
# stands for ``table[c] * s``. Both are logarithmic and hold no zero (the zero-point problem:
# a small v stored as 0 turns g / (sqrt(v) + eps) into g / eps): the smallest v code is
# 2^-UNSIGNED_CODE_OCTAVES of the block's largest value; a zero block is a zero scale.
# docs/memory.md gives the measurement behind the ranges.
UNSIGNED_CODE_OCTAVES = 32
SIGNED_CODE_OCTAVES = 24
# v >= 0: 2^(-32 (255 - c) / 255), c = 0..255.
UNSIGNED_CODE: tuple[float, ...] = tuple(
    _float32(2.0 ** (-UNSIGNED_CODE_OCTAVES * (255 - c) / 255)) for c in range(256)
)
# grad_avg, momentum_buffer: -2^(-24 c / 127) for c = 0..127, then the same magnitudes
# positive in increasing order (symmetric; no zero).
_NEGATIVE = [-_float32(2.0 ** (-SIGNED_CODE_OCTAVES * c / 127)) for c in range(128)]
SIGNED_CODE: tuple[float, ...] = tuple(_NEGATIVE + [-value for value in reversed(_NEGATIVE)])


def code_table(key: str) -> tuple[float, ...]:
    """The code table of quantized buffer ``key``: unsigned for ``v``, signed otherwise."""
    return UNSIGNED_CODE if key == V else SIGNED_CODE


def code_midpoints(table: tuple[float, ...]) -> tuple[float, ...]:
    """The 255 float32 midpoints between neighbouring codes. A normalised value x gets the
    code ``c`` = the number of midpoints strictly below x (so x == midpoint takes the lower
    code, and NaN gets code 0), found by an 8-step binary search:
    ``c = 0; for h in 128, 64, ..., 1: if x > midpoints[c + h - 1]: c += h``."""
    return tuple(_float32((low + high) / 2) for low, high in itertools.pairwise(table))


# --- stochastic rounding --------------------------------------------------------------------
# Counter-based: the random bits of element j of output o (0 = the parameter, k = the k-th
# entry of state_keys, from 1) of the parameter at position `index` in the step are, with
# uint32 wrap-around arithmetic and key = the ROUNDING_KEY scalar as an integer:
#   tensor_key = mix32(key + ROUNDING_TENSOR_STRIDE * (index + 1))
#   r = mix32(mix32(j) ^ (tensor_key + ROUNDING_OUTPUT_STRIDE * o))
# A float32 result x stored as float16/bfloat16 becomes its round-to-nearest-even value y when
# x is NaN or y == x or y is infinite; otherwise, with lo and hi the neighbours of x in the
# target type (y and the next value away from zero, or the next towards zero and y),
# hi when (r >> 8) * 2^-24 < (|x| - |lo|) / (|hi| - |lo|), else lo. Every operand there is
# exact in float32, so the rounding is unbiased to within 2^-24.
ROUNDING_TENSOR_STRIDE = 0x9E3779B9
ROUNDING_OUTPUT_STRIDE = 0x85EBCA6B
# mix32: x ^= x >> 16; x *= MIX32_MULTIPLIERS[0]; x ^= x >> 15; x *= MIX32_MULTIPLIERS[1];
# x ^= x >> 15 (every path spells these steps out; the constants come from here).
MIX32_MULTIPLIERS = (0x21F0AAAD, 0xD35A2D97)
_MASK32 = 0xFFFFFFFF


def mix32(x: int) -> int:
    """A 32-bit integer hash with good avalanche (Wellons' "lowbias32" family)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * MIX32_MULTIPLIERS[0]) & _MASK32
    x ^= x >> 15
    x = (x * MIX32_MULTIPLIERS[1]) & _MASK32
    x ^= x >> 15
    return x


def rounding_step_key(seed: int, step: int) -> int:
    """The ROUNDING_KEY scalar of update ``step`` (1-based) under ``seed``: 24 bits."""
    return mix32((seed & _MASK32) ^ mix32(step)) >> 8


def _storage_flag() -> bool:
    # How results are stored (state precision, rounding), not what they are: option_space()
    # leaves these off unless asked.
    return dataclasses.field(default=False, metadata={"storage": True})


def _pipeline_flag() -> bool:
    # Set by the Keras training-pipeline arguments (clipnorm, clipvalue, use_ema, ...), not by a
    # constructor argument of the same name.
    return dataclasses.field(default=False, metadata={"pipeline": True})


@dataclass(frozen=True)
class UpdateOptions:
    """Flags that select code in the update, in the bit order of the C++ ``Flag`` enum.
    Hashable: used as a cache key for compiled functions and kernels. Values that are mere
    numbers live in the scalars vector instead. Constructing one checks every invariant."""

    centered: bool = False
    momentum: bool = False
    nesterov: bool = False
    eps_in_sqrt: bool = False
    lr_in_momentum: bool = False
    # g <- g + lambda p before the moments (PyTorch).
    coupled_decay: bool = False
    # p <- p - p lambda lr before the step (Keras).
    decoupled_decay: bool = False
    maximize: bool = False
    bias_correction: bool = False
    scale_gradient: bool = _pipeline_flag()
    clip_value: bool = _pipeline_flag()
    gated: bool = _pipeline_flag()
    ema: bool = _pipeline_flag()
    # v, grad_avg and momentum_buffer are 8-bit codes with per-block scales (QUANTIZED_KEYS).
    quantized_state: bool = _storage_flag()
    # Stores to float16/bfloat16 round stochastically (float32 arithmetic only).
    stochastic_rounding: bool = _storage_flag()
    # Elements per quantization block (BLOCK_SIZES) with quantized_state, else 0. A number,
    # not a flag: the kernels take it as their threadgroup size, the native op as an argument.
    block_size: int = 0

    def __post_init__(self) -> None:
        for name in FLAGS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"UpdateOptions.{name} must be a bool, got {value!r}")
        check({name: getattr(self, name) for name in FLAGS})
        if self.quantized_state and self.block_size == 0:
            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE)
        if self.quantized_state and self.block_size not in BLOCK_SIZES:
            raise ValueError(
                f"UpdateOptions.block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}"
            )
        if not self.quantized_state and self.block_size != 0:
            raise ValueError(
                f"UpdateOptions.block_size={self.block_size!r} needs quantized_state=True"
            )

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Per-parameter state arrays this configuration reads and writes, in kernel order:
        each buffer, followed by its scales when quantized."""
        buffers = [V]
        if self.centered:
            buffers.append(GRAD_AVG)
        if self.momentum:
            buffers.append(MOMENTUM_BUFFER)
        keys = []
        for key in buffers:
            keys.append(key)
            if self.quantized_state:
                keys.append(scale_key(key))
        if self.ema:
            keys.append(EMA)
        return tuple(keys)


FLAGS: tuple[str, ...] = tuple(
    field.name for field in dataclasses.fields(UpdateOptions) if field.type == "bool"
)
STORAGE_FLAGS: tuple[str, ...] = tuple(
    field.name for field in dataclasses.fields(UpdateOptions) if field.metadata.get("storage")
)
PIPELINE_FLAGS: tuple[str, ...] = tuple(
    field.name for field in dataclasses.fields(UpdateOptions) if field.metadata.get("pipeline")
)

# (flag, the flag it needs). Without momentum, lr_in_momentum changes no arithmetic: the
# optimizer drops it there (``normalised``) instead of refusing it; nesterov is refused.
REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("nesterov", "momentum"),
    ("lr_in_momentum", "momentum"),
)
DROPPED_WITHOUT_NEED: frozenset[str] = frozenset({"lr_in_momentum"})
# Pairs of flags that cannot both be on.
EXCLUSIONS: tuple[tuple[str, str], ...] = (("coupled_decay", "decoupled_decay"),)

# How a flag reads when it is on, and what it was when it is off, in the caller's words (the
# constructor spells `momentum` as a number): {"momentum": ("momentum > 0", "momentum=0.0")}.
Spelling = Mapping[str, tuple[str, str]]


def violation(flags: Mapping[str, bool], spelling: Spelling | None = None) -> str | None:
    """The message for the first invariant ``flags`` (every flag by name) breaks, or None."""
    spelling = spelling or {}

    def on(name: str) -> str:
        return spelling.get(name, (f"{name}=True", ""))[0]

    def got(name: str) -> str:
        return spelling.get(name, ("", f"{name}=False"))[1]

    for flag, needed in REQUIREMENTS:
        if flags[flag] and not flags[needed]:
            return f"{on(flag)} requires {on(needed)}, got {got(needed)}"
    for first, second in EXCLUSIONS:
        if flags[first] and flags[second]:
            return f"{on(first)} and {on(second)} exclude each other"
    return None


def check(flags: Mapping[str, bool], spelling: Spelling | None = None) -> None:
    """Raise ``ValueError`` with :func:`violation`'s message when ``flags`` break an invariant."""
    message = violation(flags, spelling)
    if message is not None:
        raise ValueError(message)


def normalised(flags: Mapping[str, bool]) -> dict[str, bool]:
    """``flags`` with every flag in ``DROPPED_WITHOUT_NEED`` turned off where the flag it needs
    is off: the same code under one name."""
    result = dict(flags)
    for flag, needed in REQUIREMENTS:
        if flag in DROPPED_WITHOUT_NEED and not result[needed]:
            result[flag] = False
    return result


@cache
def option_space(storage: bool = False) -> tuple[UpdateOptions, ...]:
    """Every valid ``UpdateOptions``, each once: the product of all flags less the
    combinations an invariant forbids. Verification and the test grids draw from this.

    The ``STORAGE_FLAGS`` stay off unless ``storage`` (quantized state at
    ``DEFAULT_BLOCK_SIZE``): they multiply the space by 4 and change only how results are
    stored, so sweeps cross them with a subset instead."""
    names = FLAGS if storage else tuple(name for name in FLAGS if name not in STORAGE_FLAGS)
    return tuple(
        UpdateOptions(**flags)
        for values in itertools.product((False, True), repeat=len(names))
        if violation(
            {**dict.fromkeys(FLAGS, False), **(flags := dict(zip(names, values, strict=True)))}
        )
        is None
    )


# The signature of rmsprop_reference: (options, scalars, parameter, gradient, state, *,
# index=0) -> (new parameter, new state), index being the parameter's position in the step
# (keyword-only, a static int; Callable cannot spell it). Spelled with strings so that this
# module imports nothing but the standard library.
UpdateFn = Callable[
    [UpdateOptions, "mx.array", "mx.array", "mx.array", "dict[str, mx.array]"],
    "tuple[mx.array, dict[str, mx.array]]",
]


# --- the generated C++ header -------------------------------------------------------------

HEADER_PATH = Path(__file__).resolve().parent / "paths" / "native" / "spec.h"


def cpp_name(name: str) -> str:
    """The C++ enumerator of a flag or scalar: ``bias_correction`` -> ``kBiasCorrection``."""
    return "k" + "".join(part.capitalize() for part in name.lower().split("_"))


def _x_macro(name: str, rows: list[str]) -> list[str]:
    return [f"#define {name}(X) \\", *(f"  X({row}) \\" for row in rows[:-1]), f"  X({rows[-1]})"]


def header_text() -> str:
    """The contents of ``paths/native/spec.h``."""
    scalars = [f"{entry.name}, {cpp_name(entry.name)}" for entry in Scalar]
    flags = [f"{name}, {cpp_name(name)}" for name in FLAGS]
    requirements = [
        f"{cpp_name(flag)}, {cpp_name(needed)}, "
        f'"{violation({**dict.fromkeys(FLAGS, False), flag: True})}"'
        for flag, needed in REQUIREMENTS
    ]
    exclusions = [
        f"{cpp_name(first)}, {cpp_name(second)}, "
        f'"{violation({**dict.fromkeys(FLAGS, False), first: True, second: True})}"'
        for first, second in EXCLUSIONS
    ]

    def table(name: str, values: tuple[float, ...]) -> list[str]:
        rows = [
            ", ".join(f"{value.hex()}f" for value in values[i : i + 4])
            for i in range(0, len(values), 4)
        ]
        return [
            f"constexpr float {name}[{len(values)}] = {{",
            *(f"    {row}," for row in rows),
            "};",
        ]

    lines = [
        "// GENERATED by tools/generate_spec_header.py from mlx_rmsprop/spec.py: do not edit.",
        "// tests/test_spec.py fails while this file differs from what the spec generates.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "// X(python_name, kCppName): the entries of the scalars vector in index order (Scalar).",
        *_x_macro("RMSPROP_SCALARS", scalars),
        "",
        "// X(python_name, kCppName): the flags in bit order (UpdateOptions fields).",
        *_x_macro("RMSPROP_FLAGS", flags),
        "",
        "// X(kFlag, kNeeded, message): kFlag is valid only together with kNeeded.",
        *_x_macro("RMSPROP_REQUIREMENTS", requirements),
        "",
        "// X(kFirst, kSecond, message): kFirst and kSecond cannot both be set.",
        *_x_macro("RMSPROP_EXCLUSIONS", exclusions),
        "",
        "namespace mlx_rmsprop {",
        "",
        "// Index of each per-step value in the scalars vector.",
        "enum ScalarIndex : int {",
        "#define RMSPROP_X(name, constant) constant,",
        "  RMSPROP_SCALARS(RMSPROP_X)",
        "#undef RMSPROP_X",
        "  kNumScalars,",
        "};",
        "",
        "// Bits of the `flags` integer, one per UpdateOptions field (Flag::kMomentum: scoped, as",
        "// the scalars have enumerators of the same names).",
        "struct Flag {",
        "  enum Index : int {",
        "#define RMSPROP_X(name, constant) constant##Index,",
        "    RMSPROP_FLAGS(RMSPROP_X)",
        "#undef RMSPROP_X",
        "    kNumFlags,",
        "  };",
        "  enum Bit : uint32_t {",
        "#define RMSPROP_X(name, constant) constant = 1u << constant##Index,",
        "    RMSPROP_FLAGS(RMSPROP_X)",
        "#undef RMSPROP_X",
        "    kAll = (1u << kNumFlags) - 1,",
        "  };",
        "};",
        "",
        "// 8-bit state: the code tables and their midpoints (mlx_rmsprop.spec).",
        *table("kUnsignedCode", UNSIGNED_CODE),
        *table("kUnsignedMidpoints", code_midpoints(UNSIGNED_CODE)),
        *table("kSignedCode", SIGNED_CODE),
        *table("kSignedMidpoints", code_midpoints(SIGNED_CODE)),
        "",
        "// Stochastic rounding: the strides of the counter-based hash (mlx_rmsprop.spec).",
        f"constexpr uint32_t kRoundingTensorStride = {ROUNDING_TENSOR_STRIDE:#x}u;",
        f"constexpr uint32_t kRoundingOutputStride = {ROUNDING_OUTPUT_STRIDE:#x}u;",
        f"constexpr uint32_t kMix32Multiplier1 = {MIX32_MULTIPLIERS[0]:#x}u;",
        f"constexpr uint32_t kMix32Multiplier2 = {MIX32_MULTIPLIERS[1]:#x}u;",
        "",
        "} // namespace mlx_rmsprop",
        "",
    ]
    return "\n".join(lines)
