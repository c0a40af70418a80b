"""The import graph has no circles, between modules or between the top-level packages (data flows one way)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The layout's folders and the subpackages of `memvq` they install as (pyproject.toml's package-dir).
PACKAGES = {
    "data": "memvq.data",
    "memory": "memvq.memory",
    "retrieval": "memvq.retrieval",
    "encoders": "memvq.encoders",
}
PACKAGES |= {"pipelines": "memvq.pipelines", "memvq": "memvq"}
BARE = ("data", "memory", "retrieval", "encoders", "pipelines")  # names that must never be imported top-level


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def _imported_names(path: Path) -> set[str]:
    """Every module name a file imports anywhere (lazy imports and TYPE_CHECKING blocks included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """First-party modules a file imports."""
    return {name for name in _imported_names(path) if name in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph, or None (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)
    for start in graph:
        if colour[start]:
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return [*path[path.index(child) :], child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_modules_import_no_circle():
    graph = _graph()
    assert len(graph) > 30
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_packages_import_no_circle():
    def owner(module: str) -> str:
        """The package a module belongs to: memvq.memory, ... or the face, memvq (its cli and serve too)."""
        package = ".".join(module.split(".")[:2])
        return package if package in PACKAGES.values() else "memvq"

    packages: dict[str, set[str]] = {name: set() for name in PACKAGES.values()}
    for module, imported in _graph().items():
        packages[owner(module)] |= {owner(name) for name in imported} - {owner(module)}
    assert _cycle(packages) is None, " -> ".join(_cycle(packages))
    assert "memvq" not in set().union(*(packages[name] for name in packages if name != "memvq")), (
        "a layer imports the face"
    )


def test_everything_imports_the_one_memvq_name():
    """No file of the project (tests and benches too) imports a layout folder by its bare name: installed, only
    `memvq` exists."""
    files = [path for folder in (*PACKAGES, "tests", "bench") for path in (ROOT / folder).rglob("*.py")]
    bare = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in _imported_names(path)
        if name.split(".")[0] in BARE
    }
    assert not bare, sorted(bare)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
