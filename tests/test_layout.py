"""The dependency rule, checked on the source text (so code in a string counts too): ``streams/`` and ``trainer/``
never import each other, ``schemas/`` imports nothing of ours outside itself, and only the composition root
``tier3/`` imports both sides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"schemas": ("streams", "trainer", "tier3"), "streams": ("trainer", "tier3"),
             "trainer": ("streams", "tier3")}


def _imports_of(package: str, others: tuple[str, ...]) -> list[str]:
    pattern = re.compile(rf"\b(?:from|import)\s+({'|'.join(others)})\b")
    return [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sorted((ROOT / package).rglob("*.py"))
            for m in pattern.finditer(p.read_text())]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_rule_allows(package: str) -> None:
    assert _imports_of(package, FORBIDDEN[package]) == []


def test_the_rule_check_sees_imports_and_the_composition_root_uses_both() -> None:
    found = _imports_of("tier3", ("streams", "trainer"))
    assert any("streams" in f for f in found) and any("trainer" in f for f in found), found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, anywhere in the file (function-level imports count too)."""
    import ast

    mods: dict[str, Path] = {}
    for package in ("schemas", "streams", "trainer", "tier3"):
        for p in (ROOT / package).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p

    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [ours(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [ours(f"{node.module}.{a.name}") or ours(node.module) for a in node.names]
            graph[m].update(t for t in targets if t and t != m)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph = _import_graph()
    assert "trainer.close_loop.gate" in graph and "trainer.events" in graph["trainer.close_loop.gate"]
    assert _cycles(graph) == []
    # the check finds one when there is one
    assert _cycles({**graph, "trainer.events": graph["trainer.events"] | {"trainer.close_loop.gate"}})
