"""The CUDA kernel on an NVIDIA GPU without MLX: correctness against the reference on the host,
and its speed against a device-to-device copy.

    python benchmarks/gpu_kernel_check.py          # from a checkout of this repository

Needs an NVIDIA GPU, NumPy and CuPy (whose NVRTC compiles the kernels); never imports mlx.
It assembles the exact CUDA translation units MLX's CUDA backend builds around our body
(``metal/rmsprop_update.inc`` with the CUDA prologue; the same text as
``mlx_rmsprop.paths.kernels.source.translation_unit(variant, "cuda")``, which the test suite
checks),
compiles them with NVRTC and MLX's options (``--device-as-default-execution-space``,
``--gpu-architecture=sm_XY[a]``: mlx/backend/cuda/jit_module.cpp), with MLX's device header
replaced by the stand-in of ``tests/support/cuda_shim`` (the signature only needs its Shape
type), and launches them with MLX's grid arithmetic (blocks of 256 threads). Every variant
of the plan in ``gpu_kernel_check_plan.json`` (every dtype combination with the pairwise
option sets, every buffer layout with every flag on) runs 3 steps on sizes 1 to 4099 with NaN,
inf, zero, huge and tiny entries, each compared bit for bit with ``numpy_reference``, a float32
NumPy transcription of ``mlx_rmsprop.reference.rmsprop_reference`` (equal to it bit for bit:
tests/benchmarks/test_gpu_kernel_check.py). Then it times the kernel at 2^26 elements, float32 and
bfloat16, against a device-to-device copy of as many bytes as the kernel reads and writes,
and prints both tables. Exit status 1 if any variant differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BODY = REPO / "metal" / "rmsprop_update.inc"
PLAN = Path(__file__).with_name("gpu_kernel_check_plan.json")
MLX_DEVICE_HEADER = (
    REPO / "tests" / "support" / "cuda_shim" / "mlx" / "backend" / "cuda" / "device" / "utils.cuh"
)
KERNEL_NAME = "rmsprop"
THREADGROUP = 256
SIZES = (1, 3, 8, 33, 257, 4099)
STEPS = 3
# check's (mlx_rmsprop.paths.probe): the stochastic-rounding keys of the steps, and the
# parameter position the updates run at.
ROUNDING_SEED = 20240613
INDEX = 3
TIMED_SIZE = 2**26


def _load_spec():
    """mlx_rmsprop/spec.py (no mlx import in it) without importing the mlx_rmsprop package."""
    spec = importlib.util.spec_from_file_location("rmsprop_spec", REPO / "mlx_rmsprop" / "spec.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


spec_module = _load_spec()
UpdateOptions = spec_module.UpdateOptions
Scalar = spec_module.Scalar
FLAGS = spec_module.FLAGS
QUANTIZED_KEYS = spec_module.QUANTIZED_KEYS
scale_key = spec_module.scale_key

# ---------------------------------------------------------------------------------------------
# The translation unit (mirrors mlx_rmsprop/paths/kernels/source.py for backend "cuda").

CUDA_TYPES = {
    "float32": "float",
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "uint8": "uint8_t",
    "uint32": "uint32_t",
}
METAL_TYPES = {
    "float32": "float",
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "uint8": "uint8_t",
    "uint32": "uint32_t",
}
PRIMITIVES = (
    "#define RMS_MUL(a, b) __fmul_rn((a), (b))\n"
    "#define RMS_ADD(a, b) __fadd_rn((a), (b))\n"
    "#define RMS_SUB(a, b) __fsub_rn((a), (b))\n"
    "#define RMS_DIV(a, b) __fdiv_rn((a), (b))\n"
    "#define RMS_SQRT(x) __fsqrt_rn(x)"
)
SPELLINGS = (
    "#define RMS_FLOAT_BITS(x) __float_as_uint(x)\n"
    "#define RMS_BITS_FLOAT(u) __uint_as_float(u)\n"
    "#define RMS_IS_HALF(T) cuda::std::is_same<T, __half>::value\n"
    "#define RMS_GROUP_SHARED __shared__\n"
    "#define RMS_GROUP_BARRIER() __syncthreads()"
)
INDEX_LINE = (
    "const size_t i = (size_t(blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;"
)
GROUP_LINES = "const uint32_t group_thread = threadIdx.x;\nconst uint32_t group_size = blockDim.x;"
MAX_BLOCK_SIZE = max(spec_module.BLOCK_SIZES)
HASH_CONSTANTS = (
    ("kMix32Multiplier1", spec_module.MIX32_MULTIPLIERS[0]),
    ("kMix32Multiplier2", spec_module.MIX32_MULTIPLIERS[1]),
    ("kRoundingTensorStride", spec_module.ROUNDING_TENSOR_STRIDE),
    ("kRoundingOutputStride", spec_module.ROUNDING_OUTPUT_STRIDE),
)
TABLES = {
    "kUnsignedCode": spec_module.UNSIGNED_CODE,
    "kUnsignedMidpoints": spec_module.code_midpoints(spec_module.UNSIGNED_CODE),
    "kSignedCode": spec_module.SIGNED_CODE,
    "kSignedMidpoints": spec_module.code_midpoints(spec_module.SIGNED_CODE),
}
# Optional buffers and the body's type of their elements.
OPTIONAL_STATE = {
    "grad_avg": "Q",
    "momentum_buffer": "Q",
    "ema": "S",
    "v_scale": "float",
    "grad_avg_scale": "float",
    "momentum_buffer_scale": "float",
}
CUDA_PREAMBLE = (
    '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
)


class Variant:
    """Options and (parameter, gradient, state) dtype names; the state dtype is the float
    buffers' (with 8-bit state only the EMA's: float32 without one)."""

    def __init__(self, options, parameter: str, gradient: str, state: str):
        if options.quantized_state and not options.ema:
            state = "float32"
        self.options, self.parameter, self.gradient, self.state = (
            options,
            parameter,
            gradient,
            state,
        )

    @property
    def state_keys(self) -> tuple[str, ...]:
        return self.options.state_keys

    @property
    def moment(self) -> str:
        """The storage dtype of v, grad_avg and momentum_buffer (template parameter Q)."""
        return "uint8" if self.options.quantized_state else self.state

    def state_dtype(self, key: str) -> str:
        if key in QUANTIZED_KEYS:
            return self.moment
        return self.state if key == "ema" else "float32"

    @property
    def rounding(self) -> bool:
        return self.options.stochastic_rounding

    @property
    def block_size(self) -> int:
        """Threads per block: the quantization block with 8-bit state, else 256."""
        return self.options.block_size if self.options.quantized_state else THREADGROUP

    def template_args(self) -> list[tuple[str, object]]:
        args: list[tuple[str, object]] = [
            ("P", self.parameter),
            ("G", self.gradient),
            ("S", self.state),
            ("Q", self.moment),
        ]
        args += [(name.upper(), getattr(self.options, name)) for name in FLAGS]
        return args

    @property
    def kernel_name(self) -> str:
        suffix = ""
        for _, value in self.template_args():
            if isinstance(value, str):
                suffix += "_" + METAL_TYPES[value]
            else:
                suffix += "_t" if value else "_f"
        return f"custom_kernel_{KERNEL_NAME}{suffix}"

    def __repr__(self) -> str:
        return f"{self.kernel_name} ({self.parameter}, {self.gradient}, {self.state})"


def _table_lines(quantized: bool) -> list[str]:
    lines = []
    for name, values in TABLES.items():
        if not quantized:
            lines.append(f"const uint32_t* {name} = nullptr;")
            continue
        bits = [f"{int(np.float32(v).view(np.uint32)):#010x}u" for v in values]
        rows = ",\n    ".join(", ".join(bits[k : k + 8]) for k in range(0, len(bits), 8))
        lines.append(f"static const uint32_t {name}[{len(values)}] = {{\n    {rows}}};")
    return lines


# The names the body reads with Keras' gradient accumulation, as the launcher declares them for
# a kernel that does not accumulate (source.NO_ACCUMULATION_LINES; this script runs none that
# does).
NO_ACCUMULATION_LINES = [
    "constexpr bool ACCUMULATES = false;",
    "using A = float;",
    "const A* accumulator = nullptr;",
    "A* new_accumulator = nullptr;",
    "constexpr bool accumulation_applies = false;",
    "constexpr bool accumulation_skip = false;",
    "constexpr float loss_scale = 0.0f;",
    "constexpr float accumulation_steps = 1.0f;",
]


def kernel_body(state_keys: tuple[str, ...], rounding: bool) -> str:
    lines = [PRIMITIVES, SPELLINGS, INDEX_LINE, GROUP_LINES]
    lines += [f"const float {entry.name.lower()} = scalars[{int(entry)}];" for entry in Scalar]
    lines.append(f"const uint32_t parameter_position = {'index[0]' if rounding else '0u'};")
    lines += NO_ACCUMULATION_LINES
    lines.append(f"constexpr uint32_t kMaxBlockSize = {MAX_BLOCK_SIZE}u;")
    lines += [f"constexpr uint32_t {name} = {value:#x}u;" for name, value in HASH_CONSTANTS]
    lines += _table_lines("v_scale" in state_keys)
    for name, kind in OPTIONAL_STATE.items():
        if name not in state_keys:
            lines += [f"const {kind}* {name} = nullptr;", f"{kind}* new_{name} = nullptr;"]
    return "\n".join(lines) + "\n\n" + BODY.read_text("utf-8")


def translation_unit(variant: Variant) -> str:
    """The CUDA source MLX's CUDA backend compiles for ``variant``."""
    source = kernel_body(variant.state_keys, variant.rounding)
    inputs = ["parameter", "gradient", *variant.state_keys, "scalars"]
    input_dtypes = [variant.parameter, variant.gradient]
    input_dtypes += [variant.state_dtype(key) for key in variant.state_keys] + ["float32"]
    if variant.rounding:
        inputs.append("index")
        input_dtypes.append("uint32")
    text = CUDA_PREAMBLE + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += f"__global__ void {variant.kernel_name}(\n"
    for name, dtype in zip(inputs, input_dtypes, strict=True):
        text += f"    const {CUDA_TYPES[dtype]}* {name},\n"
        for kind, suffix in (("Shape", "shape"), ("Strides", "strides"), ("int", "ndim")):
            if f"{name}_{suffix}" in source:
                text += f"    const __grid_constant__ {kind} {name}_{suffix},\n"
    outputs = ["parameter", *variant.state_keys]
    output_dtypes = [variant.parameter] + [variant.state_dtype(k) for k in variant.state_keys]
    text += ",\n".join(
        f"    {CUDA_TYPES[d]}* new_{n}" for n, d in zip(outputs, output_dtypes, strict=True)
    )
    text += ") {\n"
    for key, value in variant.template_args():
        if isinstance(value, str):
            text += f"  using {key} = {CUDA_TYPES[value]};\n"
        else:
            text += f"  constexpr bool {key} = {'true' if value else 'false'};\n"
    return text + "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n"


def load_plan() -> list[Variant]:
    rows = json.loads(PLAN.read_text())
    return [Variant(UpdateOptions(**row["options"]), *row["dtypes"]) for row in rows]


# ---------------------------------------------------------------------------------------------
# Host storage of each dtype and the reference, in float32 NumPy.

STORAGE = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "uint8": np.uint8,
    "uint32": np.uint32,
}
HALF = ("float16", "bfloat16")


def to_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round to nearest even, as MLX's and CUDA's conversions do (NaN stays NaN)."""
    values = np.asarray(values, np.float32)
    if dtype != "bfloat16":
        with np.errstate(over="ignore"):  # overflow to inf is the conversion's meaning
            return values.astype(STORAGE[dtype])
    bits = values.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> 16) | np.uint32(0x40), rounded).astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# How results are stored (mlx_rmsprop/storage.py, in float32 NumPy): 8-bit block codes and
# stochastic rounding.


def _blocks(x: np.ndarray, block_size: int) -> np.ndarray:
    padding = -x.size % block_size
    return np.concatenate([x, np.zeros(padding, np.float32)]).reshape(-1, block_size)


def quantize(values: np.ndarray, key: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 codes, float32 scales per block) of float32 ``values`` (1-D) for buffer ``key``:
    scale NaN if the block holds a NaN else max |x|; code = #midpoints below x / scale."""
    table = spec_module.code_table(key)
    midpoints = np.array(spec_module.code_midpoints(table), np.float32)
    x = _blocks(np.asarray(values, np.float32).reshape(-1), block_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        nan = np.isnan(x).any(axis=1)
        scales = np.where(nan, np.float32(np.nan), np.abs(x).max(axis=1)).astype(np.float32)
        y = np.where(scales[:, None] == 0, np.float32(0.0), x / scales[:, None])
    codes = np.where(np.isnan(y), 0, np.searchsorted(midpoints, y, side="left"))
    return codes.reshape(-1)[: np.size(values)].astype(np.uint8), scales


def dequantize(codes: np.ndarray, scales: np.ndarray, key: str, block_size: int) -> np.ndarray:
    """table[code] * scale of its block, float32."""
    table = np.array(spec_module.code_table(key), np.float32)
    per_element = np.repeat(scales.astype(np.float32), block_size)[: codes.size]
    return table[codes.astype(np.int64)] * per_element


def _mix32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(spec_module.MIX32_MULTIPLIERS[0])
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(spec_module.MIX32_MULTIPLIERS[1])
    return x ^ (x >> np.uint32(15))


def stochastic_round(x: np.ndarray, dtype: str, key: int, index: int, output: int) -> np.ndarray:
    """Host storage of float32 ``x`` rounded stochastically to ``dtype`` (spec's rule)."""
    mask = 0xFFFFFFFF
    x = np.asarray(x, np.float32)
    seed = (key + spec_module.ROUNDING_TENSOR_STRIDE * (index + 1)) & mask
    tensor_key = int(_mix32(np.array([seed], np.uint32))[0])
    stream = np.uint32((tensor_key + spec_module.ROUNDING_OUTPUT_STRIDE * output) & mask)
    j = (np.arange(x.size, dtype=np.uint64) & mask).astype(np.uint32)
    draw = (_mix32(_mix32(j) ^ stream) >> np.uint32(8)).astype(np.float32) * np.float32(2**-24)
    nearest = from_float32(x, dtype)
    bits = nearest.view(np.uint16)
    y = to_float32(nearest, dtype)
    exact = np.isnan(x) | (y == x) | np.isinf(y)
    away = np.abs(y) < np.abs(x)
    # Unselected lanes may wrap (0 - 1): `exact` or `away` discards them.
    neighbour = np.where(away, bits + np.uint16(1), bits - np.uint16(1)).astype(np.uint16)
    neighbour = neighbour.view(STORAGE[dtype])
    lo = np.where(away, nearest, neighbour)
    hi = np.where(away, neighbour, nearest)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        low = np.abs(to_float32(lo, dtype))
        frac = (np.abs(x) - low) / (np.abs(to_float32(hi, dtype)) - low)
    return np.where(exact, nearest, np.where(draw < frac, hi, lo)).astype(STORAGE[dtype])


def state_dtypes(options, state_dtype: str) -> dict[str, str]:
    """The dtype of each state buffer: uint8 codes and float32 scales with 8-bit state."""
    dtypes = {}
    for key in options.state_keys:
        if options.quantized_state and key != "ema":
            dtypes[key] = "uint8" if key in QUANTIZED_KEYS else "float32"
        else:
            dtypes[key] = state_dtype
    return dtypes


def numpy_reference(options, scalars: np.ndarray, parameter, gradient, state, dtypes, index=0):
    """``rmsprop_reference`` in float32 NumPy, one IEEE operation at a time in its order, on
    host storage arrays; ``dtypes`` = (parameter, gradient, float state) dtype names,
    ``index`` the parameter's position (stochastic rounding)."""
    with np.errstate(all="ignore"):  # inf and NaN are inputs of the check
        return _numpy_reference(options, scalars, parameter, gradient, state, dtypes, index)


def _numpy_reference(options, scalars, parameter, gradient, state, dtypes, index):
    s = {entry: np.float32(scalars[int(entry)]) for entry in Scalar}
    p = to_float32(parameter, dtypes[0])
    g = to_float32(gradient, dtypes[1])
    stored = state_dtypes(options, dtypes[2])
    block = options.block_size
    f32 = {}
    for key in options.state_keys:
        if options.quantized_state and key in QUANTIZED_KEYS:
            f32[key] = dequantize(state[key], state[scale_key(key)], key, block)
        elif key in ("v", "grad_avg", "momentum_buffer", "ema"):
            f32[key] = to_float32(state[key], stored[key])
    if options.maximize:
        g = -g
    if options.scale_gradient:
        g = g / s[Scalar.GRAD_DIVISOR]
        g = g * s[Scalar.CLIP_MULTIPLIER] / s[Scalar.CLIP_DIVISOR]
    if options.clip_value:
        low = -s[Scalar.CLIP_VALUE]
        g = np.where(np.isnan(g), g, np.where(g > low, g, low))
        g = np.where(np.isnan(g), g, np.where(g < s[Scalar.CLIP_VALUE], g, s[Scalar.CLIP_VALUE]))
    if options.coupled_decay:
        g = g + s[Scalar.WEIGHT_DECAY] * p
    alpha, one_minus_alpha = s[Scalar.ALPHA], s[Scalar.ONE_MINUS_ALPHA]
    v = alpha * f32["v"] + one_minus_alpha * (g * g)
    new = {"v": v}
    variance = v / s[Scalar.BIAS_CORRECTION] if options.bias_correction else v
    if options.centered:
        grad_avg = alpha * f32["grad_avg"] + one_minus_alpha * g
        new["grad_avg"] = grad_avg
        if options.bias_correction:
            grad_avg = grad_avg / s[Scalar.BIAS_CORRECTION]
        centred = variance - grad_avg * grad_avg
        variance = np.where(np.isnan(centred), centred, np.where(centred > 0, centred, 0))
    eps, lr = s[Scalar.EPS], s[Scalar.LR]
    denom = np.sqrt(variance + eps) if options.eps_in_sqrt else np.sqrt(variance) + eps
    if options.momentum:
        mu = s[Scalar.MOMENTUM]
        if options.lr_in_momentum:
            increment = lr * g / denom
            buffer = mu * f32["momentum_buffer"] + increment
            delta = increment + mu * buffer if options.nesterov else buffer
        else:
            direction = g / denom
            buffer = mu * f32["momentum_buffer"] + direction
            delta = lr * (direction + mu * buffer) if options.nesterov else lr * buffer
        new["momentum_buffer"] = buffer
    else:
        delta = lr * g / denom
    p_new = p - p * s[Scalar.WEIGHT_DECAY] * lr if options.decoupled_decay else p
    p_new = p_new - delta
    keep = options.gated and s[Scalar.UPDATE_GATE] == 0
    if keep:
        p_new = p
        if not options.quantized_state:  # 8-bit buffers keep their codes in the store
            new = {key: f32[key] for key in new}
    if options.ema:
        ema = s[Scalar.EMA_MOMENTUM] * f32["ema"] + s[Scalar.EMA_ONE_MINUS_MOMENTUM] * p_new
        if s[Scalar.EMA_GATE] == 0:
            ema = f32["ema"]
        if s[Scalar.EMA_OVERWRITE] != 0:
            p_new = ema
        new["ema"] = ema
    rounding_key = int(s[Scalar.ROUNDING_KEY])

    def store(value: np.ndarray, dtype: str, output: int) -> np.ndarray:
        if options.stochastic_rounding and dtype in HALF:
            return stochastic_round(value, dtype, rounding_key, index, output)
        return from_float32(value, dtype)

    new_state = {}
    for key, value in new.items():
        if options.quantized_state and key in QUANTIZED_KEYS:
            codes, scales = quantize(value, key, block)
            if keep:
                codes, scales = state[key], state[scale_key(key)]
            new_state[key], new_state[scale_key(key)] = codes, scales
        else:
            new_state[key] = store(value, stored[key], 1 + options.state_keys.index(key))
    new_state = {key: new_state[key] for key in options.state_keys}
    return store(p_new, dtypes[0], 0), new_state


def step_scalars(step: int) -> np.ndarray:
    """The scalars of check's verification step ``step`` (mlx_rmsprop.check.step_scalars)."""
    values = np.zeros(len(Scalar), np.float32)
    values[Scalar.LR] = 0.01 * (1 + 0.5 * step)
    values[Scalar.ALPHA] = 0.9
    values[Scalar.ONE_MINUS_ALPHA] = 1 - 0.9
    values[Scalar.EPS] = 1e-6
    values[Scalar.MOMENTUM] = 0.8
    values[Scalar.WEIGHT_DECAY] = 0.1
    values[Scalar.BIAS_CORRECTION] = 1 - 0.9**step
    values[Scalar.GRAD_DIVISOR] = 2.0
    values[Scalar.CLIP_MULTIPLIER] = 0.75
    values[Scalar.CLIP_DIVISOR] = 1.5
    values[Scalar.CLIP_VALUE] = 0.25
    values[Scalar.UPDATE_GATE] = 0.0 if step == 2 else 1.0
    values[Scalar.EMA_MOMENTUM] = 0.99
    values[Scalar.EMA_ONE_MINUS_MOMENTUM] = 1 - 0.99
    values[Scalar.EMA_GATE] = 0.0 if step == 2 else 1.0
    values[Scalar.EMA_OVERWRITE] = 1.0 if step >= 2 else 0.0
    values[Scalar.ROUNDING_KEY] = spec_module.rounding_step_key(ROUNDING_SEED, step)
    return values


SPECIALS = {
    "gradient": [math.nan, math.inf, -math.inf, 0.0, -0.0, -3.0, 1e30, 1e-30],
    "v": [math.nan, 0.0, 1e-40],
    "parameter": [math.nan, -0.0],
}


def inputs(variant: Variant, size: int, seed: int):
    """Parameter, gradient and state (host storage) with about a third special entries."""
    rng = np.random.default_rng(seed)
    values = {
        "parameter": rng.normal(0.0, 1.0, size),
        "gradient": rng.uniform(-1.0, 1.0, size),
        "v": rng.uniform(0.5, 2.0, size),
        "grad_avg": rng.uniform(-0.3, 0.3, size),
        "momentum_buffer": rng.normal(0.0, 0.1, size),
    }
    values["ema"] = values["parameter"] + rng.normal(0.0, 0.01, size)
    for name, specials in SPECIALS.items():
        chosen = rng.random(size) < 0.12
        values[name][chosen] = rng.choice(specials, int(chosen.sum()))
    dtypes = {"parameter": variant.parameter, "gradient": variant.gradient}

    def stored(name: str) -> np.ndarray:
        return from_float32(values[name].astype(np.float32), dtypes.get(name, variant.state))

    state = {}
    for key in variant.state_keys:
        if variant.options.quantized_state and key in QUANTIZED_KEYS:
            block = variant.options.block_size
            state[key], state[scale_key(key)] = quantize(values[key], key, block)
        elif key in values:
            state[key] = stored(key)
    return stored("parameter"), stored("gradient"), {k: state[k] for k in variant.state_keys}


def same_bits(actual: np.ndarray, expected: np.ndarray, dtype: str) -> np.ndarray:
    """Element-wise equality of the stored values, any NaN equal to any NaN."""
    a, e = to_float32(actual, dtype), to_float32(expected, dtype)
    return (
        actual.view(np.uint8).reshape(len(actual), -1)
        == expected.view(np.uint8).reshape(len(expected), -1)
    ).all(axis=1) | (np.isnan(a) & np.isnan(e))


# ---------------------------------------------------------------------------------------------
# The GPU side (CuPy).


def architecture(cupy) -> str:
    """MLX's --gpu-architecture: sm_XY, with the "a" suffix from compute capability 9 on."""
    major, minor = divmod(int(cupy.cuda.Device().compute_capability), 10)
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


def nvrtc_options(cupy, arch: str) -> list[str]:
    """MLX's options (mlx/backend/cuda/jit_module.cpp, compile) with this machine's CUDA
    headers (CUDA 13 keeps CCCL under include/cccl, CUDA 12 in include itself)."""
    home = cupy.cuda.get_cuda_path() or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    include = Path(home) / "include"
    return [
        "--device-as-default-execution-space",
        f"--gpu-architecture={arch}",
        f"--include-path={include}",
        f"--include-path={include / 'cccl'}",
    ]


def compile_kernels(cupy, variants: list[Variant], programs: int) -> dict[str, object]:
    """Each kernel's CuPy function, by kernel name: ``programs`` NVRTC programs side by side."""
    from cupy_backends.cuda.libs import nvrtc

    options = tuple(nvrtc_options(cupy, architecture(cupy)))
    header = MLX_DEVICE_HEADER.read_text()

    def build(chunk: list[Variant]) -> tuple[bytes, dict[str, str]]:
        source = "".join(translation_unit(v) for v in chunk)
        program = nvrtc.createProgram(
            source, "rmsprop_kernels.cu", (header,), ("mlx/backend/cuda/device/utils.cuh",)
        )
        try:
            names = {v.kernel_name: f"mlx::core::cu::{v.kernel_name}" for v in chunk}
            for expression in names.values():
                nvrtc.addNameExpression(program, expression)
            try:
                nvrtc.compileProgram(program, options)
            except Exception as error:
                raise RuntimeError(f"NVRTC: {error}\n{nvrtc.getProgramLog(program)}") from error
            return nvrtc.getCUBIN(program), {
                k: nvrtc.getLoweredName(program, e) for k, e in names.items()
            }
        finally:
            nvrtc.destroyProgram(program)

    # One definition per kernel: variants that differ only in block size share it.
    variants = list({v.kernel_name: v for v in variants}.values())
    chunks = [c for c in (variants[k::programs] for k in range(programs)) if c]
    kernels: dict[str, object] = {}
    with ThreadPoolExecutor(len(chunks)) as pool:
        built = list(pool.map(build, chunks))
    for cubin, lowered in built:  # modules load on this thread, in its CUDA context
        module = cupy.cuda.function.Module()
        module.load(cubin)
        kernels.update({name: (module, module.get_function(s)) for name, s in lowered.items()})
    return kernels


def kernel_parameters(variant: Variant) -> list[str]:
    """The kernel's parameter names, in order, read off its generated signature."""
    unit = translation_unit(variant)
    start = unit.index(f"__global__ void {variant.kernel_name}(\n")
    signature = unit[start : unit.index(") {\n", start)].split("(\n", 1)[1]
    return [line.split()[-1] for line in signature.split(",\n")]


def grid_for(size: int, block_size: int = 0) -> tuple[int, int]:
    """(blocks in x, rows): mlx_rmsprop.paths.kernels.launch.grid_for with MLX's block
    arithmetic; with ``block_size`` (8-bit state) blocks of that many threads."""
    group = block_size or THREADGROUP
    threads = -(-size // group) * group if block_size else size
    if threads <= 2**31 - 1 - (group - 1):
        return (threads + group - 1) // group, 1
    row = 2**30
    return row // group, -(-size // row)


def prepare_launch(cupy, function, variant: Variant, buffers: dict, size: int):
    """A call launching the kernel once with cuLaunchKernel, as MLX does: the parameters of
    its generated signature (buffers by name, the parameter's merged 1-D shape and ndim,
    which the body reads), whole blocks of 256 threads or, with 8-bit state, of the block
    size (MLX's grid arithmetic)."""
    import ctypes

    from cupy_backends.cuda.api import driver

    values = []
    for name in kernel_parameters(variant):
        if name.endswith("_shape"):
            values.append((ctypes.c_int32 * 10)(size))  # mlx::core::cu::Shape
        elif name.endswith("_ndim"):
            values.append(ctypes.c_int32(1))
        else:
            values.append(ctypes.c_uint64(buffers[name].data.ptr))
    addresses = (ctypes.c_void_p * len(values))(
        *(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values)
    )
    quantized = variant.options.quantized_state
    blocks, rows = grid_for(size, variant.options.block_size if quantized else 0)
    threads = variant.block_size if quantized else min(THREADGROUP, size)

    def call() -> None:
        stream = cupy.cuda.get_current_stream().ptr
        driver.launchKernel(
            function.ptr,
            blocks,
            rows,
            1,
            threads,
            1,
            1,
            0,
            stream,
            ctypes.addressof(addresses),
            0,
        )

    call.keep_alive = (values, addresses, buffers)
    return call


def output_sizes(variant: Variant, size: int) -> dict[str, int]:
    """Elements of each output: the scales one per block, the rest one per element."""
    blocks = -(-size // variant.options.block_size) if variant.options.quantized_state else 0
    names = ("parameter", *variant.state_keys)
    return {name: blocks if name.endswith("_scale") else size for name in names}


def device_buffers(cupy, variant: Variant, parameter, gradient, state, scalars, size) -> dict:
    """Inputs copied to the GPU and outputs filled with a byte pattern, by kernel name."""
    buffers = {"parameter": parameter, "gradient": gradient, **state, "scalars": scalars}
    if variant.rounding:
        buffers["index"] = np.array([INDEX], np.uint32)
    buffers = {name: cupy.asarray(value) for name, value in buffers.items()}
    for name, count in output_sizes(variant, size).items():
        dtype = variant.parameter if name == "parameter" else variant.state_dtype(name)
        output = cupy.empty(count, STORAGE[dtype])
        output.view(np.uint8).fill(0x5A)
        buffers[f"new_{name}"] = output
    return buffers


def check_variant(cupy, function, variant: Variant, seed: int) -> list[str]:
    """Differences (first element of each) of ``variant`` over SIZES x STEPS."""
    problems = []
    dtypes = (variant.parameter, variant.gradient, variant.state)
    output_dtypes = [variant.parameter] + [variant.state_dtype(k) for k in variant.state_keys]
    index = INDEX if variant.rounding else 0
    for k, size in enumerate(SIZES):
        parameter, gradient, state = inputs(variant, size, seed + k)
        for step in range(1, STEPS + 1):
            scalars = step_scalars(step)
            buffers = device_buffers(cupy, variant, parameter, gradient, state, scalars, size)
            prepare_launch(cupy, function, variant, buffers, size)()
            outputs = [buffers[f"new_{n}"].get() for n in ("parameter", *variant.state_keys)]
            expected = numpy_reference(
                variant.options, scalars, parameter, gradient, state, dtypes, index
            )
            expected_list = [expected[0], *expected[1].values()]
            names = ["parameter", *variant.state_keys]
            for name, actual, wanted, dtype in zip(
                names, outputs, expected_list, output_dtypes, strict=True
            ):
                equal = same_bits(actual, wanted, dtype)
                if not equal.all():
                    i = int(np.flatnonzero(~equal)[0])
                    problems.append(
                        f"{variant}: size {size} step {step} {name}[{i}] = "
                        f"{to_float32(actual, dtype)[i]!r}, reference "
                        f"{to_float32(wanted, dtype)[i]!r} ({int((~equal).sum())} elements)"
                    )
            parameter, state = outputs[0], dict(zip(variant.state_keys, outputs[1:], strict=True))
    return problems


def time_call(cupy, call, repeats: int = 20) -> float:
    """Median seconds of ``call`` on the GPU (CUDA events), after warm-up."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def timing_rows(cupy, kernels: dict, variants: list[Variant]) -> list[list[str]]:
    rows = []
    for variant in variants:
        size = TIMED_SIZE
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}
        count = len(variant.state_keys)
        parameter, gradient, state = inputs(variant, size, seed=0)
        scalars = step_scalars(1)
        buffers = device_buffers(cupy, variant, parameter, gradient, state, scalars, size)
        _, function = kernels[variant.kernel_name]
        seconds = time_call(cupy, prepare_launch(cupy, function, variant, buffers, size))
        moved = size * (
            itemsize[variant.parameter] * 2
            + itemsize[variant.gradient]
            + itemsize[variant.state] * 2 * count
        )
        source = cupy.empty(moved // 2, np.uint8)
        target = cupy.empty_like(source)
        copy = time_call(
            cupy,
            lambda target=target, source=source: cupy.cuda.runtime.memcpyAsync(
                target.data.ptr,
                source.data.ptr,
                source.nbytes,
                cupy.cuda.runtime.memcpyDeviceToDevice,
                cupy.cuda.get_current_stream().ptr,
            ),
        )
        rows.append(
            [
                "+".join(variant.state_keys),
                variant.parameter,
                f"{seconds * 1e3:.3f}",
                f"{moved / seconds / 1e9:.0f}",
                f"{copy * 1e3:.3f}",
                f"{moved / copy / 1e9:.0f}",
                f"{seconds / copy:.2f}",
            ]
        )
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    return "\n".join(
        "  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in [header, *rows]
    )


def timed_variants() -> list[Variant]:
    """The timed kernels: PyTorch's default layout (v) and every buffer, every flag on."""
    every = UpdateOptions(
        centered=True,
        momentum=True,
        nesterov=True,
        ema=True,
        eps_in_sqrt=True,
        lr_in_momentum=True,
        decoupled_decay=True,
        maximize=True,
        bias_correction=True,
        scale_gradient=True,
        clip_value=True,
        gated=True,
    )
    return [
        Variant(options, dtype, dtype, dtype)
        for options, dtype in itertools.product((UpdateOptions(), every), ("float32", "bfloat16"))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=16, help="NVRTC programs in parallel")
    args = parser.parse_args(argv)
    import cupy

    started = time.perf_counter()
    device = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
    print(f"GPU: {name}, compute capability {device.compute_capability}")
    print(
        f"CuPy {cupy.__version__}, NVRTC {cupy.cuda.nvrtc.getVersion()}, arch {architecture(cupy)}"
    )
    plan = load_plan()
    timed = timed_variants()
    kernels = compile_kernels(
        cupy,
        plan + [t for t in timed if t.kernel_name not in {v.kernel_name for v in plan}],
        args.programs,
    )
    print(f"compiled {len(kernels)} kernels in {time.perf_counter() - started:.0f} s")
    failures: dict[tuple[str, str, str], list[str]] = {}
    counts: dict[tuple[str, str, str], int] = {}
    for k, variant in enumerate(plan):
        key = (variant.parameter, variant.gradient, variant.state)
        counts[key] = counts.get(key, 0) + 1
        problems = check_variant(cupy, kernels[variant.kernel_name][1], variant, seed=k)
        if problems:
            failures.setdefault(key, []).append(problems[0])
    rows = [[*key, str(n), str(len(failures.get(key, [])))] for key, n in counts.items()]
    print()
    print("Correctness: every element bit for bit against the float32 NumPy reference")
    print(format_table(["parameter", "gradient", "state", "variants", "differing"], rows))
    for problems in failures.values():
        for problem in problems:
            print("DIFFERS", problem)
    print()
    print(
        f"Speed at {TIMED_SIZE} elements (median of 20 launches; copy: cudaMemcpyAsync "
        "device to device of half the bytes the kernel reads and writes, the same traffic)"
    )
    header = ["buffers", "dtype", "kernel ms", "GB/s", "copy ms", "copy GB/s", "kernel/copy"]
    print(format_table(header, timing_rows(cupy, kernels, timed)))
    total = sum(counts.values())
    bad = sum(len(v) for v in failures.values())
    print(
        f"\n{'PASS' if not bad else 'FAIL'}: {total} variants, {bad} differing "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
