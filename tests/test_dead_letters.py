"""Dead letters always fit the record limit: the original is kept whole up to the exact byte that still fits, and
beyond it a prefix, the sha256, the size and the source coordinates (schemas.dead_letters)."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest

from schemas import DeadLetter, decode, encode
from schemas.dead_letters import MAX_KEY_BYTES, make_dead_letter, metadata_only
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
    from streams.broker import BrokerSettings, _server_properties

    props = _server_properties(BrokerSettings(tier3_broker_dir=tmp_path), tmp_path)
    assert f"message.max.bytes={KafkaSettings().topic_max_message_bytes}\n" in props
