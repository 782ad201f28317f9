"""The package's layers (bundle/docs/DESIGN.md): each subpackage of ``custom`` imports only from lower layers.

Walks every module of ``custom`` with ``ast`` (nothing is imported) and fails on
- an import of a higher layer, or of a sibling subpackage of the same layer,
- a cycle between modules (within a subpackage too),
- a function-local import of ``custom`` (hidden cycles live there),
- a module of ``custom`` outside the layer table (a new subpackage must be placed on purpose).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "custom"

#: subpackage -> layer; a module may import its own subpackage and any lower layer
LAYERS = {
    "core": 0,
    "data": 1,
    "planning": 2,
    "preprocessing": 3,
    "transforms": 3,
    "model": 3,
    "uncertainty": 4,
    "evaluation": 4,
    "training": 5,
    "inference": 5,
    "deploy": 6,
    "workflows": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _custom_imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module top)`` for every import of ``custom`` in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        names = [n for n in names if n == "custom" or n.startswith("custom.")]
        for n in names:
            found.append((n, node.lineno, id(node) in top))
    return found


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported, _, _ in _custom_imports(path):
            # `from custom.a.b import c` names module custom.a.b.c only if that is a module
            if imported in modules:
                deps.add(imported)
        graph[name] = deps - {name}
    return graph


def test_every_subpackage_has_a_layer():
    unplaced = sorted({_subpackage(m) for m in _modules()} - set(LAYERS) - {None})
    assert not unplaced, f"subpackages of custom without a layer in tests/test_layers.py: {unplaced}"


def test_imports_go_down_the_layers_only():
    problems = []
    for name, path in _modules().items():
        own = _subpackage(name)
        for imported, line, _ in _custom_imports(path):
            target = _subpackage(imported)
            if own is None or target is None or target == own:
                continue
            if LAYERS[target] >= LAYERS[own]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {own} (layer {LAYERS[own]}) imports "
                                f"{imported} (layer {LAYERS[target]})")
    assert not problems, "upward or sideways imports:\n" + "\n".join(problems)


def test_custom_is_imported_at_module_top_only():
    local = [f"{path.relative_to(PACKAGE.parent)}:{line}: {imported}"
             for path in _modules().values() for imported, line, at_top in _custom_imports(path) if not at_top]
    assert not local, "function-local imports of custom (import at module top instead):\n" + "\n".join(local)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("planted, expected", [
    ("from custom.training.losses import CompositeUncertaintyLoss\n", "imports custom.training.losses"),
    ("def f():\n    from custom.core.errors import BraTSInputError\n", "function-local"),
])
def test_the_walk_sees_a_planted_violation(tmp_path, monkeypatch, planted, expected):
    """The checks above would fail on an upward import and on a local import (guards the guard)."""
    fake = tmp_path / "custom"
    (fake / "core").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "core" / "bad.py").write_text(planted)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match=expected):
        test_imports_go_down_the_layers_only()
        test_custom_is_imported_at_module_top_only()


def _edits_sys_path(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            return True
    return False


def test_scripts_do_not_edit_sys_path():
    """Scripts import the installed package (pip install -e .); none puts the checkout on sys.path."""
    scripts = PACKAGE.parent / "scripts"
    editing = sorted(p.name for p in scripts.glob("*.py") if _edits_sys_path(p))
    assert not editing, f"scripts editing sys.path: {editing}"
