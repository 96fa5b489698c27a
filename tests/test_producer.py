"""The capture library against a real broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas import Experience, decode, encode, get_task
from schemas.settings import KafkaSettings
from streams import broker
from streams.errors import CaptureError
from streams.producer import Capture, CaptureSettings
from streams.topics import ensure_topics
from tests.kafka_utils import consume_values

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
