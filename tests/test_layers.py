"""The project's packages in layers: no import cycle among their modules (imports inside functions
counted, so deferring an import cannot hide one), the matrix's case table never imports the suite
that reads it, and the suite's own modules import the project at the top (issue 25)."""

from __future__ import annotations

import ast
import functools
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("autoep", "reference", "matrix", "conformance", "mutants", "benchmarks")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _project_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import of ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    inside = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _project_module(name)
            if target is not None and target != module:
                found.append((target, node.lineno, id(node) in inside))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _ in _imports(module)} for module in MODULES}


def test_the_scan_sees_the_packages_and_their_imports():
    graph = import_graph()
    assert len(MODULES) > 60 and "conformance.runner" in graph and "matrix.models" in graph
    assert {"conformance.training", "conformance.checkpoints", "matrix.models"} <= graph["conformance.runner"]


def test_no_import_cycle_among_the_project_modules():
    try:
        order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")
    assert order.index("conformance.tolerances") < order.index("conformance.runner")


def test_a_cycle_is_found_when_there_is_one():
    graph = import_graph()
    graph["conformance.tolerances"] = graph["conformance.tolerances"] | {"conformance.runner"}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())


def test_the_matrix_never_imports_the_suite():
    graph = import_graph()
    for module in (m for m in MODULES if m.split(".")[0] in ("matrix", "reference")):
        suite = sorted(target for target in graph[module] if target.split(".")[0] == "conformance")
        assert not suite, f"{module} imports {suite}: the case table and the oracle sit below the suite"


def test_the_suite_imports_the_project_at_the_top():
    """Deferred imports in conformance/ and matrix/ only for optional or heavy third-party packages
    (deepspeed, torchtitan, matplotlib, transformers), never for the project's own modules."""
    deferred = [f"{module}:{line} imports {target}" for module in MODULES if module.split(".")[0] in
                ("conformance", "matrix") for target, line, inside in _imports(module) if inside]
    assert not deferred, deferred
