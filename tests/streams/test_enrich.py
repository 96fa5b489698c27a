"""Enrichment as plain functions: triage of bad input, retries, dead letters (no Kafka, no Faust)."""

from __future__ import annotations

import asyncio
import base64
import logging
import re

import orjson
import pytest

from schemas import DeadLetter, EnrichedTrace, encode
from streams.enrich import Source, TeacherHealth, TeacherStats, ToEnrich, enrich, triage
from streams.errors import (
    InvalidTeacherOutput,
    TeacherConfigError,
    TeacherError,
    TeacherServerError,
    TeacherTimeout,
    TeacherUnavailable,
)
from streams.settings import StreamsSettings
from streams.teachers import TeacherReply
from tests.fakes.teacher_server import answer_text, expected_answer, question_of
from tests.streams.helpers import make_experience

SRC = Source("t.experiences", 2, 41, b"k")


def settings(**kw: object) -> StreamsSettings:
    base: dict[str, object] = {"tier3_teacher": "openai", "tier3_teacher_backoff_initial_s": 0.001,
                               "tier3_teacher_backoff_max_s": 0.002, "tier3_teacher_retry_max_s": 5.0}
    base.update(kw)
    return StreamsSettings(**base)  # type: ignore[arg-type]


class ScriptedTeacher:
    """Replays a script of outcomes: a mode string (as the fake server's) or an exception."""

    kind = "openai"
    model = "scripted"
    recorded = False

    def __init__(self, script: list[object]) -> None:
        self.script = list(script)
        self.calls = 0
        self.seen: list[list[dict[str, str]]] = []

    async def complete(self, messages: list[dict[str, str]]) -> TeacherReply:
        self.calls += 1
        self.seen.append(messages)
        step = self.script.pop(0) if self.script else "ok"
        if isinstance(step, BaseException):
            raise step
        return TeacherReply(answer_text(question_of(messages), str(step)), "scripted-1", 10, 20)

    async def aclose(self) -> None:
        return None


def item(conf: float = 0.9) -> tuple[ToEnrich, bytes]:
    exp = make_experience(7, conf)
    raw = encode(exp)
    got = triage(raw, SRC, settings())
    assert isinstance(got, ToEnrich)
    return got, raw


@pytest.mark.parametrize(("raw", "kind"), [
    (b"not json at all", "not_json"),
    (b"\xff\xfe\x00garbage", "not_json"),
    (b'{"schema_version": 99, "experience_id": "x"}', "unknown_version"),
    (b'{"schema_version": 1, "experience_id": 5}', "invalid"),
    (b"[1, 2, 3]", "not_json"),
])
def test_bad_input_is_dead_lettered_with_original_bytes(raw: bytes, kind: str) -> None:
    dl = triage(raw, SRC, settings())
    assert isinstance(dl, DeadLetter)
    assert dl.error_kind == kind and dl.stage == "decode"
    assert base64.b64decode(dl.original_b64) == raw
    assert (dl.source_topic, dl.source_partition, dl.source_offset) == ("t.experiences", 2, 41)
    assert dl.reason


def test_oversize_and_unknown_task() -> None:
    big = encode(make_experience(1, 0.9)).replace(b"request 1", b"x" * 5000)
    dl = triage(big, SRC, settings(tier3_max_message_bytes=4096))
    assert isinstance(dl, DeadLetter) and dl.error_kind == "oversize"
    d = orjson.loads(encode(make_experience(1, 0.9)))
    d["task"] = "no_such_task"
    dl = triage(orjson.dumps(d), SRC, settings())
    assert isinstance(dl, DeadLetter) and dl.error_kind == "unknown_task" and dl.stage == "validate"
    assert dl.experience_id == "exp-000001"


def test_not_sampled_is_none() -> None:
    raw = encode(make_experience(1, 0.1))
    assert triage(raw, SRC, settings(tier3_sample_rate=0.0)) is None


def test_prompt_parity_and_trace_fields() -> None:
    it, raw = item()
    teacher = ScriptedTeacher(["ok"])
    stats = TeacherStats()
    out = asyncio.run(enrich(it, raw, SRC, teacher, settings(), stats))
    assert isinstance(out, EnrichedTrace)
    sent = teacher.seen[0]
    prod = [m.model_dump() for m in it.experience.messages]
    assert sent[: len(prod)] == prod and len(sent) == len(prod) + 1  # production messages unchanged + 1
    assert out.answer == expected_answer(question_of(prod))
    assert out.teacher.attempts == 1 and out.teacher.model == "scripted-1" and out.teacher.output_tokens == 20
    assert out.sample_reason == "high_confidence" and out.source is not None and out.source.offset == 41
    assert stats.calls == 1 and stats.errors == 0 and stats.in_flight == 0


def test_teacher_latency_percentiles_interpolate_like_the_evaluation() -> None:
    stats = TeacherStats()
    assert stats.percentile_ms(0.95) is None
    stats.latencies_ms.extend([40.0, 10.0, 30.0, 20.0])
    # schemas.runtime.stats.percentile (linear interpolation), the same definition as the offline evaluation's p95
    assert stats.percentile_ms(0.50) == 25.0 and stats.percentile_ms(0.95) == 38.5


def test_transient_errors_retried_then_succeed() -> None:
    it, raw = item()
    teacher = ScriptedTeacher([TeacherServerError("HTTP 500"), TeacherTimeout("slow"), "ok"])
    stats = TeacherStats()
    out = asyncio.run(enrich(it, raw, SRC, teacher, settings(), stats))
    assert isinstance(out, EnrichedTrace) and out.teacher.attempts == 3
    assert stats.calls == 3 and stats.errors == 2 and stats.error_rate == pytest.approx(2 / 3, abs=1e-5)


@pytest.mark.parametrize("mode", ["invalid_json", "off_schema"])
def test_invalid_output_retried_then_dead_lettered(mode: str) -> None:
    it, raw = item()
    teacher = ScriptedTeacher([mode] * 10)
    out = asyncio.run(enrich(it, raw, SRC, teacher, settings(tier3_teacher_max_attempts=3), TeacherStats()))
    assert isinstance(out, DeadLetter)
    assert teacher.calls == 3 and out.attempts == 3
    assert out.stage == "enrich" and out.error_kind == "invalid_answer" and "3 attempt" in out.reason
    assert base64.b64decode(out.original_b64) == raw and out.experience_id == it.experience.experience_id


def test_invalid_then_valid_output_succeeds() -> None:
    it, raw = item()
    out = asyncio.run(enrich(it, raw, SRC, ScriptedTeacher(["off_schema", "ok"]), settings(), TeacherStats()))
    assert isinstance(out, EnrichedTrace) and out.teacher.attempts == 2


def test_persistent_outage_dead_letters_after_retry_budget() -> None:
    it, raw = item()
    teacher = ScriptedTeacher([TeacherServerError("HTTP 500", status=500)] * 10_000)
    out = asyncio.run(enrich(it, raw, SRC, teacher, settings(tier3_teacher_retry_max_s=0.2), TeacherStats()))
    assert isinstance(out, DeadLetter) and out.stage == "teacher" and out.error_kind == "server_error"
    assert teacher.calls > 3 and "HTTP 500" in out.reason


def test_non_retryable_dead_letters_at_once_and_config_error_raises() -> None:
    it, raw = item()
    teacher = ScriptedTeacher([TeacherError("HTTP 400: prompt too long", retryable=False)])
    out = asyncio.run(enrich(it, raw, SRC, teacher, settings(), TeacherStats()))
    assert isinstance(out, DeadLetter) and teacher.calls == 1
    with pytest.raises(TeacherConfigError):
        asyncio.run(enrich(it, raw, SRC, ScriptedTeacher([TeacherConfigError("HTTP 401")]), settings(),
                           TeacherStats()))


@pytest.mark.parametrize(("mode", "kind", "says"), [("inject_tag", "unsafe_text", "tags"),
                                                    ("inject_token", "unsafe_text", "<|im_end|>"),
                                                    ("inject_lookalike", "tag_lookalike", "look")])
def test_unsafe_output_is_dead_lettered_at_once_with_its_own_kind(mode: str, kind: str, says: str) -> None:
    it, raw = item()
    teacher = ScriptedTeacher([mode] * 10)
    stats = TeacherStats()
    out = asyncio.run(enrich(it, raw, SRC, teacher, settings(tier3_teacher_max_attempts=3), stats))
    assert isinstance(out, DeadLetter)
    assert out.stage == "enrich" and out.error_kind == kind and teacher.calls == 1
    assert says in out.reason
    assert base64.b64decode(out.original_b64) == raw and stats.errors_by_kind == {kind: 1}


class LongReasoningTeacher(ScriptedTeacher):
    async def complete(self, messages: list[dict[str, str]]) -> TeacherReply:
        ans = orjson.dumps(expected_answer(question_of(messages))).decode()
        return TeacherReply(f"<reasoning>{'why ' * 60_000}</reasoning><answer>{ans}</answer>", "m", 1, 1)


def test_a_trace_that_cannot_be_built_is_a_dead_letter_not_a_crash() -> None:
    it, raw = item()  # reasoning over the schema's 200,000 characters used to raise out of enrich()
    out = asyncio.run(enrich(it, raw, SRC, LongReasoningTeacher([]), settings(), TeacherStats()))
    assert isinstance(out, DeadLetter) and out.error_kind == "invalid_trace" and "reasoning" in out.reason


def test_outage_state_changes_are_logged_once_each_and_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    h = TeacherHealth(quiet_s=30.0, remind_s=3600.0)
    caplog.set_level(logging.INFO, logger="tier3.enrich")
    h.succeeded()  # up and staying up: nothing to say
    for _ in range(50):
        h.failed(TeacherUnavailable("openai: ConnectError: connection refused"))
    h.failed(InvalidTeacherOutput("not json"))  # an answer, however bad, is not an outage
    assert h.failed_calls == 50
    h.succeeded()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("teacher is down since ") and "unavailable: openai: ConnectError" in lines[0]
    assert re.match(r"teacher recovered after \d+\.\d s \(down since .+\); 50 calls failed$", lines[1])
    # a flapping teacher: the next outages within quiet_s are counted, not logged, then reported with the next one
    for _ in range(5):
        h.failed(TeacherTimeout("openai: ReadTimeout"))
        h.succeeded()
    assert len(caplog.records) == 2
    h._last_line -= 31.0
    h.failed(TeacherServerError("HTTP 500"))
    assert "5 short outages since the last report were not logged" in caplog.records[-1].getMessage()
    h.remind_s = 0.0
    h.failed(TeacherServerError("HTTP 500"))
    assert caplog.records[-1].getMessage().startswith("teacher still down since ")
    assert "2 calls failed" in caplog.records[-1].getMessage()
