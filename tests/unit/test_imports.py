"""The benchmark's imports form no cycle (DESIGN.md, "No import cycles").

Function-level imports count: they defer start-up cost, they must not hide a cycle. The library side (`erase/`, which
must never import `canvas/`) is checked there; today erase.cli imports canvas.toy and erase.runner imports its own
package, so this test looks only at cycles through `canvas/`."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("erase", "canvas")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Names a module imports anywhere in its body (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)  # `from canvas import fid` runs canvas/__init__.py too
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: {m for m in _imports(path, name) if m in files and m != name} for name, path in files.items()}


def test_no_import_cycles_in_the_benchmark():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not [c for c in cycles if any(m.startswith("canvas") for m in c)], cycles


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The checker itself: two modules importing each other are reported."""
    (tmp_path / "canvas").mkdir()
    (tmp_path / "erase").mkdir()
    (tmp_path / "canvas" / "__init__.py").write_text("")
    (tmp_path / "erase" / "__init__.py").write_text("")
    (tmp_path / "canvas" / "a.py").write_text("from canvas import b\n")
    (tmp_path / "canvas" / "b.py").write_text("import canvas.a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert _graph()["canvas.a"] == {"canvas", "canvas.b"} and "canvas.a" in _graph()["canvas.b"]
