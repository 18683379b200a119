"""The kernel's source text: the shared body wrapped the way MLX wraps a custom-kernel body.

``kernel_body`` is what the launchers pass as ``source=`` to ``mx.fast.metal_kernel`` /
``mx.fast.cuda_kernel``: a short backend-specific prologue (the arithmetic primitives, the
index line and the type spelling of absent buffers) followed by the body in
``mlx_rmsprop/metal/rmsprop_update.inc``, identical for both backends. ``translation_unit``
then reproduces the complete text MLX generates around it (signature, template
instantiation), so that the exact code a GPU compiles can be shown
(``RMSprop.kernel_source``), compiled by the emulation tests and compared with MLX's own
output (tests capture it through ``mx.export_function(..., verbose=True)``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from importlib import resources

import mlx.core as mx

from ...spec import (
    ACCUMULATOR,
    BLOCK_SIZES,
    EMA,
    FLAGS,
    GRAD_AVG,
    MIX32_MULTIPLIERS,
    MOMENTUM_BUFFER,
    NUM_SCALARS,
    QUANTIZED_KEYS,
    ROUNDING_OUTPUT_STRIDE,
    ROUNDING_TENSOR_STRIDE,
    SIGNED_CODE,
    UNSIGNED_CODE,
    Scalar,
    UpdateOptions,
    V,
    code_midpoints,
    scale_key,
)

BACKENDS = ("metal", "cuda")
KERNEL_NAME = "rmsprop"
# The kernel that reads its clip factors from the factors matrix has other inputs, so another
# name: MLX's CUDA backend caches a compiled module by "custom_kernel_" + name + the template
# arguments only (mlx/backend/cuda/custom_kernel.cpp, CustomKernel::eval_gpu passes name_ to
# cu::get_jit_module), and both kernels take the same template arguments.
FACTORS_KERNEL_NAME = "rmsprop_factors"
# Likewise the kernels that accumulate gradients (Keras' gradient_accumulation_steps) have
# inputs of their own and take their name's suffix.
ACCUMULATING_SUFFIX = "_accumulating"
BODY_RESOURCE = "rmsprop_update.inc"
# Dtypes the kernel computes with; anything else (float64, complex) takes the reference math.
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# MLX's spelling of each dtype in the generated source (its get_type_string): the float dtypes,
# the uint8 codes of 8-bit state and the uint32 `index` input (the parameter's position).
METAL_TYPES = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.uint8: "uint8_t",
    mx.uint32: "uint32_t",
}
CUDA_TYPES = {
    mx.float32: "float",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.uint8: "uint8_t",
    mx.uint32: "uint32_t",
}
# MLX passes an input with fewer elements than this in Metal's `constant` address space.
METAL_CONSTANT_BELOW = 8
METAL_MAX_BUFFERS = 31
# Metal thread attributes MLX declares when their name occurs anywhere in the body, in MLX's
# order (a substring search, reproduced in `_metal_attributes`).
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# The one line per backend that finds this thread's element. It must agree with
# `launch.grid_for`: a 1-D grid of n threads up to 2^31 - 256 elements, else rows of ROW_WIDTH.
INDEX_LINES = {
    "metal": "const size_t i = size_t(thread_position_in_grid.y) * threads_per_grid.x"
    " + thread_position_in_grid.x;",
    "cuda": "const size_t i = (size_t(blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x"
    " + threadIdx.x;",
}
# The arithmetic primitives of the shared body, per backend: each one IEEE float32 operation
# rounded to nearest even on its own, which no compiler may fuse with another (a fused
# multiply-add rounds once and so differs from the reference) nor replace by an approximation.
# - CUDA: MLX compiles custom kernels with NVRTC and passes no --fmad=false (MLX
#   mlx/backend/cuda/jit_module.cpp, compile(): the options are --device-as-default-execution-
#   space, --gpu-architecture and the include paths), so NVRTC contracts a*b + c into fma.rn.f32
#   by default. The CUDA Math API documents __fmul_rn, __fadd_rn and __fsub_rn ("Single
#   Precision Intrinsics") as round-to-nearest operations that are never merged into a
#   multiply-add; __fdiv_rn and __fsqrt_rn are the IEEE-rounded division and square root
#   whatever -prec-div/-prec-sqrt/-use_fast_math say.
#   tests/paths/kernels/test_kernel_ptx.py compiles the kernels with NVRTC and MLX's options
#   and finds no fma.rn.f32, no mul/add/sub.f32 without .rn and no .approx instruction.
# - Metal: MLX builds custom kernels with MTLMathModeSafe on macOS 15+ (fastMathEnabled = NO
#   before: mlx/backend/metal/device.cpp, set_compile_options; default math_mode "safe",
#   python/src/fast.cpp) and MSL 3.2 or later there (get_metal_version). Safe mode leaves the
#   FP32 math functions fast by default (MTLCompileOptions.mathFloatingPointFunctions defaults
#   to .fast; MLX never sets it), so sqrt and division are metal::precise:: explicitly, as
#   MLX's own mx.sqrt does. Contraction is switched off by `#pragma METAL fp contract(off)`, the
#   source-level control MSL 3.2 introduced with the math-mode pragmas (it must open the
#   compound statement, which the prologue does, and is compiled only where
#   __METAL_VERSION__ >= 320); on macOS 14 (MSL 3.1) Apple documents safe mode as "preventing
#   the compiler from making any transformations that could affect the results" (MTLMathMode
#   .safe). Whether Metal honours this is only measurable on a Mac: `python -m mlx_rmsprop
#   check` there compares every variant with the reference.
PRIMITIVES = {
    "metal": (
        "#if __METAL_VERSION__ >= 320\n"
        "#pragma METAL fp contract(off)\n"
        "#endif\n"
        "#define RMS_MUL(a, b) ((a) * (b))\n"
        "#define RMS_ADD(a, b) ((a) + (b))\n"
        "#define RMS_SUB(a, b) ((a) - (b))\n"
        "#define RMS_DIV(a, b) metal::precise::divide((a), (b))\n"
        "#define RMS_SQRT(x) metal::precise::sqrt(x)"
    ),
    "cuda": (
        "#define RMS_MUL(a, b) __fmul_rn((a), (b))\n"
        "#define RMS_ADD(a, b) __fadd_rn((a), (b))\n"
        "#define RMS_SUB(a, b) __fsub_rn((a), (b))\n"
        "#define RMS_DIV(a, b) __fdiv_rn((a), (b))\n"
        "#define RMS_SQRT(x) __fsqrt_rn(x)"
    ),
}
PRIMITIVE_NAMES = ("RMS_MUL", "RMS_ADD", "RMS_SUB", "RMS_DIV", "RMS_SQRT")
# What else the body needs spelled per backend: the bits of a float32 and back (exact, no
# arithmetic), whether a storage type is float16 (stochastic rounding), and one threadgroup's
# shared memory and barrier (the block reduction of 8-bit state).
# - Metal: as_type<> reinterprets bits; `threadgroup` memory and
#   threadgroup_barrier(mem_flags::mem_threadgroup) (MSL specification, "Threadgroup and SIMD-
#   group synchronization functions"): every thread of the group must reach it, which the body
#   guarantees (no early return with 8-bit state).
# - CUDA: __float_as_uint / __uint_as_float, __shared__ and __syncthreads() (CUDA Programming
#   Guide, "Synchronization functions": it must be reached by every thread of the block).
# Both type traits are what the backends' standard headers provide (metal_type_traits;
# libcu++'s cuda/std/type_traits, which MLX's device headers include:
# tests/paths/kernels/test_kernel_ptx.py compiles the kernels with those headers).
SPELLINGS = {
    "metal": (
        "#define RMS_FLOAT_BITS(x) as_type<uint32_t>(x)\n"
        "#define RMS_BITS_FLOAT(u) as_type<float>(u)\n"
        "#define RMS_IS_HALF(T) metal::is_same<T, half>::value\n"
        "#define RMS_GROUP_SHARED threadgroup\n"
        "#define RMS_GROUP_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)"
    ),
    "cuda": (
        "#define RMS_FLOAT_BITS(x) __float_as_uint(x)\n"
        "#define RMS_BITS_FLOAT(u) __uint_as_float(u)\n"
        "#define RMS_IS_HALF(T) cuda::std::is_same<T, __half>::value\n"
        "#define RMS_GROUP_SHARED __shared__\n"
        "#define RMS_GROUP_BARRIER() __syncthreads()"
    ),
}
SPELLING_NAMES = (
    "RMS_FLOAT_BITS",
    "RMS_BITS_FLOAT",
    "RMS_IS_HALF",
    "RMS_GROUP_SHARED",
    "RMS_GROUP_BARRIER",
)
# This thread's place in its threadgroup (8-bit state: its block) and the group's size.
GROUP_LINES = {
    "metal": "const uint32_t group_thread = thread_position_in_threadgroup.x;\n"
    "const uint32_t group_size = threads_per_threadgroup.x;",
    "cuda": "const uint32_t group_thread = threadIdx.x;\nconst uint32_t group_size = blockDim.x;",
}
# The code tables and midpoints of spec as float32 bit patterns (exact by construction), in
# the address space each backend reads constant data from. Metal declares them `constant` in
# the kernel's scope (function-scope constant arrays stay in constant memory instead of being
# copied per thread: Blender differential D17089, written by Apple for Blender's Metal
# backend; Apple's compiler has not seen these kernels, clang's strict parse has); CUDA as
# static const data of the kernel. Without 8-bit state they are null pointers, never read.
TABLES = {
    "kUnsignedCode": UNSIGNED_CODE,
    "kUnsignedMidpoints": code_midpoints(UNSIGNED_CODE),
    "kSignedCode": SIGNED_CODE,
    "kSignedMidpoints": code_midpoints(SIGNED_CODE),
}
TABLE_DECLARATIONS = {
    "metal": (
        "constant uint32_t {name}[{size}] = {{{values}}};",
        "constant uint32_t* {name} = nullptr;",
    ),
    "cuda": (
        "static const uint32_t {name}[{size}] = {{{values}}};",
        "const uint32_t* {name} = nullptr;",
    ),
}
# How an absent optional buffer is declared (input, output) so the body compiles without it.
ABSENT_BUFFERS = {
    "metal": ("const device {type}* {name} = nullptr;", "device {type}* new_{name} = nullptr;"),
    "cuda": ("const {type}* {name} = nullptr;", "{type}* new_{name} = nullptr;"),
}
# Optional buffers with the body's type of their elements: the moment buffers are Q (S, or
# uint8 codes with 8-bit state), the EMA S, the scales float.
OPTIONAL_STATE = {
    GRAD_AVG: "Q",
    MOMENTUM_BUFFER: "Q",
    EMA: "S",
    scale_key(V): "float",
    scale_key(GRAD_AVG): "float",
    scale_key(MOMENTUM_BUFFER): "float",
}
# The constants of the stochastic-rounding hash (spec: mix32 and the strides), named as in
# the generated spec.h.
HASH_CONSTANTS = (
    ("kMix32Multiplier1", MIX32_MULTIPLIERS[0]),
    ("kMix32Multiplier2", MIX32_MULTIPLIERS[1]),
    ("kRoundingTensorStride", ROUNDING_TENSOR_STRIDE),
    ("kRoundingOutputStride", ROUNDING_OUTPUT_STRIDE),
)
# Threads of the largest threadgroup a block is reduced by (the size of the body's threadgroup
# memory per 8-bit buffer).
MAX_BLOCK_SIZE = max(BLOCK_SIZES)


# The inputs of an accumulating kernel, after the others, named like the arguments of the
# native path's accumulating update: the running sum, this step's float32 gates (applies,
# skip) and the optimizer's float32 (loss scale, steps) (ACCUMULATION_LINES).
ACCUMULATION_INPUTS = ("accumulator", "gates", "accumulation")


def input_names(
    state_keys: tuple[str, ...],
    rounding: bool = False,
    factors: bool = False,
    accumulating: bool = False,
) -> tuple[str, ...]:
    """Kernel inputs, named like the arguments of ``rmsprop_reference``: ``index`` only where
    something reads it (stochastic rounding, the row of ``factors``), ``factors`` only when
    the parameter is clipped by its own norm, ACCUMULATION_INPUTS only when gradients
    accumulate."""
    positioned = ("index",) if rounding or factors else ()
    return (
        "parameter",
        "gradient",
        *state_keys,
        "scalars",
        *positioned,
        *(("factors",) if factors else ()),
        *(ACCUMULATION_INPUTS if accumulating else ()),
    )


def kernel_name(factors: bool = False, accumulating: bool = False) -> str:
    """The ``name=`` of the kernel object (see FACTORS_KERNEL_NAME, ACCUMULATING_SUFFIX)."""
    name = FACTORS_KERNEL_NAME if factors else KERNEL_NAME
    return name + (ACCUMULATING_SUFFIX if accumulating else "")


def output_names(state_keys: tuple[str, ...], accumulating: bool = False) -> tuple[str, ...]:
    """``new_<buffer>`` per output; an accumulating kernel's last is ``new_accumulator``."""
    names = ("parameter", *state_keys, *(("accumulator",) if accumulating else ()))
    return tuple(f"new_{name}" for name in names)


def quantized_layout(state_keys: tuple[str, ...]) -> bool:
    """Whether the buffer layout is 8-bit state's (its buffers have scales)."""
    return scale_key(V) in state_keys


@dataclass(frozen=True)
class Variant:
    """Everything that selects one compiled kernel: the options, the dtypes, and whether the
    arrays are small enough for MLX to pass them in Metal's ``constant`` address space.

    ``state_dtype`` is the dtype of the float state buffers, which all share it (the optimizer
    creates them so; other states take the reference path). With ``quantized_state`` the moment
    buffers are uint8 codes with float32 scales and only the EMA is a float buffer: without an
    EMA ``state_dtype`` is float32 (it selects nothing then). ``small_scales``: with
    ``quantized_state``, whether the scales (one per block) are fewer than 8 elements, which
    also holds whenever the parameter is.

    ``factors``: the kernel reads ``scale_gradient``'s clip multiplier and divisor from row
    ``index`` of the ``factors`` input, a float32 (parameters, 2) matrix (clipping by each
    parameter's own norm), instead of from the scalars vector; ``small_factors``: that matrix
    has fewer than 8 elements (at most 3 parameters), so MLX passes it in ``constant``.

    ``accumulator_dtype``: the kernel accumulates gradients (Keras' gradient accumulation) in
    an accumulator of this dtype (template parameter A), ``None`` when it does not."""

    options: UpdateOptions
    parameter_dtype: mx.Dtype = mx.float32
    gradient_dtype: mx.Dtype = mx.float32
    state_dtype: mx.Dtype = mx.float32
    small: bool = False
    small_scales: bool = False
    factors: bool = False
    small_factors: bool = False
    accumulator_dtype: mx.Dtype | None = None

    def __post_init__(self) -> None:
        roles = ("parameter", "gradient", "state", *(("accumulator",) if self.accumulates else ()))
        for role in roles:
            dtype = getattr(self, f"{role}_dtype")
            if dtype not in KERNEL_DTYPES:
                raise ValueError(
                    f"the kernel computes float32, float16 and bfloat16 only, got {role} "
                    f"dtype {dtype} (such parameters take the reference path instead)"
                )
        quantized = self.options.quantized_state
        if quantized and not self.options.ema:
            object.__setattr__(self, "state_dtype", mx.float32)
        if self.small_scales and not quantized:
            raise ValueError("small_scales needs options.quantized_state")
        if quantized and self.small and not self.small_scales:
            raise ValueError("a parameter under 8 elements has under 8 scales: small_scales")
        if self.factors and not self.options.scale_gradient:
            raise ValueError("factors needs options.scale_gradient (nothing else reads them)")
        if self.small_factors and not self.factors:
            raise ValueError("small_factors needs factors")

    @property
    def rounding(self) -> bool:
        """Whether the kernel rounds stochastically (it then reads ``index``)."""
        return self.options.stochastic_rounding

    @property
    def accumulates(self) -> bool:
        """Whether the kernel accumulates gradients (it then reads ACCUMULATION_INPUTS and
        writes ``new_accumulator``)."""
        return self.accumulator_dtype is not None

    @property
    def positioned(self) -> bool:
        """Whether the kernel takes the ``index`` input (stochastic rounding, factors)."""
        return self.rounding or self.factors

    @property
    def moment_dtype(self) -> mx.Dtype:
        """The storage dtype of v, grad_avg and momentum_buffer (template parameter Q)."""
        return mx.uint8 if self.options.quantized_state else self.state_dtype

    def _state_dtype(self, key: str) -> mx.Dtype:
        if key in QUANTIZED_KEYS:
            return self.moment_dtype
        return self.state_dtype if key == EMA else mx.float32

    @property
    def input_names(self) -> tuple[str, ...]:
        return input_names(self.options.state_keys, self.rounding, self.factors, self.accumulates)

    @property
    def output_names(self) -> tuple[str, ...]:
        return output_names(self.options.state_keys, self.accumulates)

    @property
    def state_names(self) -> tuple[str, ...]:
        """The state entries of the outputs after the parameter: ``state_keys``, then
        ACCUMULATOR when the kernel accumulates."""
        return (*self.options.state_keys, *((ACCUMULATOR,) if self.accumulates else ()))

    @property
    def input_dtypes(self) -> tuple[mx.Dtype, ...]:
        states = tuple(self._state_dtype(key) for key in self.options.state_keys)
        index = (mx.uint32,) if self.positioned else ()
        factors = (mx.float32,) if self.factors else ()
        accumulation = (self.accumulator_dtype, mx.float32, mx.float32) if self.accumulates else ()
        return (
            self.parameter_dtype,
            self.gradient_dtype,
            *states,
            mx.float32,
            *index,
            *factors,
            *accumulation,
        )

    @property
    def output_dtypes(self) -> tuple[mx.Dtype, ...]:
        states = tuple(self._state_dtype(key) for key in self.options.state_keys)
        accumulator = (self.accumulator_dtype,) if self.accumulates else ()
        return (self.parameter_dtype, *states, *accumulator)

    @property
    def input_sizes_small(self) -> tuple[bool, ...]:
        """Per input: passed in Metal's constant address space (fewer than 8 elements). The
        scales have one element per block, ``index`` one, ``factors`` two per parameter."""
        scales = {scale_key(key) for key in QUANTIZED_KEYS}
        small = [
            self.small_scales if name in scales else self.small
            for name in ("parameter", "gradient", *self.options.state_keys)
        ]
        small.append(NUM_SCALARS < METAL_CONSTANT_BELOW)
        if self.positioned:
            small.append(True)
        if self.factors:
            small.append(self.small_factors)
        if self.accumulates:
            # The accumulator has the parameter's size; gates and (loss scale, steps) two each.
            small += [self.small, True, True]
        return tuple(small)

    def template_args(self) -> list[tuple[str, mx.Dtype | bool]]:
        """``template=`` for MLX: the dtypes, then one bool per code-selecting option."""
        args: list[tuple[str, mx.Dtype | bool]] = [
            ("P", self.parameter_dtype),
            ("G", self.gradient_dtype),
            ("S", self.state_dtype),
            ("Q", self.moment_dtype),
        ]
        args += [(name.upper(), getattr(self.options, name)) for name in FLAGS]
        if self.accumulates:
            args.append(("A", self.accumulator_dtype))
        return args


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


@cache
def body_text() -> str:
    """The shared update body, read from the installed package."""
    return resources.files("mlx_rmsprop.metal").joinpath(BODY_RESOURCE).read_text("utf-8")


def _table_lines(backend: str, quantized: bool) -> list[str]:
    declared, absent = TABLE_DECLARATIONS[backend]
    lines = []
    for name, values in TABLES.items():
        if not quantized:
            lines.append(absent.format(name=name))
            continue
        bits = [f"{struct.unpack('<I', struct.pack('<f', value))[0]:#010x}u" for value in values]
        rows = ",\n    ".join(", ".join(bits[k : k + 8]) for k in range(0, len(bits), 8))
        lines.append(declared.format(name=name, size=len(values), values="\n    " + rows))
    return lines


# With the ``factors`` input, the two clip entries come from the parameter's row of the factors
# matrix instead of the scalars vector (reference.py: factors[index, 0] and factors[index, 1]).
FACTOR_ENTRIES = (Scalar.CLIP_MULTIPLIER, Scalar.CLIP_DIVISOR)
# The matrix is float32 (parameters, 2), row-major (MLX makes inputs row-contiguous). The
# launcher refuses an index past its last row; should one arrive anyway, the factors are NaN
# (the step's results show it) rather than a read past the buffer.
FACTOR_LINES = (
    "const bool factor_row_exists = size_t(parameter_position) < size_t(factors_shape[0]);",
    *(
        f"const float {entry.name.lower()} = factor_row_exists"
        f" ? factors[2 * size_t(parameter_position) + {column}] : RMS_BITS_FLOAT(0x7FC00000u);"
        for column, entry in enumerate(FACTOR_ENTRIES)
    ),
)


# The accumulation stage's values (the body's Keras' gradient accumulation, before its
# sections). Gates are per step, so
# an input array; the loss scale and the number of steps are fixed per optimizer and could be
# compiled in, but as an input too (the float32 `accumulation` vector the launcher makes once
# per configuration, a constant and no graph node) one kernel object and one compiled instance
# per layout serve every optimizer: MLX's template arguments take no float, and source text
# holding the loss scale would build and compile a kernel per loss scale and step count (on
# CUDA about a second of NVRTC per variant and process, mlx_rmsprop/paths/kernels/cuda.py).
# Both are rounded to float32 as the reference rounds them (mx.array(loss_scale, float32),
# mx.array(steps, float32): exact for steps up to 2^24).
ACCUMULATION_LINES = (
    "constexpr bool ACCUMULATES = true;",
    "const bool accumulation_applies = gates[0] != 0.0f;",
    "const bool accumulation_skip = gates[1] != 0.0f;",
    "const float loss_scale = accumulation[0];",
    "const float accumulation_steps = accumulation[1];",
)
# Without accumulation the body still names these (its `if constexpr` branches are parsed).
NO_ACCUMULATION_LINES = {
    backend: (
        "constexpr bool ACCUMULATES = false;",
        "using A = float;",
        absent[0].format(type="A", name="accumulator"),
        absent[1].format(type="A", name="accumulator"),
        "constexpr bool accumulation_applies = false;",
        "constexpr bool accumulation_skip = false;",
        "constexpr float loss_scale = 0.0f;",
        "constexpr float accumulation_steps = 1.0f;",
    )
    for backend, absent in ABSENT_BUFFERS.items()
}


@cache
def kernel_body(
    backend: str,
    state_keys: tuple[str, ...],
    rounding: bool = False,
    factors: bool = False,
    accumulating: bool = False,
) -> str:
    """The ``source=`` argument of the kernel object: prologue (the arithmetic primitives and
    the other backend spellings, the index and threadgroup lines, the scalars, the parameter's
    position, the clip factors' row, the code tables, absent buffers) + shared body.

    It depends on the backend, on which state buffers exist (``UpdateOptions.state_keys``,
    which also tell 8-bit state), on whether the kernel rounds stochastically and on whether
    it reads per-parameter clip factors (``index`` and ``factors`` inputs) and on whether it
    accumulates gradients (ACCUMULATION_INPUTS), not on dtypes or on the other flags (those are
    template arguments), nor on the block size (the threadgroup size), nor on any per-step or
    per-configuration number: one kernel object serves every step of every optimizer with that
    layout."""
    _check_backend(backend)
    quantized = quantized_layout(state_keys)
    lines = [PRIMITIVES[backend], SPELLINGS[backend], INDEX_LINES[backend], GROUP_LINES[backend]]
    lines += [
        f"const float {entry.name.lower()} = scalars[{int(entry)}];"
        for entry in Scalar
        if not (factors and entry in FACTOR_ENTRIES)
    ]
    position = "index[0]" if rounding or factors else "0u"
    lines.append(f"const uint32_t parameter_position = {position};")
    if factors:
        lines += FACTOR_LINES
    lines += ACCUMULATION_LINES if accumulating else NO_ACCUMULATION_LINES[backend]
    lines.append(f"constexpr uint32_t kMaxBlockSize = {MAX_BLOCK_SIZE}u;")
    lines += [f"constexpr uint32_t {name} = {value:#x}u;" for name, value in HASH_CONSTANTS]
    lines += _table_lines(backend, quantized)
    absent_input, absent_output = ABSENT_BUFFERS[backend]
    for name, kind in OPTIONAL_STATE.items():
        if name not in state_keys:
            lines += [
                absent_input.format(type=kind, name=name),
                absent_output.format(type=kind, name=name),
            ]
    return "\n".join(lines) + "\n\n" + body_text()


def kernel_arguments(
    backend: str,
    state_keys: tuple[str, ...],
    rounding: bool = False,
    factors: bool = False,
    accumulating: bool = False,
) -> dict[str, object]:
    """The constructor arguments of the kernel object (``mx.fast.metal_kernel`` or
    ``mx.fast.cuda_kernel``) for one buffer layout, with or without stochastic rounding, with
    or without per-parameter clip factors, accumulating gradients or not."""
    return {
        "name": kernel_name(factors, accumulating),
        "input_names": list(input_names(state_keys, rounding, factors, accumulating)),
        "output_names": list(output_names(state_keys, accumulating)),
        "source": kernel_body(backend, state_keys, rounding, factors, accumulating),
        "ensure_row_contiguous": True,
    }


def variant_body(variant: Variant, backend: str) -> str:
    """``kernel_body`` of the kernel object that runs ``variant``."""
    return kernel_body(
        backend, variant.options.state_keys, variant.rounding, variant.factors, variant.accumulates
    )


@cache
def shape_infos(source: str, input_names: tuple[str, ...]) -> list[tuple[bool, bool, bool]]:
    """Which of ``<name>_shape``, ``_strides``, ``_ndim`` MLX adds: a substring search of the
    body (both backends)."""
    return [
        tuple(f"{name}_{suffix}" in source for suffix in ("shape", "strides", "ndim"))
        for name in input_names
    ]


def _metal_attributes(source: str) -> list[str]:
    return [f"  {kind} {name} [[{name}]]" for name, kind in METAL_ATTRIBUTES if name in source]


def _metal_template_value(value: mx.Dtype | bool) -> str:
    return METAL_TYPES[value] if isinstance(value, mx.Dtype) else str(int(value))


def metal_kernel_name(variant: Variant) -> str:
    template = "<" + ", ".join(_metal_template_value(v) for _, v in variant.template_args()) + ">"
    name = f"custom_kernel_{kernel_name(variant.factors, variant.accumulates)}_"
    name += _template_hash(template)
    for dtype, small in zip(variant.input_dtypes, variant.input_sizes_small, strict=True):
        name += "_" + METAL_TYPES[dtype] + ("c" if small else "")
    for dtype in variant.output_dtypes:
        name += "_" + METAL_TYPES[dtype]
    return name


def _template_hash(template: str) -> str:
    return template.replace(", ", "_").replace("<", "_").replace(">", "_")[:-1]


def cuda_kernel_name(variant: Variant) -> str:
    suffix = ""
    for _, value in variant.template_args():
        if isinstance(value, mx.Dtype):
            suffix += "_" + METAL_TYPES[value]
        else:
            suffix += "_t" if value else "_f"
    return f"custom_kernel_{kernel_name(variant.factors, variant.accumulates)}{suffix}"


def metal_translation_unit(variant: Variant) -> str:
    """The Metal source MLX generates for this variant (what it prints with ``verbose=True``;
    at compile time MLX puts its own utility headers in front)."""
    source = variant_body(variant, "metal")
    name = metal_kernel_name(variant)
    template_args = variant.template_args()
    kinds = ", ".join(
        ("typename " if isinstance(v, mx.Dtype) else "bool ") + key for key, v in template_args
    )
    text = f"template <{kinds}>\n[[kernel]] void {name}(\n"
    attributes = _metal_attributes(source)
    index = 0
    infos = shape_infos(source, variant.input_names)
    for input_name, dtype, small, info in zip(
        variant.input_names, variant.input_dtypes, variant.input_sizes_small, infos, strict=True
    ):
        space = "constant" if small else "device"
        text += f"  const {space} {METAL_TYPES[dtype]}* {input_name} [[buffer({index})]],\n"
        index += 1
        for present, kind, suffix in zip(
            info, ("int*", "int64_t*", "int&"), ("shape", "strides", "ndim"), strict=True
        ):
            if present:
                text += f"  const constant {kind} {input_name}_{suffix} [[buffer({index})]],\n"
                index += 1
    outputs = list(zip(variant.output_names, variant.output_dtypes, strict=True))
    last_comma_index = len(variant.input_names) + len(outputs) - 1
    for output_name, dtype in outputs:
        text += f"  device {METAL_TYPES[dtype]}* {output_name} [[buffer({index})]]"
        # MLX's condition, reproduced as is (its index also counts shape buffers).
        text += ",\n" if index < last_comma_index or attributes else ") {\n"
        index += 1
    if attributes:
        text += ",\n".join(attributes) + ") {\n"
    text += source + "\n}\n"
    instance = name + "<" + ", ".join(_metal_template_value(v) for _, v in template_args) + ">"
    text += f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({instance}) {instance};\n'
    return text


CUDA_PREAMBLE = (
    '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
)


def cuda_translation_unit(variant: Variant) -> str:
    """The CUDA source MLX's CUDA backend builds around the same body (compiled with NVRTC)."""
    source = variant_body(variant, "cuda")
    text = CUDA_PREAMBLE + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += f"__global__ void {cuda_kernel_name(variant)}(\n"
    infos = shape_infos(source, variant.input_names)
    for input_name, dtype, info in zip(
        variant.input_names, variant.input_dtypes, infos, strict=True
    ):
        text += f"    const {CUDA_TYPES[dtype]}* {input_name},\n"
        for present, kind, suffix in zip(
            info, ("Shape", "Strides", "int"), ("shape", "strides", "ndim"), strict=True
        ):
            if present:
                text += f"    const __grid_constant__ {kind} {input_name}_{suffix},\n"
    outputs = [
        f"    {CUDA_TYPES[d]}* {n}"
        for n, d in zip(variant.output_names, variant.output_dtypes, strict=True)
    ]
    text += ",\n".join(outputs) + ") {\n"
    for key, value in variant.template_args():
        if isinstance(value, mx.Dtype):
            text += f"  using {key} = {CUDA_TYPES[value]};\n"
        else:
            text += f"  constexpr bool {key} = {'true' if value else 'false'};\n"
    text += "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n"
    return text


def translation_unit(variant: Variant, backend: str = "metal") -> str:
    """The complete source MLX compiles for ``variant`` on ``backend`` ("metal" or "cuda")."""
    _check_backend(backend)
    if backend == "metal":
        return metal_translation_unit(variant)
    return cuda_translation_unit(variant)


def metal_buffer_count(variant: Variant) -> int:
    """Buffer slots the Metal kernel binds: inputs, their shape/stride/ndim, outputs."""
    source = variant_body(variant, "metal")
    extra = sum(sum(info) for info in shape_infos(source, variant.input_names))
    return len(variant.input_names) + extra + len(variant.output_names)
