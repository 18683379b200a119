"""The kernel's source text: what we assemble equals what MLX generates (captured on Linux through
``mx.export_function(..., verbose=True)``), it stays inside Metal's language subset, and its
structure keeps the promises of the body's header (one read and one write per element, per-step
numbers only as data)."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import tempfile
from functools import partial

import mlx.core as mx
import pytest

from mlx_rmsprop import RMSprop, paths
from mlx_rmsprop.check import step_scalars, verification_inputs
from mlx_rmsprop.paths import probe
from mlx_rmsprop.paths.kernels import metal, source
from mlx_rmsprop.paths.kernels.launch import make_update, plan
from mlx_rmsprop.paths.kernels.source import Variant, translation_unit
from mlx_rmsprop.paths.kernels.variants import (
    every_flag_on,
    factor_variants,
    pairwise_option_sets,
)
from mlx_rmsprop.spec import FLAGS, REQUIREMENTS, Scalar, UpdateOptions, option_space

GENERATED = re.compile(
    r"Generated source code for `rmsprop(?:_factors)?(?:_accumulating)?`:\n```\n(.*?)\n```\n", re.S
)


def capture(capfd, function, *args) -> list[str]:
    """The Metal sources MLX generates while tracing ``function`` for export (nothing runs:
    this machine has no Metal). MLX prints them from C++, so capture at the descriptor level."""
    capfd.readouterr()
    with tempfile.TemporaryDirectory() as directory:
        mx.export_function(os.path.join(directory, "f.mlxfn"), function, *args)
    return GENERATED.findall(capfd.readouterr().out)


verbose_update = make_update(partial(metal.launch, verbose=True))

CAPTURED = [
    # (options, parameter dtype, gradient dtype, state dtype, shape, non-contiguous)
    (UpdateOptions(), mx.float32, mx.float32, mx.float32, (33,), False),
    (
        every_flag_on(("v", "grad_avg", "momentum_buffer", "ema")),
        mx.bfloat16,
        mx.float16,
        mx.float32,
        (3, 5),
        True,
    ),
    (UpdateOptions(centered=True, momentum=True), mx.float16, mx.float16, mx.float16, (3,), False),
    (
        UpdateOptions(maximize=True, coupled_decay=True, bias_correction=True),
        mx.bfloat16,
        mx.float32,
        mx.bfloat16,
        (),
        False,
    ),
    (UpdateOptions(ema=True, gated=True), mx.float32, mx.bfloat16, mx.float32, (2, 3, 7), True),
    # 8-bit state (uint8 codes, float32 scales: 3 blocks, in `constant`) with stochastic
    # rounding (the uint32 index input) to a bfloat16 parameter and a float16 EMA.
    (
        every_flag_on(
            (
                "v",
                "v_scale",
                "grad_avg",
                "grad_avg_scale",
                "momentum_buffer",
                "momentum_buffer_scale",
                "ema",
            ),
            True,
            32,
        ),
        mx.bfloat16,
        mx.float16,
        mx.float16,
        (5, 17),
        True,
    ),
    # More than 7 blocks (scales in `device`), no stochastic rounding; and a 0-d parameter.
    (
        UpdateOptions(quantized_state=True, block_size=32),
        mx.float32,
        mx.float32,
        mx.float32,
        (300,),
        False,
    ),
    (
        UpdateOptions(momentum=True, quantized_state=True, stochastic_rounding=True),
        mx.float16,
        mx.float16,
        mx.float32,
        (),
        False,
    ),
    (
        UpdateOptions(stochastic_rounding=True, centered=True),
        mx.bfloat16,
        mx.bfloat16,
        mx.bfloat16,
        (40,),
        False,
    ),
]


@pytest.mark.parametrize("case", CAPTURED, ids=lambda c: f"{c[1]}-{c[4]}")
def test_assembled_source_equals_mlx_generated_source(capfd, case):
    options, parameter_dtype, gradient_dtype, state_dtype, shape, transposed = case
    variant = Variant(options, parameter_dtype, gradient_dtype, state_dtype)
    parameter, gradient, state = verification_inputs(variant, shape, 0, transposed)
    keys = options.state_keys

    def step(scalars, parameter, gradient, *buffers):
        new_parameter, new_state = verbose_update(
            options, scalars, parameter, gradient, dict(zip(keys, buffers, strict=True))
        )
        return [new_parameter, *new_state.values()]

    (captured,) = capture(capfd, step, step_scalars(1), parameter, gradient, *state.values())
    call = plan(options, step_scalars(1), parameter, gradient, state)
    assert call.variant.small == (len(parameter.reshape(-1)) < 8)
    assert captured == translation_unit(call.variant, "metal")
    if options.quantized_state:
        assert call.variant.small_scales == (-(-parameter.size // options.block_size) < 8)


@pytest.mark.parametrize("rows", [3, 4], ids=["factors<8", "factors>=8"])
@pytest.mark.parametrize("rounding", [False, True], ids=["nearest", "stochastic"])
def test_clip_factor_source_equals_mlx_generated_source(capfd, rows, rounding):
    # The kernel reading its clip factors from the factors matrix: the `index` and `factors`
    # inputs and the factors' shape (the bounds guard reads it) as MLX binds them, in both
    # address spaces of the matrix.
    options = UpdateOptions(scale_gradient=True, centered=True, stochastic_rounding=rounding)
    variant = Variant(options, mx.bfloat16, mx.float32, mx.float32)
    parameter, gradient, state = verification_inputs(variant, (5, 3), 0)
    keys = options.state_keys
    factors = probe.clip_factors(rows)

    def step(scalars, factors, parameter, gradient, *buffers):
        new_parameter, new_state = verbose_update(
            options,
            scalars,
            parameter,
            gradient,
            dict(zip(keys, buffers, strict=True)),
            index=rows - 1,
            factors=factors,
        )
        return [new_parameter, *new_state.values()]

    arguments = (step_scalars(1), factors, parameter, gradient, *state.values())
    (captured,) = capture(capfd, step, *arguments)
    call = plan(options, step_scalars(1), parameter, gradient, state, rows - 1, factors)
    assert call.variant.factors and call.variant.small_factors == (rows < 4)
    assert captured == translation_unit(call.variant, "metal")
    assert "custom_kernel_rmsprop_factors_" in captured and "factors_shape [[buffer(" in captured


def graph_nodes(*outputs: mx.array) -> int:
    """Operations evaluating ``outputs`` would run: the nodes of MLX's DOT export."""
    text = io.StringIO()
    mx.export_to_dot(text, *outputs)
    return text.getvalue().count("shape=rectangle")


def test_clip_factors_reach_the_kernel_without_a_node_per_parameter():
    # A step's parameters clipped by their own norms, each at its position: the kernels take
    # the step's factor matrix as it is and read their rows themselves, so the graph holds
    # one node per parameter, its kernel (splicing each row into the scalars vector added
    # slice and concatenate nodes per parameter). Counted while exporting, where MLX builds
    # the Metal kernel's node without running it.
    options = UpdateOptions(scale_gradient=True, momentum=True, stochastic_rounding=True)
    parameters = 4
    counts = []

    def step(scalars, factors, *arrays):
        outputs = []
        for index in range(parameters):
            parameter, gradient, v, buffer = arrays[4 * index : 4 * index + 4]
            state = {"v": v, "momentum_buffer": buffer}
            new_parameter, new_state = verbose_update(
                options, scalars, parameter, gradient, state, index=index, factors=factors
            )
            outputs += [new_parameter, *new_state.values()]
        counts.append(graph_nodes(*outputs))
        return outputs

    # Per parameter: parameter, gradient, v, momentum_buffer (1-D: no reshape node either).
    arrays = [mx.ones((5 + k,)) for k in range(parameters) for _ in range(4)]
    with tempfile.TemporaryDirectory() as directory:
        mx.export_function(
            os.path.join(directory, "f.mlxfn"),
            step,
            step_scalars(1),
            probe.clip_factors(parameters),
            *arrays,
        )
    assert counts == [parameters]


def test_learning_rate_schedule_never_changes_the_source(capfd):
    options = UpdateOptions(momentum=True, bias_correction=True)
    variant = Variant(options)
    parameter, gradient, state = verification_inputs(variant, (40,), 0)

    def step(scalars):
        return verbose_update(options, scalars, parameter, gradient, state)[0]

    sources = [capture(capfd, step, step_scalars(t))[0] for t in (1, 2, 7)]
    assert sources[0] == sources[1] == sources[2]
    # Kernel objects: one per buffer layout, however many steps and variants.
    metal.kernel_object.cache_clear()
    for t in (1, 2, 3):
        capture(capfd, step, step_scalars(t))
    info = metal.kernel_object.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_optimizer_step_runs_one_kernel_per_parameter_inside_mx_compile(capfd, monkeypatch):
    # The optimizer's own update, on the Metal path (its loader replaced, as this machine has
    # no Metal, by the launcher with verbose=True), compiled whole as the kernel paths ask
    # (compile_step=True): one launch for each float32/bfloat16 parameter, none for the
    # float64 one (reference math), and the sources are the ones RMSprop.kernel_source reports.
    metal_path = dataclasses.replace(paths.PATHS["metal"], load=lambda: verbose_update)
    monkeypatch.setitem(paths.PATHS, "metal", metal_path)
    # Export only traces: the per-variant probe, which runs the kernel, cannot run here.
    monkeypatch.setattr(probe, "kernel_verdict", lambda *args: None)
    optimizer = RMSprop.from_torch(lr=0.01, momentum=0.9, centered=True, fused="metal")
    assert optimizer.path == "metal" and metal_path.compile_step

    def step(weight, bias, scale):
        parameters = {"weight": weight, "bias": bias, "scale": scale}
        gradients = {name: mx.ones_like(value) for name, value in parameters.items()}
        return list(optimizer.apply_gradients(gradients, parameters).values())

    sources = capture(
        capfd, step, mx.zeros((4, 5)), mx.zeros((3,), mx.bfloat16), mx.zeros((2,), mx.float64)
    )
    small_bfloat16 = Variant(optimizer._config.options, mx.bfloat16, mx.bfloat16, mx.float32, True)
    assert sorted(sources) == sorted(
        [optimizer.kernel_source(mx.float32), translation_unit(small_bfloat16)]
    )


def test_optimizer_clipping_by_each_norm_runs_the_factor_kernel_inside_mx_compile(
    capfd, monkeypatch
):
    # Keras' clipnorm on the Metal path, compiled whole: each parameter's kernel is the one
    # that reads its row of the step's clip factors, the source RMSprop.kernel_source reports
    # (4 parameters: a factor matrix of 8 elements, in `device`).
    metal_path = dataclasses.replace(paths.PATHS["metal"], load=lambda: verbose_update)
    monkeypatch.setitem(paths.PATHS, "metal", metal_path)
    monkeypatch.setattr(probe, "kernel_verdict", lambda *args: None)
    optimizer = RMSprop.from_keras(learning_rate=0.01, clipnorm=1.0, fused="metal")

    def step(*weights):
        parameters = {f"w{k}": weight for k, weight in enumerate(weights)}
        gradients = {name: mx.ones_like(value) for name, value in parameters.items()}
        return list(optimizer.apply_gradients(gradients, parameters).values())

    sources = capture(capfd, step, *(mx.zeros((9 + k,)) for k in range(4)))
    assert sources == [optimizer.kernel_source(mx.float32)] * 4
    assert "custom_kernel_rmsprop_factors_" in sources[0]
    cuda = optimizer.kernel_source(mx.float32, backend="cuda")
    assert "const float* factors," in cuda and "const uint32_t* index," in cuda


def test_kernel_source_follows_the_optimizer_configuration():
    keras = RMSprop.from_keras(learning_rate=0.01, momentum=0.5, centered=True, weight_decay=0.1)
    text = keras.kernel_source(mx.float16)
    assert "bool CENTERED" in text and "decltype(" in text
    variant = Variant(keras._config.options, mx.float16, mx.float16, mx.float32)
    assert text == translation_unit(variant, "metal")
    assert keras.kernel_source(mx.float16, backend="cuda") == translation_unit(variant, "cuda")
    state_in_half = RMSprop(0.1, state_dtype=mx.float16).kernel_source(mx.float16)
    assert "device float16_t* new_v" in state_in_half


def test_kernel_source_errors_name_the_argument():
    optimizer = RMSprop(0.1)
    with pytest.raises(ValueError, match="backend must be one of .*got 'vulkan'"):
        optimizer.kernel_source(mx.float32, backend="vulkan")
    with pytest.raises(ValueError, match="got parameter dtype mlx.core.float64 .*reference"):
        optimizer.kernel_source(mx.float64)
    with pytest.raises(ValueError, match="got state dtype mlx.core.float64"):
        RMSprop(0.1, state_dtype=mx.float64).kernel_source(mx.float32)


def _code(text: str) -> str:
    """``text`` without its comments."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


# Each pattern is something Metal's language does not have (or a kernel must not do).
NOT_METAL = {
    "double": r"\bdouble\b",
    "std::": r"\bstd::",
    "dynamic allocation": r"\b(new|delete|malloc|calloc|realloc|free)\b",
    "printf": r"\b(printf|fprintf|puts)\b",
    "unsuffixed float literal (a double)": r"(?<![\w.])(\d+\.\d*|\.\d+|\d+[eE][-+]?\d+)(?![\w.])",
    "goto": r"\bgoto\b",
}
# Every call in the kernel body: Metal built-ins and the control keywords, nothing user-defined
# (so no recursion is possible).
ALLOWED_CALLS = {"if", "constexpr", "for", "isnan", "isinf", "sizeof", "size_t"}
ALLOWED_CALLS |= {*source.PRIMITIVE_NAMES, *source.SPELLING_NAMES}
# metal::precise:: and the threadgroup barrier, in the definitions of the primitives and
# spellings.
ALLOWED_CALLS |= {"divide", "sqrt", "threadgroup_barrier"}


def _metal_subset_violations(code: str) -> list[str]:
    return [what for what, pattern in NOT_METAL.items() if re.search(pattern, code)]


def layouts() -> list[tuple[tuple[str, ...], bool, bool]]:
    """Every (buffer layout, stochastic rounding, clip factors) a kernel body is built for."""
    kinds = {(o.state_keys, o.stochastic_rounding) for o in option_space(storage=True)}
    return sorted((keys, rounding, factors) for keys, rounding in kinds for factors in (0, 1))


def test_every_metal_kernel_stays_in_the_metal_subset():
    # The body text depends only on the buffer layout: check each layout's body once, then
    # the rest of every option set's translation unit (signature, template instantiation).
    for keys, rounding, factors in layouts():
        body = _code(source.kernel_body("metal", keys, rounding, factors))
        assert not _metal_subset_violations(body), keys
        statements = re.sub(r"^#pragma [^\n]*", "", body, flags=re.M)
        calls = set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", statements))
        assert calls <= ALLOWED_CALLS, f"calls {calls - ALLOWED_CALLS} for {keys}"
    # Every option set without storage flags; with them (4x as many, the same wrappers but for
    # the buffer types), the pairwise sets and every layout with every flag on.
    storage = [every_flag_on(keys, rounding) for keys, rounding, _ in layouts()]
    variants = [
        Variant(options, mx.bfloat16, mx.float16, mx.float32)
        for options in dict.fromkeys([*option_space(), *pairwise_option_sets(True), *storage])
    ]
    variants += factor_variants()
    for variant in variants:
        unit = translation_unit(variant, "metal")
        # MLX's wrapper has no comments: what is left once the body is taken out is code.
        wrapper = unit.replace(source.variant_body(variant, "metal"), "")
        assert not _metal_subset_violations(wrapper), variant
        buffers = [int(b) for b in re.findall(r"\[\[buffer\((\d+)\)\]\]", wrapper)]
        assert buffers == list(range(len(buffers)))
        assert len(buffers) == source.metal_buffer_count(variant) <= source.METAL_MAX_BUFFERS
    # The largest layouts: 7 inputs, the parameter's shape and ndim, 5 outputs; with 8-bit
    # state and stochastic rounding 11 inputs (3 scales, index), shape, ndim and 8 outputs;
    # with clip factors too, 12 inputs and the factors' shape.
    assert max(source.metal_buffer_count(Variant(o)) for o in option_space()) == 14
    largest = max(source.metal_buffer_count(Variant(o)) for o in storage)
    assert largest == 21
    assert max(source.metal_buffer_count(v) for v in factor_variants()) == 23


def test_metal_subset_check_can_fail():
    for bad in [
        "double x = 1.0f;",
        "float y = 0.5;",
        "std::max(a, b);",
        "new float[3];",
        'printf("%f", x);',
        "float z = 1e-8;",
    ]:
        assert _metal_subset_violations(bad), bad
    assert not _metal_subset_violations(_code("float a = 0.5f * b; // double 0.5 in a comment"))
    assert not _metal_subset_violations(_code("float a = 1e-8f; /* printf */ int k = 2;"))


def test_body_reads_each_input_once_and_writes_each_output_once():
    body = _code(source.body_text())
    scales = [f"{key}_scale" for key in ("v", "grad_avg", "momentum_buffer")]
    for name in ("parameter", "gradient", "v", "grad_avg", "momentum_buffer", "ema", *scales):
        assert len(re.findall(rf"(?<![\w.]){name}\[", body)) == 1, name
    for name in ("parameter", "v", "grad_avg", "momentum_buffer", "ema"):
        assert len(re.findall(rf"\bnew_{name}\[", body)) == 1, name
        assert len(re.findall(rf"\bnew_{name}\[i\] = static_cast<[PSQ]>\(", body)) == 1, name
    # A block's scales: one store each, by one thread of the block.
    for name in scales:
        assert len(re.findall(rf"\bnew_{name}\[block\] = new_scales\[\d\];", body)) == 1, name
    # The scalars vector is read by the prologue only, one line per entry; with per-parameter
    # clip factors the two clip entries come from the parameter's row of `factors` instead.
    assert "scalars" not in body and "factors" not in body
    for factors in (False, True):
        prologue = source.kernel_body("metal", ("v",), False, factors).split(source.body_text())[0]
        for entry in Scalar:
            from_scalars = f"const float {entry.name.lower()} = scalars[{int(entry)}];"
            expected = 0 if factors and entry in source.FACTOR_ENTRIES else 1
            assert prologue.count(from_scalars) == expected, entry
        assert ("const uint32_t parameter_position = index[0];" in prologue) == factors
        column = {Scalar.CLIP_MULTIPLIER: 0, Scalar.CLIP_DIVISOR: 1}
        for entry in source.FACTOR_ENTRIES:
            row = f"factors[2 * size_t(parameter_position) + {column[entry]}]"
            line = f"const float {entry.name.lower()} = factor_row_exists ? {row}"
            assert (line in prologue) == factors, entry


def _without_qualifiers(line: str) -> str:
    return re.sub(r"\b(device|constant|static|const)\s+", "", line)


def test_cuda_and_metal_share_the_body():
    # Only the prologue's backend spellings differ: the arithmetic primitives and the other
    # spellings, the index and threadgroup lines, and the address spaces of the tables and of
    # absent buffers.
    for keys, rounding, factors in layouts():
        metal_text = source.kernel_body("metal", keys, rounding, factors)
        cuda_text = source.kernel_body("cuda", keys, rounding, factors)
        for backend, text in (("metal", metal_text), ("cuda", cuda_text)):
            head = "\n".join(
                [
                    source.PRIMITIVES[backend],
                    source.SPELLINGS[backend],
                    source.INDEX_LINES[backend],
                    source.GROUP_LINES[backend],
                ]
            )
            assert text.startswith(head + "\n"), backend
        metal_lines = metal_text.split(source.GROUP_LINES["metal"] + "\n")[1].splitlines()
        cuda_lines = cuda_text.split(source.GROUP_LINES["cuda"] + "\n")[1].splitlines()
        assert len(metal_lines) == len(cuda_lines)
        for metal_line, cuda_line in zip(metal_lines, cuda_lines, strict=True):
            if metal_line != cuda_line:
                assert _without_qualifiers(metal_line) == _without_qualifiers(cuda_line), (
                    metal_line,
                    cuda_line,
                )
        assert metal_text.endswith(source.body_text())
        assert cuda_text.endswith(source.body_text())


def test_every_update_option_is_a_template_argument():
    needs = dict(REQUIREMENTS)
    for name in FLAGS:
        # Each flag switched on alone (with the flag it needs): the template must change.
        base = {needs[name]: True} if name in needs else {}
        baseline = Variant(UpdateOptions(**base)).template_args()
        options = UpdateOptions(**base, **{name: True})
        assert Variant(options).template_args() != baseline, name
    decoupled = Variant(UpdateOptions(decoupled_decay=True)).template_args()
    assert ("DECOUPLED_DECAY", True) in decoupled
    assert ("COUPLED_DECAY", False) in decoupled


# A float operator between two operands (a * b, a / b, a + b, a - b, compound assignments
# included); unary minus (-g) is exact and allowed.
_BINARY_FLOAT_OPERATOR = re.compile(r"[\w)\]]\s*[-+*/]=?\s*[\w(]")


def _plain_float_arithmetic(body: str) -> list[str]:
    """Lines of the body doing float arithmetic with plain operators (lines that name size_t
    or uint32_t are the integer arithmetic: element count, index, block, hash, code search)."""
    return [
        line
        for line in _code(body).splitlines()
        if not re.search(r"\b(size_t|uint32_t)\b", line) and _BINARY_FLOAT_OPERATOR.search(line)
    ]


def test_body_arithmetic_goes_through_the_primitives():
    # Every float operation is an RMS_* primitive, each backend's IEEE-rounded and unfusable
    # operation (source.PRIMITIVES): a plain a*b + c could be fused by the GPU compiler.
    body = source.body_text()
    assert not _plain_float_arithmetic(body)
    for name in source.PRIMITIVE_NAMES:
        assert f"{name}(" in _code(body), name
    for backend in source.BACKENDS:
        defined = re.findall(r"^#define (RMS_\w+)\(", source.PRIMITIVES[backend], re.M)
        assert sorted(defined) == sorted(source.PRIMITIVE_NAMES), backend
    assert "metal::precise::sqrt" in source.PRIMITIVES["metal"]
    assert "metal::precise::divide" in source.PRIMITIVES["metal"]
    assert "#pragma METAL fp contract(off)" in source.PRIMITIVES["metal"]
    for intrinsic in ("__fmul_rn", "__fadd_rn", "__fsub_rn", "__fdiv_rn", "__fsqrt_rn"):
        assert intrinsic in source.PRIMITIVES["cuda"], intrinsic


# The calls the shared body may make itself: control keywords, the exact isnan, the integer
# size_t conversion and the primitives. A math function called directly (sqrt, divide, fma,
# rsqrt, ...) would bypass the primitives: on Metal a plain sqrt is the fast one under MLX's
# compile options, while g++ and NVRTC (prec-sqrt is on by default) compile it IEEE-rounded,
# so neither the emulation nor the PTX check would notice.
BODY_CALLS = {"if", "constexpr", "for", "isnan", "isinf", "sizeof", "size_t"}
BODY_CALLS |= {*source.PRIMITIVE_NAMES, *source.SPELLING_NAMES}


def _calls_outside_the_primitives(body: str) -> set[str]:
    return set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", _code(body))) - BODY_CALLS


def test_body_calls_no_math_function_outside_the_primitives():
    assert not _calls_outside_the_primitives(source.body_text())


def test_body_call_rule_can_fail():
    body = source.body_text()
    old = "RMS_SQRT(RMS_ADD(variance, eps))"
    assert old in body
    for new in [
        "sqrt(RMS_ADD(variance, eps))",
        "metal::precise::sqrt(RMS_ADD(variance, eps))",
        "metal::fast::sqrt(RMS_ADD(variance, eps))",
        "fma(variance, 1.0f, eps)",
        "__fsqrt_rn(RMS_ADD(variance, eps))",
        "RMS_DIV(1.0f, rsqrt(RMS_ADD(variance, eps)))",
    ]:
        assert _calls_outside_the_primitives(body.replace(old, new)), new


def test_primitive_rule_can_fail():
    for bad in [
        "float v_new = alpha * v_old + one_minus_alpha * RMS_MUL(g, g);",
        "  g = g / grad_divisor;",
        "p_new = p_new - delta;",
        "  denom = RMS_SQRT(variance) + eps;",
        "ema_value *= ema_momentum;",
    ]:
        assert _plain_float_arithmetic(bad), bad
    for good in [
        "g = -g;",
        "const float low = -clip_value;",
        "n *= size_t(parameter_shape[d]);",
        "const uint32_t probe = (code | step) - 1u;",
    ]:
        assert not _plain_float_arithmetic(good), good
