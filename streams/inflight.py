"""Bounded work in flight, acknowledged in arrival order per partition (no Faust, no Kafka: unit-testable).

Why: Faust commits, per partition, the highest offset below which every message was acknowledged; but it
trusts the acknowledgements it is given. With ``concurrency > 1`` two agent instances acknowledge out of
order, and a crash can then lose the slower message's work. Here one agent instance reads the stream, starts
the work for each message (teacher call + trace send, or dead-letter send), and hands the message to this
class; a message is acknowledged only when its own work *and the work of every earlier message of the same
partition* is finished, i.e. its trace or dead letter has been acknowledged by Kafka. So the committed offset
never passes a message whose output is not durable, whatever the number of calls in flight.

``max_pending`` bounds the messages read but not yet acknowledged: when a slow or failing teacher holds the
head of a partition, :meth:`InOrderAcker.add` blocks, the agent stops reading, Faust's stream buffer fills and
Faust pauses fetching (back-pressure, nothing dropped).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

E = TypeVar("E")


class InOrderAcker(Generic[E]):
    def __init__(self, ack: Callable[[E], Awaitable[Any]], max_pending: int,
                 on_fatal: Callable[[BaseException], Awaitable[None]],
                 on_acked: Callable[[Hashable, E], None] | None = None) -> None:
        self._ack = ack
        self._on_fatal = on_fatal
        self._on_acked = on_acked
        self.max_pending = max_pending
        self._queues: dict[Hashable, deque[tuple[E, asyncio.Future[Any] | None]]] = {}
        self.pending = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.failed: BaseException | None = None

    async def add(self, partition: Hashable, event: E, work: Awaitable[Any] | None) -> None:
        """Register ``event`` (with its work, or None when there is nothing to write); wait while full."""
        if self.failed is not None:
            raise RuntimeError("acker stopped after a fatal error") from self.failed
        q = self._queues.get(partition)
        if q is None:
            q = self._queues[partition] = deque()
        if work is None and not q:
            # fast path: nothing to write and nothing earlier outstanding, e.g. a message not sampled
            await self._ack(event)
            if self._on_acked is not None:
                self._on_acked(partition, event)
            return
        fut = asyncio.ensure_future(work) if work is not None else None
        q.append((event, fut))
        self.pending += 1
        if fut is not None:
            fut.add_done_callback(self._wake_up)
        else:
            self._wake.set()  # it may already be at the head of a queue whose earlier work just finished
        if self.pending >= self.max_pending:
            self._room.clear()
            await self._room.wait()
            if self.failed is not None:
                raise RuntimeError("acker stopped after a fatal error") from self.failed

    def _wake_up(self, _fut: asyncio.Future[Any]) -> None:
        self._wake.set()

    def pending_by_partition(self) -> dict[Hashable, int]:
        """Work registered and not yet acknowledged, per partition."""
        return {p: len(q) for p, q in self._queues.items() if q}

    @property
    def full(self) -> bool:
        """Whether :meth:`add` is waiting for room (``max_pending`` reached)."""
        return self.pending >= self.max_pending

    async def run(self) -> None:
        """Acknowledge finished heads of each partition's queue; runs as a task beside the agent."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            for partition, q in list(self._queues.items()):
                while q:
                    event, fut = q[0]
                    if fut is not None:
                        if not fut.done():
                            break
                        if fut.cancelled():  # shutting down: acknowledge nothing more
                            return
                        exc = fut.exception()
                        if exc is not None:
                            # never acknowledge a message whose output was not written: stop here, so the
                            # committed offset stays before it and it is redelivered after a restart
                            self.failed = exc
                            self._room.set()
                            await self._on_fatal(exc)
                            return
                    q.popleft()
                    self.pending -= 1
                    await self._ack(event)
                    if self._on_acked is not None:
                        self._on_acked(partition, event)
            if self.pending < self.max_pending:
                self._room.set()

    def cancel_all(self) -> None:
        """Cancel outstanding work (shutdown); none of it is acknowledged."""
        for q in self._queues.values():
            for _event, fut in q:
                if fut is not None:
                    fut.cancel()


class OffsetGuard:
    """Notices records skipped by the consumer, before anything after them is acknowledged, and tracks the seek
    back that recovers them in place.

    Why: Faust's consumer treats a forward jump in the offsets it delivers as a gap (transaction markers,
    compaction) and commits across it once a later offset is acknowledged; around rebalances it can deliver a
    later offset first (seen in the scale-out chaos test: the group committed past nine experiences that no worker
    ever traced). The agent asks :meth:`check` for every record before starting its work. The next offset expected
    on a partition is one past the last one delivered here (in this or an earlier assignment: records delivered
    before a rebalance are still being worked on), or the group's committed offset (``baseline``) when that is
    further (the log's start when neither is known). Any jump past it, even of one offset, is reported; the caller
    reads the range to see whether records were really there (a transaction marker is not a record). If they are,
    ``streams.app`` seeks the partition back to the first missing record and calls :meth:`rewind`: from then on,
    until that record arrives, every later offset of the partition (fetched before the seek) is :meth:`stale`:
    dropped without being processed or acknowledged, as it is delivered again after the seek. Nothing past the hole
    is acknowledged before the hole is processed.
    """

    def __init__(self) -> None:
        self._next: dict[int, int] = {}
        self._rewind: dict[int, int] = {}  # partition -> the first missing record, sought back to
        self.rewinds = 0  # holes recovered by a seek back (for /status)
        self.dropped = 0  # records dropped while rewinding (delivered again after the seek)

    def stale(self, partition: int, offset: int) -> bool:
        """Whether the record is past a hole being re-read (:meth:`rewind`): drop it, it comes again. The record
        sought back to (or any earlier one: a seek to the committed offset after a rebalance) ends the rewind."""
        target = self._rewind.get(partition)
        if target is None:
            return False
        if offset <= target:
            del self._rewind[partition]
            self._next[partition] = offset
            return False
        self.dropped += 1
        return True

    def rewinding(self, partition: int) -> int | None:
        """The offset a partition was sought back to and has not reached yet, or None."""
        return self._rewind.get(partition)

    def rewind(self, partition: int, first_missing: int) -> None:
        """The partition was sought back to ``first_missing`` (the first record of a hole)."""
        self._rewind[partition] = first_missing
        self._next[partition] = first_missing
        self.rewinds += 1

    def next_expected(self, partition: int, committed: int | None) -> int | None:
        """The next offset expected of a partition: one past the last delivered here or the group's committed
        offset, whichever is further (None when neither is known)."""
        known = self._next.get(partition)
        return max((x for x in (known, committed) if x is not None), default=None)

    def check(self, partition: int, offset: int, baseline: Callable[[int], int | None]) -> int | None:
        """The first offset that was skipped before ``offset`` (any jump, even of one offset), or None.

        Every jump is reported, also a single offset (a transaction marker looks like that, but so does one record
        the consumer skipped: the second 20-run loop of the scale-out test lost exactly one experience that way
        while a jump of one was taken for a marker); the caller reads the range back and :meth:`accept` s it when it
        holds no record. With neither a delivery here nor a committed offset known yet, the first record is taken as
        it comes (Faust may not have loaded the committed offset yet; the stall watch covers a silent start)."""
        known = self._next.get(partition)
        if known is not None and offset <= known:  # in order, or a re-delivery after a seek back
            self._next[partition] = offset + 1
            return None
        committed = baseline(partition)  # asked only off the fast path
        expected = max((x for x in (known, committed) if x is not None), default=None)
        if expected is None or offset <= expected:  # nothing known yet (the stall watch covers a silent start)
            self._next[partition] = offset + 1
            return None
        return expected

    def accept(self, partition: int, offset: int) -> None:
        """``offset`` is processed (after a jump was found harmless: only markers, or records deleted)."""
        self._next[partition] = offset + 1
