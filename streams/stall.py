"""The stall watch: an assigned partition with records waiting that the consumer stopped delivering is recovered in
place, without a restart.

Seen in the scale-out chaos test (about one run in six before this watch): after the rebalances of a kill and a
join, one partition a worker holds stops being delivered to the agent, its committed offset before the untraced
records, while the other partitions go on. Nothing is lost (nothing past the records is acknowledged), but nothing
moves either until the worker restarts. The cause inside Faust's consumer is not known (the log line this watch
writes names the state that would explain it: whether Faust's fetcher counts the partition as active, paused or
buffered, and the fetch position).

Every ``TIER3_STALL_S / 3`` seconds the worker asks the broker for the high watermarks of its partitions and hands
them to :meth:`StallWatch.stalled`. A partition is stalled when, for ``TIER3_STALL_S`` seconds, the assignment did
not change, nothing of it was delivered to the agent, none of its work is in flight, the agent is not held back by
``TIER3_MAX_PENDING``, and the log holds records past the next offset the worker expects of it (one past the last
delivered, or the group's committed offset, or the log's start when neither exists: a partition never delivered
since the group began, seen in the 20-run loop). The worker then resumes the partition in Faust's fetcher and
seeks it back to that offset (``faust_adapter.unstick``): the records are fetched again, in order, under the
offset guard.
``/status`` counts these recoveries (``offset_guard.stalls_recovered``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class StallWatch:
    stall_s: float
    last_delivered: dict[int, float] = field(default_factory=dict)
    assignment: frozenset[int] = frozenset()
    assigned_at: float = 0.0
    recovered: int = 0

    def delivered(self, partition: int, now: float | None = None) -> None:
        self.last_delivered[partition] = time.monotonic() if now is None else now

    def assigned(self, partitions: frozenset[int], now: float) -> None:
        """Note the current assignment; a change restarts every partition's clock."""
        if partitions != self.assignment:
            self.assignment = partitions
            self.assigned_at = now

    def stalled(self, now: float, *, next_expected: Mapping[int, int | None], high: Mapping[int, int],
                pending: Mapping[int, int], blocked: bool) -> list[int]:
        """The partitions to recover now (module doc). ``next_expected``: the next offset the worker expects per
        assigned partition (None: unknown, not judged); ``high``: the log's high watermarks; ``pending``: work in
        flight per partition; ``blocked``: the agent waits for room under ``TIER3_MAX_PENDING``."""
        if blocked or now - self.assigned_at < self.stall_s:
            return []
        out = []
        for p in sorted(self.assignment):
            nxt, hw = next_expected.get(p), high.get(p)
            if nxt is None or hw is None or hw <= nxt or pending.get(p, 0) > 0:
                continue
            if now - max(self.last_delivered.get(p, 0.0), self.assigned_at) >= self.stall_s:
                out.append(p)
        return out

    def recovering(self, partition: int, now: float) -> None:
        """A recovery of ``partition`` was started: its clock restarts."""
        self.last_delivered[partition] = now
        self.recovered += 1
