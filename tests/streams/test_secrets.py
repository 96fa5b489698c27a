"""A teacher that echoes the API key in its error body (some gateways do on 401 / 403) never gets the key into an
exception, a log line, a traceback, /status, a dead letter or a trace: redacted where the error text is made."""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import Callable

import httpx
import orjson
import pytest

from schemas import get_task
from streams.errors import TeacherBadRequest, TeacherConfigError, TeacherError
from streams.redaction import REDACTED, redact, register_secret
from streams.settings import StreamsSettings
from streams.teachers import make_teacher
from tests.fakes.teacher_server import FakeTeacherServer
from tests.kafka_utils import consume_values, produce_values
from tests.streams.helpers import WorkerProcess, as_records, make_experience


def canary(kind: str) -> str:
    # OpenAI's is key-shaped (caught by pattern too); Anthropic's is not: only its registration redacts it
    tag = uuid.uuid4().hex
    return f"sk-canary-OPENAI-{tag}" if kind == "openai" else f"canary.ANTHROPIC.{tag}"


def teacher_settings(kind: str, url: str, key: str, **kw: object) -> dict[str, object]:
    base: dict[str, object] = {"tier3_teacher": kind, "tier3_teacher_model": "fake-model",
                               "tier3_teacher_timeout_s": 5.0}
    if kind == "openai":
        base.update(tier3_teacher_base_url=f"{url}/v1", openai_api_key=key)
    else:
        base.update(tier3_teacher_base_url=url, anthropic_api_key=key)
    base.update(kw)
    return base


def test_redact_values_and_key_shapes() -> None:
    register_secret("a-registered-secret-value")
    text = ("key a-registered-secret-value; Incorrect API key provided: sk-proj-AbCdEf0123456789xyz. "
            "x-api-key: sk-ant-api03-abcdefghij Authorization: Bearer tok_1234567890 "
            '{"api_key": "zzzzzzzzzzzz"} hf_abcdefghijklmnopqrstuvwxyz AKIAABCDEFGHIJKLMNOP')
    out = redact(text)
    for secret in ("a-registered-secret-value", "sk-proj-AbCdEf0123456789xyz", "sk-ant-api03-abcdefghij",
                   "tok_1234567890", "zzzzzzzzzzzz", "hf_abcdefghijklmnopqrstuvwxyz", "AKIAABCDEFGHIJKLMNOP"):
        assert secret not in out
    assert out.count(REDACTED) == 7 and '"api_key": "[REDACTED]"' in out
    # ordinary words with the same letters stay
    plain = "task-selector-with-a-long-name and risk-assessment-report, ask-me-anything-please"
    assert redact(plain) == plain


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize(("mode", "exc"), [("401_echo", TeacherConfigError), ("403_echo", TeacherConfigError),
                                          ("400_echo", TeacherBadRequest)])
def test_echoed_key_is_redacted_at_the_source(kind: str, mode: str, exc: type[TeacherError],
                                              caplog: pytest.LogCaptureFixture) -> None:
    key = canary(kind)
    caplog.set_level(logging.DEBUG)
    with FakeTeacherServer() as srv:
        srv.set_mode(mode)
        teacher = make_teacher(StreamsSettings(**teacher_settings(kind, srv.url, key)))  # type: ignore[arg-type]
        task = get_task("widget_selector")

        async def go() -> None:
            try:
                await teacher.complete(task.messages_for_model([{"role": "user", "content": "cpu?"}]))
            finally:
                await teacher.aclose()

        with pytest.raises(exc) as info:
            asyncio.run(go())
        assert key in srv.keys_seen  # the server did get the key, and did echo it
    err = info.value
    tb = "".join(traceback.format_exception(err))
    assert "Incorrect API key provided" in str(err) and REDACTED in str(err)
    for text in (str(err), repr(err), tb, caplog.text):
        assert key not in text and key[:24] not in text


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_worker_with_an_echoing_teacher_leaks_the_key_nowhere(
        kind: str, make_settings: Callable[..., object], start_worker: Callable[..., WorkerProcess],
        teacher_server: FakeTeacherServer) -> None:
    key = canary(kind)
    fields = teacher_settings(kind, teacher_server.url, key, tier3_teacher_backoff_initial_s=0.05,
                              tier3_teacher_backoff_max_s=0.2, tier3_session_timeout_s=6.0,
                              tier3_commit_interval_s=0.5)
    s = make_settings(StreamsSettings, **fields)
    assert isinstance(s, StreamsSettings)
    from streams.app import changelog_spec
    from streams.topics import ensure_topics

    ensure_topics(s, [changelog_spec(s)])
    w = start_worker(s)
    w.wait_ready()
    # 400 with the key echoed: dead-lettered at once, the error text in the dead letter's reason
    teacher_server.set_mode("400_echo")
    produce_values(s, s.experiences_topic, as_records([make_experience(i, 0.95, prefix="echo") for i in range(4)]))
    st = w.wait_for(lambda st: st["counts"]["dead_lettered"] == 4, 60)
    metrics = httpx.get(f"{w.url}/metrics", timeout=5).text
    # 401 with the key echoed: the worker stops (wrong key), logging the error, the crash and the traceback
    teacher_server.set_mode("401_echo")
    produce_values(s, s.experiences_topic, as_records([make_experience(9, 0.95, prefix="stop")]))
    w.proc.wait(90)
    assert key in teacher_server.keys_seen
    log = w.log_text()
    assert "HTTP 401" in log and "Incorrect API key provided: [REDACTED]" in log
    letters = consume_values(s, s.dead_letters_topic, 4, 30)
    assert len(letters) == 4 and all(b"Incorrect API key provided: [REDACTED]" in (m.value() or b"")
                                     for m in letters)
    everything = [log, orjson.dumps(st).decode(), metrics]
    for topic in (s.dead_letters_topic, s.traces_topic, s.training_runs_topic, s.experiences_topic):
        everything += [(m.value() or b"").decode(errors="replace") + (m.key() or b"").decode(errors="replace")
                       for m in consume_values(s, topic, None, 10, idle_s=1.0)]
    for text in everything:
        assert key not in text and key[:24] not in text
