"""The trigger: when the trainer starts a run. Pure (no Kafka, no threads); the clock is injectable.

A run is due when, with nothing blocking it (a run or its close loop in progress, a back-off, a manifest whose
batch is coming back, history not loaded yet, no partition assigned):

- ``retry``: a failed batch is back in full (after its seek-back), and nothing else may run before it;
- ``min_traces``: at least ``min_traces`` distinct new experience ids wait;
- ``interval``: ``check_interval_s`` passed since the last check and at least one new id waits;
- ``train_now``: a ``train_now`` request waits (answered "declined" when, read up to the end, nothing is new).

"New" means more than after the last empty dataset (:meth:`Trigger.empty`): the same traces cannot train.
An interval check that finds nothing new counts as a check: the next one is an interval later.

When a trigger other than ``retry`` fires, the run first reads on up to the end offsets of that moment
(a :class:`Drain`), within the per-run message cap and a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from tenacity import RetryCallState, Retrying, wait_exponential

TriggerName = Literal["retry", "min_traces", "interval", "train_now"]


def _wall_ms() -> int:
    return int(time.time() * 1000)


class Trigger:
    """The trigger's state: the last check, the failed batch to retry, the bar after an empty dataset."""

    def __init__(self, min_traces: int, check_interval_s: float, *, clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = _wall_ms) -> None:
        self.min_traces = min_traces
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._wall_ms = wall_ms
        self._last_check = clock()
        self.last_check_ms = wall_ms()
        #: partition -> end offset of the failed batch to retry once it is read again (None: nothing to retry)
        self.retry_target: dict[int, int] | None = None
        #: after an empty dataset: wait for more distinct new traces than this
        self.need_more_than = 0

    # -- the interval -------------------------------------------------------------------------------------
    def mark_check(self) -> None:
        """A check happened now (a run ended, or an interval check found nothing new)."""
        self._last_check = self._clock()
        self.last_check_ms = self._wall_ms()

    def next_check_in_s(self) -> float:
        return max(0.0, self._last_check + self.check_interval_s - self._clock())

    # -- the decision -------------------------------------------------------------------------------------
    def nothing_new(self, n_new: int) -> bool:
        return n_new <= self.need_more_than

    def due(self, *, n_new: int, requests: bool, assigned: Iterable[int] = (),
            held_ends: Mapping[int, int] | None = None) -> TriggerName | None:
        """The trigger that fires now, or None. ``n_new``: distinct new experience ids held; ``requests``: a
        train_now request waits; ``assigned``: the partitions owned now; ``held_ends``: per partition held, one
        past the last offset read (decides whether a failed batch is back). Call it only when nothing blocks a
        run (see the module's docstring)."""
        interval_due = self.next_check_in_s() <= 0.0
        if self.nothing_new(n_new):
            if interval_due:
                self.mark_check()  # nothing (new) to train: the next check is one interval away
            # a request: read up to the end offsets first, then train or say there is nothing new
            return "train_now" if requests and self.retry_target is None else None
        if self.retry_target is not None:
            # a failed batch is retried once it is back in full (the seek-back re-reads it)
            owned, ends = set(assigned), held_ends or {}
            back = all(p not in owned or ends.get(p, -1) >= end for p, end in self.retry_target.items())
            return "retry" if back else None
        if n_new >= self.min_traces:
            return "min_traces"
        if interval_due:
            return "interval"
        if requests:
            return "train_now"
        return None

    # -- what happened to a run ---------------------------------------------------------------------------
    def started(self) -> None:
        """A run took the batch: nothing to retry, no bar."""
        self.retry_target = None
        self.need_more_than = 0
        self.mark_check()

    def failed(self, targets: Mapping[int, int]) -> None:
        """A run failed: retry it once every partition of ``targets`` (still owned) is read up to its end."""
        self.retry_target = dict(targets)

    def empty(self, n_new: int) -> None:
        """A run found no trainable example in ``n_new`` new traces: wait for more than that."""
        self.need_more_than = n_new

    def retry_covered_by(self, ends: Mapping[int, int]) -> bool:
        """A manifest committing up to ``ends`` covers the failed batch (its commit was refused): the retry is
        dropped, True. False when there is nothing to retry or it is not covered."""
        if self.retry_target is None or not all(p in ends and ends[p] >= end for p, end in self.retry_target.items()):
            return False
        self.retry_target = None
        return True


@dataclass(frozen=True)
class Drain:
    """A trigger fired: read on until every partition reaches ``targets`` (its end offset at that moment), the
    batch holds ``max_messages``, or ``deadline`` (on the trigger's clock) passed."""

    trigger: TriggerName
    targets: dict[int, int]
    deadline: float

    @staticmethod
    def targets_from(positions: Mapping[int, int], watermarks: Mapping[int, tuple[int, int]]) -> dict[int, int]:
        """The end offset to reach per partition: its high watermark, where something lies between where reading
        is (``positions``, -1 if unknown) and there."""
        return {p: high for p, (low, high) in watermarks.items() if max(positions.get(p, -1), low) < high}

    def full(self, n_messages: int, max_messages: int) -> bool:
        return n_messages >= max_messages

    def reached(self, positions: Mapping[int, int]) -> bool:
        """Every partition in ``positions`` (the targets still owned) is read up to its target."""
        return all(pos >= self.targets[p] for p, pos in positions.items())

    def expired(self, now: float) -> bool:
        return now > self.deadline


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """The trainer's one back-off policy (a failed run, a failed close loop): tenacity's exponential wait,
    ``initial_s`` doubled per consecutive failure, at most ``max_s``. Only the wait comes from tenacity: the loop
    cannot sleep (it keeps polling so the group keeps it), so it schedules the retry ``backoff_s`` ahead."""
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = attempt
    return float(wait_exponential(multiplier=initial_s, max=max_s)(state))
