"""Slow work off the loop thread: training, evaluation, the close loop and history reads run in a worker thread
while the loop thread keeps polling (partitions held), so the group never evicts the trainer (max.poll.interval.ms
is about poll() calls, not about work).

:class:`Background` runs one callable at a time that way; the worker thread reports its stage into the trainer's
:class:`trainer.stage.StageHolder` (bound to the thread). A stop request makes the wait end after a grace period
and the work raise :class:`RunAborted` (the training callback raises it at its next step).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from trainer.errors import TrainerError
from trainer.settings import TrainerSettings
from trainer.stage import StageHolder, bound

log = logging.getLogger("tier3.trainer.worker")

T = TypeVar("T")

#: exit status of an injected crash (TIER3_TRAINER_FAULT): distinguishable from a real failure in tests
FAULT_EXIT_CODE = 86
#: name prefix of the threads that train, evaluate, gate and export (the loop thread keeps polling meanwhile)
WORKER_THREAD_PREFIX = "tier3-train-"


class RunAborted(TrainerError):
    """The trainer is stopping while a run trains: the run is abandoned, nothing is committed."""

    retryable = True


def busy_workers() -> list[threading.Thread]:
    """Worker threads still running (after a stop whose grace period ran out)."""
    return [t for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX) and t.is_alive()]


def inject_fault(settings: TrainerSettings, point: str) -> None:
    """Testing only (TIER3_TRAINER_FAULT): end the process abruptly at ``point``: ``crash_*`` with os._exit
    (FAULT_EXIT_CODE), ``kill_*`` with a real SIGKILL (no handler, no flush, no cleanup)."""
    if settings.tier3_trainer_fault != point:
        return
    log.critical("TIER3_TRAINER_FAULT=%s: ending the process abruptly (testing)", point)
    sys.stderr.flush()
    if point.startswith("kill_"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(FAULT_EXIT_CODE)


class Background:
    """``Background(poll, stop_event, stage, ...)(fn)``: run ``fn`` in a worker thread, calling ``poll(seconds)``
    on this thread until it ends; its value, or its exception, is returned or raised here. ``run_id`` names the
    run worked on (the worker thread's name, the heartbeat's run_id)."""

    def __init__(self, poll: Callable[[float], None], stop_event: threading.Event, stage: StageHolder, *,
                 poll_s: float, grace_s: float, step_delay_s: float = 0.0) -> None:
        self._poll = poll
        self._stop = stop_event
        self._stage = stage
        self._poll_s = poll_s
        self._grace_s = grace_s
        self._step_delay_s = step_delay_s  # testing (TIER3_TRAINER_STEP_DELAY_S): slower steps
        self.run_id: str | None = None

    def __call__(self, fn: Callable[[], T]) -> T:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                with bound(self._stage):  # trainer.stage.set_stage / record_loss in this thread report to us
                    box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc

        worker = threading.Thread(target=target, name=f"{WORKER_THREAD_PREFIX}{self.run_id}", daemon=True)
        worker.start()
        stop_deadline: float | None = None
        while worker.is_alive():
            self._poll(self._poll_s)
            if self._stop.is_set():
                # wait for the worker to notice (training ends at its next step, see step()): a thread left
                # inside torch when the interpreter exits dies uncleanly ("terminate called without an active
                # exception"); after the grace period the command ends the process without running finalizers
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + self._grace_s
                    log.info("stopping: waiting up to %.0f s for the work in progress to end", self._grace_s)
                if time.monotonic() >= stop_deadline:
                    break
        if self._stop.is_set():
            raise RunAborted("the trainer is stopping; the run is abandoned and its traces come back")
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def step(self, step: int, total: int) -> None:
        """The training thread's callback after every optimiser step: the stage's step counter, and the stop."""
        if self._stop.is_set():
            raise RunAborted("the trainer is stopping; training ends at this step")
        self._stage.step(step, total)
        if self._step_delay_s > 0:
            time.sleep(self._step_delay_s)
