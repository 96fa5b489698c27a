"""Dead letters always fit the record limit: the original is kept whole up to the exact byte that still fits, and
beyond it a prefix, the sha256, the size and the source coordinates (schemas.kafka.dead_letters)."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest

from schemas import DeadLetter, decode, encode
from schemas.kafka.dead_letters import MAX_KEY_BYTES, make_dead_letter, metadata_only
from schemas.settings import DEFAULT_MAX_RECORD_BYTES, RECORD_BATCH_SLACK_BYTES, KafkaSettings

LIMIT = 64 * 1024


def letter(raw: bytes, max_bytes: int = LIMIT, key: bytes | None = b"k-1") -> DeadLetter:
    return make_dead_letter(raw, stage="decode", error_kind="oversize", reason="too big", max_bytes=max_bytes,
                            source_topic="t.experiences", source_partition=4, source_offset=1234, key=key,
                            failed_at_ms=1_700_000_000_000)


def largest_whole(max_bytes: int = LIMIT) -> int:
    """The largest original kept whole, found by bisection on the real encoder (no formula from the code)."""
    lo, hi = 0, max_bytes
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if letter(b"x" * mid, max_bytes).original_truncated:
            hi = mid - 1
        else:
            lo = mid
    return lo


def test_whole_up_to_the_bound_and_a_prefix_with_sha256_beyond() -> None:
    k = largest_whole()
    assert k > LIMIT * 0.7  # nearly all the room goes to the original (base64: 3 bytes per 4 characters)
    for n in (k - 1, k):
        raw = os.urandom(n)
        dl = letter(raw)
        assert not dl.original_truncated and base64.b64decode(dl.original_b64) == raw
        assert len(encode(dl)) <= LIMIT
        assert dl.original_size == n and dl.original_sha256 == hashlib.sha256(raw).hexdigest()
    for n in (k + 1, 2_096_600):
        raw = os.urandom(n)
        dl = letter(raw)
        assert dl.original_truncated and len(encode(dl)) <= LIMIT
        prefix = base64.b64decode(dl.original_b64)
        assert raw.startswith(prefix) and len(prefix) >= k - 3
        assert dl.original_size == n and dl.original_sha256 == hashlib.sha256(raw).hexdigest()
        assert (dl.source_topic, dl.source_partition, dl.source_offset) == ("t.experiences", 4, 1234)
        assert decode(encode(dl), DeadLetter, max_bytes=LIMIT) == dl


def test_worst_case_fields_still_fit() -> None:
    # longest reason, control characters (6 bytes each in JSON), a huge key: still within the limit
    raw = os.urandom(3 * LIMIT)
    dl = make_dead_letter(raw, stage="teacher", error_kind="e" * 500, reason="\x01" * 50_000, max_bytes=LIMIT,
                          source_topic="t" * 249, source_partition=999, source_offset=2**62, key=b"\x00" * 100_000,
                          experience_id="\U0001f600" * 200, attempts=7)
    assert len(encode(dl)) <= LIMIT and dl.original_truncated
    assert len(base64.b64decode(dl.key_b64 or "")) == MAX_KEY_BYTES
    small = metadata_only(dl, note="first write refused")
    assert small.original_b64 == "" and small.original_sha256 == dl.original_sha256
    assert small.reason.endswith("[first write refused]") or len(small.reason) == 10_000


@pytest.mark.parametrize("max_message_bytes", [1024, 1_000_000, 1_048_577, 3_000_000])
def test_one_limit_everywhere(max_message_bytes: int) -> None:
    s = KafkaSettings(tier3_max_message_bytes=max_message_bytes)
    assert s.max_record_bytes >= DEFAULT_MAX_RECORD_BYTES and s.max_record_bytes >= 2 * max_message_bytes
    assert s.client_config()["message.max.bytes"] == s.max_record_bytes
    assert s.topic_max_message_bytes == s.max_record_bytes + RECORD_BATCH_SLACK_BYTES
    for spec in s.topic_specs():
        assert spec.config["max.message.bytes"] == str(s.topic_max_message_bytes)
    # the largest accepted experience, rejected for any reason, keeps its whole bytes in its dead letter
    raw = b"y" * max_message_bytes
    dl = make_dead_letter(raw, stage="teacher", error_kind="timeout", reason="r" * 10_000,
                          max_bytes=s.max_record_bytes, key=b"k" * 2000)
    assert base64.b64decode(dl.original_b64) == raw and len(encode(dl)) <= s.max_record_bytes


def test_local_broker_default_is_the_topics_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tier3.devbroker.server import BrokerSettings, _server_properties

    props = _server_properties(BrokerSettings(tier3_broker_dir=tmp_path), tmp_path)
    assert f"message.max.bytes={KafkaSettings().topic_max_message_bytes}\n" in props


# ------------------------------------------------------------------ the record fits by construction (issue 11b)

#: a 200-character topic prefix: keys of ~230 bytes, far over the ~30 bytes a letter had room for
LONG_PREFIX = "p" * 198 + "x."
#: (partition, offset) pairs no fresh topic can have: the letter is built with them, then produced on partition 0
COORDINATES = [(0, 7_654_321), (1_000, 10**12), (999_999, 10**12 + 7), (2**31 - 1, 2**63 - 1)]


def test_budget_is_the_limit_minus_key_headers_and_the_documented_overhead() -> None:
    from schemas.kafka.dead_letters import (
        MARGIN_BYTES,
        RECORD_OVERHEAD_BYTES,
        headers_size,
        letter_budget,
    )

    key = b"k" * 300
    headers: list[tuple[str, str | bytes | None]] = [("tier3-a", b"v" * 40), ("b", "w")]
    assert headers_size(headers) == (10 + 7 + 40) + (10 + 1 + 1)
    assert letter_budget(2_097_152, key, headers) == (2_097_152 - 300 - headers_size(headers)
                                                      - RECORD_OVERHEAD_BYTES - MARGIN_BYTES)
    # librdkafka's own count is key + value + headers + 36: the budget leaves at least a v2 batch header more
    assert RECORD_OVERHEAD_BYTES >= 61 + 36 and MARGIN_BYTES >= 1024


def test_keys_are_bounded_with_a_sha256_suffix() -> None:
    from schemas.kafka.dead_letters import MAX_LETTER_KEY_BYTES, bounded_key, letter_key

    topic = "q" * 234 + "enriched-traces"  # the longest topic name Kafka allows (249)
    k1, k2 = letter_key(topic, 2**31 - 1, 2**63 - 1), letter_key(topic, 2**31 - 1, 2**63 - 2)
    assert len(k1) == len(k2) == MAX_LETTER_KEY_BYTES and k1 != k2
    assert k1.endswith(b"#" + hashlib.sha256(f"{topic}/{2**31 - 1}/{2**63 - 1}".encode()).hexdigest().encode())
    assert letter_key("t.enriched-traces", 3, 12) == b"t.enriched-traces/3/12"  # short keys are kept as they are
    assert bounded_key(b"x" * MAX_LETTER_KEY_BYTES) == b"x" * MAX_LETTER_KEY_BYTES


def _record(raw: bytes, topic: str, partition: int, offset: int, headers=None):  # type: ignore[no-untyped-def]
    from schemas.kafka.dead_letters import dead_letter_record

    return dead_letter_record(raw, max_record_bytes=DEFAULT_MAX_RECORD_BYTES, stage="decode", error_kind="not_json",
                              reason="undecodable", source_topic=topic, source_partition=partition,
                              source_offset=offset, key=b"orig-key", failed_at_ms=1_700_000_000_000,
                              headers=headers)


def _largest_whole(topic: str, partition: int, offset: int, headers=None) -> int:  # type: ignore[no-untyped-def]
    lo, hi = 0, DEFAULT_MAX_RECORD_BYTES
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _record(b"x" * mid, topic, partition, offset, headers).letter.original_truncated:
            hi = mid - 1
        else:
            lo = mid
    return lo


def test_boundary_letters_are_accepted_by_the_real_broker(make_settings) -> None:  # type: ignore[no-untyped-def]
    from confluent_kafka import KafkaException, Producer

    from schemas.kafka.dead_letters import letter_budget
    from schemas.settings import RELIABLE_PRODUCER
    from tests.kafka_utils import produce_and_wait

    s = make_settings(tier3_topic_prefix=f"{LONG_PREFIX}{os.urandom(3).hex()}.", tier3_partitions=1)
    assert s.max_record_bytes == DEFAULT_MAX_RECORD_BYTES and len(s.tier3_topic_prefix) == 207
    producer = Producer({**s.client_config(), **RELIABLE_PRODUCER, "linger.ms": 5})  # the real producer config
    records: list[tuple[bytes, bytes]] = []
    for partition, offset in COORDINATES:
        k = _largest_whole(s.traces_topic, partition, offset)
        whole, cut = _record(os.urandom(k), s.traces_topic, partition, offset), \
            _record(os.urandom(k + 1), s.traces_topic, partition, offset)
        issue = _record(os.urandom(2_096_600), s.traces_topic, partition, offset)
        assert not whole.letter.original_truncated and cut.letter.original_truncated
        assert issue.letter.original_truncated and issue.letter.original_size == 2_096_600
        assert (issue.letter.source_partition, issue.letter.source_offset) == (partition, offset)
        assert whole.key == f"{s.traces_topic}/{partition}/{offset}".encode() and len(whole.key) > 200
        for rec in (whole, cut, issue):
            assert len(rec.value) <= letter_budget(s.max_record_bytes, rec.key)
            records.append((rec.key, rec.value))
        # and the letter is within the budget by no more than the base64 rounding and the measured margin
        assert letter_budget(s.max_record_bytes, whole.key) - len(whole.value) < 200
    assert produce_and_wait(producer, s.dead_letters_topic, records, 120) == len(records)

    # what librdkafka itself allows with such a key, measured: the budget stays below it by the documented margin
    key = records[-1][0]

    def accepts(n: int) -> bool:
        try:
            producer.produce(s.dead_letters_topic, key=key, value=b"\0" * n)
        except KafkaException:
            return False
        return True

    lo, hi = 1, s.max_record_bytes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if accepts(mid) else (lo, mid)
    assert producer.flush(120) == 0
    assert lo == s.max_record_bytes - len(key) - 36  # librdkafka: key + value + 36 <= message.max.bytes
    assert lo - letter_budget(s.max_record_bytes, key) == 61 + 1024


def test_headers_count_against_the_budget(make_settings) -> None:  # type: ignore[no-untyped-def]
    from confluent_kafka import Producer

    from schemas.settings import RELIABLE_PRODUCER

    s = make_settings(tier3_topic_prefix=f"{LONG_PREFIX}{os.urandom(3).hex()}.", tier3_partitions=1)
    headers: list[tuple[str, str | bytes | None]] = [("tier3-redriven-from", b"h" * 5000)]
    k = _largest_whole(s.traces_topic, 1_000, 10**12, headers)
    assert k < _largest_whole(s.traces_topic, 1_000, 10**12) - 3700
    producer = Producer({**s.client_config(), **RELIABLE_PRODUCER})
    errors: list[object] = []
    for n in (k, k + 1):
        rec = _record(os.urandom(n), s.traces_topic, 1_000, 10**12, headers)
        producer.produce(s.dead_letters_topic, key=rec.key, value=rec.value, headers=headers,
                         on_delivery=lambda e, _m: errors.append(e))
    assert producer.flush(60) == 0 and errors == [None, None]


def test_fallbacks_shrink_to_a_size_no_message_controls() -> None:
    from schemas.kafka.dead_letters import fallbacks, write_failure

    dl = make_dead_letter(os.urandom(100_000), stage="decode", error_kind="not_json", reason="\x01" * 20_000,
                          max_bytes=LIMIT * 4, source_topic="t" * 249, source_partition=2**31 - 1,
                          source_offset=2**63 - 1, key=b"k" * 5000)
    full, meta, small = fallbacks(dl, note="first write refused: " + "x" * 1000)
    assert full == dl and meta.original_b64 == "" and meta.original_sha256 == dl.original_sha256
    assert small.key_b64 is None and len(small.reason) <= 200 and len(encode(small)) < 1024
    assert decode(encode(small), DeadLetter) == small and decode(encode(meta), DeadLetter) == meta
    from confluent_kafka import KafkaError

    assert write_failure(KafkaError.MSG_SIZE_TOO_LARGE) == "refused"
    assert write_failure(KafkaError._MSG_TIMED_OUT) == "transient"
    assert write_failure(KafkaError.TOPIC_AUTHORIZATION_FAILED) == "other"
