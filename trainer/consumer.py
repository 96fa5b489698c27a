"""The trainer consumer: accumulate enriched traces, train when enough are new, commit only after success.

A plain confluent-kafka consumer (not a Faust agent: Faust acknowledges a message when the agent raises) in the
group ``TIER3_TRAINER_GROUP`` with ``RELIABLE_CONSUMER``: no auto-commit, no automatic offset store,
cooperative-sticky assignment. The loop, one thread:

1. poll; decode each trace (undecodable ones are dead-lettered and still count as read); keep them per partition
   (trainer/accumulation.py);
2. a trigger fires (trainer/trigger.py) when >= ``TIER3_MIN_TRACES`` distinct experience ids wait, or
   ``TIER3_CHECK_INTERVAL_S`` passed with at least one, or a ``train_now`` request arrived on ``trainer-control``
   (``tier3 train-now``, answered there: trainer/control.py), or a failed batch is back for its retry;
   when one fires, the run takes everything available at that moment: the loop keeps reading until every
   assigned partition reaches the end offset it had when the trigger fired, or the batch holds
   ``TIER3_MAX_TRACES_PER_RUN`` messages (reading stops there);
3. the run is :func:`trainer.protocol.train_and_commit`: the training itself happens in a worker thread
   (trainer/worker.py) while this thread keeps polling with the partitions held (trainer/hold.py), so the group
   never evicts us (max.poll.interval.ms is about poll() calls, not about work);
4. on failure: ``failed`` event, nothing committed, seek back to the batch's first offsets, back off (the
   partitions held for ``backoff``), retry.

5. after a committed run, its close loop (``after_success``: evaluated event, the gate's verdict, the export) runs
   with the partitions held (trainer/close_loop_queue.py). It is resumable: at start, and after a restart path
   commits or announces a run (trainer/recovery.py), every committed run of this group that the log
   (training-runs) shows without a verdict, or promoted without its export, is queued and closed.

Heartbeats (trainer-status, every ``TIER3_TRAINER_STATUS_INTERVAL_S`` and at once when the stage changes) say what
the trainer really does (trainer/heartbeat.py): the stage (trainer/stage.py: ``idle``, ``training`` with step,
total_steps, loss and eta_s, ``evaluating``, ``close_loop`` and the steps ``after_success`` reports: ``exporting``,
``evaluating_served``, ``gating``, ``registering``), ``training_in_progress`` only while a run trains or is
evaluated before its commit, and why the partitions are held.

Revoked or lost partitions are dropped from memory and never committed: a run whose partitions were revoked
while it trained fails its commit step (the new owner reads those traces again from the committed offset).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from schemas.settings import KAFKA_CLIENT_LOG
from trainer.accumulation import Accumulator
from trainer.close_loop_queue import AfterPending, AfterSuccess, CloseLoopQueue
from trainer.control import ControlRequests
from trainer.dataset import BuiltDataset
from trainer.errors import CommitFailed, DatasetError
from trainer.events import TrainerEvents, now_ms
from trainer.heartbeat import Heartbeat, TrainerStats
from trainer.hold import PartitionHold
from trainer.intake import Intake
from trainer.manifest import RunManifest, list_manifests
from trainer.offsets import TopicOffsets
from trainer.protocol import (
    Batch,
    EvaluateFn,
    RunContext,
    TrainFn,
    check_commit_result,
    commit_recognised,
    new_run_id,
    publish_failed,
    publish_succeeded,
    train_and_commit,
)
from trainer.recovery import Recovery
from trainer.settings import TrainerSettings
from trainer.sft_config import SFTConfig
from trainer.stage import StageHolder
from trainer.trigger import Drain, Trigger, TriggerName
from trainer.worker import (
    FAULT_EXIT_CODE,
    WORKER_THREAD_PREFIX,
    Background,
    RunAborted,
    busy_workers,
    inject_fault,
)

log = logging.getLogger("tier3.trainer.consumer")

__all__ = ["FAULT_EXIT_CODE", "WORKER_THREAD_PREFIX", "RunAborted", "TrainerConsumer", "TrainerStats",
           "busy_workers", "inject_fault"]


def evaluating(evaluate: EvaluateFn | None, stage: StageHolder) -> EvaluateFn | None:
    """The evaluation hook, reporting the stage ``evaluating`` while it runs (before the manifest)."""
    if evaluate is None:
        return None

    def run(adapter_dir: Path, built: BuiltDataset, cfg: SFTConfig, *, run_id: str,
            model_version: int) -> dict[str, Any]:
        stage.set("evaluating")
        return evaluate(adapter_dir, built, cfg, run_id=run_id, model_version=model_version)

    return run


class TrainerConsumer:
    """``TrainerConsumer(settings).run()`` is ``tier3 trainer``: the loop, the rebalances and the commit; the rest
    is delegated to the objects made here. ``train`` and ``evaluate`` are injectable (tests, the close loop's
    evaluation); by default :func:`trainer.sft_trainer.train` and no evaluation. ``after_success(manifest)`` (the
    close loop's gate and export) and ``after_pending(manifests)``: see trainer/close_loop_queue.py."""

    def __init__(self, settings: TrainerSettings, cfg: SFTConfig | None = None, *, train: TrainFn | None = None,
                 evaluate: EvaluateFn | None = None, after_success: AfterSuccess | None = None,
                 after_pending: AfterPending | None = None) -> None:
        s = self.s = settings
        self.cfg = cfg if cfg is not None else SFTConfig()
        self.topic = settings.traces_topic
        self.events = TrainerEvents(settings)
        self.consumer = Consumer({**settings.consumer_config(), "error_cb": self._on_error})
        self.stop_event = threading.Event()
        self.stats = TrainerStats()
        self.control = ControlRequests(settings, self.events, self.stats, error_cb=self._on_error)
        self.known_ids: set[str] = set()  # experience ids inside committed runs of this group (trigger dedup)
        self.pending = Accumulator(self.known_ids)
        self.trigger = Trigger(s.tier3_min_traces, s.tier3_check_interval_s)
        self.offsets = TopicOffsets(self.consumer, self.topic, settings)
        self.recovery = Recovery(self.offsets.committed, wait_s=s.tier3_trainer_commit_timeout_s)
        self.hold = PartitionHold(self.consumer, self.topic)  # what is assigned, paused, and why
        self.stage = StageHolder()  # what the trainer does (trainer/stage.py); the worker threads report into it
        self.background = Background(self.poll, self.stop_event, self.stage, grace_s=s.tier3_trainer_stop_grace_s,
                                     poll_s=min(0.2, s.tier3_trainer_poll_timeout_s),
                                     step_delay_s=s.tier3_trainer_step_delay_s)
        self.close_loop = CloseLoopQueue(settings, self.topic, after_success=after_success,
                                         after_pending=after_pending, hold=self.hold, stage=self.stage,
                                         background=self.background, stats=self.stats, stop_event=self.stop_event)
        self.intake = Intake(settings, self.topic, self.pending, events=self.events, stats=self.stats,
                             offsets=self.offsets, background=self.background)
        self.heartbeat = Heartbeat(self.events, self.stage, self.trigger, details=self._status,
                                   interval_s=s.tier3_trainer_status_interval_s)
        self._train, self._evaluate = train, evaluate
        self._drain: Drain | None = None
        self._lost_since_batch: set[int] = set()
        self._failures = 0
        self._committed: dict[int, int] = {}  # what this process committed, per partition
        self._started = self._closed = self._closing = False

    @property
    def assigned(self) -> set[int]:
        return self.hold.assigned

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.s.runs_dir.mkdir(parents=True, exist_ok=True)
        self._reconcile_manifests()
        self.close_loop.start()
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self.control.subscribe()
        log.info("trainer group %s on %s: min_traces=%d, max_traces_per_run=%d, check_interval_s=%s, runs in %s",
                 self.s.tier3_trainer_group, self.topic, self.s.tier3_min_traces, self.s.tier3_max_traces_per_run,
                 self.s.tier3_check_interval_s, self.s.runs_dir)

    def stop(self) -> None:
        """Ask the loop to end (thread-safe; a signal handler may call it). A run in progress is abandoned."""
        self.stop_event.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = self._closing = True  # the revocation that leaving the group causes is not a rebalance
        with contextlib.ExitStack() as later:  # then the control consumer, then the events: each even if one fails
            later.callback(self.events.close)
            later.callback(self.control.close)
            self.consumer.close()  # leaves the group; commits nothing (auto-commit is off)

    def run(self, *, max_runs: int | None = None, timeout_s: float | None = None) -> TrainerStats:
        """Consume and train until stopped, or until ``max_runs`` runs were committed, or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self.start()
        try:
            while not self.stop_event.is_set():
                if max_runs is not None and self.stats.runs_succeeded + self.stats.recognised >= max_runs \
                        and not self.close_loop.due():
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
        self.hold.resume_if_ready()  # a back-off ends
        if not self.hold.held:
            self.intake.load_history()
        self._recognise_manifests()
        self.close_loop.scan()
        self.close_loop.run_due()
        trigger = self._ready()
        if trigger is not None:
            self._run_batch(trigger)

    def poll(self, timeout_s: float) -> None:
        """One poll (up to ``timeout_s``): read a message into the accumulator, answer the control topic, send the
        heartbeat when due. Starts nothing: :meth:`turn` does (tests poll with it to read without training)."""
        msg = self.consumer.poll(timeout_s)
        if msg is not None:
            self.intake.add(msg, self.assigned)
        self.hold.enforce()  # partitions assigned while held must not deliver either
        if not self.hold.held and self._drain is not None and \
                self.pending.n_messages >= self.s.tier3_max_traces_per_run:
            self.hold.pause_all()  # the batch is full: read no further (the rest waits for the next run)
        self.control.poll()
        self.heartbeat.maybe_send()
        self.events.poll()

    # -- rebalance callbacks (called from inside poll(), on this thread) -----------------------------------
    def _on_assign(self, _c: Consumer, partitions: list[TopicPartition]) -> None:
        ps = {tp.partition for tp in partitions}
        log.info("assigned %s", sorted(ps))
        self.hold.assign(ps)
        self.intake.history_todo |= ps
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
                    f" while held ({', '.join(self.hold.reasons)})" if self.hold.held else "")
        self.hold.revoke(ps)
        self.intake.history_todo -= ps
        self._lost_since_batch |= ps  # a run in progress must not commit them
        self.pending.drop(ps)  # the new owner reads them again from the committed offset

    def _on_error(self, err: KafkaError) -> None:
        KAFKA_CLIENT_LOG.warning("trainer consumer: %s", err.str())  # rate-limited: a broker outage repeats it

    # -- when to train (the decision is trainer.trigger's) -------------------------------------------------
    def due(self) -> TriggerName | None:
        """The trigger that fires now, or None (nothing is started: :meth:`turn` starts the run)."""
        if self.hold.held or self.recovery.awaiting or self.intake.history_todo or self.close_loop.due() \
                or not self.assigned:
            return None
        return self.trigger.due(n_new=self.pending.n_new, requests=bool(self.control.waiting),
                                assigned=self.assigned, held_ends=self.pending.ends())

    def _ready(self) -> TriggerName | None:
        """The trigger of the run to start now, or None. A trigger (other than a retry, whose batch is fixed)
        first reads on up to the end offsets of the moment it fired, within TIER3_MAX_TRACES_PER_RUN."""
        if self._drain is None:
            trigger = self.due()
            if trigger is None or trigger == "retry":
                return trigger
            self._drain = self.offsets.drain(trigger, self.assigned, self.pending)
        if self.hold.held or not self.offsets.drained(self._drain, self.assigned, self.pending):
            return None
        drain, self._drain = self._drain, None
        if self.trigger.nothing_new(self.pending.n_new):  # only a request gets here with nothing new
            self.control.answer_all("declined", reason=f"no new traces to train on ({self.pending.n_messages} read "
                                    "since the last commit, none new)",
                                    details={"pending_messages": self.pending.n_messages})
            self.hold.resume_all()
            return None
        return drain.trigger

    # -- one run ------------------------------------------------------------------------------------------
    def _run_batch(self, trigger: TriggerName) -> None:
        batch = self.pending.take(self.topic, trigger, attempt=self._failures + 1)
        self.trigger.started()
        self._lost_since_batch.clear()
        run_id = self.background.run_id = new_run_id()
        self.stage.begin_run()
        self.hold.hold("run")
        if self.control.waiting:  # every waiting request is served by this run: it takes all that is available
            self.control.answer_all("accepted", run_id=run_id, details={**batch.describe(), "trigger": trigger})
        log.info("run %s: %d traces (%d distinct) from %s, trigger %s, attempt %d", run_id, batch.n_messages,
                 batch.n_unique, batch.describe()["offsets"], trigger, batch.attempt)
        self.stats.last_run_id = run_id
        try:
            manifest = train_and_commit(batch, run_id, self._context())
        except Exception as exc:
            self._on_failure(batch, run_id, exc)
        else:
            self._failures = 0
            self.hold.release("run")
            self.stats.runs_succeeded += 1
            self.stats.last_manifest = manifest
            self.known_ids.update(r.trace.experience_id for r in batch.records)
            log.info("run %s committed %s (dataset %s, loss %s)", run_id, manifest.commit_offsets(),
                     manifest.dataset.sha256[:12], manifest.metrics.get("train_loss"))
            self.close_loop.add(manifest)
            self.close_loop.run_due()
        finally:
            self.background.run_id = None
            self.stage.set("idle")
            self.hold.release("run")
            # the next interval check is one interval after this run ended, not after it started: a run
            # longer than the interval must not be followed at once by a run of the few traces read meanwhile
            self.trigger.mark_check()
            self.heartbeat.maybe_send(force=True)

    def _on_failure(self, batch: Batch, run_id: str, exc: Exception) -> None:
        self._failures += 1
        self.stats.runs_failed += 1
        wait_s = publish_failed(batch, run_id, exc, self._context(), failures=self._failures)
        # Seek back: every batch partition we still own is read again from the batch's first offset, so the retry
        # trains exactly what a restarted trainer would (the broker's committed offsets did not move).
        owned = [p for p in batch.offsets if p in self.assigned and p not in self._lost_since_batch]
        self.pending.drop(list(batch.offsets))
        self.offsets.seek({p: batch.offsets[p].start for p in owned})
        if isinstance(exc, CommitFailed):  # a durable model and manifest: commit them once the batch is back
            self.recovery.remember_recorded(self.s.runs_dir / run_id)
        if isinstance(exc, DatasetError):  # empty: retrying the same traces cannot help; wait for more of them
            self.trigger.empty(batch.n_new)
            self._failures = 0
        else:
            self.trigger.failed({p: batch.offsets[p].end for p in owned})
            self.hold.hold("backoff", for_s=wait_s)
        self.hold.release("run")

    def _context(self) -> RunContext:
        return RunContext(settings=self.s, cfg=self.cfg, events=self.events, commit=self.commit,
                          in_background=self.background, train=self._train,
                          dataset_slice=lambda batch: self.offsets.dataset_slice(batch, self.cfg.tier3_scope),
                          evaluate=evaluating(self._evaluate, self.stage), fault=lambda p: inject_fault(self.s, p),
                          on_step=self.background.step)

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

    # -- restart: manifests whose commit (or announcement) did not happen (the bookkeeping is trainer.recovery's)
    def _reconcile_manifests(self) -> None:
        """At start: publish `succeeded` for runs that committed but were not announced; remember the runs that
        were trained and recorded but not committed, to commit them when their batch comes back."""
        def announce(m: RunManifest) -> None:
            if m.state == "trained":
                m = m.model_copy(update={"state": "committed", "committed_at_ms": now_ms()})
            publish_succeeded(m, self._context())  # its close loop is resumed by the close-loop queue's scan

        self.recovery.reconcile([m for m in list_manifests(self.s.runs_dir) if m.topic == self.topic
                                 and m.group == self.s.tier3_trainer_group and m.state != "published"], announce)

    def _recognise_manifests(self) -> None:
        """Commit an uncommitted manifest once the batch it describes is back in memory, in full."""
        if self.hold.held:
            self.recovery.awaiting = False
            return

        def commit(m: RunManifest) -> None:
            self._lost_since_batch.clear()
            try:
                commit_recognised(m, self._context())
            except CommitFailed as exc:
                log.error("run %s: commit of the recognised manifest failed (%s); trying again", m.run_id, exc)
                raise

        try:
            for m in self.recovery.commit_ready(self.assigned, self.pending, commit):
                if self.trigger.retry_covered_by(m.commit_offsets()):
                    self._failures = 0  # the failed batch (its commit was refused) is what this manifest committed
                self.close_loop.add(m)  # committed by this restart path: its close loop never ran
                self.stats.recognised += 1
                self.stats.last_run_id = m.run_id
                log.info("run %s: recognised on restart and committed without training again", m.run_id)
        except CommitFailed:
            self.hold.hold("backoff", for_s=self.s.tier3_trainer_backoff_initial_s)

    def _status(self) -> dict[str, Any]:
        """The loop's own fields of the heartbeat (trainer/heartbeat.py adds the stage)."""
        retry_in_s = self.hold.left_s("backoff")
        return {"run_id": self.background.run_id, "pending_traces": self.pending.n_new,
                "pending_messages": self.pending.n_messages, "min_traces": self.s.tier3_min_traces,
                "assigned": sorted(self.assigned), "consecutive_failures": self._failures,
                "retry_in_s": None if retry_in_s is None else round(retry_in_s, 3), "stats": self.stats.counts(),
                "held_for": self.hold.reasons}
