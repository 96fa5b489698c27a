"""One small Kafka I/O layer: read a slice, read "until now", watermarks, and the retry policy for the broker's
transient answers.

Every reader in tier3 that needs "the whole topic as it is now" (the gate, the dead-letter tool, replay, the
router's and the demo's catch-up) goes through :func:`read_until_now` or :func:`iter_slice`, so they all start at
the same place (each partition's low watermark), end at the same place (the high watermark taken at the start),
and treat offset gaps (transaction markers, compaction) the same way: a partition is done when its *position*
reaches the end, not when a message count does.

Transient answers are retried, with one policy (:data:`TRANSIENT`), until the caller's deadline: right after a
topic is created, or while a partition's leadership moves, the broker answers ``NOT_LEADER_FOR_PARTITION`` or
``LEADER_NOT_AVAILABLE`` for a moment. Reading a watermark then must wait, not fail.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

from schemas.settings import RELIABLE_CONSUMER, KafkaSettings

# error codes that mean "ask again in a moment", whatever librdkafka's retriable flag says (errors built from a
# plain response code, such as those of get_watermark_offsets, carry no flag)
_TRANSIENT_CODES = frozenset({
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.OFFSET_NOT_AVAILABLE, KafkaError.FETCH_SESSION_ID_NOT_FOUND,
    KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._WAIT_COORD, KafkaError._NO_OFFSET,
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError.NETWORK_EXCEPTION, KafkaError._ALL_BROKERS_DOWN,
    KafkaError._MSG_TIMED_OUT, KafkaError._RESOLVE,
})


class TopicMissing(KafkaException):
    """The topic is not in the cluster's metadata (tier3 never auto-creates one: run `tier3 topics create`)."""


class ReadTimeout(Exception):
    """A slice was not read to its end before the deadline."""


def is_transient(exc: BaseException) -> bool:
    """A Kafka error worth asking again about (leadership moving, a request timing out, a connection dropped)."""
    if not isinstance(exc, KafkaException) or isinstance(exc, TopicMissing) or not exc.args:
        return False
    err = exc.args[0]
    if not isinstance(err, KafkaError):
        return False
    return bool(err.retriable()) or err.code() in _TRANSIENT_CODES


#: the one retry policy's pauses: the first one, doubled after each failure up to the last one
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0


def transient_retry(deadline_s: float) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The one retry policy for broker round trips: exponential 50 ms → 1 s, transient errors only, until
    ``deadline_s`` has passed; then the last error is raised as it was."""
    return retry(retry=retry_if_exception(is_transient), stop=stop_after_delay(max(deadline_s, 0.0)),
                 wait=wait_exponential(multiplier=RETRY_FIRST_S, max=RETRY_MAX_S), reraise=True)


def retry_pause_s(failures: int) -> float:
    """The policy's pause after ``failures`` failures in a row (1: 50 ms, 2: 100 ms, ... at most 1 s): what
    :func:`transient_retry` waits between attempts, for loops that retry on their own (a reconnect)."""
    return min(RETRY_FIRST_S * 2.0 ** max(failures - 1, 0), RETRY_MAX_S)


# ---------------------------------------------------------------------------------------------- clients


def reader(settings: KafkaSettings, purpose: str, **extra: Any) -> Consumer:
    """A consumer for assign()-based reads: a throw-away group id (librdkafka wants one) that never commits, and
    ``read_committed`` like the trainer, so every reader sees the same log."""
    return Consumer({**settings.client_config(), **RELIABLE_CONSUMER,
                     "group.id": f"tier3-{purpose}-{uuid.uuid4().hex}", **extra})


def partitions(consumer: Consumer, topic: str, timeout_s: float = 10.0) -> list[int]:
    """The topic's partition ids; :class:`TopicMissing` when it does not exist. Transient errors are retried."""

    @transient_retry(timeout_s)
    def ask() -> list[int]:
        md = consumer.list_topics(topic, timeout=timeout_s)
        meta = md.topics.get(topic)
        if meta is None or (meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            raise TopicMissing(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART,
                                          f"topic {topic} does not exist (run `tier3 topics create`)"))
        if meta.error is not None:
            raise KafkaException(meta.error)
        return sorted(meta.partitions)

    return ask()  # type: ignore[no-any-return]


def watermarks(consumer: Consumer, topic: str, parts: Iterable[int] | None = None, timeout_s: float = 10.0
               ) -> dict[int, tuple[int, int]]:
    """``{partition: (low, high)}`` now. A partition whose leader is moving (or was just created) is asked again
    until ``timeout_s``, never reported as an error at once."""
    parts = partitions(consumer, topic, timeout_s) if parts is None else list(parts)
    deadline = time.monotonic() + timeout_s

    def one(p: int) -> tuple[int, int]:
        @transient_retry(max(deadline - time.monotonic(), 0.0))
        def ask() -> tuple[int, int]:
            left = max(deadline - time.monotonic(), 0.5)
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=left)
            return int(low), int(high)

        return ask()  # type: ignore[no-any-return]

    return {p: one(p) for p in parts}


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Range:
    """``[start, end)`` of one partition."""

    start: int
    end: int


def ranges_until_now(consumer: Consumer, topic: str, timeout_s: float = 10.0) -> dict[int, Range]:
    """Each non-empty partition from its low watermark to its high watermark as of now."""
    return {p: Range(lo, hi) for p, (lo, hi) in watermarks(consumer, topic, timeout_s=timeout_s).items() if hi > lo}


def iter_slice(consumer: Consumer, topic: str, ranges: dict[int, Range] | dict[int, Any], *,
               timeout_s: float = 300.0, poll_s: float = 0.5) -> Iterator[Message]:
    """Yield the records of exactly ``[start, end)`` of each partition, in offset order per partition.

    ``ranges`` values need ``start`` and ``end`` attributes. Positions, not message counts, decide when a partition
    is done: offsets can have gaps (transaction markers, compaction), so "end reached" is "the next offset to read
    is >= end". A non-transient partition error is raised; :class:`ReadTimeout` when the deadline passes first.
    The consumer is left assigned (the caller owns and closes it). One record at a time over
    :func:`iter_slice_batches`.
    """
    for batch in iter_slice_batches(consumer, topic, ranges, timeout_s=timeout_s, poll_s=poll_s):
        yield from batch


#: records taken from the client's queue per call in :func:`iter_slice_batches`
SLICE_BATCH = 1000


def iter_slice_batches(consumer: Consumer, topic: str, ranges: dict[int, Range] | dict[int, Any], *,
                       timeout_s: float = 300.0, poll_s: float = 0.5, batch: int | None = None
                       ) -> Iterator[list[Message]]:
    """:func:`iter_slice` in lists of records (each non-empty, partitions interleaved, offset order within each
    partition): for bulk readers, so the per-record work in Python is the reader's own.

    The client's queue is drained with ``consume(batch, timeout=0)`` (whatever librdkafka has fetched already,
    without waiting for a full batch); only when it is empty does one call wait, up to ``poll_s``, for the next
    record, so the tail of a slice never waits for a batch that cannot fill up. ``batch``: :data:`SLICE_BATCH`
    unless given.
    """
    batch = batch or SLICE_BATCH
    todo = {p: r.end for p, r in ranges.items() if r.end > r.start}
    if not todo:
        return
    consumer.assign([TopicPartition(topic, p, r.start) for p, r in ranges.items() if r.end > r.start])
    deadline = time.monotonic() + timeout_s

    def done(p: int) -> None:
        todo.pop(p, None)
        consumer.pause([TopicPartition(topic, p)])  # stop fetching past the end

    while todo:
        if time.monotonic() > deadline:
            raise ReadTimeout(f"timed out reading {topic}: partitions {sorted(todo)} not at their end offsets")
        msgs = consumer.consume(batch, 0) or consumer.consume(1, poll_s)
        if not msgs:
            # an idle partition may sit right at its end after skipping markers: ask for its position
            for tp in consumer.position([TopicPartition(topic, p) for p in list(todo)]):
                if tp.offset >= 0 and tp.offset >= todo[tp.partition]:
                    done(tp.partition)
            continue
        out: list[Message] = []
        for msg in msgs:
            p = msg.partition()
            end = todo.get(p)  # type: ignore[arg-type]
            if end is None:  # not ours, or already done (records fetched past the end before the pause)
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    off = msg.offset()
                    if off is not None and off >= end:
                        done(p)  # type: ignore[arg-type]
                    continue
                if err.retriable() or err.code() in _TRANSIENT_CODES:
                    continue
                if out:  # what was read before the error is handed over first
                    yield out
                raise KafkaException(err)
            off = msg.offset()
            assert off is not None
            if off >= end:
                done(p)  # type: ignore[arg-type]
                continue
            out.append(msg)
            if off + 1 >= end:
                done(p)  # type: ignore[arg-type]
        if out:
            yield out


def read_until_now(settings: KafkaSettings, topic: str, purpose: str, *, timeout_s: float = 30.0
                   ) -> Iterator[Message]:
    """Every record of ``topic`` from each partition's low watermark up to its high watermark as of the call, with
    no group membership and nothing committed. :class:`TopicMissing` when the topic does not exist."""
    consumer = reader(settings, purpose)
    try:
        deadline = time.monotonic() + timeout_s
        ranges = ranges_until_now(consumer, topic, timeout_s)
        yield from iter_slice(consumer, topic, ranges, timeout_s=max(deadline - time.monotonic(), 1.0))
    finally:
        consumer.close()
