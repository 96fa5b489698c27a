"""The hand-written golden set (examples/widget_selector/golden.jsonl): well-formed, labelled by the example
teacher's rules, covering every scenario, and made of questions the example generator cannot produce."""

from __future__ import annotations

import collections
import importlib.util
import re
import string
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from schemas import get_task

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "widget_selector"
GOLDEN = EXAMPLES / "golden.jsonl"

LABEL = re.compile(
    r"^example teacher rules: scenario (?P<scenario>\w+), full widget list, time phrase '(?P<phrase>.*)'$")

#: the meaning of a hand-written time phrase, by its unit (first match wins): keeps labels honest
PHRASE_UNITS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(24 hours|day)\b"), "24h"),
    (re.compile(r"\bhour\b"), "1h"),
    (re.compile(r"\b(seven|7) days\b|\bweek\b"), "7d"),
    (re.compile(r"\b(month|30 days|thirty days|four weeks)\b"), "30d"),
    (re.compile(r"\b(quarter|90 days|three months)\b"), "90d"),
)


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_examples"] = mod
    spec.loader.exec_module(mod)
    return mod


def _norm(text: str) -> str:
    """Casefolded, punctuation (ASCII and typographic dashes/quotes) replaced by spaces, whitespace collapsed."""
    table = str.maketrans({c: " " for c in string.punctuation + "—–’‘“”…"})
    return " ".join(text.casefold().translate(table).split())


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _generator()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in GOLDEN.read_bytes().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def generated(gen: ModuleType) -> set[str]:
    """Every question the generator's templates make (template x entity x time phrase, no prefix/suffix), in
    every variety (``base``, the committed files, and ``wide``)."""
    out: set[str] = set()
    phrases = [p for r in gen.TIME_PHRASES for p in gen.time_phrases(r, "wide")]
    for sc in gen.SCENARIOS:
        for template in gen.scenario_templates(sc, "wide"):
            entities = gen.scenario_entities(sc, "wide") if "{e}" in template else ("",)
            times = phrases if "{t}" in template else ("",)
            for e in entities:
                for t in times:
                    q = template.format(e=e, t=t).replace("  ", " ").strip().replace("??", "?")
                    out.add(_norm(q))
    return out


def test_enough_rows_and_unique_ids(rows: list[dict[str, Any]]) -> None:
    assert len(rows) >= 40
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"golden-\d{3}", i) for i in ids)
    questions = [_norm(r["question"]) for r in rows]
    assert len(questions) == len(set(questions)), "duplicate golden questions"


def test_messages_are_what_the_app_sends(rows: list[dict[str, Any]]) -> None:
    task = get_task("widget_selector")
    for r in rows:
        assert r["task"] == "widget_selector"
        assert r["messages"] == [{"role": "system", "content": task.system_prompt},
                                 {"role": "user", "content": r["question"]}], r["id"]
        assert r["question"].strip() == r["question"] and r["question"]


def test_answers_follow_the_example_teacher(rows: list[dict[str, Any]], gen: ModuleType) -> None:
    task = get_task("widget_selector")
    scenarios = {sc.name: sc for sc in gen.SCENARIOS}
    phrase_range: dict[str, str] = {}
    generator_phrases = {p.casefold() for r in gen.TIME_PHRASES for p in gen.time_phrases(r, "wide")}
    for r in rows:
        assert task.validate_answer(r["answer"]) == r["answer"], r["id"]
        sc = scenarios[r["scenario"]]
        assert r["answer"]["widgets"] == list(sc.widgets), r["id"]  # the full list (k = len), most important first
        tr = r["answer"]["time_range"]
        assert tr in sc.times, r["id"]
        m = LABEL.match(r["labelled_by"])
        assert m and m["scenario"] == sc.name, r["id"]
        phrase = m["phrase"]
        if phrase == "none":  # no period named: the scenario's default range
            assert tr == sc.times[0], r["id"]
            continue
        assert phrase.casefold() in r["question"].casefold(), r["id"]
        assert phrase.casefold() not in generator_phrases, f"{r['id']}: not own words"
        unit = next((rng for pat, rng in PHRASE_UNITS if pat.search(phrase.casefold())), None)
        assert unit == tr, f"{r['id']}: {phrase!r} means {unit}, labelled {tr}"
        assert phrase_range.setdefault(phrase.casefold(), tr) == tr, r["id"]


def test_covers_every_scenario_and_time_range(rows: list[dict[str, Any]], gen: ModuleType) -> None:
    per_scenario = collections.Counter(r["scenario"] for r in rows)
    assert set(per_scenario) == {sc.name for sc in gen.SCENARIOS}
    assert set(r["answer"]["time_range"] for r in rows) == set(gen.TIME_PHRASES)
    assert any(r["labelled_by"].endswith("time phrase 'none'") for r in rows)


def test_questions_are_not_the_generators(rows: list[dict[str, Any]], generated: set[str]) -> None:
    assert len(generated) > 10_000  # the enumeration really ran
    for r in rows:
        q = _norm(r["question"])
        assert q not in generated, r["id"]
        # nor one of its questions with words around it (the generator's prefixes and suffixes, or others)
        words = q.split()  # every run of whole words in q (what " g " in " q " means for normalised text)
        runs = (" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1))
        hit = next((g for g in runs if g in generated), None)
        assert hit is None, f"{r['id']} contains the generated question {hit!r}"


def test_questions_are_not_in_the_example_traffic(rows: list[dict[str, Any]]) -> None:
    seen = set()
    for line in (EXAMPLES / "experiences.jsonl").read_bytes().splitlines():
        exp = orjson.loads(line)
        seen.update(_norm(m["content"]) for m in exp["messages"] if m["role"] == "user")
    assert seen
    for r in rows:
        assert _norm(r["question"]) not in seen, r["id"]
