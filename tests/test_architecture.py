"""The package's shape: no import cycle, one asyncpg importer, services blind to the facade."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "integrations"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every package-internal module this file imports: at top level, under
    TYPE_CHECKING and inside functions alike."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("integrations"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("integrations"):
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names}
            known = {name for name in submodules if _known(name)}
            found.update(known)
            if node.module is not None or len(known) < len(submodules):
                # ``from . import x`` imports the package only when x is not a module.
                found.add(target)
    found.discard(module)
    return {name for name in found if _known(name)}


def _known(name: str) -> bool:
    relative = Path(*name.split("."))
    base = PACKAGE.parent / relative
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_repository_imports_asyncpg() -> None:
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if any(n == "asyncpg" or n.startswith("asyncpg.") for n in names):
                importers.append(path.name)
    assert sorted(set(importers)) == ["_repository.py"]


SERVICES = ("_connections", "_tokens", "_authflow", "_checks", "_requests", "_rotation", "_core")


def test_services_never_import_the_facade() -> None:
    graph = _graph()
    for service in SERVICES:
        reachable: set[str] = set()
        todo = [f"integrations.{service}"]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in reachable:
                    reachable.add(nxt)
                    todo.append(nxt)
        assert "integrations._integrations" not in reachable, service
        assert "integrations" not in reachable, service
