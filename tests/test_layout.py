"""The layering rules, read from the source: no import cycle within ``jobs/`` or ``retinaface_core/``,
and ``retinaface_core`` never imports Ray.

Every import statement counts, wherever it is: at module level, inside a function (a lazy import
still couples the two modules) and under ``TYPE_CHECKING`` (a cycle the type checker sees is a
cycle a reader has to untangle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "retinaface_core")


def module_names(package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` (a package's ``__init__`` is the package's name)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports (relative imports resolved; ``from a import b`` gives
    ``a`` and ``a.b``, since ``b`` may be a module)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts[: len(parts) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    modules = module_names(package)
    return {module: imported_names(module, path) & modules.keys() - {module} for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_are_resolved_from_the_source():
    graph = import_graph("jobs")
    assert {"jobs.annotate.config", "jobs.annotate.job", "jobs.annotate.cli"} <= graph["jobs.annotate"]
    assert {"jobs._exit", "jobs._inputs", "jobs.annotate.shards"} <= graph["jobs.annotate.inventory"]
    assert "jobs.annotate.config" in graph["jobs.annotate.worker"]  # under TYPE_CHECKING
    assert "retinaface_core.detector" in import_graph("retinaface_core")["retinaface_core"]


@pytest.mark.parametrize(
    "package",
    [
        "jobs",
        "retinaface_core",
    ],
)
def test_no_import_cycle(package):
    cycle = find_cycle(import_graph(package))
    assert cycle is None, f"import cycle in {package}/: {' -> '.join(cycle)}"


def test_core_never_imports_ray():
    offenders = {
        module: sorted(n for n in imported_names(module, path) if n == "ray" or n.startswith("ray."))
        for module, path in module_names("retinaface_core").items()
    }
    assert not {m: names for m, names in offenders.items() if names}
