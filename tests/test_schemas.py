"""Schema round trips and rejections, with hypothesis-generated inputs."""

from __future__ import annotations

import json

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    DeadLetter,
    EnrichedTrace,
    Experience,
    InvalidAnswer,
    InvalidMessage,
    MessageTooLarge,
    NotJSON,
    TrainingRun,
    UnknownSchemaVersion,
    decode,
    encode,
    get_task,
)
from schemas.tasks import TaskDefinition, field_f1, set_f1
from schemas.write_json_schemas import JSON_DIR, render

TASK = get_task("widget_selector")
WIDGETS = sorted(TASK.catalog)

text = st.text(max_size=200)
messages = st.lists(st.builds(dict, role=st.sampled_from(["system", "user", "assistant"]), content=text),
                    min_size=1, max_size=4)
experiences = st.builds(
    dict,
    schema_version=st.just(1),
    experience_id=st.text(min_size=1, max_size=64),
    task=st.just("widget_selector"),
    created_at_ms=st.integers(min_value=0, max_value=2**53),
    messages=messages,
    response=text,
    confidence=st.floats(min_value=0, max_value=1),
    reward=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    latency_ms=st.none() | st.floats(min_value=0, max_value=1e6),
    user_id=st.none() | st.text(max_size=20),
    metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
)


@given(experiences)
@settings(max_examples=200, deadline=None)
def test_experience_round_trip(d: dict) -> None:
    exp = Experience.model_validate(d)
    data = encode(exp)
    back = decode(data, Experience)
    assert back == exp
    assert encode(back) == data  # bytes equal after a decode/encode cycle


@given(experiences, st.sampled_from(["experience_id", "task", "created_at_ms", "messages", "response",
                                     "confidence"]))
@settings(max_examples=100, deadline=None)
def test_missing_field_is_named(d: dict, field: str) -> None:
    d = dict(d)
    del d[field]
    with pytest.raises(InvalidMessage) as info:
        decode(orjson.dumps(d), Experience)
    assert info.value.field == field
    assert "required" in info.value.reason.lower()


small_ints = st.integers(min_value=-(2**62), max_value=2**62)
BAD_VALUES = {
    "created_at_ms": st.text(min_size=1) | st.lists(small_ints, min_size=1) | st.booleans() | st.just(1.5),
    "confidence": st.text(min_size=1) | st.lists(small_ints, min_size=1) | st.booleans(),
    "messages": st.text() | small_ints | st.booleans() | st.just([{"role": "robot", "content": "x"}]),
    "response": small_ints | st.lists(st.text(), min_size=1) | st.booleans(),
}


@given(experiences, st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda f: st.tuples(st.just(f), BAD_VALUES[f])))
@settings(max_examples=100, deadline=None)
def test_wrong_types_are_rejected(d: dict, case: tuple[str, object]) -> None:
    field, bad = case
    d = dict(d)
    d[field] = bad
    with pytest.raises(InvalidMessage) as info:
        decode(orjson.dumps(d), Experience)
    assert info.value.field is not None and info.value.field.startswith(field)


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1).filter(lambda v: v != 1) | st.text() | st.none())
def test_unknown_version(version: object) -> None:
    with pytest.raises(UnknownSchemaVersion) as info:
        decode(orjson.dumps({"schema_version": version, "experience_id": "x"}), Experience)
    assert info.value.field == "schema_version"


@given(st.binary(min_size=1, max_size=100))
def test_arbitrary_bytes_raise_schema_errors_only(data: bytes) -> None:
    try:
        decode(data, Experience)
    except (NotJSON, InvalidMessage, UnknownSchemaVersion):
        pass


def test_invalid_utf8_and_not_an_object() -> None:
    with pytest.raises(NotJSON):
        decode(b'{"experience_id": "\xff\xfe"}', Experience)
    with pytest.raises(NotJSON, match="expected a JSON object"):
        decode(b"[1, 2]", Experience)


def test_oversize_is_rejected_before_parsing() -> None:
    huge = b'{"x": "' + b"a" * 2_000_000 + b'"}'
    with pytest.raises(MessageTooLarge):
        decode(huge, Experience)
    with pytest.raises(MessageTooLarge):
        decode(b"{" + b" " * 2000 + b"}", Experience, max_bytes=1024)


def test_huge_strings_are_bounded() -> None:
    d = {"schema_version": 1, "experience_id": "x" * 10_000, "task": "t", "created_at_ms": 1,
         "messages": [{"role": "user", "content": "hi"}], "response": "", "confidence": 0.5}
    with pytest.raises(InvalidMessage) as info:
        decode(orjson.dumps(d), Experience)
    assert info.value.field == "experience_id"


def test_other_messages_round_trip() -> None:
    exp = Experience(experience_id="e1", task="widget_selector", created_at_ms=5,
                     messages=[{"role": "user", "content": "cpu?"}], response="{}", confidence=0.9)  # type: ignore[list-item]
    trace = EnrichedTrace(experience_id="e1", task="widget_selector", enriched_at_ms=6,
                          sample_reason="high_confidence", experience=exp,
                          teacher={"kind": "recorded", "model": "m", "latency_ms": 1.0, "attempts": 1},  # type: ignore[arg-type]
                          reasoning="r", answer={"widgets": ["cpu_usage"], "time_range": "1h"})
    dl = DeadLetter(stage="decode", reason="not json", error_kind="not_json", failed_at_ms=1, original_b64="AA==")
    run = TrainingRun(run_id="r1", event="succeeded", at_ms=1, details={"offsets": {"0": [0, 10]}})
    for msg in (trace, dl, run):
        assert decode(encode(msg), type(msg)) == msg


def test_json_schema_files_are_current() -> None:
    for fname, text in render().items():
        assert (JSON_DIR / fname).read_text() == text, f"run `python -m schemas.write_json_schemas` ({fname} is stale)"
        assert json.loads(text)["type"] == "object"


def test_widget_selector_task() -> None:
    assert len(TASK.catalog) >= 15
    assert TASK.validate_answer({"widgets": ["cpu_usage", "error_rate"], "time_range": "24h"})
    with pytest.raises(InvalidAnswer, match="widgets"):
        TASK.validate_answer({"widgets": ["not_a_widget"], "time_range": "24h"})
    with pytest.raises(InvalidAnswer):
        TASK.validate_answer({"widgets": [], "time_range": "24h"})
    out = TASK.format_output({"time_range": "7d", "widgets": ["revenue_trend"]}, "because")
    assert TASK.parse_output(out) == ("because", {"time_range": "7d", "widgets": ["revenue_trend"]})
    with pytest.raises(InvalidAnswer):
        TASK.parse_output("<answer>{not json</answer>")
    msgs = TASK.messages_for_model([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert msgs[:2] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert len(msgs) == 3 and "<answer>" in msgs[2]["content"]


def test_f1() -> None:
    assert set_f1(["a", "b"], ["a", "b"]) == 1.0
    assert set_f1(["a"], ["a", "b"]) == pytest.approx(2 / 3)
    assert set_f1(["c"], ["a"]) == 0.0
    ref = {"widgets": ["cpu_usage", "memory_usage"], "time_range": "24h"}
    assert field_f1(TASK, {"widgets": ["cpu_usage"], "time_range": "24h"}, ref) == pytest.approx((2 / 3 + 1) / 2)


# --- the answer validator's fast path (issue 10): compiled accept, jsonschema decides every rejection ----------

_ANSWERS = [
    {"widgets": ["cpu_usage"], "time_range": "24h"}, {"widgets": ["cpu_usage", "cpu_usage"], "time_range": "24h"},
    {"widgets": [], "time_range": "24h"}, {"widgets": ["cpu_usage"]}, {"widgets": ["cpu_usage"], "time_range": "2h"},
    {"widgets": ["cpu_usage"], "time_range": "24h", "extra": 1}, {"widgets": "cpu_usage", "time_range": "24h"},
    {"widgets": [1], "time_range": "24h"}, {"widgets": [True], "time_range": True}, {"widgets": [None]}, [], None,
    "x", 1, 1.0, True, {"widgets": ["cpu_usage"] * 50, "time_range": "24h"},
    {"widgets": ["cpu_usage", "error_rate", "disk_io", "log_volume", "queue_depth", "active_users"],
     "time_range": "7d"},
]


@pytest.mark.parametrize("answer", _ANSWERS)
def test_fast_validation_gives_jsonschemas_verdict(answer: object) -> None:
    reference = TASK._validator.is_valid(answer)
    try:
        TASK.validate_answer(answer)
        verdict = True
    except InvalidAnswer:
        verdict = False
    assert verdict == reference


def test_a_valid_answer_never_reaches_jsonschema(monkeypatch: pytest.MonkeyPatch) -> None:
    task = TaskDefinition(name="t", system_prompt="s", answer_schema=TASK.answer_schema)
    assert task._fast_accept is not None

    def slow(*_a: object, **_k: object) -> None:
        raise AssertionError("jsonschema was asked about a valid answer")

    monkeypatch.setattr(jsonschema.exceptions, "best_match", slow)
    assert task.validate_answer({"widgets": ["cpu_usage"], "time_range": "24h"})


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "array", "prefixItems": [{"type": "string"}]}}},  # 2020-12
    {"type": "object", "properties": {"a": {"enum": [1, 2]}}},  # Python's True == 1 is not JSON Schema's
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"type": "string"}}},
    {"type": "array", "items": [{"type": "string"}]},
])
def test_schemas_outside_the_portable_subset_use_jsonschema_only(schema: dict) -> None:
    task = TaskDefinition(name="t", system_prompt="s", answer_schema=schema)
    assert task._fast_accept is None
    if "$defs" in schema:
        with pytest.raises(InvalidAnswer):
            task.validate_answer({"a": 1})
    if schema.get("properties", {}).get("a", {}).get("enum"):
        with pytest.raises(InvalidAnswer):
            task.validate_answer({"a": True})
