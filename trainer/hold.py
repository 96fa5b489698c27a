"""The partition hold: the trainer's partitions paused while work runs, each pause for a named reason.

Modelled on quix-streams' ``processing/pausing.py`` (a pause with an optional deadline, ``resume_if_ready``,
``revoke``). The loop thread keeps polling while a run trains, while its close loop runs and while a failed run
backs off (the group evicts a consumer that stops polling), so its partitions must not deliver meanwhile:

- ``run``: a run trains, evaluates and commits (trainer/protocol.py);
- ``close_loop``: a committed run's evaluated event, gate and export (trainer/close_loop_queue.py);
- ``backoff``: a failed run, or a refused commit of a recognised manifest, waits before its retry; it has a
  deadline and ends in :meth:`PartitionHold.resume_if_ready`.

While any reason holds, no new work starts and every assigned partition is paused; partitions assigned meanwhile
start unpaused (librdkafka), so :meth:`PartitionHold.enforce` (the loop calls it after each poll) pauses them too.
When the last reason is released every paused partition still assigned is resumed. :meth:`PartitionHold.pause_all`
without a reason (the batch being read is full) blocks nothing and lasts until the next resume. A revoked or lost
partition is forgotten: it is not ours to resume, and if it comes back it comes back unpaused.

Knows no Kafka beyond ``pause`` / ``resume`` of the consumer it is given; the clock is injectable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Literal, Protocol

from confluent_kafka import TopicPartition

Reason = Literal["run", "close_loop", "backoff"]


class Pausable(Protocol):
    def pause(self, partitions: list[TopicPartition], /) -> None: ...

    def resume(self, partitions: list[TopicPartition], /) -> None: ...


class PartitionHold:
    """What is assigned, what is paused, and why (the reasons, with the deadline of a timed one)."""

    def __init__(self, consumer: Pausable, topic: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._consumer = consumer
        self.topic = topic
        self._clock = clock
        self.assigned: set[int] = set()
        self._paused: set[int] = set()
        self._reasons: dict[Reason, float | None] = {}  # reason -> deadline on the clock (None: until released)

    # -- what holds ---------------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        """Some reason holds the partitions: no new work may start."""
        return bool(self._reasons)

    def holds(self, *reasons: Reason) -> bool:
        return any(r in self._reasons for r in reasons)

    @property
    def reasons(self) -> list[Reason]:
        return sorted(self._reasons)

    @property
    def paused(self) -> frozenset[int]:
        return frozenset(self._paused)

    def left_s(self, reason: Reason) -> float | None:
        """Seconds until a timed reason ends (0 when due), None when it does not hold or has no deadline."""
        deadline = self._reasons.get(reason)
        return None if deadline is None else max(0.0, deadline - self._clock())

    # -- holding and releasing ----------------------------------------------------------------------------
    def hold(self, reason: Reason, *, for_s: float | None = None) -> None:
        """Hold for ``reason`` (until :meth:`release`, or for ``for_s`` seconds): pause every assigned partition."""
        self._reasons[reason] = None if for_s is None else self._clock() + for_s
        self.pause_all()

    def release(self, reason: Reason) -> None:
        """``reason`` no longer holds; when no other does, every paused partition resumes."""
        self._reasons.pop(reason, None)
        if not self._reasons:
            self.resume_all()

    def resume_if_ready(self) -> bool:
        """Release the timed reasons whose deadline passed; True when one did."""
        now = self._clock()
        due = [r for r, deadline in self._reasons.items() if deadline is not None and deadline <= now]
        for reason in due:
            self.release(reason)
        return bool(due)

    def enforce(self) -> None:
        """While held, pause what was assigned since (a newly assigned partition delivers otherwise)."""
        if self._reasons:
            self.pause_all()

    # -- the consumer -------------------------------------------------------------------------------------
    def pause_all(self) -> None:
        todo = self.assigned - self._paused
        if todo:
            self._consumer.pause([TopicPartition(self.topic, p) for p in sorted(todo)])
            self._paused |= todo

    def resume_all(self) -> None:
        todo = self._paused & self.assigned
        if todo:
            self._consumer.resume([TopicPartition(self.topic, p) for p in sorted(todo)])
        self._paused.clear()

    # -- rebalances (from the consumer's callbacks) ---------------------------------------------------------
    def assign(self, partitions: Iterable[int]) -> None:
        self.assigned |= set(partitions)

    def revoke(self, partitions: Iterable[int]) -> None:
        """Revoked or lost: no longer ours, so neither paused by us nor to resume."""
        ps = set(partitions)
        self.assigned -= ps
        self._paused -= ps
