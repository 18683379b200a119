"""The spec (mlx_rmsprop/spec.py): its invariants and messages, the one option space, the C++
header generated from it, and UpdateFn defined once (that the import graph has no cycle:
tests/test_package_imports.py)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_rmsprop
from mlx_rmsprop import RMSprop, spec
from mlx_rmsprop.paths.native.sources import SOURCE_DIR, SOURCE_FILES
from mlx_rmsprop.spec import FLAGS, UpdateOptions, option_space

PACKAGE_DIR = Path(mlx_rmsprop.__file__).parent
REPOSITORY = PACKAGE_DIR.parent


def test_generated_header_is_current():
    # Fails after a spec change until `python tools/generate_spec_header.py` has been run.
    assert spec.HEADER_PATH.read_text("utf-8") == spec.header_text()


def test_generator_check_mode_reports_a_stale_header(tmp_path, monkeypatch):
    tool = REPOSITORY / "tools" / "generate_spec_header.py"
    run = [sys.executable, str(tool), "--check"]
    current = subprocess.run(run, capture_output=True, text=True, cwd=REPOSITORY)
    assert current.returncode == 0, current.stdout + current.stderr

    stale = tmp_path / "spec.h"
    stale.write_text(spec.header_text().replace("X(ema, kEma)", "X(ema, kEmaX)"), "utf-8")
    script = (
        "import runpy, sys, mlx_rmsprop.spec as s, pathlib; "
        f"s.HEADER_PATH = pathlib.Path({str(stale)!r}); "
        f"sys.argv = [{str(tool)!r}, '--check']; "
        f"runpy.run_path({str(tool)!r}, run_name='__main__')"
    )
    outdated = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPOSITORY
    )
    assert outdated.returncode == 1
    assert "stale" in outdated.stdout


def test_header_lists_every_scalar_and_flag_in_order():
    text = spec.header_text()
    scalar_rows = [f"X({entry.name}, {spec.cpp_name(entry.name)})" for entry in spec.Scalar]
    flag_rows = [f"X({name}, {spec.cpp_name(name)})" for name in FLAGS]
    positions = [text.index(row) for row in scalar_rows + flag_rows]
    assert positions == sorted(positions)
    # The C++ names follow the Python ones.
    assert spec.cpp_name("bias_correction") == "kBiasCorrection"
    assert spec.cpp_name("clip_value") == "kClipValue"
    assert spec.cpp_name("EMA_ONE_MINUS_MOMENTUM") == "kEmaOneMinusMomentum"


def test_native_source_digest_covers_every_shipped_source():
    # A spec change must invalidate a build from older sources: spec.h is part of the digest.
    shipped = {
        path.name
        for path in SOURCE_DIR.iterdir()
        if path.suffix in (".h", ".cpp") or path.name == "CMakeLists.txt"
    }
    assert "spec.h" in SOURCE_FILES
    assert shipped == set(SOURCE_FILES)


def test_option_space_is_every_valid_combination_once():
    space = option_space(storage=True)
    assert len(space) == len(set(space))
    members = set(space)
    for values in itertools.product((False, True), repeat=len(FLAGS)):
        flags = dict(zip(FLAGS, values, strict=True))
        if spec.violation(flags) is None:
            assert UpdateOptions(**flags) in members
        else:
            with pytest.raises(ValueError):
                UpdateOptions(**flags)
    # Of the 8 (momentum, nesterov, lr_in_momentum) combinations 5 are valid, of the 4 decay
    # combinations 3; the other flags are free (15360 with the 15 flags of this writing).
    assert len(space) == 2 ** len(FLAGS) * 5 // 8 * 3 // 4
    # Without storage, the same with every storage flag off.
    assert option_space() == tuple(
        options
        for options in space
        if not any(getattr(options, name) for name in spec.STORAGE_FLAGS)
    )


def test_block_size_is_set_exactly_with_quantized_state():
    assert UpdateOptions(quantized_state=True).block_size == spec.DEFAULT_BLOCK_SIZE
    assert UpdateOptions(quantized_state=True, block_size=64).block_size == 64
    with pytest.raises(ValueError, match=r"block_size must be one of .* got 100"):
        UpdateOptions(quantized_state=True, block_size=100)
    with pytest.raises(ValueError, match="block_size=256 needs quantized_state=True"):
        UpdateOptions(block_size=256)


@pytest.mark.parametrize("table", [spec.UNSIGNED_CODE, spec.SIGNED_CODE])
def test_code_tables_are_increasing_float32_with_no_zero(table):
    midpoints = spec.code_midpoints(table)
    assert len(table) == 256 and len(midpoints) == 255
    assert all(low < high for low, high in itertools.pairwise(table))
    assert all(low < high for low, high in itertools.pairwise(midpoints))
    assert all(
        low < mid < high for low, mid, high in zip(table[:-1], midpoints, table[1:], strict=True)
    )
    assert 0.0 not in table and table[-1] == 1.0
    assert all(np.float32(value) == value for value in (*table, *midpoints))


def test_signed_code_is_symmetric():
    assert spec.SIGNED_CODE == tuple(-value for value in reversed(spec.SIGNED_CODE))


def test_rounding_hash_matches_known_values():
    # Pinned so that a change to the hash (which changes every stochastically rounded result
    # and every recorded trajectory) is deliberate.
    assert [spec.mix32(x) for x in (0, 1, 0xFFFFFFFF)] == [0, 114555507, 3652544131]
    assert spec.rounding_step_key(0, 1) == 10361252
    assert all(spec.rounding_step_key(seed, 7) < 2**24 for seed in range(100))


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"nesterov": True}, "nesterov=True requires momentum=True, got momentum=False"),
        (
            {"lr_in_momentum": True},
            "lr_in_momentum=True requires momentum=True, got momentum=False",
        ),
        (
            {"coupled_decay": True, "decoupled_decay": True},
            "coupled_decay=True and decoupled_decay=True exclude each other",
        ),
    ],
)
def test_each_invariant_has_one_message(flags, message):
    with pytest.raises(ValueError) as error:
        UpdateOptions(**flags)
    assert str(error.value) == message


def test_options_are_bools():
    with pytest.raises(TypeError, match="UpdateOptions.centered must be a bool, got 'yes'"):
        UpdateOptions(centered="yes")


def test_constructor_words_the_invariant_with_its_arguments():
    with pytest.raises(ValueError) as error:
        RMSprop(0.1, nesterov=True, momentum=0.0)
    assert str(error.value) == "nesterov=True requires momentum > 0, got momentum=0.0"


def test_lr_in_momentum_without_momentum_is_the_plain_update():
    # Same code under another name: the options drop it, the public settings keep it.
    optimizer = RMSprop(0.1, lr_in_momentum=True)
    assert optimizer._config.options == UpdateOptions()
    assert optimizer.lr_in_momentum is True
    assert optimizer.get_config()["lr_in_momentum"] is True
    with_momentum = RMSprop(0.1, lr_in_momentum=True, momentum=0.5)
    assert with_momentum._config.options == UpdateOptions(momentum=True, lr_in_momentum=True)


def test_weight_decay_mode_follows_the_two_arguments():
    assert (
        RMSprop(0.1, weight_decay=0.0, decoupled_weight_decay=True)._config.options
        == UpdateOptions()
    )
    assert RMSprop(0.1, weight_decay=0.1)._config.options == UpdateOptions(coupled_decay=True)
    decoupled = RMSprop(0.1, weight_decay=0.1, decoupled_weight_decay=True)
    assert decoupled._config.options == UpdateOptions(decoupled_decay=True)


def test_update_fn_is_defined_once():
    definitions = [
        path.relative_to(PACKAGE_DIR).as_posix()
        for path in PACKAGE_DIR.rglob("*.py")
        if "UpdateFn = " in path.read_text("utf-8")
    ]
    assert definitions == ["spec.py"]


SECTIONS = [
    "prepare gradient",
    "moments",
    "denominator",
    "step",
    "decoupled decay",
    "gate",
    "EMA",
]
# The final section, how results are stored (8-bit state, stochastic rounding), in the bodies
# that implement issue 17's storage options.
STORE = "store"
STORING_BODIES = {PACKAGE_DIR / "reference.py", REPOSITORY / "metal" / "rmsprop_update.inc"}
MATH_BODIES = [
    PACKAGE_DIR / "reference.py",
    REPOSITORY / "metal" / "rmsprop_update.inc",
    SOURCE_DIR / "update_kernel.h",
    SOURCE_DIR / "transforms.cpp",
]


@pytest.mark.parametrize("path", MATH_BODIES, ids=lambda path: path.name)
def test_math_bodies_have_the_same_sections_in_the_same_order(path):
    # So that the bodies read side by side (the native gate lives in rmsprop_update.cpp; its
    # place in update_kernel.h is a pointer comment).
    headers = re.findall(r"^\s*(?:#|//) --- (.+?) ---$", path.read_text("utf-8"), re.M)
    assert headers == (SECTIONS + [STORE] if path in STORING_BODIES else SECTIONS)
