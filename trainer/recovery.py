"""Recovery after a restart: manifests whose commit (or announcement) did not happen.

Step (3) of the protocol (trainer/protocol.py) makes a run's manifest durable *before* its offsets are committed.
A trainer that stopped in between finds the manifest at its next start:

- committed but not announced (or the group's offsets already cover it): announce it (:meth:`Recovery.reconcile`);
- trained, not committed: remember it and commit it, without training again, once the batch it describes is
  back in memory in full (:meth:`Recovery.commit_ready`); a manifest whose offsets the group moved past (another
  trainer took a partition over), or whose batch does not come back in time, is stale and forgotten: its traces
  train again.

The Kafka round trip (the group's committed offsets) is passed in, so this bookkeeping has no client of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from trainer.accumulation import Accumulator
from trainer.errors import ManifestError
from trainer.manifest import RunManifest, read_manifest

log = logging.getLogger("tier3.trainer.recovery")

#: partitions -> the group's committed offset of each (negative: none)
CommittedFn = Callable[[list[int]], dict[int, int]]


class Recovery:
    def __init__(self, committed: CommittedFn, *, wait_s: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._committed = committed
        self._wait_s = wait_s  # how long a recorded batch may take to come back
        self._clock = clock
        self.uncommitted: list[RunManifest] = []  # trained and recorded, not committed
        #: a manifest's batch is on its way back: no new run may start (it would train part of it again)
        self.awaiting = False
        self._awaiting_since: dict[str, float] = {}  # run_id -> when we started waiting for its batch
        self._recheck_at: dict[str, float] = {}  # run_id -> next look at the group's committed offsets

    def reconcile(self, manifests: Iterable[RunManifest], announce: Callable[[RunManifest], object]) -> None:
        """At start: ``announce`` the runs that committed but were not announced; remember the runs that were
        trained and recorded but not committed, to commit them when their batch comes back."""
        for m in manifests:
            committed = self._committed(sorted(m.offsets))
            if m.state == "committed" or all(committed.get(p, -1) >= r.end for p, r in m.offsets.items()):
                log.info("run %s was committed before the last stop; announcing it", m.run_id)
                announce(m)
            else:
                self.remember(m)
                log.info("run %s was trained and recorded but not committed; it is committed (not retrained) when "
                         "its offsets %s come back", m.run_id, {p: [r.start, r.end] for p, r in m.offsets.items()})

    def remember(self, manifest: RunManifest) -> None:
        """A recorded run to commit (not retrain) once its batch is back (its commit was refused)."""
        self.uncommitted.append(manifest)

    def remember_recorded(self, run_dir: Path) -> None:
        """A run whose commit was refused: if its model and manifest are durable (state ``trained``), commit it
        once its batch is back in full, do not train it again."""
        try:
            m = read_manifest(run_dir)
        except ManifestError:
            return
        if m.state == "trained":
            self.remember(m)

    def ready(self, assigned: set[int], pending: Accumulator) -> Iterator[RunManifest]:
        """The remembered manifests whose batch is back in memory in full, to commit now (call :meth:`done`
        after each commit). Stale ones are forgotten on the way; :attr:`awaiting` says whether one is still
        coming back. Stopping the iteration early (a failed commit) leaves the rest for the next call."""
        self.awaiting = False
        for m in list(self.uncommitted):
            if not set(m.offsets) <= assigned:
                continue  # not (all) ours now; another trainer of the group may own the rest
            # Where each partition of the manifest stands here: the first offset read since the last commit, or,
            # with nothing read yet, the position the fetcher starts from (the group's committed offset)
            firsts = {p: pending.first_offset(p) for p in m.offsets}
            moved = {p for p, f in firsts.items() if f is not None and f != m.offsets[p].start}
            idle = [p for p, f in firsts.items() if f is None]
            if idle and self._clock() >= self._recheck_at.get(m.run_id, 0.0):
                # nothing read there yet: has the group committed past the start? (at most once a second: it asks
                # the broker; a committed offset below the start is fine, the batch's messages are on their way)
                self._recheck_at[m.run_id] = self._clock() + 1.0
                moved |= {p for p, off in self._committed(idle).items() if off >= 0 and off > m.offsets[p].start}
            waited_s = max(0.0, self._clock() - self._awaiting_since.setdefault(m.run_id, self._clock()))
            if moved or waited_s > self._wait_s:
                # someone committed past its start (another trainer of the group took a partition over), or its
                # batch does not come back: it can no longer be committed as recorded; its traces train again
                log.info("run %s: the log moved on from its offsets (partitions %s, waited %.0f s); the manifest "
                         "is stale", m.run_id, sorted(moved), waited_s)
                self.uncommitted.remove(m)
                self._awaiting_since.pop(m.run_id, None)
                continue
            if not all((pending.next_offset(p) or -1) >= r.end for p, r in m.offsets.items()):
                self.awaiting = True  # do not start a run that would train part of it again
                continue
            self._awaiting_since.pop(m.run_id, None)
            yield m

    def done(self, manifest: RunManifest) -> None:
        """``manifest`` (from :meth:`ready`) is committed."""
        self.uncommitted.remove(manifest)

    def commit_ready(self, assigned: set[int], pending: Accumulator,
                     commit: Callable[[RunManifest], object]) -> Iterator[RunManifest]:
        """:meth:`ready`, then for each: ``commit`` it, drop its traces from ``pending`` (their ids join
        ``pending.known``: a later duplicate of one is not new) and yield it. A failed commit raises out of the
        iteration; that manifest and the rest wait for the next call."""
        for m in self.ready(assigned, pending):
            commit(m)
            ids = set().union(*(pending.ids_below(p, r.end) for p, r in m.offsets.items()))
            for p, r in m.offsets.items():
                pending.trim(p, r.end)
            pending.known.update(ids)
            pending.recount()
            self.done(m)
            yield m
