"""The package's modules import each other without a cycle.

Read from the source with ``ast``, not by importing: every ``import`` and ``from ... import``
of a module of this package counts, wherever it stands (module level, under
``if TYPE_CHECKING:``, or inside a function: a lazy import that closes a cycle only moves the
failure to the first call). ``from package import name`` points at the submodule
``package.name`` when there is one, else at the package itself.

Not counted: that importing ``a.b`` first runs ``a/__init__.py``. A package whose
``__init__`` imports its own submodules, which import their siblings, is how Python packages
are built and works whatever the order; what breaks is a submodule that needs a *name* from
its partially initialised parent, and that is an explicit ``from .. import name`` edge, which
is counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mlx_rmsprop

PACKAGE_DIR = Path(mlx_rmsprop.__file__).resolve().parent


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``package_dir``."""
    root = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((root, *parts))] = path
    return modules


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Each module -> the modules of the same package it imports."""
    modules = module_files(package_dir)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        # The package that relative imports in this module start from.
        here = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in modules else source)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or ``None``."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        trail.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return trail[trail.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        trail.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE_DIR)
    assert "mlx_rmsprop.optimizer" in graph and "mlx_rmsprop.paths.native" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_through_a_type_checking_or_lazy_import_is_found(tmp_path):
    # The cycle main had: the path dispatcher imported the native loader, which imported the
    # dispatcher back for a type under TYPE_CHECKING.
    package = _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "backends.py": "from . import native\n",
            "native.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from .backends import UpdateFn\n"
            ),
            "lazy/__init__.py": "",
            "lazy/a.py": "def f():\n    from ..lazy import b\n",
            "lazy/b.py": "import pkg.lazy.a\n",
        },
    )
    graph = import_graph(package)
    assert graph["pkg.backends"] == {"pkg.native"}
    assert find_cycle(graph) == ["pkg.backends", "pkg.native", "pkg.backends"]
    del graph["pkg.native"], graph["pkg.backends"]
    assert find_cycle(graph) == ["pkg.lazy.a", "pkg.lazy.b", "pkg.lazy.a"]


def test_a_subpackage_importing_its_siblings_is_no_cycle_but_a_name_from_its_parent_is(tmp_path):
    files = {
        "__init__.py": "",
        "paths/__init__.py": "from . import native\nUpdatePath = object\n",
        "paths/probe.py": "",
        "paths/native/__init__.py": "from .. import probe\n",
    }
    package = _write(tmp_path / "pkg", files)
    assert find_cycle(import_graph(package)) is None
    (package / "paths/native/__init__.py").write_text("from .. import UpdatePath\n")
    assert find_cycle(import_graph(package)) == ["pkg.paths", "pkg.paths.native", "pkg.paths"]
