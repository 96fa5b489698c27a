"""What the trainer reads: each polled trace into the accumulator (an undecodable one dead-lettered, still counted
as read), and, for newly assigned partitions, the experience ids the group already trained on (their committed
history), so that a late duplicate of an old trace does not count as new.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException, Message

from schemas import SchemaError
from trainer.accumulation import Accumulator
from trainer.events import TrainerEvents
from trainer.heartbeat import TrainerStats
from trainer.offsets import TopicOffsets
from trainer.projection import TraceRecord, decode_trace, read_ids
from trainer.settings import TrainerSettings
from trainer.worker import Background, RunAborted

log = logging.getLogger("tier3.trainer.intake")


class Intake:
    """Feeds ``pending`` (its ``known`` set holds the ids inside committed runs); :attr:`history_todo` holds the
    assigned partitions whose committed history is not loaded yet (no run may start before it is)."""

    def __init__(self, settings: TrainerSettings, topic: str, pending: Accumulator, *, events: TrainerEvents,
                 stats: TrainerStats, offsets: TopicOffsets, background: Background) -> None:
        self.s = settings
        self.topic = topic
        self.pending = pending
        self._events = events
        self._stats = stats
        self._offsets = offsets
        self._background = background
        self.history_todo: set[int] = set()

    def add(self, msg: Message, assigned: set[int]) -> None:
        """One polled message: a trace of an assigned partition is held; errors other than EOF are logged (a
        fatal one raises)."""
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return
            if err.fatal():
                raise KafkaException(err)
            log.warning("consumer error: %s", err.str())
            return
        p, off = msg.partition(), msg.offset()
        if p is None or off is None or p not in assigned:
            return  # a message fetched before its partition was revoked: the new owner reads it
        value = msg.value()
        try:
            record: TraceRecord | None = TraceRecord(p, off, decode_trace(value, self.s.max_record_bytes))
        except SchemaError as exc:
            # bad bytes never stop the trainer: kept on dead-letters with the reason; the offset is still part of
            # the batch, so the next successful run commits past it
            self._events.dead_letter(topic=self.topic, partition=p, offset=off, key=msg.key(), value=value or b"",
                                     reason=str(exc), error_kind=exc.kind)  # never raises (trainer/events.py)
            self._stats.dead_lettered += 1
            record = None
        self.pending.add(p, off, record)

    def load_history(self) -> None:
        """Learn the experience ids already trained (committed) in the partitions of :attr:`history_todo`: the
        message keys (the experience id) of [low watermark, committed offset), read in a worker thread (a long
        history must not cost the group membership). On failure the trainer goes on without them."""
        if not self.history_todo:
            return
        todo, self.history_todo = sorted(self.history_todo), set()
        ranges = self._offsets.history(todo)
        if not ranges:
            return
        try:
            ids = self._background(lambda: read_ids(self.s, self.topic, ranges))
        except RunAborted:
            return
        except Exception as exc:  # only the trigger's dedup depends on it: go on without
            log.warning("could not read the trained history of partitions %s: %s", sorted(ranges), exc)
            return
        self.pending.known.update(ids)
        self.pending.recount()
        log.info("history: %d experience ids already trained in partitions %s", len(self.pending.known),
                 sorted(ranges))
