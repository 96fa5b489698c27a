"""`tier3 dlq`: reading dead letters and re-driving their original bytes to the source topic."""

from __future__ import annotations

import base64
from collections.abc import Callable

from schemas import DeadLetter, encode
from schemas.settings import KafkaSettings
from streams.dlq import read_dead_letters, redrive
from tests.kafka_utils import consume_values, produce_values


def test_read_and_redrive(make_settings: Callable[..., KafkaSettings]) -> None:
    settings = make_settings()
    letters = [DeadLetter(stage="teacher" if i % 2 else "decode", reason=f"reason {i}",
                          error_kind="rate_limited" if i % 2 else "not_json", failed_at_ms=i,
                          source_topic=settings.experiences_topic, source_partition=0, source_offset=i,
                          key_b64=base64.b64encode(f"k{i}".encode()).decode(),
                          original_b64=base64.b64encode(f"original-{i}".encode()).decode())
               for i in range(10)]
    produce_values(settings, settings.dead_letters_topic,
                   [(f"k{i}".encode(), encode(dl)) for i, dl in enumerate(letters)] + [(b"bad", b"\xff not json")])
    got = read_dead_letters(settings)
    assert len(got) == 11
    assert sum(1 for g in got if g.letter is None) == 1  # an unreadable dead letter is shown, not lost
    teacher = [g for g in got if g.letter is not None and g.letter.stage == "teacher"]
    assert redrive(settings, teacher) == 5
    back = consume_values(settings, settings.experiences_topic, expected=5, timeout_s=30)
    assert sorted((m.key(), m.value()) for m in back) == sorted(
        (f"k{i}".encode(), f"original-{i}".encode()) for i in range(1, 10, 2))
    assert all(dict(m.headers() or [])["tier3-redriven-from"].startswith(settings.dead_letters_topic.encode())
               for m in back)
