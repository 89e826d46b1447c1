"""The package's imports point one way (issue 13): no cycles, no upward import.

Every ``import`` of the package is read with :mod:`ast`, including the lazy ones
inside functions: a dependency is a dependency. Imports under ``if TYPE_CHECKING:``
never run, so they cannot close a cycle (a module may name the type of the module
that imports it), but they must still point down.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "pgm_drm"

#: Lower layers first; a module may import its own layer or any layer below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_typing", "semiring", "sharding", "_random", "data"),
    ("models",),
    ("graph",),
    ("inference", "testing"),
    ("learning",),
    ("diagnostics",),
    ("experiments",),
    ("cli", "sklearn", "__main__"),
    ("",),  # the package's own __init__
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(target: str, known: dict[str, Path]) -> str | None:
    """The package module a dotted import name lands in, if it is ours."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and (
            (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        ):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(
    name: str, path: Path, known: dict[str, Path], runtime_only: bool = False
) -> set[str]:
    """Our modules that ``name`` imports (``runtime_only``: not the imports under
    ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = _type_checking_nodes(tree) if runtime_only else set()
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # ``from pkg import mod`` imports the submodule ``pkg.mod``.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                for a in node.names
            ]
        else:
            continue
        for t in targets:
            hit = resolve(t, known)
            if hit is not None and hit != name:
                out.add(hit)
    return out


def import_graph(runtime_only: bool = False) -> nx.DiGraph:
    known = modules()
    g = nx.DiGraph()
    g.add_nodes_from(known)
    for name, path in known.items():
        g.add_edges_from((name, t) for t in imports_of(name, path, known, runtime_only))
    return g


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def test_every_module_has_a_layer() -> None:
    for m in modules():
        layer(m)


def test_no_import_cycles() -> None:
    cycles = list(nx.simple_cycles(import_graph(runtime_only=True)))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_point_down() -> None:
    g = import_graph()
    up = sorted(
        f"{a} ({LAYERS[layer(a)][0] or 'pgm_drm'}) imports {b} ({LAYERS[layer(b)][0]})"
        for a, b in g.edges
        if layer(b) > layer(a)
    )
    assert not up, "imports from a higher layer:\n" + "\n".join(up)


@pytest.mark.parametrize(
    ("source", "expect"),
    [
        ("import pgm_drm.learning.em\n", {"pgm_drm.learning.em"}),
        ("from pgm_drm.models import drm\n", {"pgm_drm.models.drm"}),
        ("from pgm_drm.models import RenderingModel\n", {"pgm_drm.models"}),
        ("def f():\n    from pgm_drm.cli import main\n", {"pgm_drm.cli"}),
        ("from . import plots\n", {"pgm_drm.diagnostics.plots"}),
        ("import numpy\n", set()),
        ("if TYPE_CHECKING:\n    import pgm_drm.cli\n", {"pgm_drm.cli"}),
    ],
)
def test_imports_are_read(tmp_path: Path, source: str, expect: set[str]) -> None:
    """The reader itself: absolute, submodule, lazy and relative imports."""
    path = tmp_path / "x.py"
    path.write_text(source)
    known = modules()
    assert imports_of("pgm_drm.diagnostics.x", path, known) == expect


def test_type_checking_imports_are_not_runtime(tmp_path: Path) -> None:
    path = tmp_path / "x.py"
    path.write_text("import typing\nif typing.TYPE_CHECKING:\n    import pgm_drm.cli\n")
    assert imports_of("pgm_drm.diagnostics.x", path, modules(), True) == set()
