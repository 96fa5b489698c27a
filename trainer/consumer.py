"""The trainer consumer: accumulate enriched traces, train when enough are new, commit only after success.

A plain confluent-kafka consumer (not a Faust agent: Faust acknowledges a message when the agent raises) in the
group ``TIER3_TRAINER_GROUP`` with ``RELIABLE_CONSUMER``: no auto-commit, no automatic offset store,
cooperative-sticky assignment. The loop, one thread:

1. poll; decode each trace (undecodable ones are dead-lettered and still count as read); keep them per partition;
2. a trigger fires when >= ``TIER3_MIN_TRACES`` distinct experience ids wait, or ``TIER3_CHECK_INTERVAL_S`` passed
   with at least one, or a ``train_now`` request arrived on ``trainer-control`` (``tier3 train-now``, answered
   there), or a failed batch is back for its retry;
   when one fires, the run takes everything available at that moment: the loop keeps reading until every
   assigned partition reaches the end offset it had when the trigger fired, or the batch holds
   ``TIER3_MAX_TRACES_PER_RUN`` messages (reading stops there);
3. the run is :func:`trainer.protocol.train_and_commit`: the training itself happens in a worker thread while this
   thread keeps polling with every partition paused, so the group never evicts us (max.poll.interval.ms is about
   poll() calls, not about work);
4. on failure: ``failed`` event, nothing committed, seek back to the batch's first offsets, back off, retry.

5. after a committed run, the close loop (``after_success``: evaluated event, the gate's verdict, the export) runs
   with the partitions paused. It is resumable: at start, and after a restart path commits or announces a run,
   every committed run of this group that the log (training-runs) shows without a verdict, or promoted without
   its export, is queued and closed (``after_pending`` says which; ``after_success`` does only the missing steps).

Heartbeats (trainer-status, every ``TIER3_TRAINER_STATUS_INTERVAL_S`` and at once when the stage changes) say what
the trainer does: ``training_in_progress`` while the partitions are held, and in ``details`` the stage
(trainer/stage.py: ``idle``, ``training`` with step, total_steps, loss and eta_s, ``evaluating`` in the evaluation
hook, ``close_loop`` or the step of it that ``after_success`` reports with ``trainer.stage.set_stage``) and
``stage_since_ms``.

Revoked or lost partitions are dropped from memory and never committed: a run whose partitions were revoked
while it trained fails its commit step (the new owner reads those traces again from the committed offset).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from schemas import SchemaError, TrainerControl, decode
from schemas import kafka_io as kio
from schemas.settings import KAFKA_CLIENT_LOG
from trainer.accumulation import Accumulator
from trainer.dataset import BuiltDataset
from trainer.errors import CommitFailed, DatasetError, ManifestError, TrainerError
from trainer.events import TrainerEvents, now_ms
from trainer.manifest import OffsetRange, RunManifest, list_manifests, read_manifest
from trainer.protocol import (
    Batch,
    EvaluateFn,
    RunContext,
    TrainFn,
    check_commit_result,
    commit_recognised,
    new_run_id,
    publish_succeeded,
    train_and_commit,
)
from trainer.recovery import Recovery
from trainer.replay import TraceRecord, decode_trace, read_ids
from trainer.settings import TrainerSettings
from trainer.sft_config import SFTConfig
from trainer.stage import StageHolder, bound
from trainer.trigger import Drain, Trigger, TriggerName, backoff_s

log = logging.getLogger("tier3.trainer.consumer")

T = TypeVar("T")

#: exit status of an injected crash (TIER3_TRAINER_FAULT): distinguishable from a real failure in tests
FAULT_EXIT_CODE = 86
#: name prefix of the threads that train, evaluate, gate and export (the loop thread keeps polling meanwhile)
WORKER_THREAD_PREFIX = "tier3-train-"


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


class RunAborted(TrainerError):
    """The trainer is stopping while a run trains: the run is abandoned, nothing is committed."""

    retryable = True


# ------------------------------------------------------------------------------------------------ the consumer


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


class TrainerConsumer:
    """``TrainerConsumer(settings).run()`` is ``tier3 trainer``. ``train`` and ``evaluate`` are injectable (tests,
    the close-loop's evaluation); by default :func:`trainer.sft_trainer.train` and no evaluation.
    ``after_success(manifest)`` runs after a run is committed and announced (the close-loop's gate and export);
    it runs with the partitions paused and polling going on, and its errors never touch the committed run.
    ``after_pending(manifests)`` returns the ids of those committed runs whose close loop is not complete (read
    from the log); they are closed at start, oldest first, before any new run."""

    def __init__(self, settings: TrainerSettings, cfg: SFTConfig | None = None, *, train: TrainFn | None = None,
                 evaluate: EvaluateFn | None = None,
                 after_success: Callable[[RunManifest], object] | None = None,
                 after_pending: Callable[[list[RunManifest]], list[str]] | None = None) -> None:
        self.s = settings
        self.cfg = cfg if cfg is not None else SFTConfig()
        self.topic = settings.traces_topic
        self.events = TrainerEvents(settings)
        self.consumer = Consumer({**settings.consumer_config(), "error_cb": self._on_error})
        # requests (train_now) on trainer-control, in a group of their own: one trainer of the group answers each,
        # and a request that arrived while no trainer ran is answered at the next start
        self.control = Consumer({**settings.client_config(), "group.id": f"{settings.tier3_trainer_group}.control",
                                 "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                 "isolation.level": "read_committed", "error_cb": self._on_error,
                                 "client.id": f"tier3-trainer-control-{settings.tier3_trainer_group}"})
        self._requests: list[TrainerControl] = []  # train_now requests read, not answered yet
        self._control_next: dict[int, int] = {}  # control partition -> one past the last message read
        self._control_committed: dict[int, int] = {}
        self.stop_event = threading.Event()
        self.stats = TrainerStats()
        self.known_ids: set[str] = set()  # experience ids inside committed runs of this group (trigger dedup)
        self.pending = Accumulator(self.known_ids)
        self._history_todo: set[int] = set()  # assigned partitions whose committed history is not loaded yet
        self._train = train
        self._evaluate = evaluate
        self._after_success = after_success
        self._after_pending = after_pending
        self._after_todo: list[RunManifest] = []  # committed runs whose close loop is to be done, oldest first
        self._after_retry_at: dict[str, float] = {}
        self._after_attempts: Counter[str] = Counter()
        self._after_scan_at: float | None = None  # when to ask the log which runs lack their close loop
        self.trigger = Trigger(settings.tier3_min_traces, settings.tier3_check_interval_s)
        self._drain: Drain | None = None
        self.recovery = Recovery(self._committed_offsets, wait_s=settings.tier3_trainer_commit_timeout_s)
        self.assigned: set[int] = set()
        self._paused: set[int] = set()
        self._lost_since_batch: set[int] = set()
        self.training = False
        self._current_run: str | None = None
        #: what the trainer is doing (heartbeat's stage, step, loss, ETA); bound to every worker thread, so the
        #: training callback and the close loop report into it (trainer/stage.py)
        self.stage = StageHolder()
        self._stage_sent = -1  # stage changes already in a heartbeat (a change sends one at once)
        self._failures = 0
        self._backoff_until: float | None = None
        self._committed: dict[int, int] = {}  # what this process committed, per partition
        self._next_status_mono = 0.0
        self._started = False
        self._closed = False
        self._closing = False
        self.events.status = lambda: {"last_check_time_ms": self.trigger.last_check_ms,
                                      "next_check_in_s": self.next_check_in_s()}

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.s.runs_dir.mkdir(parents=True, exist_ok=True)
        self._reconcile_manifests()
        if self._after_success is not None and self._after_pending is not None:
            self._after_scan_at = time.monotonic()
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self.control.subscribe([self.s.trainer_control_topic])
        log.info("trainer group %s on %s: min_traces=%d, max_traces_per_run=%d, check_interval_s=%s, runs in %s",
                 self.s.tier3_trainer_group, self.topic, self.s.tier3_min_traces, self.s.tier3_max_traces_per_run,
                 self.s.tier3_check_interval_s, self.s.runs_dir)

    def stop(self) -> None:
        """Ask the loop to end (thread-safe; a signal handler may call it). A run in progress is abandoned."""
        self.stop_event.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True  # the revocation that leaving the group causes is not a rebalance to count
        try:
            self.consumer.close()  # leaves the group; commits nothing (auto-commit is off)
        finally:
            try:
                self.control.close()
            finally:
                self.events.close()

    def run(self, *, max_runs: int | None = None, timeout_s: float | None = None) -> TrainerStats:
        """Consume and train until stopped, or until ``max_runs`` runs were committed, or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self.start()
        try:
            while not self.stop_event.is_set():
                if max_runs is not None and self.stats.runs_succeeded + self.stats.recognised >= max_runs \
                        and not self._after_due():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                self.turn()
        finally:
            self.close()
        return self.stats

    def turn(self) -> None:
        """One turn of the loop: poll, then whatever is due (history, recognition, close loop, a run)."""
        self.poll(self.s.tier3_trainer_poll_timeout_s)
        self._end_backoff_if_due()
        self._load_history()
        self._recognise_manifests()
        self._scan_after()
        self._close_runs()
        trigger = self._ready()
        if trigger is not None:
            self._run_batch(trigger)

    # -- polling ------------------------------------------------------------------------------------------
    @property
    def _hold(self) -> bool:
        """Partitions stay paused while a run trains and while a failed one backs off."""
        return self.training or self._backoff_until is not None

    def poll(self, timeout_s: float) -> None:
        """One poll (up to ``timeout_s``): read a message into the accumulator, answer the control topic, send the
        heartbeat when due. Starts nothing: :meth:`turn` does (tests poll with it to read without training)."""
        msg = self.consumer.poll(timeout_s)
        if msg is not None:
            self._handle(msg)
        if self._hold:
            self._pause_all()  # partitions assigned while holding must not deliver either
        elif self._drain is not None and self.pending.n_messages >= self.s.tier3_max_traces_per_run:
            self._pause_all()  # the batch is full: read no further (the rest waits for the next run)
        self._poll_control()
        self._status_heartbeat()
        self.events.poll()

    # -- requests on trainer-control ----------------------------------------------------------------------
    def _poll_control(self) -> None:
        if not self._started:
            return
        msg = self.control.poll(0)
        while msg is not None:
            err = msg.error()
            if err is None:
                self._on_control(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("trainer-control: %s", err.str())
            msg = self.control.poll(0)
        self._commit_control()

    def _on_control(self, msg: Message) -> None:
        p, off = msg.partition() or 0, msg.offset() or 0
        self._control_next[p] = off + 1
        try:
            req = decode(msg.value() or b"", TrainerControl, max_bytes=self.s.tier3_max_message_bytes)
        except SchemaError as exc:  # someone else's garbage on the control topic: not a reason to stop
            log.warning("trainer-control offset %d: not a request (%s); ignored", off, exc)
            return
        if req.kind != "request" or (req.group is not None and req.group != self.s.tier3_trainer_group):
            return  # an answer (ours or another trainer's), or a request for another group
        age_s = (now_ms() - req.at_ms) / 1000
        if age_s > self.s.tier3_train_now_max_age_s:
            self._answer(req, "declined", reason=f"expired: the request is {age_s:.0f} s old (more than "
                         f"TIER3_TRAIN_NOW_MAX_AGE_S={self.s.tier3_train_now_max_age_s:.0f})")
            return
        log.info("train-now request %s from %s", req.request_id, req.requested_by or "?")
        self._requests.append(req)

    def _answer(self, req: TrainerControl, answer: str, *, run_id: str | None = None, reason: str | None = None,
                details: dict[str, Any] | None = None) -> None:
        self.events.answer(req, answer=answer, run_id=run_id, reason=reason, details=details)
        self.stats.train_now_answered += 1
        log.info("train-now request %s: %s%s%s", req.request_id, answer, f" run {run_id}" if run_id else "",
                 f" ({reason})" if reason else "")

    def _answer_all(self, answer: str, **kw: Any) -> None:
        todo, self._requests = self._requests, []
        for req in todo:
            self._answer(req, answer, **kw)

    def _commit_control(self) -> None:
        """Commit the control offsets read, up to the first request not answered yet (at-least-once answers:
        a trainer killed in between answers that request again after its restart)."""
        if self._requests:
            return
        todo = {p: off for p, off in self._control_next.items() if off > self._control_committed.get(p, -1)}
        if not todo:
            return
        if not self.events.flush(5.0):  # the answers first: a committed request always has its answer
            return
        try:
            self.control.commit(offsets=[TopicPartition(self.s.trainer_control_topic, p, off)
                                         for p, off in todo.items()], asynchronous=False)
            self._control_committed.update(todo)
        except KafkaException as exc:
            log.warning("trainer-control: commit failed (%s); the requests may be answered again", exc)

    def _handle(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return
            if err.fatal():
                raise KafkaException(err)
            log.warning("consumer error: %s", err.str())
            return
        p, off = msg.partition(), msg.offset()
        if p is None or off is None or p not in self.assigned:
            return  # a message fetched before its partition was revoked: the new owner reads it
        value = msg.value()
        try:
            record: TraceRecord | None = TraceRecord(p, off, decode_trace(value, self.s.max_record_bytes))
        except SchemaError as exc:
            # bad bytes never stop the trainer: kept on dead-letters with the reason; the offset is still part of
            # the batch, so the next successful run commits past it
            try:  # never fatal (trainer/events.py): a letter that cannot be written must not stop the trainer
                self.events.dead_letter(topic=self.topic, partition=p, offset=off, key=msg.key(),
                                        value=value or b"", reason=str(exc), error_kind=exc.kind)
            except Exception:
                log.exception("dead letter for %s/%d/%d not written; the trace is skipped", self.topic, p, off)
            self.stats.dead_lettered += 1
            record = None
        self.pending.add(p, off, record)

    def _pause_all(self) -> None:
        todo = self.assigned - self._paused
        if todo:
            self.consumer.pause([TopicPartition(self.topic, p) for p in sorted(todo)])
            self._paused |= todo

    def _resume_all(self) -> None:
        todo = self._paused & self.assigned
        if todo:
            self.consumer.resume([TopicPartition(self.topic, p) for p in sorted(todo)])
        self._paused.clear()

    # -- rebalance callbacks (called from inside poll(), on this thread) -----------------------------------
    def _on_assign(self, _c: Consumer, partitions: list[TopicPartition]) -> None:
        ps = {tp.partition for tp in partitions}
        log.info("assigned %s", sorted(ps))
        self.assigned |= ps
        self._history_todo |= ps
        self.stats.assigned += len(ps)

    def _on_revoke(self, _c: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget_partitions({tp.partition for tp in partitions}, "revoked")
        if not self._closing:
            self.stats.revoked += len(partitions)

    def _on_lost(self, _c: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget_partitions({tp.partition for tp in partitions}, "lost")
        self.stats.lost += len(partitions)

    def _forget_partitions(self, ps: set[int], why: str) -> None:
        if ps:
            log.log(logging.INFO if self._closing else logging.WARNING, "partitions %s %s%s", sorted(ps), why,
                    " during a run" if self.training else "")
        self.assigned -= ps
        self._history_todo -= ps
        self._paused -= ps
        self._lost_since_batch |= ps  # a run in progress must not commit them
        self.pending.drop(ps)  # the new owner reads them again from the committed offset

    def _on_error(self, err: KafkaError) -> None:
        KAFKA_CLIENT_LOG.warning("trainer consumer: %s", err.str())  # rate-limited: a broker outage repeats it

    # -- when to train (the decision is trainer.trigger's) -------------------------------------------------
    def next_check_in_s(self) -> float:
        return self.trigger.next_check_in_s()

    def due(self) -> TriggerName | None:
        """The trigger that fires now, or None (nothing is started: :meth:`turn` starts the run)."""
        if self._hold or self.recovery.awaiting or self._history_todo or self._after_due() or not self.assigned:
            return None
        return self.trigger.due(n_new=self.pending.n_new, requests=bool(self._requests), assigned=self.assigned,
                                held_ends=self.pending.ends())

    def _ready(self) -> TriggerName | None:
        """The trigger of the run to start now, or None. A trigger (other than a retry, whose batch is fixed)
        first reads on up to the end offsets of the moment it fired, within TIER3_MAX_TRACES_PER_RUN."""
        if self._drain is None:
            trigger = self.due()
            if trigger is None or trigger == "retry":
                return trigger
            self._drain = self._start_drain(trigger)
        if self._hold or not self._drained(self._drain):
            return None
        drain, self._drain = self._drain, None
        if self.trigger.nothing_new(self.pending.n_new):  # only a request gets here with nothing new
            self._answer_all("declined", reason=f"no new traces to train on ({self.pending.n_messages} read since "
                             "the last commit, none new)", details={"pending_messages": self.pending.n_messages})
            self._resume_all()
            return None
        return drain.trigger

    def _start_drain(self, trigger: TriggerName) -> Drain:
        timeout_s = self.s.tier3_trainer_commit_timeout_s
        deadline = time.monotonic() + self.s.tier3_trainer_drain_timeout_s
        ps = sorted(self.assigned)
        at: dict[int, int] = {}  # where reading is (or starts) per partition
        marks: dict[int, tuple[int, int]] = {}  # (low, high) watermarks, per partition asked so far
        try:
            pos = self._positions(ps)
            idle = [p for p in ps if pos[p] < 0]  # nothing read there yet: the fetch starts at the committed offset
            committed = self._committed_offsets(idle) if idle else {}
            at = {p: pos[p] if pos[p] >= 0 else committed.get(p, -1) for p in ps}
            for p in ps:
                marks[p] = kio.watermarks(self.consumer, self.topic, [p], timeout_s)[p]
        except KafkaException as exc:  # the batch is then what is held: never worse than before
            log.warning("could not read the end offsets (%s); the run takes what is read so far", exc)
        targets = Drain.targets_from(at, marks)
        log.info("trigger %s: reading up to the end offsets %s (at most %d messages per run)", trigger, targets,
                 self.s.tier3_max_traces_per_run)
        return Drain(trigger, targets, deadline)

    def _positions(self, ps: list[int]) -> dict[int, int]:
        """Per partition: the next offset to read (what we hold, else the fetcher's position; -1 if unknown)."""
        got = {tp.partition: tp.offset for tp in self.consumer.position([TopicPartition(self.topic, p) for p in ps])}
        return {p: max(self.pending.next_offset(p) or -1, got.get(p, -1)) for p in ps}

    def _drained(self, drain: Drain) -> bool:
        if drain.full(self.pending.n_messages, self.s.tier3_max_traces_per_run):
            return True
        todo = [p for p in drain.targets if p in self.assigned]
        pos = self._positions(todo) if todo else {}
        if drain.reached(pos):
            return True
        if drain.expired(time.monotonic()):
            log.warning("trigger %s: end offsets %s not reached within %.0f s (at %s); running with what is read",
                        drain.trigger, drain.targets, self.s.tier3_trainer_drain_timeout_s, pos)
            return True
        return False

    # -- one run ------------------------------------------------------------------------------------------
    def _run_batch(self, trigger: TriggerName) -> None:
        batch = self.pending.take(self.topic, trigger, attempt=self._failures + 1)
        self.trigger.started()
        self._lost_since_batch.clear()
        run_id = new_run_id()
        self.training, self._current_run = True, run_id
        self.stage.begin_run()
        self._pause_all()
        if self._requests:  # every waiting request is served by this run: it takes all that is available
            self._answer_all("accepted", run_id=run_id, details={**batch.describe(), "trigger": trigger})
        log.info("run %s: %d traces (%d distinct) from %s, trigger %s, attempt %d", run_id, batch.n_messages,
                 batch.n_unique, batch.describe()["offsets"], trigger, batch.attempt)
        self.stats.last_run_id = run_id
        try:
            manifest = train_and_commit(batch, run_id, self._context())
        except Exception as exc:
            self.training = False
            self._on_failure(batch, run_id, exc)
        else:
            self.training = False
            self._failures = 0
            self._resume_all()
            self.stats.runs_succeeded += 1
            self.stats.last_manifest = manifest
            self.known_ids.update(r.trace.experience_id for r in batch.records)
            log.info("run %s committed %s (dataset %s, loss %s)", run_id, manifest.commit_offsets(),
                     manifest.dataset.sha256[:12], manifest.metrics.get("train_loss"))
            if self._after_success is not None:
                self._after_todo.append(manifest)
                self._close_runs()
        finally:
            self.training, self._current_run = False, None
            self.stage.set("idle")
            # the next interval check is one interval after this run ended, not after it started: a run
            # longer than the interval must not be followed at once by a run of the few traces read meanwhile
            self.trigger.mark_check()
            self._status_heartbeat(force=True)

    # -- the close loop after a commit (evaluated, verdict, export): resumable --------------------------------
    def _after_due(self) -> bool:
        """A committed run waits for its close loop now (new runs wait for it: verdicts come in run order)."""
        now = time.monotonic()
        return any(self._after_retry_at.get(m.run_id, 0.0) <= now for m in self._after_todo)

    def _scan_after(self) -> None:
        """Ask the log which committed runs of this group lack their verdict (or their export): a trainer
        killed during evaluation, the gate or the export left them so. Queued oldest first."""
        if self._after_scan_at is None or time.monotonic() < self._after_scan_at or self._after_pending is None:
            return
        mine = [m for m in list_manifests(self.s.runs_dir) if m.topic == self.topic
                and m.group == self.s.tier3_trainer_group and m.state in ("committed", "published")]
        if not mine:
            self._after_scan_at = None
            return
        pending = self._after_pending
        try:
            todo = set(self._in_background(lambda: pending(mine)))
        except RunAborted:
            return
        except Exception as exc:  # the broker may be down: ask again later
            log.warning("could not read which runs lack their verdict (%s); asking again in %.0f s", exc,
                        self.s.tier3_trainer_backoff_initial_s)
            self._after_scan_at = time.monotonic() + max(1.0, self.s.tier3_trainer_backoff_initial_s)
            return
        self._after_scan_at = None
        queued = {m.run_id for m in self._after_todo}
        for m in mine:
            if m.run_id in todo and m.run_id not in queued:
                log.info("run %s is committed but its close loop did not finish (killed?); resuming it", m.run_id)
                self._after_todo.append(m)

    def _close_runs(self) -> None:
        """Run the close loop of the queued committed runs that are due, oldest first."""
        if self._after_success is None:
            self._after_todo.clear()
            return
        while not self._hold and not self.stop_event.is_set():
            now = time.monotonic()
            due = [m for m in self._after_todo if self._after_retry_at.get(m.run_id, 0.0) <= now]
            if not due:
                return
            m = due[0]
            if self._run_after_success(m):
                self._after_todo.remove(m)
                self._after_retry_at.pop(m.run_id, None)
                self.stats.closed += 1
                continue
            self._after_attempts[m.run_id] += 1
            n = self._after_attempts[m.run_id]
            if n >= self.s.tier3_trainer_close_attempts:
                log.error("run %s: its close loop failed %d times; giving up until the next start", m.run_id, n)
                self._after_todo.remove(m)
                continue
            wait_s = backoff_s(n, self.s.tier3_trainer_backoff_initial_s, self.s.tier3_trainer_backoff_max_s)
            self._after_retry_at[m.run_id] = now + wait_s
            log.warning("run %s: close loop failed (attempt %d); retry in %.1f s", m.run_id, n, wait_s)

    def _run_after_success(self, manifest: RunManifest) -> bool:
        """The close loop of one committed run; True when it completed (False: retry later)."""
        if self._after_success is None:
            return True
        after = self._after_success
        self.training = True  # keep the partitions paused: the next batch waits for the gate and the export
        self._current_run = manifest.run_id
        self.stage.set("close_loop")  # after_run may say which of its steps runs (trainer.stage.set_stage)
        try:
            self._in_background(lambda: after(manifest))
            return True
        except RunAborted:
            return False
        except Exception:
            log.exception("run %s: the after-run step (evaluated, gate, export) failed; the run stays committed",
                          manifest.run_id)
            return False
        finally:
            self.training = False
            self._current_run = None
            self.stage.set("idle")
            self._resume_all()

    def _on_failure(self, batch: Batch, run_id: str, exc: Exception) -> None:
        self._failures += 1
        self.stats.runs_failed += 1
        retryable = bool(getattr(exc, "retryable", True))  # an unexpected exception: assume it is transient
        empty = isinstance(exc, DatasetError)
        if empty:
            wait_s = 0.0  # retrying the same traces cannot help; wait for more of them instead
        elif retryable:
            wait_s = backoff_s(self._failures, self.s.tier3_trainer_backoff_initial_s,
                               self.s.tier3_trainer_backoff_max_s)
        else:
            wait_s = self.s.tier3_trainer_backoff_max_s  # needs an operator: retry rarely
        log.error("run %s failed (%s, retryable=%s): %s; nothing committed, retry in %.1f s", run_id,
                  type(exc).__name__, retryable, exc, wait_s, exc_info=not isinstance(exc, TrainerError))
        self.events.failed(run_id, model_version=None, base_model=self.cfg.tier3_base_model, details={
            **batch.describe(), "error": str(exc)[:2000], "error_type": type(exc).__name__,
            "retryable": retryable, "retry_in_s": wait_s})
        self.events.flush(5.0)
        # Seek back: every batch partition we still own is read again from the batch's first offset, so the retry
        # trains exactly what a restarted trainer would (the broker's committed offsets did not move).
        owned = [p for p in batch.offsets if p in self.assigned and p not in self._lost_since_batch]
        self.pending.drop(list(batch.offsets))
        for p in owned:
            try:
                self.consumer.seek(TopicPartition(self.topic, p, batch.offsets[p].start))
            except KafkaException as err:
                log.warning("seek back of partition %d failed (%s); it resumes from the committed offset", p, err)
        if isinstance(exc, CommitFailed):
            # the model and its manifest are durable: when the batch is back in full, commit it, do not retrain
            try:
                m = read_manifest(self.s.runs_dir / run_id)
                if m.state == "trained":
                    self.recovery.remember(m)
            except ManifestError:
                pass
        if empty:
            self.trigger.empty(batch.n_new)
            self._failures = 0
            self._resume_all()
            return
        self.trigger.failed({p: batch.offsets[p].end for p in owned})
        self._backoff_until = time.monotonic() + wait_s
        self._pause_all()

    def _end_backoff_if_due(self) -> None:
        if self._backoff_until is not None and time.monotonic() >= self._backoff_until:
            self._backoff_until = None
            self._resume_all()

    def _context(self) -> RunContext:
        return RunContext(settings=self.s, cfg=self.cfg, events=self.events, commit=self.commit,
                          in_background=self._in_background, dataset_slice=self._dataset_slice, train=self._train,
                          evaluate=self._evaluating(), fault=self._fault, on_step=self._on_step)

    def _evaluating(self) -> EvaluateFn | None:
        """The evaluation hook, reporting the stage ``evaluating`` while it runs (before the manifest)."""
        evaluate = self._evaluate
        if evaluate is None:
            return None

        def run(adapter_dir: Path, built: BuiltDataset, cfg: SFTConfig, *, run_id: str,
                model_version: int) -> dict[str, Any]:
            self.stage.set("evaluating")
            return evaluate(adapter_dir, built, cfg, run_id=run_id, model_version=model_version)

        return run

    def _in_background(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread; meanwhile keep polling (partitions paused) so the group keeps us."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                with bound(self.stage):  # trainer.stage.set_stage / record_loss in this thread report to us
                    box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc

        worker = threading.Thread(target=target, name=f"{WORKER_THREAD_PREFIX}{self._current_run}", daemon=True)
        worker.start()
        stop_deadline: float | None = None
        while worker.is_alive():
            self.poll(min(0.2, self.s.tier3_trainer_poll_timeout_s))
            if self.stop_event.is_set():
                # wait for the worker to notice (training ends at its next step, see _on_step): a thread left
                # inside torch when the interpreter exits dies uncleanly ("terminate called without an active
                # exception"); after the grace period the command ends the process without running finalizers
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + self.s.tier3_trainer_stop_grace_s
                    log.info("stopping: waiting up to %.0f s for the work in progress to end",
                             self.s.tier3_trainer_stop_grace_s)
                if time.monotonic() >= stop_deadline:
                    break
        if self.stop_event.is_set():
            raise RunAborted("the trainer is stopping; the run is abandoned and its traces come back")
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def _on_step(self, step: int, total: int) -> None:
        if self.stop_event.is_set():  # called by the training thread after every optimiser step
            raise RunAborted("the trainer is stopping; training ends at this step")
        self.stage.step(step, total)
        if self.s.tier3_trainer_step_delay_s > 0:
            time.sleep(self.s.tier3_trainer_step_delay_s)

    def commit(self, offsets: dict[int, int]) -> None:
        """Step (4) of the protocol: synchronous commit of exactly ``offsets``, refused for any partition that was
        revoked or lost since the batch was read (its new owner may already have read past it)."""
        gone = {p for p in offsets if p not in self.assigned or p in self._lost_since_batch}
        if gone:
            raise CommitFailed(f"partitions {sorted(gone)} were revoked or lost during the run: not committing")
        behind = {p: (off, self._committed[p]) for p, off in offsets.items() if off < self._committed.get(p, -1)}
        if behind:  # paranoid: a commit only ever moves forward; anything else is a bug worth stopping for
            raise CommitFailed(f"refusing to move committed offsets backwards: {behind}", retryable=False)
        tps = [TopicPartition(self.topic, p, off) for p, off in sorted(offsets.items())]
        try:
            result = self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            raise CommitFailed(f"commit of {offsets} failed: {exc.args[0]}") from exc
        check_commit_result(result, offsets)
        self._committed.update(offsets)

    def _dataset_slice(self, batch: Batch) -> dict[int, OffsetRange]:
        if self.cfg.tier3_scope == "new":
            return dict(batch.offsets)
        # scope "all": every partition from its low watermark up to this batch's end, or, for a partition not in
        # the batch, up to the group's committed offset (what earlier runs trained on)
        timeout_s = self.s.tier3_trainer_commit_timeout_s
        md = self.consumer.list_topics(self.topic, timeout=timeout_s)
        parts = sorted(md.topics[self.topic].partitions)
        others = [TopicPartition(self.topic, p) for p in parts if p not in batch.offsets]
        committed = {tp.partition: tp.offset for tp in self.consumer.committed(others, timeout=timeout_s)} \
            if others else {}
        out: dict[int, OffsetRange] = {}
        for p in parts:
            low, _high = kio.watermarks(self.consumer, self.topic, [p], timeout_s)[p]
            end = batch.offsets[p].end if p in batch.offsets else max(low, committed.get(p, -1))
            if end > low:
                out[p] = OffsetRange(start=low, end=end)
        return out

    def _fault(self, point: str) -> None:
        inject_fault(self.s, point)

    def _load_history(self) -> None:
        """Learn the experience ids already trained (committed) in newly assigned partitions, so a late duplicate
        of an old trace does not count as new. Reads the message keys (the experience id) of [start, committed)."""
        if not self._history_todo or self._hold:
            return
        todo, self._history_todo = sorted(self._history_todo), set()
        timeout_s = self.s.tier3_trainer_commit_timeout_s
        tps = self.consumer.committed([TopicPartition(self.topic, p) for p in todo], timeout=timeout_s)
        ranges: dict[int, OffsetRange] = {}
        for tp in tps:
            low, _high = kio.watermarks(self.consumer, self.topic, [tp.partition], timeout_s)[tp.partition]
            if tp.offset > low:
                ranges[tp.partition] = OffsetRange(start=low, end=tp.offset)
        if ranges:
            try:  # a long history must not cost the group membership: read it while polling
                ids = self._in_background(lambda: read_ids(self.s, self.topic, ranges))
            except RunAborted:
                return
            except Exception as exc:  # only the trigger's dedup depends on it: go on without
                log.warning("could not read the trained history of partitions %s: %s", sorted(ranges), exc)
                return
            self.known_ids.update(ids)
            self.pending.recount()
            log.info("history: %d experience ids already trained in partitions %s", len(self.known_ids),
                     sorted(ranges))

    # -- restart: manifests whose commit (or announcement) did not happen (the bookkeeping is trainer.recovery's)
    def _committed_offsets(self, ps: list[int]) -> dict[int, int]:
        """The group's committed offset of each partition (negative: none)."""
        tps = self.consumer.committed([TopicPartition(self.topic, p) for p in ps],
                                      timeout=self.s.tier3_trainer_commit_timeout_s)
        return {tp.partition: tp.offset for tp in tps}

    def _reconcile_manifests(self) -> None:
        """At start: publish `succeeded` for runs that committed but were not announced; remember the runs that
        were trained and recorded but not committed, to commit them when their batch comes back."""
        def announce(m: RunManifest) -> None:
            if m.state == "trained":
                m = m.model_copy(update={"state": "committed", "committed_at_ms": now_ms()})
            publish_succeeded(m, self._context())  # its close loop is resumed by _scan_after

        self.recovery.reconcile([m for m in list_manifests(self.s.runs_dir) if m.topic == self.topic
                                 and m.group == self.s.tier3_trainer_group and m.state != "published"], announce)

    def _recognise_manifests(self) -> None:
        """Commit an uncommitted manifest once the batch it describes is back in memory, in full."""
        if self._hold:
            self.recovery.awaiting = False
            return
        for m in self.recovery.ready(self.assigned, self.pending):
            self._lost_since_batch.clear()
            try:
                commit_recognised(m, self._context())
            except CommitFailed as exc:
                log.error("run %s: commit of the recognised manifest failed (%s); trying again", m.run_id, exc)
                self._backoff_until = time.monotonic() + self.s.tier3_trainer_backoff_initial_s
                self._pause_all()
                return
            ids = set().union(*(self.pending.ids_below(p, r.end) for p, r in m.offsets.items()))
            for p, r in m.offsets.items():
                self.pending.trim(p, r.end)
            # its traces are inside a committed run now: a later duplicate of one is not new
            self.known_ids.update(ids)
            self.pending.recount()
            self.recovery.done(m)
            if self.trigger.retry_covered_by(m.commit_offsets()):
                # the failed batch (its commit was refused) is what this manifest committed: nothing to retry
                self._failures = 0
            if self._after_success is not None:
                self._after_todo.append(m)  # committed by this restart path: its close loop never ran
            self.stats.recognised += 1
            self.stats.last_run_id = m.run_id
            log.info("run %s: recognised on restart and committed without training again", m.run_id)

    # -- status -------------------------------------------------------------------------------------------
    def _status_heartbeat(self, force: bool = False) -> None:
        """The heartbeat, every TIER3_TRAINER_STATUS_INTERVAL_S and at once when the stage changed.
        ``training_in_progress`` means "partitions held" (a run trains or its close loop runs); ``details.stage``
        says which (trainer/stage.py), with the step, the latest loss and an ETA while training."""
        now = time.monotonic()
        changes = self.stage.changes
        if not force and now < self._next_status_mono and changes == self._stage_sent:
            return
        self._next_status_mono = now + self.s.tier3_trainer_status_interval_s
        self._stage_sent = changes
        self.events.heartbeat(
            training_in_progress=self.training, last_check_time_ms=self.trigger.last_check_ms,
            next_check_in_s=self.next_check_in_s(),
            details={"run_id": self._current_run, **self.stage.snapshot(),
                     "pending_traces": self.pending.n_new, "pending_messages": self.pending.n_messages,
                     "min_traces": self.s.tier3_min_traces, "assigned": sorted(self.assigned),
                     "consecutive_failures": self._failures,
                     "retry_in_s": round(max(0.0, self._backoff_until - now), 3) if self._backoff_until else None,
                     "stats": {k: v for k, v in asdict(self.stats).items() if k != "last_manifest"}})
