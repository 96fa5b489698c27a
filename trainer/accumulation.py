"""Accumulation: the traces the trainer read and has not committed yet, per partition.

Pure bookkeeping, no Kafka: the consumer adds what it polls, drops what a rebalance takes away, trims what a
recognised manifest committed, and takes everything as one :class:`trainer.protocol.Batch` when a run starts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from trainer.manifest import OffsetRange
from trainer.projection import TraceRecord
from trainer.protocol import Batch


@dataclass
class _Partition:
    start: int  # first offset read since the last commit (or since assignment)
    end: int  # one past the last offset read: what a commit of this partition would store
    records: list[TraceRecord] = field(default_factory=list)
    n_messages: int = 0
    n_bad: int = 0


class Accumulator:
    """Traces read and not yet committed, per partition. Distinct experience ids decide the trigger, because
    enrichment is at-least-once and a duplicate is not a new trace: ``n_new`` counts the distinct ids that are
    neither held twice nor in ``known`` (ids already inside a committed run)."""

    def __init__(self, known: set[str] | None = None) -> None:
        self.parts: dict[int, _Partition] = {}
        self._ids: Counter[str] = Counter()
        self.known: set[str] = known if known is not None else set()
        self._n_new = 0

    @property
    def n_unique(self) -> int:
        return len(self._ids)

    @property
    def n_new(self) -> int:
        return self._n_new

    def recount(self) -> None:
        """After ``known`` grew (history loaded): count the new ids again."""
        self._n_new = sum(1 for eid in self._ids if eid not in self.known)

    @property
    def n_messages(self) -> int:
        return sum(p.n_messages for p in self.parts.values())

    def add(self, partition: int, offset: int, record: TraceRecord | None) -> None:
        part = self.parts.get(partition)
        if part is None:
            part = self.parts[partition] = _Partition(start=offset, end=offset)
        if offset < part.end:  # a redelivery below what we hold (cannot happen without a seek): ignore it
            return
        part.end = offset + 1
        part.n_messages += 1
        if record is None:
            part.n_bad += 1
        else:
            part.records.append(record)
            eid = record.trace.experience_id
            if self._ids[eid] == 0 and eid not in self.known:
                self._n_new += 1
            self._ids[eid] += 1

    def ids_below(self, partition: int, end: int) -> set[str]:
        """Experience ids of the records held in ``partition`` below offset ``end``."""
        part = self.parts.get(partition)
        return {r.trace.experience_id for r in part.records if r.offset < end} if part is not None else set()

    def first_offset(self, partition: int) -> int | None:
        part = self.parts.get(partition)
        return part.start if part is not None else None

    def ends(self) -> dict[int, int]:
        """Per partition held: one past the last offset read (what a commit of it would store)."""
        return {p: part.end for p, part in self.parts.items()}

    def next_offset(self, partition: int) -> int | None:
        part = self.parts.get(partition)
        return part.end if part is not None else None

    def drop(self, partitions: set[int] | list[int]) -> None:
        for p in partitions:
            part = self.parts.pop(p, None)
            if part is not None:
                self._forget(part.records)

    def trim(self, partition: int, end: int) -> None:
        """Forget everything below ``end`` in ``partition`` (it was committed by a recognised manifest)."""
        part = self.parts.get(partition)
        if part is None:
            return
        gone = [r for r in part.records if r.offset < end]
        self._forget(gone)
        part.records = [r for r in part.records if r.offset >= end]
        part.n_messages = max(0, part.n_messages - (min(part.end, end) - part.start))
        if part.end <= end:
            self.parts.pop(partition)
        else:
            part.start = end
            part.n_bad = min(part.n_bad, part.n_messages)

    def take(self, topic: str, trigger: str, attempt: int) -> Batch:
        """Everything held, as one batch; the accumulator is empty afterwards."""
        records = sorted(r for part in self.parts.values() for r in part.records)
        batch = Batch(topic=topic, offsets={p: OffsetRange(start=x.start, end=x.end) for p, x in self.parts.items()},
                      records=records, n_messages=self.n_messages, n_unique=self.n_unique, n_new=self.n_new,
                      n_bad=sum(x.n_bad for x in self.parts.values()), trigger=trigger, attempt=attempt)
        self.parts.clear()
        self._ids.clear()
        self._n_new = 0
        return batch

    def _forget(self, records: list[TraceRecord]) -> None:
        for r in records:
            eid = r.trace.experience_id
            self._ids[eid] -= 1
            if self._ids[eid] <= 0:
                del self._ids[eid]
                if eid not in self.known:
                    self._n_new -= 1
