"""No import circle inside embtab: every module imports on its own, and the import graph is acyclic."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "embtab"

# Import every module with no embtab module loaded before it. torch and torchrec stay loaded
# between modules (they take seconds); every embtab module is dropped from sys.modules first.
ISOLATED_IMPORTS = """
import importlib, sys, torch, torchrec, torchrec.distributed, torchrec.distributed.planner
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "embtab" or m.startswith("embtab.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {type(error).__name__}: {error}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The embtab modules `path` imports anywhere (function bodies too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name in known}


def ancestors(name: str) -> set[str]:
    """The packages above module `name`, without `embtab` itself (the public API, which imports the rest)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts))}


def import_graph() -> dict[str, set[str]]:
    """Module -> the embtab modules its imports run: each imported module and, first, the packages
    above it that are not already above the importer (those run before the importer does)."""
    known = set(module_names())
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        own = ancestors(name) | ({name} if path.name == "__init__.py" else set())
        edges = set()
        for target in imported_modules(path, known):
            edges |= ({target} | ancestors(target)) - own
        graph[name] = edges - {"embtab", name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node], _ = 1, stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = 2, stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "embtab.methods.base" in graph and "embtab.config" in graph["embtab.methods.base"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle(graph) == []


def test_every_module_imports_on_its_own():
    names = [n for n in module_names() if n != "embtab"]
    assert len(names) > 30
    done = subprocess.run(
        [sys.executable, "-c", ISOLATED_IMPORTS, *names], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
