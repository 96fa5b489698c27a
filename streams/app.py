"""The Faust worker: sample and enrich experiences, count traces per window, serve /status, /metrics and /.

Agents are a few lines; the work is in :mod:`streams.enrich` (plain functions) and :mod:`streams.inflight`
(in-order acknowledgement). How no offset is committed before its trace or dead letter is written:
``docs/guarantees.md``.

Everything the worker runs is wired here, explicitly, in :func:`create_app`: the agents, the count table, the
online evaluation (:mod:`streams.online_eval`), the router's per-arm table (:mod:`streams.router_stats`), the
training-runs reader and the web views (/metrics through :mod:`streams.metrics`). The two places that need
Faust's private internals are in :mod:`streams.faust_adapter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faust
from faust.types import EventT, StreamT
from prometheus_client.exposition import generate_latest

from schemas import DeadLetter, EnrichedTrace, Experience, SchemaError, TrainingRun, decode, encode
from schemas.kafka import reading as kio
from schemas.kafka.dead_letters import backoff_s as dl_backoff_s
from schemas.kafka.dead_letters import fallbacks, letter_budget, write_failure
from schemas.settings import TopicSpec
from streams import faust_adapter, metrics, online_eval, router_stats
from streams.counts import WindowCounts
from streams.delivery import DeliveryError, DeliveryProducer
from streams.enrich import Source, TeacherStats, ToEnrich, dead_letter, enrich, triage
from streams.inflight import InOrderAcker, OffsetGuard
from streams.redaction import redact
from streams.router_stats import no_router_block
from streams.runs_view import RunHistory
from streams.settings import StreamsSettings
from streams.stall import StallWatch
from streams.teachers import Teacher, make_teacher
from streams.topics import ensure_topics

log = logging.getLogger("tier3.worker")

STATIC_DIR = Path(__file__).parent / "static"
COUNT_TABLE = "trace_counts"

def changelog_spec(settings: StreamsSettings) -> TopicSpec:
    """The count table's changelog, created up front with the source's partition count (Faust's rule)."""
    keep_ms = settings.tier3_window_s * (settings.tier3_recent_windows + 2) * 1000
    return TopicSpec(f"{settings.faust_app_id}-{COUNT_TABLE}-changelog", settings.tier3_partitions,
                     {"cleanup.policy": "compact,delete", "retention.ms": str(keep_ms)})


class TrainerView:
    """The trainer block of /status, projected from the training-runs topic and the trainers' heartbeats on the
    compacted trainer-status topic."""

    #: the heartbeat's details that the ``live`` block shows (the trainer's stage, with its run's step, the latest
    #: training loss and an ETA while it trains)
    LIVE_FIELDS = ("stage", "stage_since_ms", "run_id", "step", "total_steps", "loss", "eta_s")

    def __init__(self) -> None:
        self.heartbeat: TrainingRun | None = None
        self.live_beat: TrainingRun | None = None  # the newest heartbeat proper (not a lifecycle event)
        self.training_in_progress: bool | None = None
        self._state_at_ms = 0  # at_ms of the event that set training_in_progress
        self.history = RunHistory()  # every run's lifecycle (streams/runs_view.py): bounded by runs, not events

    def apply(self, run: TrainingRun) -> None:
        # heartbeats and lifecycle events come from two topics, so not in time order: the newest one says
        # whether the trainer trains
        newer = run.at_ms >= self._state_at_ms
        if (run.event == "heartbeat" or run.training_in_progress is not None) and (
                self.heartbeat is None or run.at_ms >= self.heartbeat.at_ms):
            self.heartbeat = run
        if run.event == "heartbeat" and (self.live_beat is None or run.at_ms >= self.live_beat.at_ms):
            self.live_beat = run
        if newer and run.training_in_progress is not None:
            self.training_in_progress, self._state_at_ms = run.training_in_progress, run.at_ms
        if newer and run.event == "started":
            self.training_in_progress, self._state_at_ms = True, run.at_ms
        elif newer and run.event in ("succeeded", "failed"):
            self.training_in_progress, self._state_at_ms = False, run.at_ms
        if run.event != "heartbeat":
            self.history.apply(run)

    def block(self, now_ms: int) -> dict[str, Any]:
        hb = self.heartbeat
        next_in: float | None = None
        if hb is not None and hb.next_check_in_s is not None:
            next_in = round(max(0.0, hb.next_check_in_s - (now_ms - hb.at_ms) / 1000), 1)
        return {
            "tier3_sft": {
                "training_in_progress": self.training_in_progress,
                "last_check_time": (hb.last_check_time_ms / 1000 if hb and hb.last_check_time_ms else None),
                "check_interval_s": hb.check_interval_s if hb else None,
                "next_check_in_s": next_in,
            },
            "live": self.live(now_ms),
            **self.history.block(),  # totals, in_force, runs (one record per run), versions
        }

    def live(self, now_ms: int) -> dict[str, Any] | None:
        """What the trainer does, from its newest heartbeat: ``stage`` (idle, training, evaluating, close_loop,
        exporting, evaluating_served, gating, registering), ``stage_since_ms``, the run's ``step`` / ``total_steps``,
        the latest training ``loss`` and ``eta_s`` (counted down from the heartbeat's time), ``stage_for_s`` (how
        long the stage has lasted) and the heartbeat's ``at_ms``. None before the first heartbeat; ``stage`` None
        from a trainer that does not send it."""
        hb = self.live_beat
        if hb is None:
            return None
        out: dict[str, Any] = {k: hb.details.get(k) for k in self.LIVE_FIELDS}
        eta = out["eta_s"]
        if isinstance(eta, (int, float)) and not isinstance(eta, bool):
            out["eta_s"] = round(max(0.0, eta - max(0, now_ms - hb.at_ms) / 1000), 1)
        since = out["stage_since_ms"]
        out["stage_for_s"] = round(max(0, now_ms - since) / 1000, 1) if isinstance(since, int) else None
        out["at_ms"] = hb.at_ms
        return out


class WorkerState:
    """Everything /status and /metrics report; updated by the agents (one asyncio loop, no locks)."""

    def __init__(self, settings: StreamsSettings, teacher: Teacher) -> None:
        self.settings = settings
        self.teacher = teacher
        self.started = time.monotonic()
        self.counts: Counter[str] = Counter(
            {"consumed": 0, "sampled": 0, "enriched": 0, "dead_lettered": 0, "not_sampled": 0})
        self.dead_by_reason: Counter[str] = Counter()
        self.teacher_stats = TeacherStats()
        self.trainer = TrainerView()
        # next offset to commit per experiences partition: one past the last acknowledged message
        self.acked_offset: dict[int, int] = {}
        self.lag: Callable[[], dict[str, int]] = dict
        self.windows: Callable[[], dict[str, Any]] = lambda: {}
        self.online_eval: Callable[[], dict[str, Any]] = dict  # streams/online_eval.py
        self.router: Callable[[], dict[str, Any]] = no_router_block  # streams/router_stats.py
        self.guard = OffsetGuard()  # outlives the agent instance: what was delivered before a restart still counts
        self.stalls = StallWatch(settings.tier3_stall_s)
        # work in flight per partition, and whether the agent waits for room (set by the agent)
        self.pending: Callable[[], Mapping[Any, int]] = dict
        self.blocked: Callable[[], bool] = lambda: False

    def status(self) -> dict[str, Any]:
        ts = self.teacher_stats
        now_ms = int(time.time() * 1000)
        out: dict[str, Any] = {
            "app": "tier3-worker",
            "worker_id": self.settings.worker_id,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "counts": dict(self.counts),
            "windows": self.windows(),
            "lag": {"experiences": self.lag()},
            "teacher": {"kind": self.teacher.kind, "model": self.teacher.model, "in_flight": ts.in_flight,
                        "calls": ts.calls, "errors": ts.errors, "error_rate": ts.error_rate,
                        "latency_ms_p50": ts.percentile_ms(0.50), "latency_ms_p95": ts.percentile_ms(0.95)},
            "dead_letters": {"count": self.counts["dead_lettered"], "by_reason": dict(self.dead_by_reason)},
            # holes in the delivered offsets recovered in place by a seek back (streams.inflight.OffsetGuard)
            "offset_guard": {"rewinds": self.guard.rewinds, "dropped_while_rewinding": self.guard.dropped,
                             "stalls_recovered": self.stalls.recovered},
            "trainer": self.trainer.block(now_ms),
            "router": None,
            "online_eval": self.online_eval(),
        }
        try:
            out["router"] = self.router()
        except Exception as exc:  # display-only statistics must not take /status down
            out["router"] = {"error": type(exc).__name__}
        return out


def faust_config(settings: StreamsSettings) -> dict[str, Any]:
    """The worker's Faust settings (also what ``bench/streams_bench.py`` gives its bare Faust agent)."""
    data_dir = settings.tier3_data_dir / "faust" / settings.worker_id
    data_dir.mkdir(parents=True, exist_ok=True)
    return dict(
        broker=settings.faust_broker_url(),
        broker_credentials=settings.faust_credentials(),
        store="memory://",  # the count table is display-only (docs/design.md); its changelog restores it
        datadir=str(data_dir),
        autodiscover=False,
        topic_partitions=settings.tier3_partitions,
        topic_replication_factor=settings.tier3_replication_factor,
        topic_disable_leader=True,
        processing_guarantee="at_least_once",  # never exactly_once: see docs/guarantees.md
        producer_acks=-1,  # Faust's producer writes only the table changelog; traces go through streams.delivery
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=settings.tier3_commit_interval_s,
        broker_session_timeout=settings.tier3_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.tier3_session_timeout_s / 3),
        web_host=settings.tier3_web_host,
        web_bind=settings.tier3_web_host,
        web_port=settings.tier3_web_port,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_router_enabled=False,
        web_tables_enabled=False,
        web_metrics_enabled=False,
        table_standby_replicas=0,
        consumer_max_fetch_size=settings.topic_max_message_bytes,  # per partition: the largest record fits
    )


def create_app(settings: StreamsSettings, teacher: Teacher | None = None) -> tuple[faust.App, WorkerState]:
    """Build the Faust app and its state. Topics must exist already (``streams.topics.ensure_topics``)."""
    teacher = teacher if teacher is not None else make_teacher(settings)
    state = WorkerState(settings, teacher)
    app = faust.App(settings.faust_app_id, **faust_config(settings))
    # raw bytes in: bad input must reach schemas.decode (and the dead letter) exactly as it was written
    experiences = app.topic(settings.experiences_topic, partitions=settings.tier3_partitions, key_type=bytes,
                            value_type=bytes, key_serializer="raw", value_serializer="raw")

    # Traces are counted where they are written: inside the experience's event, when its trace is acknowledged
    # (count_trace below), so the worker never reads enriched-traces back. The changelog partition of both tables is
    # the event's, the experience's partition number, which is also the trace's (traces keep their experience's
    # partition number): co-partitioned with the experiences the agent reads, as Faust requires.
    counts_table = app.Table(COUNT_TABLE, default=int, partitions=settings.tier3_partitions, key_type=str,
                             value_type=int)
    tally = WindowCounts(settings.tier3_window_s, keep_windows=settings.tier3_recent_windows + 1)
    state.windows = lambda: tally.view(counts_table, _assigned(app, settings.experiences_topic), time.time(),
                                       settings.tier3_recent_windows)
    state.lag = lambda: _lag(app, settings, state)

    # online evaluation of the served student (streams/online_eval.py): a table keyed by task, arm, model version,
    # window and partition; count_trace scores each shadow trace into it; a timer publishes closed windows
    ensure_topics(settings, [online_eval.changelog_spec(settings)])
    online_table = app.Table(online_eval.ONLINE_TABLE, default=dict, partitions=settings.tier3_partitions,
                             key_type=str)
    online = online_eval.install(app, settings, online_table, lambda: _assigned(app, settings.experiences_topic))
    state.online_eval = lambda: online.block(time.time())

    def count_trace(trace: EnrichedTrace, partition: int) -> None:
        """A trace was written to ``partition``: count it and score it (runs in the experience's event)."""
        now = time.time()
        online.observe_trace(trace, partition, now, now)
        due = tally.add(trace.task, partition, now, now, counts_table)
        if due is not None:
            counts_table[due[0]] = due[1]
            for old in tally.expired(partition, now, list(counts_table.keys())):
                del counts_table[old]

    # the router's per-arm statistics (streams/router_stats.py): a table over the experiences, fed by the
    # experiences agent; the promoted version, fed by the training-runs reader
    ensure_topics(settings, [router_stats.changelog_spec(settings)])
    router = router_stats.RouterStats(app, settings)
    state.router = router.block

    @app.agent(experiences, concurrency=1)
    async def process_experiences(stream: StreamT) -> None:
        # concurrency=1 on purpose: this one instance acknowledges in offset order (streams/inflight.py)
        await _process(app, stream.noack(), settings, state,  # type: ignore[attr-defined]
                       observers=[router.observe], guard=state.guard, on_trace=count_trace)

    @app.timer(settings.tier3_stall_s / 3)
    async def watch_stalls() -> None:
        await _watch_stalls(app, settings, state)

    @app.task
    async def follow_training_runs() -> None:
        await _follow_training_runs(settings, [state.trainer.apply, router.apply_run])

    @app.page("/status")
    async def status_view(web: Any, request: Any) -> Any:
        return web.json(state.status())

    registry = metrics.registry_for(state.status)

    @app.page("/metrics")
    async def metrics_view(web: Any, request: Any) -> Any:
        return web.text(generate_latest(registry).decode(), content_type=metrics.CONTENT_TYPE)

    # Faust mounts a placeholder index ({"status": "OK"}) at "/" when its statistics pages are off; the
    # dashboard replaces it
    faust_adapter.drop_production_index(app)

    @app.page("/")
    async def index_view(web: Any, request: Any) -> Any:
        page = STATIC_DIR / "dashboard.html"
        if page.is_file():
            return web.html(page.read_text(encoding="utf-8"))
        return web.json({"app": "tier3-worker", "views": ["/status", "/metrics"]})
    return app, state


def _assigned(app: faust.App, topic: str) -> set[int] | None:
    try:
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == topic}
    except Exception:  # not started yet
        return None


def _lag(app: faust.App, settings: StreamsSettings, state: WorkerState) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        assigned = sorted(tp for tp in app.consumer.assignment() if tp.topic == settings.experiences_topic)
    except Exception:  # not started yet
        return out
    committed = faust_adapter.committed_offsets(app)
    for tp in assigned:
        try:
            hw = app.consumer.highwater(tp)
        except Exception:
            continue
        if hw is None or hw < 0:
            continue
        pos = state.acked_offset.get(tp.partition)
        if pos is None:
            c = committed.get(tp)  # the group's committed offset: the next message to read
            pos = c if c is not None else 0
        out[str(tp.partition)] = max(0, hw - pos)
    return out


async def _watch_stalls(app: faust.App, settings: StreamsSettings, state: WorkerState) -> None:
    """One look of the stall watch (streams/stall.py): recover the stalled partitions in place."""
    topic = settings.experiences_topic
    try:
        assigned = frozenset(tp.partition for tp in app.consumer.assignment() if tp.topic == topic)
    except Exception:  # not started yet
        return
    now = time.monotonic()
    state.stalls.assigned(assigned, now)
    if not assigned or app.rebalancing or now - state.stalls.assigned_at < state.stalls.stall_s:
        return
    committed = {tp.partition: off for tp, off in faust_adapter.committed_offsets(app).items() if tp.topic == topic}
    try:
        marks = await asyncio.get_running_loop().run_in_executor(None, watermarks, settings, sorted(assigned))
    except Exception as exc:  # the broker away: the next look tries again
        log.debug("stall watch: no watermarks (%s)", type(exc).__name__)
        return
    high = {p: hi for p, (_lo, hi) in marks.items()}
    # nothing delivered here and nothing committed: the consumer starts at the log's start (auto.offset.reset)
    nxt = {p: state.guard.next_expected(p, committed.get(p)) for p in assigned}
    nxt = {p: marks[p][0] if n is None and p in marks else n for p, n in nxt.items()}
    pending = {int(p): n for p, n in state.pending().items()}
    for p in state.stalls.stalled(time.monotonic(), next_expected=nxt, high=high, pending=pending,
                                  blocked=state.blocked()):
        offset = state.guard.rewinding(p)  # a rewind in progress: seek to what the guard waits for
        offset = nxt[p] if offset is None else offset
        assert offset is not None
        log.warning("partition %d: %d record(s) from offset %d wait in the log and none was delivered for %.0f s "
                    "(fetcher state %s); resuming it and seeking back to %d in place", p, high[p] - offset, offset,
                    state.stalls.stall_s, faust_adapter.fetch_state(app, topic, p), offset)
        state.stalls.recovering(p, time.monotonic())
        try:
            await faust_adapter.unstick(app, topic, p, offset)
        except Exception as exc:  # revoked meanwhile: its new owner reads it from the committed offset
            log.warning("partition %d: the recovery failed (%s: %s)", p, type(exc).__name__, exc)


def watermarks(settings: StreamsSettings, partitions: Sequence[int]) -> dict[int, tuple[int, int]]:
    """The experiences topic's (low, high) watermarks per partition, asked of the broker."""
    c = kio.reader(settings, "stall-watch")
    try:
        return dict(kio.watermarks(c, settings.experiences_topic, list(partitions)))
    finally:
        c.close()


async def _process(app: faust.App, stream: StreamT, settings: StreamsSettings, state: WorkerState,
                   observers: Sequence[Callable[[Experience, int], None]] = (),
                   guard: OffsetGuard | None = None,
                   on_trace: Callable[[EnrichedTrace, int], None] | None = None) -> None:
    """Read experiences; start each one's work; acknowledge in order when its output is written.

    ``observers`` see every valid experience with its partition, inside that event's context (so a Faust table
    written there is co-partitioned with the experiences topic; a second agent on the same topic would share the
    messages' acknowledgements with this one and hold up its shutdown)."""
    slots = asyncio.Semaphore(settings.tier3_teacher_concurrency)
    counts = state.counts

    async def fatal(exc: BaseException) -> None:
        # e.g. a wrong API key: every experience would fail. Stop without acknowledging: the committed
        # offsets stay before the failed message, which is redelivered once the configuration is fixed.
        log.critical("stopping the worker: %s: %s", type(exc).__name__, redact(str(exc)))
        await app.crash(exc)

    def on_acked(_partition: Any, event: EventT) -> None:
        state.acked_offset[event.message.partition] = event.message.offset + 1

    out = DeliveryProducer(settings, client_id=f"tier3-worker-{settings.worker_id}")
    acker: InOrderAcker[EventT] = InOrderAcker(stream.ack, settings.max_pending, fatal, on_acked)
    acker_task = asyncio.ensure_future(acker.run())
    state.pending, state.blocked = acker.pending_by_partition, lambda: acker.full

    async def write_dead_letter(dl: DeadLetter, source: Source) -> None:
        # built to fit (schemas.kafka.dead_letters: bounded key, value within letter_budget). A write refused anyway (a
        # topic stricter than ours) is degraded: the letter without the original bytes (sha256, size and source
        # coordinates stay, to re-drive from the source), then the smallest letter; a transient failure (an
        # outage past librdkafka's own retries) is written again after a back-off, holding the partition's
        # slot. No message can make this fatal: only the cluster's answers (authorization, or even the
        # smallest letter refused) stop the worker, with nothing committed (docs/guarantees.md)
        key = source.dead_letter_key()
        letter = dl
        level = 0 if len(encode(dl)) <= letter_budget(settings.max_record_bytes, key) else 1
        if level:  # not built by dead_letter(): never hand the producer an oversize letter
            letter = fallbacks(dl, note="over the record limit")[level]
        attempt = 0
        while True:
            try:
                await (await out.send(settings.dead_letters_topic, key, encode(letter)))
                break
            except DeliveryError as exc:
                what = write_failure(exc.code)
                if what == "refused" and level < 2:
                    log.warning("dead letter for %s refused (%s); writing it again without the original bytes",
                                key.decode(errors="replace"), exc)
                    level += 1
                    letter = fallbacks(dl, note=f"first write refused: {exc}")[level]
                    continue
                if what != "transient":
                    raise
                attempt += 1
                wait_s = dl_backoff_s(attempt)
                log.warning("dead letter for %s not written (%s, attempt %d); again in %.1f s",
                            key.decode(errors="replace"), exc, attempt, wait_s)
                await asyncio.sleep(wait_s)
        dl = letter
        # acknowledged by the broker: only now may the source offset be committed
        counts["dead_lettered"] += 1
        state.dead_by_reason[dl.error_kind] += 1

    async def enrich_and_write(item: ToEnrich, raw: bytes, source: Source) -> None:
        async with slots:
            result = await enrich(item, raw, source, state.teacher, settings, state.teacher_stats)
        if isinstance(result, EnrichedTrace):
            value = encode(result)
            refused = (f"the trace is {len(value)} bytes, over the record limit of {settings.max_record_bytes}"
                       if len(value) > settings.max_record_bytes else None)
            if refused is None:
                try:  # same partition number as the experience: traces stay co-partitioned with their source
                    await (await out.send(settings.traces_topic, result.experience_id.encode(), value,
                                          source.partition))
                    counts["enriched"] += 1
                    if on_trace is not None:
                        try:  # the count and online tables: a failure there must not fail the trace
                            on_trace(result, source.partition)
                        except Exception:
                            log.exception("counting the trace of %s failed", result.experience_id)
                    return
                except DeliveryError as exc:
                    if not exc.too_large:  # e.g. the broker is away: fatal, redelivered after the restart
                        raise
                    refused = str(exc)
            result = dead_letter(raw, source, stage="publish", error_kind="trace_too_large", reason=refused,
                                 max_bytes=settings.max_record_bytes, experience_id=result.experience_id)
        await write_dead_letter(result, source)

    guard = guard or OffsetGuard()
    loop = asyncio.get_running_loop()

    def committed(partition: int) -> int | None:
        for tp, off in faust_adapter.committed_offsets(app).items():
            if tp.topic == settings.experiences_topic and tp.partition == partition:
                return off
        return None

    try:
        async for event in stream.events():
            msg = event.message
            state.stalls.delivered(msg.partition)
            if guard.stale(msg.partition, msg.offset):
                # fetched before a seek back: not processed, not acknowledged; it is delivered again. It moved the
                # fetcher's read offset past the hole, so seek back once more (faust_adapter.keep_rewinding)
                target = guard.rewinding(msg.partition)
                if target is not None:
                    with contextlib.suppress(Exception):  # revoked meanwhile: the new owner reads it
                        await faust_adapter.keep_rewinding(app, msg.topic, msg.partition, target)
                continue
            skipped_from = guard.check(msg.partition, msg.offset, committed)
            if skipped_from is not None:
                first = await loop.run_in_executor(None, first_record, settings, msg.topic, msg.partition,
                                                   skipped_from, msg.offset)
                if first is not None:
                    # never acknowledge past records that were not processed: re-read them in place
                    what = (f"partition {msg.partition}: records from {first} to {msg.offset - 1} were never "
                            f"delivered to the worker, which got offset {msg.offset} next")
                    try:
                        await faust_adapter.seek_back(app, msg.topic, msg.partition, first)
                    except Exception as exc:  # e.g. revoked meanwhile: stop, the restart re-reads them
                        await fatal(SkippedRecords(f"{what}; the seek back failed ({type(exc).__name__}: {exc}), "
                                                   "stopping before acknowledging anything after them"))
                        return
                    guard.rewind(msg.partition, first)
                    log.warning("%s; sought back to %d, nothing after it is acknowledged before it", what, first)
                    continue
                guard.accept(msg.partition, msg.offset)  # only markers, or records deleted by retention
            raw: bytes = msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b"")
            source = Source(msg.topic, msg.partition, msg.offset, msg.key)
            counts["consumed"] += 1
            try:
                decision = triage(raw, source, settings, observers)
            except Exception as exc:  # a bug must not stop the stream: dead-letter the message, say why
                log.exception("triage failed for %s/%s/%s", msg.topic, msg.partition, msg.offset)
                decision = dead_letter(raw, source, stage="decode", error_kind="internal",
                                       reason=f"{type(exc).__name__}: {exc}", max_bytes=settings.max_record_bytes)
            work: Any
            if decision is None:
                counts["not_sampled"] += 1
                work = None
            elif isinstance(decision, DeadLetter):
                work = write_dead_letter(decision, source)
            else:
                counts["sampled"] += 1
                work = enrich_and_write(decision, raw, source)
            await acker.add(msg.partition, event, work)
    finally:
        acker.cancel_all()
        acker_task.cancel()
        # what is queued is delivered if it can be (its source offsets are not acknowledged, so it may be
        # written again after the restart: at-least-once)
        await asyncio.get_running_loop().run_in_executor(None, out.flush, 5.0)


class SkippedRecords(Exception):
    """Faust delivered a later offset while records before it were never delivered, and the seek back to them
    failed (see OffsetGuard)."""


def first_record(settings: StreamsSettings, topic: str, partition: int, start: int, end: int) -> int | None:
    """The offset of the first record in ``[start, end)`` of one partition now (read_uncommitted, as the worker
    reads), or None when the range is only transaction markers or was deleted by retention."""
    c = kio.reader(settings, "offset-guard", **{"isolation.level": "read_uncommitted"})
    try:
        lo, hi = kio.watermarks(c, topic, [partition])[partition]
        start, end = max(start, lo), min(end, hi)
        if start >= end:
            return None
        for m in kio.iter_slice(c, topic, {partition: kio.Range(start, end)}, timeout_s=60):
            return int(m.offset() or 0)
        return None
    finally:
        c.close()


async def _follow_training_runs(settings: StreamsSettings, apply: Sequence[Callable[[TrainingRun], None]]) -> None:
    """Read training-runs and trainer-status (heartbeats) from the beginning, outside the consumer group: every
    worker sees every event, and hands each to every function of ``apply``: the one follower
    (:class:`schemas.kafka.follow.TopicFollower`, reconnecting after the retry policy's pause), its blocking reads on a
    thread of their own, ``apply`` on the event loop."""
    from concurrent.futures import ThreadPoolExecutor

    from schemas.kafka.follow import TopicFollower

    follower = TopicFollower(settings, [settings.training_runs_topic, settings.trainer_status_topic],
                             "worker-runs", missing="wait")
    reads = ThreadPoolExecutor(1, thread_name_prefix="tier3-runs-reader")
    try:
        while True:
            try:
                records = await asyncio.get_running_loop().run_in_executor(reads, follower.poll, 1.0)
                for rec in records:
                    try:
                        run = decode(rec.value() or b"", TrainingRun, max_bytes=settings.max_record_bytes)
                    except SchemaError as exc:  # not ours to dead-letter (the trainer owns the topic)
                        log.warning("skipping bad training-runs record at offset %s: %s", rec.offset(), exc)
                        continue
                    for fn in apply:
                        fn(run)
            except Exception as exc:
                log.warning("training-runs reader: %s: %s; retrying", type(exc).__name__, exc)
    finally:
        reads.submit(follower.close)  # after the read in flight, on the thread that reads
        reads.shutdown(wait=False)


__all__ = ["WorkerState", "changelog_spec", "create_app"]
