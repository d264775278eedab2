"""The two layers and the rules between them (../shared/DESIGN.md), read from the source with `ast`:
`erase/` never imports `canvas/`, no import cycle anywhere, and function-level imports only in the CLIs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("erase", "canvas")
CLI_MODULES = {"erase.cli", "canvas.cli"}  # may defer heavy start-up imports to the command that needs them


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + sorted((ROOT / "scripts").glob("*.py"))
    return {module_name(p): p for p in sorted(files)}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of ours in the file. `from A import B` counts as
    an import of A.B when that is a module, else of A; relative imports are resolved against the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                found.append((target, node.lineno, id(node) in top_level))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = source_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_the_graph_sees_the_imports_it_should(graph):
    """The reader itself: known edges are found and relative imports resolved (so the checks below can fail)."""
    targets = {m: {t for t, _, _ in edges} for m, edges in graph.items()}
    assert "erase.params" in targets["erase.config"]  # from .params import ...
    assert "erase.methods.esd" in targets["erase.methods"]  # from . import esd
    assert "erase.catalog" in targets["erase.methods.ca"]  # from ..catalog import ...


def imports_matching(graph, modules, wanted) -> list[str]:
    return [
        f"{m}:{line} imports {t}"
        for m, edges in graph.items()
        if modules(m)
        for t, line, top in edges
        if wanted(t, top)
    ]


def test_erase_never_imports_canvas(graph):
    upward = imports_matching(graph, lambda m: m.startswith("erase"), lambda t, _: t.startswith("canvas"))
    assert not upward, "\n".join(upward)


def test_no_import_cycles(graph):
    modules = set(graph)
    edges = {m: sorted({t for t, _, _ in graph[m] if t in modules and t != m}) for m in graph}
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == "open":
                cycles.append(" -> ".join([*stack[stack.index(t) :], t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_level_imports_only_in_the_clis(graph):
    deferred = imports_matching(graph, lambda m: m not in CLI_MODULES, lambda _, top: not top)
    assert not deferred, "\n".join(deferred)
