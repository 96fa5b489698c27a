"""The demo's monitor: reads the four topics (and trainer-status) from the beginning, the trainer group's committed
offsets on enriched-traces and the worker's ``/status``, into :class:`Observed` (one thread, under a lock)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, KafkaException, TopicPartition

from schemas import DeadLetter, EnrichedTrace, TrainingRun, decode
from schemas.errors import SchemaError
from schemas.kafka import reading as kio
from schemas.kafka.follow import TopicFollower
from schemas.runs import RunsFold
from schemas.settings import KafkaSettings

VERDICTS = ("promoted", "rejected")


@dataclass
class RunInfo:
    run_id: str
    events: list[str] = field(default_factory=list)
    model_version: int | None = None
    base_model: str | None = None  # what it was trained from (its started / succeeded / evaluated events say)
    metrics: dict[str, Any] = field(default_factory=dict)
    report: str | None = None
    reasons: Any = None
    error: str | None = None
    first_ms: int = 0
    seen_mono: dict[str, float] = field(default_factory=dict)  # event -> when the demo saw it (monotonic s)
    trainer_closes: bool = False  # the trainer evaluated it in its commit protocol and closes the loop itself
    exported: list[str] = field(default_factory=list)  # GGUF files of its export
    ollama: str | None = None  # the Ollama tag it was registered as, or how to register it

    @property
    def verdict(self) -> str | None:
        for e in reversed(self.events):
            if e in VERDICTS:
                return e
        return None


@dataclass
class Observed:
    """What the demo has seen so far (written by the monitor thread, read by the display)."""

    experiences: int = 0
    trace_ids: set[str] = field(default_factory=set)
    trace_messages: int = 0
    dead_letters: int = 0
    dead_by_reason: dict[str, int] = field(default_factory=dict)
    runs: dict[str, RunInfo] = field(default_factory=dict)
    heartbeat: TrainingRun | None = None  # the trainer's latest: details.stage, step, total_steps, loss, eta_s
    traces_end: dict[int, int] = field(default_factory=dict)  # partition -> end offset (high watermark)
    committed: dict[int, int] = field(default_factory=dict)  # partition -> the trainer group's committed offset
    status: dict[str, Any] | None = None
    status_error: str | None = None
    errors: list[str] = field(default_factory=list)
    notes_live: list[str] = field(default_factory=list)  # what the demo itself did, for the event lines
    windows_seen: dict[Any, int] = field(default_factory=dict)  # window start -> count, kept across polls

    def runs_with(self, event: str) -> list[RunInfo]:
        return [r for r in self.runs.values() if event in r.events]

    @property
    def traces_committed(self) -> int:
        return sum(min(self.committed.get(p, 0), end) for p, end in self.traces_end.items())

    @property
    def traces_total(self) -> int:
        return sum(self.traces_end.values())

    def _windows(self) -> dict[Any, int]:
        """window start -> enriched traces counted in it: every window /status has shown so far (a long demo
        outlives /status's list of recent windows, so windows seen earlier are kept)."""
        w = (self.status or {}).get("windows") or {}
        for win in [*(w.get("recent") or []), *([w["current"]] if w.get("current") else [])]:
            self.windows_seen[win.get("start_ms")] = int(sum(v for v in (win.get("by_task") or {}).values()
                                                             if isinstance(v, (int, float))))
        return self.windows_seen

    def counted(self) -> int:
        """Enriched traces in the worker's tumbling count table."""
        return sum(self._windows().values())

    def windows_used(self) -> int:
        return sum(1 for n in self._windows().values() if n)

    def window_s(self) -> Any:
        return ((self.status or {}).get("windows") or {}).get("size_s", "?")


#: errors of a Kafka request that a later retry may not see: the group coordinator moved or is loading its offsets,
#: a leader election, a timeout or a reconnect. librdkafka does not mark every one retriable() (committed()'s
#: NOT_COORDINATOR is not), hence the list.
PROBE_GIVE_UP_S = 60.0  # a "transient" error that lasts this long is reported after all


def transient(exc: BaseException) -> bool:
    """Whether a Kafka client exception is worth retrying: the one rule, :func:`schemas.kafka.reading.is_transient`."""
    return kio.is_transient(exc)


class Monitor(threading.Thread):
    """Reads the four topics from the beginning, the trainer group's committed offsets and /status."""

    def __init__(self, settings: KafkaSettings, trainer_group: str, status_url: str, obs: Observed) -> None:
        super().__init__(name="tier3-demo-monitor", daemon=True)
        self.s, self.group, self.status_url, self.obs = settings, trainer_group, status_url, obs
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.fold = RunsFold()  # the one fold of training-runs (schemas/runs.py), as the gate and the router
        self.probe_failing_since: float | None = None  # monotonic time of the first failure in a row
        self.probe_retries = 0  # transient probe failures, retried on the next probe (a second later)

    def make_probe(self) -> Consumer:
        """The committed-offsets probe: the trainer's group id, but it never subscribes, so it never joins."""
        return Consumer({**self.s.client_config(), "group.id": self.group, "enable.auto.commit": False})

    def run(self) -> None:
        topics = [self.s.experiences_topic, self.s.traces_topic, self.s.dead_letters_topic,
                  self.s.training_runs_topic, self.s.trainer_status_topic]
        # the one follower (schemas/kafka/follow.py): from the beginning, a topic not there yet read once it is
        follower = TopicFollower(self.s, topics, "demo-monitor", missing="wait",
                                 config={"group.id": f"{self.s.tier3_topic_prefix}demo-monitor"})
        probe = self.make_probe()
        http = httpx.Client(timeout=2.0)
        try:
            next_probe = 0.0
            while not self.stop_event.is_set():
                try:
                    for msg in follower.poll(0.2, 500):
                        self._apply(msg.topic() or "", msg.value() or b"")
                except KafkaException as exc:
                    # transient ones (a broker reconnect) are the follower's business; report what is not
                    self._error(f"monitor: {exc.args[0] if exc.args else exc}")
                if time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + 1.0
                    self._probe(probe, sorted(p for t, p in follower.positions if t == self.s.traces_topic))
                    self._poll_status(http)
        except Exception as exc:  # the display must go on: say what broke
            self._error(f"monitor stopped: {exc!r}")
        finally:
            follower.close()
            probe.close()
            http.close()

    def _error(self, text: str) -> None:
        with self.lock:
            if text not in self.obs.errors:
                self.obs.errors.append(text)

    def _apply(self, topic: str, value: bytes) -> None:
        obs = self.obs
        try:
            with self.lock:
                if topic == self.s.experiences_topic:
                    obs.experiences += 1
                elif topic == self.s.traces_topic:
                    trace = decode(value, EnrichedTrace, max_bytes=self.s.max_record_bytes)
                    obs.trace_ids.add(trace.experience_id)
                    obs.trace_messages += 1
                elif topic == self.s.dead_letters_topic:
                    dl = decode(value, DeadLetter, max_bytes=self.s.max_record_bytes)
                    obs.dead_letters += 1
                    obs.dead_by_reason[dl.error_kind] = obs.dead_by_reason.get(dl.error_kind, 0) + 1
                elif topic in (self.s.training_runs_topic, self.s.trainer_status_topic):  # lifecycle, heartbeats
                    self._apply_run(decode(value, TrainingRun))
        except SchemaError as exc:
            self._error(f"{topic}: undecodable message ({exc.kind})")

    def _apply_run(self, ev: TrainingRun) -> None:
        """Fold a lifecycle event with the one fold of training-runs (``schemas.runs.RunsFold``) and copy what the
        display shows; heartbeats (not part of the fold) are the trainer's live status."""
        if ev.event == "heartbeat":
            self.obs.heartbeat = ev
            return
        self.fold.apply(ev)
        rec = self.fold.runs.get(ev.run_id)
        if rec is None:
            return
        run = self.obs.runs.setdefault(ev.run_id, RunInfo(ev.run_id, first_ms=rec.first_ms))
        run.events.append(ev.event)
        run.seen_mono.setdefault(ev.event, time.monotonic())
        run.model_version = rec.model_version
        if ev.base_model:
            run.base_model = ev.base_model
        run.trainer_closes = rec.evaluated_by_trainer
        run.metrics = dict(rec.metrics)
        run.report = rec.report
        if run.report and Path(run.report).is_dir() and (Path(run.report) / "report.md").exists():
            run.report = str(Path(run.report) / "report.md")
        run.reasons = rec.reasons
        run.exported = list(rec.exported)
        if rec.ollama is not None:
            tags = ", ".join(rec.ollama.tags or [])
            run.ollama = (f"registered as {tags}" if rec.ollama.registered
                          else f"Ollama not reachable: {(rec.ollama.commands or ['-'])[0]}")
        run.error = rec.error[:300] if rec.error else None

    def _probe(self, probe: Consumer, parts: list[int]) -> None:
        """Read the end offsets and the trainer group's committed offsets. A transient error (the group's
        coordinator moving or loading, a timeout, a reconnect) is retried by the next probe, a second later, and
        never reported; one that persists for ``PROBE_GIVE_UP_S``, or any other error, is."""
        if not parts:
            return
        try:
            ends = {p: hi for p, (_lo, hi) in kio.watermarks(probe, self.s.traces_topic, parts, 2).items()}
            committed = probe.committed([TopicPartition(self.s.traces_topic, p) for p in parts], timeout=5)
            bad = next((tp.error for tp in committed if tp.error is not None), None)
            if bad is not None:
                raise KafkaException(bad)
        except Exception as exc:
            now = time.monotonic()
            if self.probe_failing_since is None:
                self.probe_failing_since = now
            if transient(exc) and now - self.probe_failing_since < PROBE_GIVE_UP_S:
                self.probe_retries += 1
                return
            self._error(f"offset probe: {exc!r}"
                        + (f" (failing for {now - self.probe_failing_since:.0f} s)" if transient(exc) else ""))
            return
        self.probe_failing_since = None
        with self.lock:
            self.obs.traces_end = ends
            self.obs.committed = {tp.partition: max(tp.offset, 0) for tp in committed}

    def _poll_status(self, http: httpx.Client) -> None:
        try:
            resp = http.get(self.status_url)
            resp.raise_for_status()
            st = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            with self.lock:
                self.obs.status_error = type(exc).__name__
            return
        with self.lock:
            self.obs.status, self.obs.status_error = st, None
