"""The shipped example data (examples/widget_selector/): valid, varied, and in step with its generator."""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import orjson
import pytest

from schemas import Experience, decode, get_task
from schemas.tasks import field_f1, parse_json_answer
from streams.teachers import prompt_hash

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "widget_selector"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_examples"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def experiences() -> list[Experience]:
    return [decode(line, Experience) for line in (EXAMPLES / "experiences.jsonl").read_bytes().splitlines()]


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict[str, object]]:
    rows = [orjson.loads(line) for line in (EXAMPLES / "recorded_teacher.jsonl").read_bytes().splitlines()]
    return {r["prompt_hash"]: r for r in rows}


def test_committed_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    gen = _generator()
    gen.write(tmp_path, gen.DEFAULT_N, gen.DEFAULT_SEED)
    for name in ("experiences.jsonl", "recorded_teacher.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), f"{name} is stale: regenerate it"


def test_experiences_are_valid_and_varied(experiences: list[Experience]) -> None:
    task = get_task("widget_selector")
    assert len(experiences) >= 320
    assert len({e.experience_id for e in experiences}) == len(experiences)
    questions = [e.messages[-1].content for e in experiences]
    assert len(set(questions)) == len(questions), "every question is distinct"
    for e in experiences:
        assert e.task == "widget_selector" and e.served_by.arm == "baseline"
        assert [m.role for m in e.messages] == ["system", "user"]
        assert e.messages[0].content == task.system_prompt  # exactly what production sends
        assert e.user_id and e.session_id
    conf = [e.confidence for e in experiences]
    # spread over 0-1: every tenth of the range is used, and a good share is above the sampling threshold
    assert all(any(k / 10 <= c < (k + 1) / 10 for c in conf) for k in range(10))
    assert 0.15 < sum(c > 0.8 for c in conf) / len(conf) < 0.5
    quality = collections.Counter(e.metadata["example_quality"] for e in experiences)
    assert set(quality) == {"correct", "partial", "off_schema", "not_json"}
    assert len({e.metadata["scenario"] for e in experiences}) >= 20


def test_every_experience_has_a_valid_recorded_teacher_answer(
        experiences: list[Experience], recorded: dict[str, dict[str, object]]) -> None:
    gen = _generator()
    task = get_task("widget_selector")
    invalid_responses = 0
    for e in experiences:
        sent = task.messages_for_model([m.model_dump() for m in e.messages])
        row = recorded[gen.prompt_key(sent)]
        assert gen.prompt_key(sent) == prompt_hash(sent)  # the key the worker's RecordedTeacher looks up
        reasoning, answer = task.parse_output(str(row["text"]))
        assert reasoning and answer["widgets"]
        # the production response is scored against the teacher exactly as its label says
        quality = e.metadata["example_quality"]
        try:
            _, prod = parse_json_answer(e.response)
            task.validate_answer(prod)
        except Exception:
            invalid_responses += 1
            assert quality in ("not_json", "off_schema")
            continue
        f1 = field_f1(task, prod, answer)
        assert (f1 == 1.0) == (quality == "correct"), (e.experience_id, quality, f1)
    assert invalid_responses > 30


def test_recorded_teacher_answers_every_example(experiences: list[Experience]) -> None:
    import asyncio

    from streams.teachers import RecordedTeacher

    teacher = RecordedTeacher(EXAMPLES / "recorded_teacher.jsonl")
    task = get_task("widget_selector")

    async def ask_all() -> int:
        for e in experiences:
            reply = await teacher.complete(task.messages_for_model([m.model_dump() for m in e.messages]))
            task.parse_output(reply.text)
        return len(experiences)

    assert asyncio.run(ask_all()) == len(teacher) == len(experiences)


def test_wide_variety_is_deterministic_valid_and_wider(tmp_path: Path) -> None:
    """``--variety wide`` (issue 20, item 5): same seed, same bytes; every answer follows the example teacher's rules
    and validates; the questions are more varied than the base variety's on the same seed and size."""
    gen = _generator()
    task = get_task("widget_selector")
    a, b = tmp_path / "a", tmp_path / "b"
    gen.write(a, 200, 5, "wide")
    gen.write(b, 200, 5, "wide")
    for name in ("experiences.jsonl", "recorded_teacher.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    with pytest.raises(ValueError, match="variety"):
        gen.build(10, 5, "huge")

    wide, recorded = gen.build(200, 5, "wide")
    base, _ = gen.build(200, 5, "base")
    by_key = {r["prompt_hash"]: r for r in recorded}
    scenarios = {sc.name: sc for sc in gen.SCENARIOS}
    for e in wide:
        assert e.metadata["example_variety"] == "wide"
        sent = task.messages_for_model([m.model_dump() for m in e.messages])
        _, answer = task.parse_output(str(by_key[prompt_hash(sent)]["text"]))
        sc = scenarios[e.metadata["scenario"]]
        # the labelling rules are the base variety's: the scenario's widgets in order (trimmed), a range it allows
        assert answer["widgets"] == list(sc.widgets[: len(answer["widgets"])]) and len(answer["widgets"]) >= 2
        assert answer["time_range"] in sc.times
    assert all("example_variety" not in e.metadata for e in base)

    def words(exps: list[Experience]) -> set[str]:
        return {w.casefold() for e in exps for w in e.messages[-1].content.split()}

    # more distinct words (new templates, entities, time phrases, framings, typos) on the same seed and size
    assert len(words(wide)) > 1.3 * len(words(base))
    questions = [e.messages[-1].content for e in wide]
    assert len(set(questions)) == len(questions)
    framed = sum(any(f.split("{q}")[0] and q.startswith(f.split("{q}")[0]) for f in gen.WIDE_FRAMES)
                 for q in questions)
    assert 0.1 < framed / len(questions) < 0.6
