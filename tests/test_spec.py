"""The spec (mlx_rmsprop/spec.py): its invariants and messages, the one option space, the C++
header generated from it, and the package's import graph (no cycles)."""

from __future__ import annotations

import ast
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_rmsprop
from mlx_rmsprop import RMSprop, spec
from mlx_rmsprop._native import SOURCE_DIR, SOURCE_FILES
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
    space = option_space()
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
    # combinations 3; the other flags are free (3840 with the 13 flags of this writing).
    assert len(space) == 2 ** len(FLAGS) * 5 // 8 * 3 // 4


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
    assert optimizer._options == UpdateOptions()
    assert optimizer.lr_in_momentum is True
    assert optimizer.get_config()["lr_in_momentum"] is True
    with_momentum = RMSprop(0.1, lr_in_momentum=True, momentum=0.5)
    assert with_momentum._options == UpdateOptions(momentum=True, lr_in_momentum=True)


def test_weight_decay_mode_follows_the_two_arguments():
    assert RMSprop(0.1, weight_decay=0.0, decoupled_weight_decay=True)._options == UpdateOptions()
    assert RMSprop(0.1, weight_decay=0.1)._options == UpdateOptions(coupled_decay=True)
    decoupled = RMSprop(0.1, weight_decay=0.1, decoupled_weight_decay=True)
    assert decoupled._options == UpdateOptions(decoupled_decay=True)


def _module_level_imports(path: Path, module: str) -> set[str]:
    """Modules of this package that ``path`` imports when it is imported (statements outside
    functions, ``if TYPE_CHECKING:`` blocks included: a cycle there is still a cycle)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                if base.startswith("mlx_rmsprop"):
                    found.add(base)
                    found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("mlx_rmsprop"))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(ast.parse(path.read_text("utf-8")).body)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        # `from . import x` names module x; `from .spec import Scalar` names spec only.
        graph[name] = {m for m in _module_level_imports(path, name) if m in modules} - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done = [], set()

    def walk(node: str, trail: list[str]) -> None:
        if node in trail:
            cycles.append(trail[trail.index(node) :] + [node])
            return
        if node in done:
            return
        for child in sorted(graph.get(node, ())):
            # A package imports its submodules by design; a submodule importing a sibling
            # through an enclosing package (`from . import x`) is not a cycle of the code.
            if not node.startswith(child + "."):
                walk(child, trail + [node])
        done.add(node)

    for node in sorted(graph):
        walk(node, [])
    return cycles


def test_no_import_cycle_between_modules():
    graph = _import_graph()
    assert "mlx_rmsprop.spec" in graph["mlx_rmsprop.native"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    # backends <-> native, as it was when native imported UpdateFn from backends.
    graph = {
        "mlx_rmsprop.backends": {"mlx_rmsprop.native"},
        "mlx_rmsprop.native": {"mlx_rmsprop.backends"},
    }
    assert _cycles(graph) == [
        ["mlx_rmsprop.backends", "mlx_rmsprop.native", "mlx_rmsprop.backends"]
    ]


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
    assert headers == SECTIONS
