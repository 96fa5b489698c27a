"""Follow topics: catch up on everything from the beginning, then keep reading what comes (no group, nothing
committed).

The one "catch up on a topic, then keep following it" of tier3: the router's promotions
(``streams/client/router.py``), the worker's training-runs reader (``streams/app.py``), the watcher's tails
(``trainer/close_loop/online_watch.py``) and the demo's monitor (``tier3/demo/monitor.py``) all read through a
:class:`TopicFollower`, so a fix is made once:

- **Where it starts**: each partition's low watermark; the high watermarks taken then are what "caught up"
  means (:attr:`TopicFollower.caught_up`).
- **Offset gaps** (transaction markers, compaction): positions, not message counts, decide. When a read returns
  nothing, the client's position (past any gap it skipped) is taken as the next offset, as in
  :func:`schemas.kafka.reading.iter_slice`.
- **Reconnects** use the one retry policy (:mod:`schemas.kafka.reading`): round trips retry transient answers until
  ``setup_timeout_s``; after a failure the next read waits :func:`schemas.kafka.reading.retry_pause_s` (50 ms doubling
  to 1 s) and starts a fresh client at the positions already read, so nothing is read twice or skipped.
- **Errors**: transient ones (a broker away, a leader moving) are the client's business and never raised;
  anything else (an authorisation failure, a fatal client error, a missing topic unless ``missing="wait"``) is
  raised as :class:`confluent_kafka.KafkaException` (:class:`schemas.kafka.reading.TopicMissing` for a missing topic),
  never before the records read ahead of it have been handed over. The caller decides what to say; it may
  simply read again.
- **Security**: the client is :func:`schemas.kafka.reading.reader` (``KafkaSettings.client_config()``: SASL_SSL and
  all), ``read_committed``.

Not thread-safe: one thread reads (an asyncio caller runs :meth:`TopicFollower.poll` on one executor thread).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from schemas.kafka import reading as kio
from schemas.settings import KafkaSettings

Missing = Literal["raise", "wait"]


class TopicFollower:
    """Every record of ``topics`` from the beginning, then the new ones as they come.

    ``missing="raise"``: a topic not in the cluster is :class:`~schemas.kafka.reading.TopicMissing` (from every read
    until it exists); ``"wait"``: it is listed in :attr:`missing`, asked for again every ``recheck_s``, and read
    from its beginning once it exists. ``config``: librdkafka settings over :func:`schemas.kafka.reading.reader`'s
    (a group id, say: none is joined and nothing is committed).
    """

    def __init__(self, settings: KafkaSettings, topics: str | Sequence[str], purpose: str, *,
                 missing: Missing = "raise", setup_timeout_s: float = 10.0, recheck_s: float = 5.0,
                 config: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.purpose = purpose
        self.missing_mode = missing
        self.setup_timeout_s = setup_timeout_s
        self.recheck_s = recheck_s
        self._config = dict(config or {})
        self._consumer: Consumer | None = None
        self._assigned = False  # the current client has its assignment
        self._pos: dict[tuple[str, int], int] = {}  # next offset to read, per (topic, partition)
        self._ends: dict[tuple[str, int], int] = {}  # high watermark when the partition was first seen
        self.missing: set[str] = set()  # topics not in the cluster (missing="wait")
        self._recheck_at = 0.0
        self.failures = 0  # failures in a row (reset by a successful setup)
        self._retry_at = 0.0
        self._pending: KafkaException | None = None  # raised by the next read (records came first)

    # -------------------------------------------------------------------------------------------- state

    @property
    def caught_up(self) -> bool:
        """Every partition's position has reached the end offset it had when first seen (and no topic is
        missing): everything that was in the log when the follower started has been read."""
        return self._assigned and not self.missing and all(self._pos[k] >= e for k, e in self._ends.items())

    @property
    def positions(self) -> dict[tuple[str, int], int]:
        """``{(topic, partition): next offset to read}``."""
        return dict(self._pos)

    # -------------------------------------------------------------------------------------------- reading

    def poll(self, timeout_s: float = 0.5, max_records: int = 500) -> list[Message]:
        """The next records (possibly none after ``timeout_s``), errors left out. Connects (or reconnects,
        after the policy's pause) first when it must; raises what is not transient (module docstring)."""
        self._raise_pending()
        wait = self._retry_at - time.monotonic()
        if self._consumer is None and wait > 0:  # the policy's pause after a failure
            time.sleep(min(wait, timeout_s))
            if wait > timeout_s:
                return []
        c = self._ensure()
        if not self._pos:  # nothing to read yet (every topic missing, or without partitions)
            time.sleep(timeout_s)
            return []
        try:
            msgs = c.consume(max_records, timeout_s)
        except (KafkaException, RuntimeError):
            self._fail(drop=True)
            raise
        out = self._take(msgs)
        if not out or not self.caught_up:
            self._advance(c)
        return out

    def read_new(self, timeout_s: float = 10.0) -> list[Message]:
        """Every record up to the end offsets as of this call (all of them on the first call), then return:
        for callers that read in steps. ``timeout_s`` bounds the call; what was read by then is returned."""
        self._raise_pending()
        c = self._ensure()
        deadline = time.monotonic() + timeout_s
        ends: dict[tuple[str, int], int] = {}
        for topic in sorted({t for t, _p in self._pos}):
            parts = [p for t, p in self._pos if t == topic]
            for p, (_lo, hi) in kio.watermarks(c, topic, parts, max(deadline - time.monotonic(), 0.5)).items():
                ends[(topic, p)] = hi
        out: list[Message] = []
        while any(self._pos.get(k, 0) < e for k, e in ends.items()) and time.monotonic() < deadline:
            try:
                out.extend(self.poll(0.2))
            except KafkaException as exc:
                if not out:
                    raise
                self._pending = exc
                break
        return out

    def close(self) -> None:
        """Close the client (the follower may be read again: it reconnects at its positions)."""
        self._drop()

    def __enter__(self) -> TopicFollower:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- inside

    def _raise_pending(self) -> None:
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc

    def _ensure(self) -> Consumer:
        """The client, created and assigned when needed; missing topics asked for again when due."""
        fresh = self._consumer is None
        if not fresh and not (self.missing and time.monotonic() >= self._recheck_at):
            assert self._consumer is not None
            return self._consumer
        try:
            if self._consumer is None:
                self._consumer = kio.reader(self.settings, self.purpose, **self._config)
                self._assigned = False
            self._assign(self._consumer)
        except BaseException:
            # a recheck of missing topics that fails keeps a working client; a failed setup starts afresh
            self._fail(drop=not self._assigned)
            raise
        self.failures = 0
        return self._consumer

    def _assign(self, c: Consumer) -> None:
        todo = self.topics if not self._assigned else sorted(self.missing)
        deadline = time.monotonic() + self.setup_timeout_s
        missing: set[str] = set()
        changed = not self._assigned
        for topic in todo:
            try:
                marks = kio.watermarks(c, topic, timeout_s=max(deadline - time.monotonic(), 1.0))
            except kio.TopicMissing:
                if self.missing_mode == "raise":
                    raise
                missing.add(topic)
                continue
            for p, (lo, hi) in marks.items():
                key = (topic, p)
                if key not in self._pos:
                    self._ends[key] = hi
                    changed = True
                self._pos[key] = max(self._pos.get(key, lo), lo)  # retention may have moved the start on
        self.missing = missing
        self._recheck_at = time.monotonic() + self.recheck_s
        if changed:
            c.assign([TopicPartition(t, p, off) for (t, p), off in sorted(self._pos.items())])
        self._assigned = True

    def _take(self, msgs: list[Message]) -> list[Message]:
        """The records of a batch, positions moved on; the first error that is not transient is raised now
        (nothing read) or by the next read (records first)."""
        out: list[Message] = []
        first: KafkaError | None = None
        for m in msgs:
            err = m.error()
            if err is not None:
                if first is None and err.code() != KafkaError._PARTITION_EOF \
                        and not kio.is_transient(KafkaException(err)):
                    first = err
                continue
            off = m.offset()
            key = (m.topic() or "", m.partition() or 0)
            if off is None or key not in self._pos:
                continue
            self._pos[key] = max(self._pos[key], off + 1)
            out.append(m)
        if first is not None:
            exc = KafkaException(first)
            if first.fatal():  # the client is done for: a fresh one, after the pause
                self._fail(drop=True)
            if not out:
                raise exc
            self._pending = exc
        return out

    def _advance(self, c: Consumer) -> None:
        """Positions past offset gaps: the client's position has skipped markers and compacted offsets."""
        try:
            tps = c.position([TopicPartition(t, p) for t, p in self._pos])
        except (KafkaException, RuntimeError):
            return
        for tp in tps:
            key = (tp.topic, tp.partition)
            if tp.offset >= 0 and key in self._pos:
                self._pos[key] = max(self._pos[key], tp.offset)

    def _fail(self, *, drop: bool) -> None:
        self.failures += 1
        pause = kio.retry_pause_s(self.failures)
        if drop:
            self._drop()
            self._retry_at = time.monotonic() + pause
        else:
            self._recheck_at = time.monotonic() + pause

    def _drop(self) -> None:
        c, self._consumer, self._assigned = self._consumer, None, False
        if c is not None:
            try:
                c.close()
            except (KafkaException, RuntimeError):
                pass


__all__ = ["Missing", "TopicFollower"]
