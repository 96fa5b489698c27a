"""The close-loop queue: committed runs waiting for their close loop (the evaluated event, the gate's verdict, the
export), run oldest first by the consumer between runs.

The close loop is the consumer's ``after_success(manifest)`` (``trainer.close_loop.gate.after_run`` under ``tier3
trainer``). Each one runs in a worker thread with the partitions held for ``close_loop`` (trainer/hold.py), so the
next batch waits for the gate and the export (verdicts come in run order); the stage is ``close_loop`` until
``after_run`` reports its steps (``exporting``, ``evaluating_served``, ``gating``, ``registering``) and ``idle``
after it. A failure never touches the committed run: it is retried with the trainer's back-off, up to
``TIER3_TRAINER_CLOSE_ATTEMPTS`` times per start.

It is resumable: at start (:meth:`CloseLoopQueue.start`), every committed run of this group that the log
(training-runs) shows without a verdict, or promoted without its export, is queued (``after_pending`` says which;
``after_success`` does only the missing steps), and so is a run that the restart path committed or announced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from trainer.heartbeat import TrainerStats
from trainer.hold import PartitionHold
from trainer.manifest import RunManifest, list_manifests
from trainer.settings import TrainerSettings
from trainer.stage import StageHolder
from trainer.trigger import backoff_s
from trainer.worker import Background, RunAborted

log = logging.getLogger("tier3.trainer.close_loop_queue")

AfterSuccess = Callable[[RunManifest], object]
AfterPending = Callable[[list[RunManifest]], list[str]]


class CloseLoopQueue:
    """Committed runs whose close loop is to be done, oldest first, with their retry times. Without
    ``after_success`` nothing is ever queued."""

    def __init__(self, settings: TrainerSettings, topic: str, *, after_success: AfterSuccess | None,
                 after_pending: AfterPending | None, hold: PartitionHold, stage: StageHolder,
                 background: Background, stats: TrainerStats, stop_event: threading.Event,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self.topic = topic
        self._after_success = after_success
        self._after_pending = after_pending
        self._hold = hold
        self._stage = stage
        self._background = background
        self._stats = stats
        self._stop = stop_event
        self._clock = clock
        self.todo: list[RunManifest] = []
        self._retry_at: dict[str, float] = {}
        self._attempts: Counter[str] = Counter()
        self._scan_at: float | None = None  # when to ask the log which runs lack their close loop

    def start(self) -> None:
        """Ask the log at the next :meth:`scan` which committed runs lack their close loop."""
        if self._after_success is not None and self._after_pending is not None:
            self._scan_at = self._clock()

    def add(self, manifest: RunManifest) -> None:
        """A run just committed (by a run, or by the restart path): its close loop is to be done."""
        if self._after_success is not None:
            self.todo.append(manifest)

    def due(self) -> bool:
        """A committed run waits for its close loop now (new runs wait for it: verdicts come in run order)."""
        now = self._clock()
        return any(self._retry_at.get(m.run_id, 0.0) <= now for m in self.todo)

    def scan(self) -> None:
        """Ask the log which committed runs of this group lack their verdict (or their export): a trainer
        killed during evaluation, the gate or the export left them so. Queued oldest first."""
        if self._scan_at is None or self._clock() < self._scan_at or self._after_pending is None:
            return
        mine = [m for m in list_manifests(self.s.runs_dir) if m.topic == self.topic
                and m.group == self.s.tier3_trainer_group and m.state in ("committed", "published")]
        if not mine:
            self._scan_at = None
            return
        pending = self._after_pending
        try:
            todo = set(self._background(lambda: pending(mine)))
        except RunAborted:
            return
        except Exception as exc:  # the broker may be down: ask again later
            log.warning("could not read which runs lack their verdict (%s); asking again in %.0f s", exc,
                        self.s.tier3_trainer_backoff_initial_s)
            self._scan_at = self._clock() + max(1.0, self.s.tier3_trainer_backoff_initial_s)
            return
        self._scan_at = None
        queued = {m.run_id for m in self.todo}
        for m in mine:
            if m.run_id in todo and m.run_id not in queued:
                log.info("run %s is committed but its close loop did not finish (killed?); resuming it", m.run_id)
                self.todo.append(m)

    def run_due(self) -> None:
        """Run the close loop of the queued runs that are due, oldest first (not while the partitions are held
        for something else, nor once the trainer is stopping)."""
        if self._after_success is None:
            self.todo.clear()
            return
        while not self._hold.held and not self._stop.is_set():
            now = self._clock()
            due = [m for m in self.todo if self._retry_at.get(m.run_id, 0.0) <= now]
            if not due:
                return
            m = due[0]
            if self._close(m, self._after_success):
                self.todo.remove(m)
                self._retry_at.pop(m.run_id, None)
                self._stats.closed += 1
                continue
            self._attempts[m.run_id] += 1
            n = self._attempts[m.run_id]
            if n >= self.s.tier3_trainer_close_attempts:
                log.error("run %s: its close loop failed %d times; giving up until the next start", m.run_id, n)
                self.todo.remove(m)
                continue
            wait_s = backoff_s(n, self.s.tier3_trainer_backoff_initial_s, self.s.tier3_trainer_backoff_max_s)
            self._retry_at[m.run_id] = now + wait_s
            log.warning("run %s: close loop failed (attempt %d); retry in %.1f s", m.run_id, n, wait_s)

    def _close(self, manifest: RunManifest, after: AfterSuccess) -> bool:
        """The close loop of one committed run; True when it completed (False: retry later)."""
        self._hold.hold("close_loop")  # the next batch waits for the gate and the export
        self._background.run_id = manifest.run_id
        self._stage.set("close_loop")  # after_run may say which of its steps runs (trainer.stage.set_stage)
        try:
            self._background(lambda: after(manifest))
            return True
        except RunAborted:
            return False
        except Exception:
            log.exception("run %s: the after-run step (evaluated, gate, export) failed; the run stays committed",
                          manifest.run_id)
            return False
        finally:
            self._background.run_id = None
            self._stage.set("idle")
            self._hold.release("close_loop")
