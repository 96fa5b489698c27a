"""The trainer's heartbeat on trainer-status: every ``TIER3_TRAINER_STATUS_INTERVAL_S``, and at once when the stage
changed.

What it says comes from what the trainer really does, not from whether its partitions are held:

- ``details.stage`` is the :class:`trainer.stage.StageHolder`'s: ``idle``, ``training`` (with step, total_steps, loss
  and eta_s), ``evaluating`` (the commit protocol's evaluation), ``close_loop`` and the steps of it that
  ``after_run`` reports (``exporting``, ``evaluating_served``, ``gating``, ``registering``), with ``stage_since_ms``;
- ``training_in_progress`` is true while a run trains or is evaluated before its commit (:data:`RUN_STAGES`), not
  while its gate and export run, so it agrees with the run's lifecycle events (``started`` true, ``succeeded``
  false);
- ``details.held_for`` lists why the partitions are paused (trainer/hold.py: ``run``, ``close_loop``,
  ``backoff``; empty when reading), so a reader knows the trainer is busy whatever the stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from trainer.events import TrainerEvents
from trainer.manifest import RunManifest
from trainer.stage import RUN_STAGES, StageHolder
from trainer.trigger import Trigger


@dataclass
class TrainerStats:
    runs_succeeded: int = 0
    runs_failed: int = 0
    recognised: int = 0  # manifests committed on restart without training
    closed: int = 0  # runs whose close loop (evaluated, verdict, export) completed in this process
    train_now_answered: int = 0
    assigned: int = 0  # partitions assigned (cumulative)
    revoked: int = 0  # partitions revoked (cumulative)
    lost: int = 0  # partitions lost (cumulative): the group evicted us
    dead_lettered: int = 0
    last_run_id: str | None = None
    last_manifest: RunManifest | None = None

    def counts(self) -> dict[str, Any]:
        """What the heartbeat carries (the manifest itself stays out)."""
        return {k: v for k, v in asdict(self).items() if k != "last_manifest"}


class Heartbeat:
    """Sends the heartbeat when due; ``details()`` gives the loop's own fields (pending counts, assignment...)."""

    def __init__(self, events: TrainerEvents, stage: StageHolder, trigger: Trigger, *, interval_s: float,
                 details: Callable[[], dict[str, Any]], clock: Callable[[], float] = time.monotonic) -> None:
        self._events = events
        self._stage = stage
        self._trigger = trigger
        self._interval_s = interval_s
        self._details = details
        self._clock = clock
        self.next_mono = 0.0  # when the next periodic heartbeat is due (0: at the next look)
        self.sent = -1  # the stage changes already reported (a change sends a heartbeat at once)
        # the check times go into the lifecycle events too (a reader of the latest event always has them)
        events.status = lambda: {"last_check_time_ms": trigger.last_check_ms,
                                 "next_check_in_s": trigger.next_check_in_s()}

    def maybe_send(self, force: bool = False) -> bool:
        """Send the heartbeat if forced, due, or the stage changed since the last one; True when sent."""
        now = self._clock()
        changes = self._stage.changes
        if not force and now < self.next_mono and changes == self.sent:
            return False
        self.next_mono = now + self._interval_s
        self.sent = changes
        snapshot, details = self._stage.snapshot(), self._details()
        self._events.heartbeat(
            training_in_progress=snapshot["stage"] in RUN_STAGES, last_check_time_ms=self._trigger.last_check_ms,
            next_check_in_s=self._trigger.next_check_in_s(),
            details={"run_id": details.pop("run_id", None), **snapshot, **details})
        return True
