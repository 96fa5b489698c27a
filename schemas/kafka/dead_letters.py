"""Dead letters that always fit: the original bytes are kept up to what the record limit leaves room for.

A dead letter is written for a message that could not be processed; if the dead letter itself were refused by the
producer or the broker (too large), the message could be neither processed nor set aside, and its partition would
stop. So every writer (the worker, the trainer, and any added later) builds its letter with
:func:`dead_letter_record`, which

- bounds the record's key (:func:`letter_key`: ``<source topic>/<partition>/<offset>``, and a key over
  :data:`MAX_LETTER_KEY_BYTES` becomes its prefix plus ``#`` and its sha256);
- computes the value's room with :func:`letter_budget`: the producer's ``message.max.bytes`` minus the key, the
  headers, :data:`RECORD_OVERHEAD_BYTES` and :data:`MARGIN_BYTES` (librdkafka refuses a record when key + value +
  serialized headers + 36 bytes of record framing exceed ``message.max.bytes``; the budget counts a whole
  one-record v2 batch and a margin on top, so it never depends on how librdkafka counts);
- and :func:`make_dead_letter` measures the encoded letter without the original and keeps as much of the original
  (base64, 4/3 larger) as that room allows: whole when it fits, else a prefix plus ``original_size``,
  ``original_sha256`` and the source coordinates, enough to re-drive it from the source topic while that retains
  it (``TIER3_EXPERIENCES_RETENTION_MS`` is at least ``TIER3_DEAD_LETTERS_RETENTION_MS`` by default).

A write that fails anyway (a topic stricter than ours, a broker refusing the record) is retried when the error is
transient and otherwise degraded along :func:`fallbacks`: the letter without the original
(:func:`metadata_only`), then the smallest letter (:func:`minimal`, whose size does not depend on the message).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from confluent_kafka import KafkaError

from schemas.codec import encode
from schemas.messages import DeadLetter, DeadLetterStage

#: a message key longer than this is kept as a prefix in ``key_b64`` (keys are ids, not payloads)
MAX_KEY_BYTES = 1024
MAX_REASON_CHARS = 10_000
#: a dead letter's own record key longer than this is replaced by a prefix + "#" + its sha256 (hex)
MAX_LETTER_KEY_BYTES = 256
#: what Kafka adds to one record, counted generously: a v2 record batch header (61 bytes) + the record's framing
#: at the widest its varints can be (length 5, attributes 1, timestamp delta 10, offset delta 5, key length 5,
#: value length 5, header count 5 = 36, librdkafka's RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD)
RECORD_OVERHEAD_BYTES = 61 + 36
#: room left unused below the limit on top of that (librdkafka versions, a header added by a proxy, ...)
MARGIN_BYTES = 1024
#: each header counts its key and value plus two length varints of at most 5 bytes
HEADER_OVERHEAD_BYTES = 10
#: room left unused inside the value (the letter is measured exactly; this covers the one field that changes)
_MARGIN = 64
#: the smallest letter's reason is cut to this (so its size does not depend on the message)
_MINIMAL_REASON_CHARS = 200

Headers = Sequence[tuple[str, bytes | str | None]]


def headers_size(headers: Headers | None) -> int:
    """Bytes the headers take in a record, counted generously (:data:`HEADER_OVERHEAD_BYTES` each)."""
    total = 0
    for k, v in headers or ():
        total += HEADER_OVERHEAD_BYTES + len(k.encode()) + (len(v.encode()) if isinstance(v, str)
                                                            else len(v or b""))
    return total


def letter_budget(max_record_bytes: int, key: bytes | None, headers: Headers | None = None) -> int:
    """The largest value a record with this key and headers may have to be accepted by a producer whose
    ``message.max.bytes`` is ``max_record_bytes`` (and so by the topics, whose limit is larger):
    ``max_record_bytes - len(key) - headers - RECORD_OVERHEAD_BYTES - MARGIN_BYTES``."""
    return (max_record_bytes - len(key or b"") - headers_size(headers) - RECORD_OVERHEAD_BYTES - MARGIN_BYTES)


def record_fits(max_record_bytes: int, key: bytes | None, value: bytes, headers: Headers | None = None) -> bool:
    """True when (key, value, headers) is within :func:`letter_budget`: any tier3 producer accepts it."""
    return len(value) <= letter_budget(max_record_bytes, key, headers)


def bounded_key(key: bytes) -> bytes:
    """``key`` when at most :data:`MAX_LETTER_KEY_BYTES`, else its prefix + ``#`` + its sha256 (hex), exactly
    :data:`MAX_LETTER_KEY_BYTES` long: distinct keys stay distinct, and equal keys equal (same partition)."""
    if len(key) <= MAX_LETTER_KEY_BYTES:
        return key
    digest = hashlib.sha256(key).hexdigest().encode()
    return key[:MAX_LETTER_KEY_BYTES - len(digest) - 1] + b"#" + digest


def letter_key(topic: str | None, partition: int | None, offset: int | None) -> bytes:
    """The record key of a dead letter: its source coordinates ``<topic>/<partition>/<offset>``, bounded."""
    return bounded_key(f"{topic or ''}/{'' if partition is None else partition}/"
                       f"{'' if offset is None else offset}".encode())


def make_dead_letter(raw: bytes, *, stage: DeadLetterStage, error_kind: str, reason: str, max_bytes: int,
                     source_topic: str | None = None, source_partition: int | None = None,
                     source_offset: int | None = None, key: bytes | None = None, experience_id: str | None = None,
                     attempts: int = 1, failed_at_ms: int | None = None) -> DeadLetter:
    """A dead letter for ``raw`` whose encoding is at most ``max_bytes`` (the original cut to fit if needed).

    ``max_bytes`` is the room for the letter's *value*: :func:`letter_budget` of the record it goes in (use
    :func:`dead_letter_record`, which does that)."""
    key_cut = key is not None and len(key) > MAX_KEY_BYTES
    base = DeadLetter(
        stage=stage, reason=reason[:MAX_REASON_CHARS], error_kind=error_kind[:200],
        failed_at_ms=failed_at_ms if failed_at_ms is not None else int(time.time() * 1000),
        source_topic=source_topic, source_partition=source_partition, source_offset=source_offset,
        key_b64=base64.b64encode(key[:MAX_KEY_BYTES]).decode() if key is not None else None,
        original_b64="", experience_id=experience_id, attempts=attempts, original_size=len(raw),
        original_sha256=hashlib.sha256(raw).hexdigest(), original_truncated=True)
    room = max_bytes - len(encode(base)) - _MARGIN
    keep = max(0, room // 4 * 3)  # base64: 4 characters per 3 bytes
    whole = len(raw) <= keep
    dl = base.model_copy(update={"original_b64": base64.b64encode(raw if whole else raw[:keep]).decode(),
                                 "original_truncated": key_cut or not whole})
    if len(encode(dl)) > max_bytes:  # cannot happen with the measurement above; never write an oversize letter
        return metadata_only(dl)
    return dl


@dataclass(frozen=True)
class LetterRecord:
    """A dead letter and the record it is written as: ``key`` bounded, ``value`` within the budget."""

    key: bytes
    letter: DeadLetter
    value: bytes

    def degraded(self) -> list[LetterRecord]:
        """The smaller letters to write instead when this one is refused, smallest last."""
        return [LetterRecord(self.key, dl, encode(dl)) for dl in fallbacks(self.letter)[1:]]


def dead_letter_record(raw: bytes, *, max_record_bytes: int, stage: DeadLetterStage, error_kind: str, reason: str,
                       source_topic: str | None = None, source_partition: int | None = None,
                       source_offset: int | None = None, key: bytes | None = None,
                       experience_id: str | None = None, attempts: int = 1, failed_at_ms: int | None = None,
                       headers: Headers | None = None) -> LetterRecord:
    """The dead letter of ``raw`` (read at ``source_topic/source_partition/source_offset`` with ``key``) as a record
    that a producer with ``message.max.bytes`` = ``max_record_bytes`` accepts, whatever the sizes, the key, the
    coordinates or ``headers`` (the headers the writer adds to the record, if any)."""
    rec_key = letter_key(source_topic, source_partition, source_offset)
    dl = make_dead_letter(raw, stage=stage, error_kind=error_kind, reason=reason,
                          max_bytes=letter_budget(max_record_bytes, rec_key, headers), source_topic=source_topic,
                          source_partition=source_partition, source_offset=source_offset, key=key,
                          experience_id=experience_id, attempts=attempts, failed_at_ms=failed_at_ms)
    return LetterRecord(rec_key, dl, encode(dl))


def metadata_only(dl: DeadLetter, note: str = "") -> DeadLetter:
    """``dl`` without the original bytes (the sha256, size and source coordinates stay): re-drivable from the
    source while it is retained."""
    reason = f"{dl.reason} [{note}]" if note else dl.reason
    return dl.model_copy(update={"original_b64": "", "original_truncated": True,
                                 "reason": reason[:MAX_REASON_CHARS]})


def minimal(dl: DeadLetter, note: str = "") -> DeadLetter:
    """The smallest letter: no original, no original key, the reason cut to 200 characters; its size does not
    depend on the message (stage, kind, coordinates, sha256, size, experience id)."""
    reason = f"[{note}] {dl.reason}" if note else dl.reason
    return dl.model_copy(update={"original_b64": "", "original_truncated": True, "key_b64": None,
                                 "reason": reason[:_MINIMAL_REASON_CHARS]})


def fallbacks(dl: DeadLetter, note: str = "write refused") -> list[DeadLetter]:
    """``dl``, then :func:`metadata_only`, then :func:`minimal` (three letters, ``note`` cut to 300 characters in
    the reason of the last two): what a writer tries in turn when one is refused."""
    note = note[:300]
    return [dl, metadata_only(dl, note=note), minimal(dl, note=note)]


def is_complete(dl: DeadLetter) -> bool:
    """True when ``dl`` carries its whole original (re-drivable from the dead letter itself)."""
    return not dl.original_truncated


# ------------------------------------------------------------------------------------ failed writes

#: the record itself was refused (its size or the broker's record validation): a smaller letter may pass
REFUSED_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
                           KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE})
#: ask again in a moment (an outage, a leader moving, a timeout): the same letter is written again
TRANSIENT_CODES = frozenset({
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError._QUEUE_FULL, KafkaError._RESOLVE, KafkaError._WAIT_COORD, KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NETWORK_EXCEPTION,
    KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND, KafkaError.KAFKA_STORAGE_ERROR,
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.BROKER_NOT_AVAILABLE, KafkaError._NODE_UPDATE,
})


def write_failure(code: int | None) -> Literal["refused", "transient", "other"]:
    """What to do about a dead-letter write that failed with librdkafka's ``code``: ``refused`` (write a smaller
    letter), ``transient`` (write it again after a back-off), ``other`` (the cluster's: authorization, ...)."""
    if code in REFUSED_CODES:
        return "refused"
    if code in TRANSIENT_CODES:
        return "transient"
    return "other"


def backoff_s(attempt: int, initial_s: float = 0.1, max_s: float = 5.0) -> float:
    """The wait before write ``attempt`` + 1 of a dead letter (exponential, capped)."""
    return float(min(max_s, initial_s * 2 ** max(0, attempt - 1)))


__all__ = ["HEADER_OVERHEAD_BYTES", "MARGIN_BYTES", "MAX_KEY_BYTES", "MAX_LETTER_KEY_BYTES", "RECORD_OVERHEAD_BYTES",
           "LetterRecord", "backoff_s", "bounded_key", "dead_letter_record", "fallbacks", "headers_size",
           "is_complete", "letter_budget", "letter_key", "make_dead_letter", "metadata_only", "minimal",
           "record_fits", "write_failure"]
