"""The capture library against a real broker."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas import Experience, decode, encode, get_task
from schemas.settings import KafkaSettings
from streams.client.capture import Capture, CaptureSettings
from streams.errors import CaptureError
from streams.topics import ensure_topics
from tests.kafka_utils import consume_values
from tier3.devbroker import server as broker

TASK = get_task("widget_selector")


def make_experience(i: int) -> Experience:
    return Experience.model_validate({
        "experience_id": f"exp-{i:06d}", "task": "widget_selector", "created_at_ms": 1_764_000_000_000 + i,
        "messages": [{"role": "system", "content": TASK.system_prompt},
                     {"role": "user", "content": f"how are the checkout servers doing? #{i}"}],
        "response": '{"widgets": ["cpu_usage", "error_rate"], "time_range": "24h"}',
        "served_by": {"arm": "baseline", "model": "prod-7b"},
        "confidence": (i % 100) / 100, "reward": 1.0 if i % 3 else None, "latency_ms": 412.5,
        "user_id": f"u{i % 37}",
    })


def test_publish_10000_all_present_none_duplicated(make_settings: Callable[..., KafkaSettings]) -> None:
    settings = make_settings(CaptureSettings)
    cap = Capture(settings)  # type: ignore[arg-type]
    sent = [make_experience(i) for i in range(10_000)]
    for exp in sent:
        assert cap.publish(exp)
    assert cap.flush(60) == 0
    stats = cap.stats()
    assert (stats.sent, stats.delivered, stats.failed, stats.dropped) == (10_000, 10_000, 0, 0)
    got = consume_values(settings, settings.experiences_topic, expected=10_000, timeout_s=120)
    assert len(got) == 10_000
    by_id = {m.key().decode(): m.value() for m in got}
    assert len(by_id) == 10_000  # none duplicated
    for exp in sent:
        value = by_id[exp.experience_id]
        assert decode(value, Experience) == exp
        assert value == encode(exp)  # bytes equal
    cap.close()


def test_invalid_experience_is_counted_not_raised(make_settings: Callable[..., KafkaSettings],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(CaptureSettings)
    cap = Capture(settings)  # type: ignore[arg-type]
    bad = {"experience_id": "x", "task": "widget_selector", "confidence": "high"}
    assert cap.publish(bad) is False
    assert cap.publish(bad) is False
    assert cap.publish(make_experience(1).model_dump()) is True
    assert cap.stats().invalid == 2
    warnings = [r for r in caplog.records if "invalid experience" in r.getMessage()]
    assert len(warnings) == 1  # logged once per kind, then only counted
    strict = Capture(CaptureSettings(**{**settings.model_dump(), "tier3_capture_strict": True}))
    with pytest.raises(CaptureError, match=r"confidence|created_at_ms|messages"):
        strict.publish(bad)
    cap.close()
    strict.close()


def test_disabled_capture_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENABLE_TIER3_CAPTURE", "false")
    cap = Capture()
    assert cap.publish(make_experience(1)) is False
    assert cap.stats().sent == 0 and cap._producer is None


@pytest.mark.chaos
def test_broker_down_mid_stream(tmp_path: Path) -> None:
    """Stop the broker mid-stream, keep publishing, start it again: every acknowledged experience is there."""
    bs = broker.BrokerSettings(tier3_broker_port=19492, tier3_broker_controller_port=19493,
                               tier3_broker_dir=tmp_path / "broker")
    broker.up(bs)
    try:
        settings = CaptureSettings(kafka_bootstrap_servers=bs.bootstrap,
                                   tier3_topic_prefix=f"t{uuid.uuid4().hex[:8]}.")
        ensure_topics(settings)
        cap = Capture(settings)
        lat_up: list[float] = []
        lat_down: list[float] = []
        for i in range(2_000):
            t0 = time.perf_counter()
            cap.publish(make_experience(i))
            lat_up.append(time.perf_counter() - t0)
        assert cap.flush(30) == 0
        broker.down(bs)
        for i in range(2_000, 5_000):
            t0 = time.perf_counter()
            assert cap.publish(make_experience(i))  # accepted into the buffer while the broker is away
            lat_down.append(time.perf_counter() - t0)
            if i % 500 == 0:
                time.sleep(0.5)  # let librdkafka notice and retry while we keep publishing
        assert cap.stats().delivered == 2_000
        broker.up(bs)
        assert cap.flush(120) == 0
        stats = cap.stats()
        assert (stats.delivered, stats.failed, stats.dropped) == (5_000, 0, 0)
        got = consume_values(settings, settings.experiences_topic, expected=5_000, timeout_s=120)
        ids = [m.key().decode() for m in got]
        assert len(ids) == 5_000 and len(set(ids)) == 5_000  # idempotent producer: no duplicates on retry
        # publish() stayed fast while the broker was down: it never waits for the network
        lat_down.sort()
        assert lat_down[len(lat_down) // 2] < 0.001
        assert max(lat_down) < 0.05
        cap.close()
    finally:
        broker.down(bs)


def test_close_counts_what_it_gives_up_and_says_so_plainly(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port where no broker answers
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="tier3.capture")
    cap = Capture(CaptureSettings(kafka_bootstrap_servers=f"127.0.0.1:{port}", tier3_capture_flush_timeout_s=1.0))
    for i in range(25):
        assert cap.publish(make_experience(i))
    deadline = time.monotonic() + 30
    while "cannot reach Kafka" not in caplog.text and time.monotonic() < deadline:
        cap._producer.poll(0.1)  # type: ignore[union-attr]  # serve the error callback
    assert cap.stats().queue_depth == 25 and cap.stats().lost == 0
    cap.close()
    stats = cap.stats()
    assert (stats.sent, stats.delivered, stats.lost, stats.failed, stats.queue_depth) == (25, 0, 25, 0, 0)
    assert f"capture cannot reach Kafka at 127.0.0.1:{port} (no broker answers)" in caplog.text
    assert "brokers are down" not in caplog.text and "Kafka client error" not in caplog.text
    assert "25 experiences not delivered within 1 s: they are lost (counted in stats().lost)" in caplog.text


def test_size_limit_is_the_workers(make_settings: Callable[..., KafkaSettings]) -> None:
    settings = make_settings(CaptureSettings)
    assert isinstance(settings, CaptureSettings)
    limit = settings.tier3_max_message_bytes
    cap = Capture(settings)

    def sized(i: int, n: int) -> Experience:
        exp = make_experience(i)
        pad = n - len(encode(exp.model_copy(update={"metadata": {"pad": ""}})))
        out = exp.model_copy(update={"metadata": {"pad": "p" * pad}})
        assert len(encode(out)) == n
        return out

    at, over = sized(1, limit), sized(2, limit + 1)
    assert cap.publish(sized(0, limit - 1)) and cap.publish(at)
    assert not cap.publish(over)  # the worker would only dead-letter it: refused here, counted, never sent
    assert cap.flush(30) == 0
    stats = cap.stats()
    assert (stats.sent, stats.delivered, stats.invalid, stats.failed) == (2, 2, 1, 0)
    got = consume_values(settings, settings.experiences_topic, expected=2, timeout_s=60)
    assert sorted(len(m.value() or b"") for m in got) == [limit - 1, limit]
    cap.close()
    strict = Capture(settings.model_copy(update={"tier3_capture_strict": True}))
    with pytest.raises(CaptureError, match="TIER3_MAX_MESSAGE_BYTES"):
        strict.publish(over)
    strict.close()
