"""A strict Metal front end on Linux: clang parses the exact Metal translation units MLX
generates, with Metal's address spaces real (``tests/support/metal_emulation/metal_strict.h``), and a
rule over clang's AST rejects any pointer or reference that names no address space.

What this adds to the g++ emulation (``test_kernel_emulation.py``), which maps every address
space to plain memory: Metal rejects a pointer into ``device`` initialised from one into
``constant`` (MLX passes inputs under 8 elements in ``constant``), and any pointer or reference
declared without an address space. Neither shows up on g++.

Three liberties are taken with the text, each a Metal extension clang has no C++ spelling for:
the explicit instantiation's ``[[host_name(...)]] [[kernel]]`` attributes are dropped (C++
allows no attribute there); MLX's other attributes (``[[kernel]]``, ``[[buffer(i)]]``,
thread positions) are ignored as unknown; and the kernel-scope ``constant`` tables and
``threadgroup`` array of 8-bit state are declared ``static`` (clang refuses an automatic
variable in an address space, Metal declares such kernel-scope variables without it; static,
they keep their address space, so a pointer into one is still checked). ``if constexpr`` is accepted as the C++17 extension
Metal's compiler also accepts in its C++14-based language.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_rmsprop.paths.kernels.source import Variant, body_text, kernel_body, translation_unit
from mlx_rmsprop.paths.kernels.variants import (
    accumulating_variants,
    every_flag_on,
    factor_variants,
    pairwise_option_sets,
    verification_plan,
)
from mlx_rmsprop.spec import UpdateOptions, option_space

from locations import SUPPORT

STRICT_HEADER = SUPPORT / "metal_emulation" / "metal_strict.h"
CLANG = shutil.which("clang")
# CI installs clang (.ci/run); elsewhere the check is skipped with this reason.
if CLANG is None and os.environ.get("CI"):
    raise RuntimeError("clang is required in CI for the strict Metal check (.ci/run installs it)")
pytestmark = pytest.mark.skipif(CLANG is None, reason="clang is not installed")

CLANG_FLAGS = [
    # An arm64 target: clang has _Float16 and __bf16 (Metal's half and bfloat) there.
    "--target=aarch64-linux-gnu",
    "-march=armv8.6-a+bf16",
    "-std=c++14",
    "-fsyntax-only",
    "-nostdinc",
    f"-I{STRICT_HEADER.parent}",
    "-include",
    STRICT_HEADER.name,
    "-Wno-unknown-attributes",
    "-Wno-c++17-extensions",
    "-ferror-limit=0",
]
_INSTANCE_ATTRIBUTES = re.compile(r"^template (\[\[[^\]]*\]\] )+decltype", re.M)
_KERNEL_SCOPE_VARIABLES = re.compile(
    r"^(constant uint32_t k\w+\[|#define RMS_GROUP_SHARED )(threadgroup)?", re.M
)
# Declarations and explicit casts in clang's text AST dump, with their type ('T' or
# 'T':'desugared T'). Implicit casts (array or function decay) declare nothing.
_TYPED_NODE = re.compile(
    r"(?P<kind>VarDecl|ParmVarDecl|FieldDecl|TypedefDecl|TypeAliasDecl|CStyleCastExpr"
    r"|CXXStaticCastExpr|CXXReinterpretCastExpr|CXXConstCastExpr|CXXFunctionalCastExpr)"
    r" .*?(?P<name>\w*) '(?P<type>[^']*)'(?::'(?P<desugared>[^']*)')?"
)
_ADDRESS_SPACE = re.compile(
    r"\b(device|constant|threadgroup)\b|__attribute__\(\(address_space\(\d+\)\)\)"
)


def _static(match: re.Match) -> str:
    if match[0].startswith("#define"):
        return match[1] + "static " + (match[2] or "")
    return "static " + match[0]


def strict_unit(variant: Variant) -> str:
    """The generated Metal unit with the Metal-only spellings C++ cannot parse replaced (see
    the module docstring)."""
    unit = _INSTANCE_ATTRIBUTES.sub("template decltype", translation_unit(variant, "metal"))
    return _KERNEL_SCOPE_VARIABLES.sub(_static, unit)


def parse(units: list[str], tmp_path: Path, ast: bool = True) -> tuple[int, str, str]:
    """clang over the units (one file: every kernel has its own name): (returncode, errors,
    text AST dump)."""
    source = tmp_path / "units.metal.cpp"
    source.write_text("\n".join(units))
    command = [CLANG, *CLANG_FLAGS, "-x", "c++", str(source)]
    if ast:
        command += ["-Xclang", "-ast-dump"]
    result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode, result.stderr, result.stdout


def lacks_address_space(type_text: str) -> bool:
    """Whether some pointer or reference level in a clang type spelling points to a type with
    no address space: every text before a '*' or '&' (back to the previous one) must name one."""
    marked = _ADDRESS_SPACE.sub(" AS ", type_text)
    pieces = re.split(r"&&|[*&]", marked)
    return any("AS" not in piece.split() for piece in pieces[:-1])


def kernel_subtrees(ast_dump: str) -> list[str]:
    """The top-level nodes of the dump that are the kernels (template and instantiation), not
    clang's built-in declarations or the header's."""
    blocks = re.split(r"\n(?=[|`]-)", ast_dump)
    return [block for block in blocks if "custom_kernel_" in block.partition("\n")[0]]


def unqualified_indirections(ast_dump: str) -> list[str]:
    """Every declaration or explicit cast whose type has a pointer or reference without an
    address space (Metal: "pointer type must have explicit address space qualifier")."""
    found = []
    for match in _TYPED_NODE.finditer("\n".join(kernel_subtrees(ast_dump))):
        spellings = [match["type"], match["desugared"] or match["type"]]
        if any(lacks_address_space(t) for t in spellings):
            found.append(f"{match['kind']} {match['name']} '{match['type']}'")
    return found


def representative_variants() -> list[Variant]:
    """Every buffer layout (with and without stochastic rounding) with all its flags on, in
    mixed dtypes and every address-space class, plus the pairwise option sets (storage flags
    included) in float32 for both classes, plus the plan's kernels reading per-parameter clip
    factors (both address-space classes of the factors matrix)."""
    layouts = sorted({(o.state_keys, o.stochastic_rounding) for o in option_space(storage=True)})
    variants = []
    for keys, rounding in layouts:
        options = every_flag_on(keys, rounding)
        classes = [(False, False), (True, False)]
        if options.quantized_state:
            classes = [(False, False), (False, True), (True, True)]
        variants += [
            Variant(options, mx.bfloat16, mx.float16, mx.bfloat16, small, small_scales)
            for small, small_scales in classes
        ]
    for options in pairwise_option_sets(storage=True):
        for small in (False, True):
            quantized = options.quantized_state
            variants.append(Variant(options, small=small, small_scales=quantized and small))
    variants += factor_variants()
    variants += accumulating_variants()
    return list(dict.fromkeys(variants))


def test_address_space_rule_reads_clang_type_spellings():
    assert not lacks_address_space("device float const *")
    assert not lacks_address_space("constant int const &")
    assert not lacks_address_space("const __attribute__((address_space(2))) float *")
    assert not lacks_address_space("device float *device *")
    assert not lacks_address_space("size_t")
    assert lacks_address_space("const float *")
    assert lacks_address_space("float &")
    assert lacks_address_space("device float **")
    assert lacks_address_space("float (*)(float)")


def test_generated_units_parse_strictly_with_every_pointer_in_an_address_space(tmp_path):
    units = list(dict.fromkeys(strict_unit(variant) for variant in representative_variants()))
    returncode, errors, ast_dump = parse(units, tmp_path)
    assert returncode == 0 and "error" not in errors, errors[-4000:]
    assert unqualified_indirections(ast_dump) == []
    # The rule did see the kernels' buffers (a dump it cannot read would pass vacuously).
    kernels = kernel_subtrees(ast_dump)
    assert len(kernels) >= len(units)
    assert all("ParmVarDecl" in kernel for kernel in kernels)
    assert any("'constant float const *'" in kernel for kernel in kernels)
    # 8-bit state's kernel-scope variables were parsed in their address spaces.
    assert any("block_magnitude '__attribute__((address_space(3))) float[" in k for k in kernels)
    assert any("kSignedMidpoints 'constant uint32_t[255]' static" in k for k in kernels)


SMALL = Variant(UpdateOptions(centered=True), mx.float16, mx.float32, mx.float32, small=True)
LARGE = Variant(UpdateOptions(centered=True), mx.float16, mx.float32, mx.float32, small=False)


def planted(variant: Variant, line: str) -> str:
    """The unit with ``line`` added between the launcher's prologue and the shared body."""
    unit = strict_unit(variant)
    prologue = kernel_body("metal", variant.options.state_keys).removesuffix(body_text())
    prologue = _KERNEL_SCOPE_VARIABLES.sub(_static, prologue)
    assert prologue in unit
    return unit.replace(prologue, prologue + line + "\n", 1)


def test_a_device_pointer_to_a_constant_buffer_is_rejected(tmp_path):
    # On a parameter under 8 elements MLX passes `v` in `constant`: Metal refuses this line,
    # g++ with the emulation shim accepts it.
    line = "const device S* x = v;"
    returncode, errors, _ = parse([planted(SMALL, line)], tmp_path, ast=False)
    assert returncode != 0
    assert (
        "of type 'device float const *' with an lvalue of type 'constant float const *'" in errors
    )
    # The same line is valid Metal where `v` is a device buffer.
    returncode, errors, _ = parse([planted(LARGE, line)], tmp_path, ast=False)
    assert returncode == 0, errors


@pytest.mark.parametrize(
    "line",
    [
        "const float* x = nullptr;",
        "const float& x = lr;",
        "auto x = (const float*)nullptr;",
    ],
)
def test_a_pointer_or_reference_without_address_space_is_rejected(tmp_path, line):
    returncode, errors, ast_dump = parse([planted(LARGE, line)], tmp_path)
    assert returncode == 0, errors  # plain C++ accepts it: only the AST rule can tell
    assert any(
        " x '" in found or "CastExpr" in found for found in unqualified_indirections(ast_dump)
    )


def test_the_strict_header_has_the_metal_functions_the_body_may_call(tmp_path):
    calls = (
        "const float a = metal::precise::sqrt(lr) + metal::precise::divide(lr, alpha);\n"
        "const bool b = isnan(a);\n"
        "#pragma METAL fp contract(off)\n"
    )
    returncode, errors, _ = parse([planted(SMALL, calls)], tmp_path, ast=False)
    assert returncode == 0, errors
    # Anything outside Metal's library does not resolve (no libc here).
    returncode, errors, _ = parse([planted(SMALL, "const float c = sqrtf(lr);")], tmp_path)
    assert returncode != 0 and "sqrtf" in errors


@pytest.mark.slow
def test_every_verification_variant_parses_strictly(tmp_path):
    """The whole verification plan (every option set in float32, the pairwise sets in every
    dtype combination and both address-space classes), in chunks of one clang call each."""
    plan = verification_plan()
    assert any(v.small for v in plan) and any(not v.small for v in plan)
    chunk = 250
    # One unit per kernel: variants that differ only in block size (the threadgroup size, not
    # source text) share theirs.
    plan = list({translation_unit(variant): variant for variant in plan}.values())
    for start in range(0, len(plan), chunk):
        units = [strict_unit(variant) for variant in plan[start : start + chunk]]
        returncode, errors, ast_dump = parse(units, tmp_path)
        assert returncode == 0 and "error" not in errors, errors[-4000:]
        assert unqualified_indirections(ast_dump) == []


def test_threadgroup_memory_keeps_its_address_space(tmp_path):
    # The block reduction's threadgroup array, declared static for clang, is still in
    # `threadgroup`: a device pointer into it is refused, as Metal refuses it; a threadgroup
    # one is valid.
    options = every_flag_on(("v", "v_scale"))
    variant = Variant(options, small_scales=True)
    marker = "RMS_GROUP_SHARED float block_magnitude[shared_floats];\n"
    unit = strict_unit(variant)
    assert marker in unit
    for line, valid in [
        ("device float* x = block_magnitude;", False),
        ("threadgroup float* x = block_magnitude;", True),
    ]:
        returncode, errors, _ = parse([unit.replace(marker, marker + line + "\n")], tmp_path, False)
        assert (returncode == 0) == valid, errors[-2000:]
