"""The package's modules import each other without a cycle: every import, function-level ones included (only
``if TYPE_CHECKING:`` blocks, read by type checkers alone, are left out)."""

from __future__ import annotations

import ast
from pathlib import Path

import ric

PACKAGE = Path(ric.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, wherever in the file (``from ric.x import y`` counts
    ``ric.x.y`` when that is a module, else ``ric.x``)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}  # fmt: skip
    # a module's parent package runs first on import: an edge to it would only restate that
    return {name for name in found if name in modules and name != "ric"}


def test_no_import_cycle():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports(path, set(paths)) - {name} for name, path in paths.items()}
    state: dict[str, str] = {}
    stack: list[str] = []
    cycles = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                cycles.append(stack[stack.index(other) :] + [other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert "ric.rollout" in graph["ric.interfaces"] and "ric.interfaces" not in graph["ric.rollout"]
