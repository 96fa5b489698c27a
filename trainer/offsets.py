"""Where the trainer's topic stands, as its consumer sees it: the group's committed offsets, where reading is, the
watermarks, and what follows from them (a trigger's end offsets, the slice of the log a run trains on, the
committed history of newly assigned partitions).

Every call asks the broker (bounded by ``TIER3_TRAINER_COMMIT_TIMEOUT_S``) through the consumer given; the
decisions stay with the loop (trainer/consumer.py) and the pure parts (trainer/trigger.py, trainer/accumulation.py).
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition

from schemas.kafka import reading as kio
from trainer.accumulation import Accumulator
from trainer.manifest import OffsetRange
from trainer.protocol import Batch
from trainer.settings import TrainerSettings
from trainer.trigger import Drain, TriggerName

log = logging.getLogger("tier3.trainer.offsets")


class TopicOffsets:
    def __init__(self, consumer: Consumer, topic: str, settings: TrainerSettings) -> None:
        self._consumer = consumer
        self.topic = topic
        self.s = settings
        self._timeout_s = settings.tier3_trainer_commit_timeout_s

    def committed(self, ps: list[int]) -> dict[int, int]:
        """The group's committed offset of each partition (negative: none)."""
        tps = self._consumer.committed([TopicPartition(self.topic, p) for p in ps], timeout=self._timeout_s)
        return {tp.partition: tp.offset for tp in tps}

    def watermarks(self, p: int) -> tuple[int, int]:
        return kio.watermarks(self._consumer, self.topic, [p], self._timeout_s)[p]

    def positions(self, ps: list[int], pending: Accumulator) -> dict[int, int]:
        """Per partition: the next offset to read (what is held, else the fetcher's position; -1 if unknown)."""
        got = {tp.partition: tp.offset for tp in self._consumer.position([TopicPartition(self.topic, p) for p in ps])}
        return {p: max(pending.next_offset(p) or -1, got.get(p, -1)) for p in ps}

    def seek(self, starts: dict[int, int]) -> None:
        """Read each partition again from ``starts[partition]`` (a failed batch's first offsets); one that cannot
        be moved resumes from the group's committed offset."""
        for p, start in starts.items():
            try:
                self._consumer.seek(TopicPartition(self.topic, p, start))
            except KafkaException as err:
                log.warning("seek back of partition %d failed (%s); it resumes from the committed offset", p, err)

    def drain(self, trigger: TriggerName, assigned: set[int], pending: Accumulator) -> Drain:
        """A trigger fired: read on up to every assigned partition's end offset of this moment."""
        deadline = time.monotonic() + self.s.tier3_trainer_drain_timeout_s
        ps = sorted(assigned)
        at: dict[int, int] = {}  # where reading is (or starts) per partition
        marks: dict[int, tuple[int, int]] = {}  # (low, high) watermarks, per partition asked so far
        try:
            pos = self.positions(ps, pending)
            idle = [p for p in ps if pos[p] < 0]  # nothing read there yet: the fetch starts at the committed offset
            committed = self.committed(idle) if idle else {}
            at = {p: pos[p] if pos[p] >= 0 else committed.get(p, -1) for p in ps}
            for p in ps:
                marks[p] = self.watermarks(p)
        except KafkaException as exc:  # the batch is then what is held: never worse than before
            log.warning("could not read the end offsets (%s); the run takes what is read so far", exc)
        targets = Drain.targets_from(at, marks)
        log.info("trigger %s: reading up to the end offsets %s (at most %d messages per run)", trigger, targets,
                 self.s.tier3_max_traces_per_run)
        return Drain(trigger, targets, deadline)

    def drained(self, drain: Drain, assigned: set[int], pending: Accumulator) -> bool:
        """The trigger's reading is over: the batch is full, every target still owned is reached, or time is up."""
        if drain.full(pending.n_messages, self.s.tier3_max_traces_per_run):
            return True
        todo = [p for p in drain.targets if p in assigned]
        pos = self.positions(todo, pending) if todo else {}
        if drain.reached(pos):
            return True
        if drain.expired(time.monotonic()):
            log.warning("trigger %s: end offsets %s not reached within %.0f s (at %s); running with what is read",
                        drain.trigger, drain.targets, self.s.tier3_trainer_drain_timeout_s, pos)
            return True
        return False

    def dataset_slice(self, batch: Batch, scope: str) -> dict[int, OffsetRange]:
        """The slice of the log a run's dataset is built from. Scope ``new``: the batch. Scope ``all``: every
        partition from its low watermark up to this batch's end, or, for a partition not in the batch, up to the
        group's committed offset (what earlier runs trained on)."""
        if scope == "new":
            return dict(batch.offsets)
        md = self._consumer.list_topics(self.topic, timeout=self._timeout_s)
        parts = sorted(md.topics[self.topic].partitions)
        others = [p for p in parts if p not in batch.offsets]
        committed = self.committed(others) if others else {}
        out: dict[int, OffsetRange] = {}
        for p in parts:
            low, _high = self.watermarks(p)
            end = batch.offsets[p].end if p in batch.offsets else max(low, committed.get(p, -1))
            if end > low:
                out[p] = OffsetRange(start=low, end=end)
        return out

    def history(self, ps: list[int]) -> dict[int, OffsetRange]:
        """Per partition, what the group has committed: [low watermark, committed offset), where not empty."""
        ranges: dict[int, OffsetRange] = {}
        for p, off in self.committed(ps).items():
            low, _high = self.watermarks(p)
            if off > low:
                ranges[p] = OffsetRange(start=low, end=off)
        return ranges
