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
