"""What the trainer is doing right now, for its heartbeat: the stage, the step, the latest loss, an ETA.

The consumer (``trainer/consumer.py``) owns one :class:`StageHolder` and sets the stages it sees itself
(``training``, ``evaluating`` in the commit protocol's evaluation hook, ``idle``); its close-loop queue
(``trainer/close_loop_queue.py``) sets ``close_loop`` for the whole after-run step; its heartbeat
(``trainer/heartbeat.py``) reads the holder whenever it sends one. Code that runs *inside* those steps reports
through the module-level functions, without importing the consumer:

- :func:`set_stage` — the close loop's ``after_run`` says which of its steps runs (``exporting``,
  ``evaluating_served``, ``gating``, ``registering``); the queue sets ``idle`` when ``after_run`` returns, so a
  sub-stage never outlives the step;
- :func:`record_loss` — the training callback (``trainer.sft_trainer._Progress``) passes on every logged loss.

They reach the holder that the consumer bound to the current thread (:func:`bound`: trainer/worker.py binds the
consumer's holder in each worker thread it starts, so two consumers in one process never mix). Outside such a
thread (``tier3 close-loop``, ``tier3 eval``, tests) they go to a process-wide holder that nothing reads: calling
them is always safe and cheap. Thread-safe: the worker thread writes, the consumer's loop thread reads.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, get_args

Stage = Literal["idle", "training", "evaluating", "close_loop", "exporting", "evaluating_served", "gating",
                "registering"]
#: every stage a heartbeat may report, in the order a run goes through them
STAGES: tuple[str, ...] = get_args(Stage)
#: the stages of a run before its commit: the heartbeat's ``training_in_progress`` is true in these only
RUN_STAGES = ("training", "evaluating")
#: the steps of the close loop (``trainer.close_loop.gate.after_run``), inside the consumer's ``close_loop``
CLOSE_LOOP_STAGES = ("exporting", "evaluating_served", "gating", "registering")


def _now_ms() -> int:
    return int(time.time() * 1000)


class StageHolder:
    """The trainer's current stage, its step counter and latest loss (one lock; any thread may write or read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stage: str = "idle"
        self._since_ms = _now_ms()
        self._changes = 0
        self._step = 0
        self._total = 0
        self._loss: float | None = None
        self._first: tuple[int, float] | None = None  # (step, monotonic s) of the first step seen in this run
        self._last_mono: float | None = None  # monotonic s of the latest step

    def set(self, stage: str) -> None:
        """Enter ``stage`` (one of :data:`STAGES`; ValueError otherwise). Setting the current stage again keeps
        its start time."""
        if stage not in STAGES:
            raise ValueError(f"unknown trainer stage {stage!r}: one of {', '.join(STAGES)}")
        with self._lock:
            if stage != self._stage:
                self._stage, self._since_ms = stage, _now_ms()
                self._changes += 1

    def begin_run(self) -> None:
        """A new run starts training: stage ``training``, step counter, loss and rate cleared."""
        with self._lock:
            self._step, self._total, self._loss, self._first, self._last_mono = 0, 0, None, None, None
            if self._stage != "training":
                self._stage, self._since_ms = "training", _now_ms()
                self._changes += 1

    def step(self, step: int, total: int) -> None:
        """An optimiser step ended (``step`` of ``total``, counted across the run's phases)."""
        now = time.monotonic()
        with self._lock:
            if self._first is None or step < self._first[0]:
                self._first = (step, now)
            self._step, self._total, self._last_mono = step, total, now

    def loss(self, value: float) -> None:
        """The latest logged training loss (not finite: ignored)."""
        if math.isfinite(value):
            with self._lock:
                self._loss = float(value)

    @property
    def changes(self) -> int:
        """How often the stage changed (the consumer sends a heartbeat at once when it did)."""
        with self._lock:
            return self._changes

    @property
    def stage(self) -> str:
        with self._lock:
            return self._stage

    def snapshot(self) -> dict[str, Any]:
        """The heartbeat's fields: ``stage``, ``stage_since_ms``, ``step``, ``total_steps``, ``loss`` (the latest
        training loss of the current or last run) and ``eta_s`` (while training, once two steps were seen: the
        steps left at the step rate since the run's first step, less the time since the latest step)."""
        now = time.monotonic()
        with self._lock:
            eta: float | None = None
            if (self._stage == "training" and self._first is not None and self._last_mono is not None
                    and self._step > self._first[0] and self._total >= self._step):
                per_step = (self._last_mono - self._first[1]) / (self._step - self._first[0])
                eta = round(max(0.0, (self._total - self._step) * per_step - (now - self._last_mono)), 1)
            return {"stage": self._stage, "stage_since_ms": self._since_ms, "step": self._step,
                    "total_steps": self._total,
                    "loss": None if self._loss is None else round(self._loss, 4), "eta_s": eta}


#: the holders bound to threads (a new thread starts with an empty context: nothing is inherited)
_BOUND: contextvars.ContextVar[StageHolder | None] = contextvars.ContextVar("tier3_trainer_stage", default=None)
#: where reports go outside a thread that a consumer bound (nothing reads it)
_DEFAULT = StageHolder()


def current() -> StageHolder:
    """The holder bound to this thread, else the process-wide one."""
    return _BOUND.get() or _DEFAULT


@contextmanager
def bound(holder: StageHolder) -> Iterator[StageHolder]:
    """Within the block, :func:`set_stage` and :func:`record_loss` in this thread report to ``holder``."""
    token = _BOUND.set(holder)
    try:
        yield holder
    finally:
        _BOUND.reset(token)


def set_stage(name: str) -> None:
    """Report the stage the trainer is in (one of :data:`STAGES`; ValueError otherwise), e.g. from the close
    loop's ``after_run``: ``set_stage("exporting")`` before the export, ``set_stage("evaluating_served")`` before the
    served evaluation, ``set_stage("gating")`` before the verdict, ``set_stage("registering")`` before the
    registration. The consumer sets ``idle`` when the step returns."""
    current().set(name)


def record_loss(value: float) -> None:
    """Report the latest logged training loss (the training callback calls it)."""
    current().loss(value)
