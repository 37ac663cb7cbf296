"""The package's shape stays as docs/architecture.md draws it: no import circle among fct's
parts (a module or sub-package directly under fct; imports under TYPE_CHECKING aside), no
module over 600 lines, no class over 300, and the ground floor imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "fct"

#: Modules that import no other part of fct except these (docs/architecture.md, "Floors").
GROUND = {
    "errors": set(),
    "registry": {"errors"},
    "hashing": set(),
    "seeding": {"hashing"},
    "threads": set(),
    "io": {"errors"},
    "device": {"errors"},
    "provenance": {"threads"},
    "record": {"errors", "io", "record_schema"},
    "record_schema": {"errors"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _part(module: str) -> str | None:
    bits = module.split(".")
    return bits[1] if bits[0] == "fct" and len(bits) > 1 else None


def _exists(module: str) -> bool:
    path = PKG.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or path.is_dir()


def _imports(path: Path) -> set[str]:
    """fct modules imported by ``path`` (at any depth, TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    me = _module_name(path).split(".")
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(me) - node.level + (1 if path.name == "__init__.py" else 0)
                base = ".".join(me[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if _exists(f"{base}.{a.name}")}
    return {m for m in out if m.startswith("fct.") and _exists(m)}


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        me = _part(_module_name(path))
        if me is None:
            continue
        for target in _imports(path):
            other = _part(target)
            if other and other != me:
                edges.setdefault(me, set()).add(other)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_among_fct_parts():
    assert _cycles(_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_ground_floor_imports_nothing_above_it():
    edges = _graph()
    for part, allowed in GROUND.items():
        assert edges.get(part, set()) <= allowed, (part, edges.get(part, set()) - allowed)


def test_no_module_over_600_lines_and_no_class_over_300():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 600, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno + 1 <= 300, (path, node.name)
