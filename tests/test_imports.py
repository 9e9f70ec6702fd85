"""The import graph of dbmpi/ has no cycles and no module imports another module's ``_names``.

The graph is built from the source with :mod:`ast`, not by importing: every ``import`` and
``from ... import`` counts, at module level or inside a function (a lazy import is a cycle
deferred, not removed), except those under ``if TYPE_CHECKING:`` (never run). Importing
``a.b.c`` runs the ``__init__`` of ``a.b`` first, so an edge to a module is also an edge to each
package above it that is not above the importer (a package's own modules import it anyway).

Known offenders outside the model package are listed by name below, for their owners to fix;
the test also fails when a listed one is gone, so that the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dbmpi"

# Cycles (as the sorted modules of a strongly connected component) that their owners fix.
KNOWN_CYCLES: set[tuple[str, ...]] = set()
# (importer, module, name): imports of another module's private name, for their owners.
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _base(importer: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str:
    if not node.level:
        return node.module or ""
    pkg = importer.split(".")
    if not _is_package(importer, modules):
        pkg = pkg[:-1]
    pkg = pkg[:len(pkg) - (node.level - 1)]
    return ".".join(pkg + ([node.module] if node.module else []))


def build_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(edges between dbmpi modules, private-name imports as (importer, module, name))."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _base(importer, node, modules)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:
                        targets.append(sub)
                    else:
                        targets.append(base)
                        if a.name.startswith("_") and base in modules and base != importer:
                            private.append((importer, base, a.name))
            for target in targets:
                if target not in modules:
                    continue  # outside dbmpi
                parts = target.split(".")
                for k in range(1, len(parts) + 1):
                    mod = ".".join(parts[:k])
                    # the importer's own packages are being imported already
                    if mod != importer and not importer.startswith(mod + "."):
                        edges[importer].add(mod)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_checker_sees_lazy_cycles_and_private_names(tmp_path, monkeypatch):
    """The checker itself, on a made-up package: a function-level import closes a cycle, a
    TYPE_CHECKING import does not, and ``from .a import _x`` is reported."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from .c import C\n_x = 1\n")
    (pkg / "c.py").write_text("from .a import _x\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..d import D\n")
    (pkg / "d.py").write_text("from .sub import b\n")  # d -> sub (init) -> b -> d
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    edges, private = build_graph()
    assert cycles(edges) == [("dbmpi.d", "dbmpi.sub", "dbmpi.sub.b")]
    assert private == [("dbmpi.c", "dbmpi.a", "_x")]
    assert "dbmpi.c" not in edges["dbmpi.a"]


def test_no_import_cycles():
    found = set(cycles(build_graph()[0]))
    new = sorted(found - KNOWN_CYCLES)
    assert not new, f"import cycles in {PACKAGE}/: {new}"
    fixed = sorted(KNOWN_CYCLES - found)
    assert not fixed, f"these known cycles are gone: remove them from KNOWN_CYCLES: {fixed}"
    # the model package has no excuses
    assert not any(m.startswith("dbmpi.model") for c in KNOWN_CYCLES for m in c)


def test_no_imports_of_private_names():
    found = set(build_graph()[1])
    new = sorted(found - KNOWN_PRIVATE)
    assert not new, f"imports of another module's private names: {new}"
    fixed = sorted(KNOWN_PRIVATE - found)
    assert not fixed, f"these private imports are gone: remove them from KNOWN_PRIVATE: {fixed}"
    assert not any(imp.startswith("dbmpi.model") for imp, _, _ in KNOWN_PRIVATE)
