"""``tier3 demo``: the whole flywheel on this machine, with the shipped widget-selector example.

What it does, in order:

1. Kafka: brings up the local broker (``tier3 broker up``), unless ``KAFKA_BOOTSTRAP_SERVERS`` names a cluster;
   creates the four topics under a fresh prefix (``demo-<time>-<id>.``), so running it twice never mixes runs.
2. The student: ``TIER3_BASE_MODEL`` if set, else SmolLM2-135M-Instruct (``smollm2-135m``); a named model is
   pulled into the model cache once by ``tier3 models pull NAME`` (a subprocess: ``streams`` never imports
   ``trainer``), which prints its folder.
3. Starts ``tier3 worker`` (recorded teacher: ``examples/widget_selector/recorded_teacher.jsonl``) and
   ``tier3 trainer`` as subprocesses, each in its own process group with its log in the demo folder.
4. Publishes the example experiences through the capture library, spread over ``--publish-seconds``, as the
   production app would (each stamped with the time it is published).
5. Follows every stage by reading the topics (experiences, enriched-traces, dead-letters, training-runs), the
   trainer group's committed offsets and the worker's ``/status``, with one progress bar per stage.
6. When every sampled experience is enriched (or dead-lettered), every trace is inside a trained model (the
   trainer's committed offsets reach the end of enriched-traces) and every run has its verdict, it prints a
   summary table and the evaluation report's path, writes ``summary.json``, and stops what it started (unless
   ``--keep-running``: then it prints the status and dashboard URLs, which still answer). Ctrl-C at any point
   stops everything cleanly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas import DeadLetter, EnrichedTrace, Experience, TrainingRun, decode
from schemas import kafka_io as kio
from schemas.errors import SchemaError
from schemas.settings import KafkaSettings
from streams.errors import StreamsError
from streams.sampling import sample_reason

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "examples" / "widget_selector"
STAGES = ("published", "sampled", "enriched", "counted", "training", "evaluated", "promoted/rejected", "exported")
VERDICTS = ("promoted", "rejected")

console = Console()


class DemoError(Exception):
    """The demo cannot go on (missing example files, a process that died at start, ...)."""


# --------------------------------------------------------------------------------------------------- setup

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _available_commands() -> set[str]:
    """The ``tier3`` commands installed here (the trainer's arrive through an entry-point plugin)."""
    from streams.cli import app

    names: set[str] = set()
    for cmd in app.registered_commands:
        name = cmd.name or (cmd.callback.__name__.replace("_", "-") if cmd.callback else "")
        names.add(name)
    return names


def load_examples(path: Path, limit: int) -> list[Experience]:
    if not path.exists():
        raise DemoError(f"no example experiences at {path} (run examples/widget_selector/make_examples.py)")
    out = [decode(line, Experience) for line in path.read_bytes().splitlines() if line.strip()]
    return out[:limit] if limit > 0 else out


DEFAULT_STUDENT = "smollm2-135m"
#: model names `tier3 models pull` knows (``tier3 models list``); anything else is a local folder or a hub id
NAMED_STUDENTS = ("smollm2-135m", "tiny")


def student_name() -> str:
    return os.environ.get("TIER3_BASE_MODEL", "").strip() or DEFAULT_STUDENT


def build_student(log_path: Path, timeout_s: float = 1200.0) -> str:
    """The student's base model as the trainer will load it: a named model is pulled once into the model cache
    (``tier3 models pull NAME``, which prints its folder); a folder or a hub id is passed on as it is."""
    name = student_name()
    if name not in NAMED_STUDENTS:
        return name
    with log_path.open("ab") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "streams.cli", "models", "pull", name],
                                  stdout=subprocess.PIPE, stderr=log, timeout=timeout_s, check=False,
                                  cwd=str(REPO_ROOT))
        except subprocess.TimeoutExpired:
            raise DemoError(f"`tier3 models pull {name}` took over {timeout_s:.0f} s; see {log_path}") from None
    lines = proc.stdout.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise DemoError(f"`tier3 models pull {name}` failed (exit {proc.returncode}); see {log_path}")
    return lines[-1]


@dataclass
class Child:
    """A process the demo started, in its own process group (so Ctrl-C reaches the demo first, which then stops
    its children in order)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    exited_mono: float | None = None

    def alive(self) -> bool:
        if self.proc.poll() is None:
            return True
        if self.exited_mono is None:
            self.exited_mono = time.monotonic()
        return False

    def exited_for_s(self) -> float:
        """Seconds since the demo first saw this process gone (0 while it runs)."""
        return 0.0 if self.alive() or self.exited_mono is None else time.monotonic() - self.exited_mono

    def terminate(self) -> None:
        """SIGTERM the group without waiting (``stop`` waits)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the group (both the worker and the trainer shut down cleanly on it), SIGKILL after timeout."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # anything left in the group (a helper the child forked) goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _die_with_parent() -> Any:
    """A ``preexec_fn`` that makes the child get SIGTERM when the demo dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG); None elsewhere. libc is loaded here, in the parent, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return preexec


def start_child(name: str, args: list[str], env: dict[str, str], log_dir: Path, *, keep_running: bool = False
                ) -> Child:
    """``python -m streams.cli ARGS`` in its own session (Ctrl-C reaches the demo, which stops it in order); unless
    it is to outlive the demo (``--keep-running``), it also stops if the demo is killed outright."""
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=str(REPO_ROOT), preexec_fn=None if keep_running else _die_with_parent())
    log.close()  # the child holds its own descriptor
    return Child(name, proc, log_path)


# --------------------------------------------------------------------------------------------- monitoring

@dataclass
class RunInfo:
    run_id: str
    events: list[str] = field(default_factory=list)
    model_version: int | None = None
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
    heartbeat: TrainingRun | None = None
    traces_end: dict[int, int] = field(default_factory=dict)  # partition -> end offset (high watermark)
    committed: dict[int, int] = field(default_factory=dict)  # partition -> the trainer group's committed offset
    status: dict[str, Any] | None = None
    status_error: str | None = None
    errors: list[str] = field(default_factory=list)
    notes_live: list[str] = field(default_factory=list)  # what the demo itself did, for the event lines

    def runs_with(self, event: str) -> list[RunInfo]:
        return [r for r in self.runs.values() if event in r.events]

    @property
    def traces_committed(self) -> int:
        return sum(min(self.committed.get(p, 0), end) for p, end in self.traces_end.items())

    @property
    def traces_total(self) -> int:
        return sum(self.traces_end.values())

    def _windows(self) -> dict[Any, int]:
        """window start -> enriched traces counted in it (every window /status shows)."""
        w = (self.status or {}).get("windows") or {}
        wins: dict[Any, int] = {}
        for win in [*(w.get("recent") or []), *([w["current"]] if w.get("current") else [])]:
            wins[win.get("start_ms")] = int(sum(v for v in (win.get("by_task") or {}).values()
                                                if isinstance(v, (int, float))))
        return wins

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
TRANSIENT_KAFKA_ERRORS = frozenset({
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.NETWORK_EXCEPTION, KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._WAIT_COORD,
    KafkaError._MSG_TIMED_OUT, KafkaError._RESOLVE})
PROBE_GIVE_UP_S = 60.0  # a "transient" error that lasts this long is reported after all


def transient(exc: BaseException) -> bool:
    """Whether a Kafka client exception is worth retrying (see :data:`TRANSIENT_KAFKA_ERRORS`)."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if not isinstance(err, KafkaError):
        return False
    return bool(err.retriable()) or err.code() in TRANSIENT_KAFKA_ERRORS


class Monitor(threading.Thread):
    """Reads the four topics from the beginning, the trainer group's committed offsets and /status."""

    def __init__(self, settings: KafkaSettings, trainer_group: str, status_url: str, obs: Observed) -> None:
        super().__init__(name="tier3-demo-monitor", daemon=True)
        self.s, self.group, self.status_url, self.obs = settings, trainer_group, status_url, obs
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.probe_failing_since: float | None = None  # monotonic time of the first failure in a row
        self.probe_retries = 0  # transient probe failures, retried on the next probe (a second later)

    def make_probe(self) -> Consumer:
        """The committed-offsets probe: the trainer's group id, but it never subscribes, so it never joins."""
        return Consumer({**self.s.client_config(), "group.id": self.group, "enable.auto.commit": False})

    def run(self) -> None:
        conf = {**self.s.client_config(), "group.id": f"{self.s.tier3_topic_prefix}demo-monitor",
                "enable.auto.commit": False, "auto.offset.reset": "earliest", "isolation.level": "read_committed"}
        consumer = Consumer(conf)
        probe = self.make_probe()
        http = httpx.Client(timeout=2.0)
        try:
            topics = [self.s.experiences_topic, self.s.traces_topic, self.s.dead_letters_topic,
                      self.s.training_runs_topic, self.s.trainer_status_topic]
            md = consumer.list_topics(timeout=10)
            assignment = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics if t in md.topics
                          for p in md.topics[t].partitions]
            trace_parts = sorted(md.topics[self.s.traces_topic].partitions) if self.s.traces_topic in md.topics else []
            consumer.assign(assignment)
            next_probe = 0.0
            while not self.stop_event.is_set():
                for msg in consumer.consume(500, timeout=0.2):
                    err = msg.error()
                    if err is not None:
                        # transient ones (a broker reconnect) are the client's business; report what is not
                        if err.code() != KafkaError._PARTITION_EOF and not err.retriable():
                            self._error(f"monitor: {err}")
                        continue
                    self._apply(msg.topic() or "", msg.value() or b"")
                if time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + 1.0
                    self._probe(probe, trace_parts)
                    self._poll_status(http)
        except Exception as exc:  # the display must go on: say what broke
            self._error(f"monitor stopped: {exc!r}")
        finally:
            consumer.close()
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
        if ev.event == "heartbeat":
            self.obs.heartbeat = ev
            return
        run = self.obs.runs.setdefault(ev.run_id, RunInfo(ev.run_id, first_ms=ev.at_ms))
        run.events.append(ev.event)
        run.seen_mono.setdefault(ev.event, time.monotonic())
        if ev.model_version is not None:
            run.model_version = ev.model_version
        d = ev.details or {}
        if ev.event == "succeeded" and "evaluation" in (d.get("metrics") or {}):
            run.trainer_closes = True
        if ev.event == "evaluated":
            run.metrics = dict(d.get("metrics") or {})
            report = d.get("report")
            run.report = (report.get("report_md") if isinstance(report, dict) else None) or d.get("report_dir")
            if run.report and Path(run.report).is_dir() and (Path(run.report) / "report.md").exists():
                run.report = str(Path(run.report) / "report.md")
        if ev.event in VERDICTS:
            run.reasons = d.get("reasons")
        if ev.event == "exported":
            files = d.get("files") or {}
            paths = files.values() if isinstance(files, dict) else files if isinstance(files, list) else []
            run.exported = sorted(str(f.get("path") if isinstance(f, dict) else f) for f in paths
                                  if str(f.get("path") if isinstance(f, dict) else f).endswith(".gguf"))
            reg = d.get("ollama") or {}
            if isinstance(reg, dict):
                tags = ", ".join(reg.get("tags") or [])
                run.ollama = (f"registered as {tags}" if reg.get("registered")
                              else f"Ollama not reachable: {(reg.get('commands') or ['-'])[0]}")
        if ev.event == "failed":
            run.error = str(d.get("error") or d.get("reason") or "")[:300]

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


# ------------------------------------------------------------------------------------------------ display

class Display:
    """One progress bar per stage, plus a line of what is happening."""

    def __init__(self, n_examples: int, expected_sampled: int, have_worker: bool, have_trainer: bool) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description:>18}"), BarColumn(bar_width=36),
                                 MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                                 console=console, expand=False)
        self.tasks: dict[str, TaskID] = {}
        totals = {"published": n_examples, "sampled": expected_sampled, "enriched": expected_sampled,
                  "counted": expected_sampled, "training": None, "evaluated": None, "promoted/rejected": None,
                  "exported": None}
        for stage in STAGES:
            note = ""
            if not have_worker and stage in ("sampled", "enriched", "counted"):
                note = "[yellow]worker not installed"
            if not have_trainer and stage in ("training", "evaluated", "promoted/rejected", "exported"):
                note = "[yellow]trainer not installed"
            self.tasks[stage] = self.progress.add_task(stage, total=totals[stage], note=note)
        self.have_worker, self.have_trainer = have_worker, have_trainer
        self.line = ""
        self.last_events: list[str] = []

    def renderable(self) -> Group:
        return Group(self.progress, *(f"  [dim]{e}[/]" for e in self.last_events[-4:]))

    def text_line(self) -> str:
        """The bars as one line, for a log (CI) where a live display cannot redraw."""
        parts = []
        for stage in STAGES:
            t = self.progress.tasks[self.tasks[stage]]
            total = "?" if t.total is None else f"{t.total:.0f}"
            parts.append(f"{stage} {t.completed:.0f}/{total}")
        return " · ".join(parts)

    def update(self, published: int, obs: Observed, expected_sampled: int) -> None:
        p = self.progress
        p.update(self.tasks["published"], completed=published)
        if self.have_worker:
            counts = (obs.status or {}).get("counts") or {}
            sampled = int(counts.get("sampled", 0)) if obs.status else len(obs.trace_ids) + obs.dead_letters
            p.update(self.tasks["sampled"], completed=min(sampled, expected_sampled) if expected_sampled else sampled,
                     note=f"{counts.get('consumed', '?')} consumed, {counts.get('not_sampled', '?')} not sampled"
                     if obs.status else f"[yellow]/status: {obs.status_error or 'waiting'}")
            p.update(self.tasks["enriched"], completed=len(obs.trace_ids),
                     note=f"{obs.dead_letters} dead-lettered" if obs.dead_letters else "")
            p.update(self.tasks["counted"], completed=obs.counted(),
                     note=f"in {obs.windows_used()} windows of {obs.window_s()} s" if obs.status else "")
        if not self.have_trainer:
            return
        hb = obs.heartbeat
        total = obs.traces_total
        note = ""
        if hb is not None and hb.training_in_progress and hb.details.get("total_steps"):
            run_id = str(hb.details.get("run_id"))[:18]
            note = f"run {run_id}: step {hb.details.get('step')}/{hb.details['total_steps']}"
        elif hb is not None and hb.next_check_in_s is not None:
            note = (f"{hb.details.get('pending_traces', '?')} new traces waiting (>= "
                    f"{hb.details.get('min_traces', '?')} or {hb.next_check_in_s:.0f} s)")
        p.update(self.tasks["training"], total=max(total, 1), completed=obs.traces_committed,
                 note=(note + " · " if note else "") + "traces inside a trained model")
        ok = obs.runs_with("succeeded")
        evaluated = obs.runs_with("evaluated")
        verdicts = [r for r in obs.runs.values() if r.verdict]
        promoted = obs.runs_with("promoted")
        exported = obs.runs_with("exported")
        failed = obs.runs_with("failed")
        p.update(self.tasks["evaluated"], total=len(ok), completed=len(evaluated),
                 note=f"{len(ok)} runs succeeded" + (f", {len(failed)} failed" if failed else ""))
        p.update(self.tasks["promoted/rejected"], total=len(evaluated), completed=len(verdicts),
                 note=" · ".join(f"{_version(r)} {r.verdict}" for r in verdicts[-4:]))
        p.update(self.tasks["exported"], total=len(promoted), completed=len(exported),
                 note="" if promoted else "only promoted versions are exported")


def _version(run: RunInfo) -> str:
    return f"v{run.model_version}" if run.model_version is not None else run.run_id[:12]


# ---------------------------------------------------------------------------------------------- the demo

@dataclass
class DemoState:
    children: list[Child] = field(default_factory=list)
    closers: dict[str, Child] = field(default_factory=dict)  # run_id -> `tier3 close-loop` the demo started
    oneshots: list[Child] = field(default_factory=list)  # `tier3 train-now` requests
    forced: str | None = None  # the run `--promote` promoted by hand
    started_broker: bool = False
    broker_settings: Any = None
    monitor: Monitor | None = None


# Ctrl-C; a CI runner stopping the job; the terminal closing. SIGINT is here too, not left to Python's default:
# a process started with SIGINT ignored (any command run in the background of a non-interactive shell, as CI
# runners and `cmd &` do) inherits SIG_IGN, and Python then never installs its KeyboardInterrupt handler, so
# Ctrl-C (or `kill -INT`) was silently ignored and the demo ran to its end.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stop_signals_as_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP stop the demo: everything it started is stopped, whatever the demo inherited."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _say(text: str) -> None:
    """Print, unless the terminal is gone (SIGHUP): stopping the processes matters more than saying so."""
    with contextlib.suppress(OSError, ValueError):
        console.print(text)


def demo(
    examples: Annotated[int, typer.Option(help="publish only the first N example experiences (0 = all)")] = 0,
    publish_seconds: Annotated[float, typer.Option(help="spread publishing over this many seconds")] = 60.0,
    keep_running: Annotated[bool, typer.Option(help="leave the broker, worker and trainer running at the end")]
    = False,
    timeout_s: Annotated[float, typer.Option(help="give up waiting for the pipeline after this many seconds")]
    = 900.0,
    sample_rate: Annotated[float, typer.Option(help="hash-sampled share of experiences (TIER3_SAMPLE_RATE); "
                                               "higher than production's 0.15 so the short demo has data")] = 0.3,
    window_s: Annotated[int, typer.Option(help="tumbling count window (TIER3_WINDOW_S), short for the demo")] = 15,
    examples_file: Annotated[Path | None, typer.Option(help="Experience JSONL to publish")] = None,
    recorded_teacher: Annotated[Path | None, typer.Option(help="recorded teacher JSONL (the demo's teacher)")]
    = None,
    summary_json: Annotated[Path | None, typer.Option(help="also write the summary here (default: in the demo "
                                                      "folder)")] = None,
    eval_wait_s: Annotated[float, typer.Option(help="seconds to wait for the trainer's evaluation of a run "
                                               "before the demo runs `tier3 close-loop RUN_ID` itself")] = 30.0,
    export_wait_s: Annotated[float, typer.Option(help="seconds to wait for a promoted version's export")] = 600.0,
    promote: Annotated[bool, typer.Option(help="if the gate promotes no version (the tiny CPU student never earns "
                                          "it), promote the newest by hand and export it to GGUF, so the last "
                                          "stages run too (downloads llama.cpp's converter once, ~75 MB)")]
    = False,
) -> None:
    """Run the whole flywheel on this machine: broker, worker, trainer, the example traffic, every stage live."""
    examples_path = examples_file or EXAMPLES_DIR / "experiences.jsonl"
    recorded_path = recorded_teacher or EXAMPLES_DIR / "recorded_teacher.jsonl"
    state = DemoState()
    exit_code = 0
    completed = False  # only a demo that ran to its summary may leave things running (--keep-running)
    with _stop_signals_as_interrupt():
        try:
            exit_code = _run(state, examples_path, recorded_path, examples, publish_seconds, keep_running,
                             timeout_s, sample_rate, window_s, summary_json, eval_wait_s, export_wait_s, promote)
            completed = True
        except KeyboardInterrupt:
            _say("\n[yellow]interrupted: stopping everything the demo started…[/]")
            exit_code = 130
        except DemoError as exc:
            _say(f"[bold red]demo failed:[/] {exc}")
            exit_code = 1
        finally:
            # a second Ctrl-C (or SIGTERM) must not leave half-stopped processes behind: ignore them meanwhile
            old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
            try:
                _cleanup(state, keep_running and completed)
            finally:
                for sig, h in old.items():
                    signal.signal(sig, h)
    if exit_code:
        raise typer.Exit(exit_code)


def _cleanup(state: DemoState, keep_running: bool) -> None:
    if state.monitor is not None:
        state.monitor.stop_event.set()
        state.monitor.join(10)
    if keep_running:
        return
    children = [*state.oneshots, *state.closers.values(), *reversed(state.children)]  # trainer before worker
    for child in children:  # all asked at once: a loaded machine must not wait out each child's grace in turn
        if child.alive():
            _say(f"stopping {child.name} (pid {child.pid})")
            child.terminate()
    deadline = time.monotonic() + 30.0
    for child in children:
        child.stop(timeout_s=max(0.1, deadline - time.monotonic()))
    if state.started_broker:
        from streams import broker as broker_mod

        _say("stopping the local broker the demo started")
        broker_mod.down(state.broker_settings)


def _run(state: DemoState, examples_path: Path, recorded_path: Path, limit: int, publish_seconds: float,
         keep_running: bool, timeout_s: float, sample_rate: float, window_s: int, summary_json: Path | None,
         eval_wait_s: float, export_wait_s: float, promote: bool) -> int:
    from streams.client.capture import Capture, CaptureSettings
    from streams.topics import ensure_topics

    t_start = time.monotonic()
    experiences = load_examples(examples_path, limit)
    if not recorded_path.exists():
        raise DemoError(f"no recorded teacher answers at {recorded_path}")
    base = KafkaSettings()
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    prefix = f"{run_name}."
    demo_dir = (base.tier3_data_dir / "demo" / run_name).resolve()
    demo_dir.mkdir(parents=True, exist_ok=True)
    settings = base.model_copy(update={"tier3_topic_prefix": prefix, "tier3_data_dir": demo_dir})
    console.rule(f"[bold]tier3 demo[/] · {len(experiences)} widget-selector experiences over {publish_seconds:.0f} s")

    # 1. Kafka
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        console.print(f"Kafka: the configured cluster at [bold]{settings.kafka_bootstrap_servers}[/]")
    else:
        from streams import broker as broker_mod

        state.broker_settings = broker_mod.BrokerSettings()
        st = broker_mod.status(state.broker_settings)
        if st.running:  # ours from an earlier `tier3 broker up`, or another broker on that port: use it, leave it
            console.print(f"Kafka: a broker already answers at [bold]{st.bootstrap}[/]; using it")
        else:
            state.started_broker = True  # before up(): a Ctrl-C while it starts must still stop it
            with console.status("starting the local Kafka broker (the first time resolves its jars with Maven)…"):
                try:
                    st = broker_mod.up(state.broker_settings)
                except StreamsError as exc:
                    raise DemoError(f"the local broker did not start: {exc}") from None
            console.print(f"Kafka {st.version}: started a local broker at [bold]{st.bootstrap}[/]")
        settings = settings.model_copy(update={"kafka_bootstrap_servers": st.bootstrap})
    try:
        ensure_topics(settings)
    except (KafkaException, StreamsError) as exc:
        raise DemoError(f"cannot create the topics on {settings.kafka_bootstrap_servers}: {exc}. Check "
                        "KAFKA_BOOTSTRAP_SERVERS (and its SASL/SSL settings), or unset it to let the demo run the "
                        "local broker") from None
    console.print(f"topics: [bold]{prefix}[/]{{experiences, enriched-traces, dead-letters, training-runs}}")

    # which experiences the worker will sample: the same pure function it uses
    expected_sampled = sum(sample_reason(e.experience_id, e.confidence, rate=sample_rate) is not None
                           for e in experiences)
    commands = _available_commands()
    have_worker, have_trainer = "worker" in commands, "trainer" in commands
    missing = [c for c, ok in (("tier3 worker", have_worker), ("tier3 trainer", have_trainer)) if not ok]
    if missing:
        console.print(f"[yellow]not installed here: {', '.join(missing)} — those stages are skipped[/]")

    env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1"}
    web_port = _free_port()
    status_url = f"http://127.0.0.1:{web_port}/status"
    trainer_group = f"{prefix}trainer"

    # 2. the student, 3. the processes
    student = None
    closer_env: dict[str, str] | None = None
    train_now_env: dict[str, str] | None = None
    train_now_requested: set[int] = set()
    if have_trainer:
        with console.status(f"getting the student base model {student_name()} (`tier3 models pull`, cached after "
                            "the first time)…"):
            student = build_student(demo_dir / "student-build.log")
        console.print(f"student base model: [bold]{student_name()}[/] ({student})")
    if have_worker:
        worker_env = {**env, "TIER3_TEACHER": "recorded", "TIER3_TEACHER_RECORDED_PATH": str(recorded_path.resolve()),
                      "TIER3_WEB_HOST": "127.0.0.1", "TIER3_WEB_PORT": str(web_port),
                      "TIER3_WORKER_ID": f"{run_name}-worker", "TIER3_SAMPLE_RATE": str(sample_rate),
                      "TIER3_WINDOW_S": str(window_s), "TIER3_RECENT_WINDOWS": "40"}
        state.children.append(start_child("worker", ["worker"], worker_env, demo_dir, keep_running=keep_running))
    if have_trainer:
        assert student is not None
        # Two runs in a typical demo, so the flywheel shows two model versions: the first by count when just over
        # half the traces are there; the rest can then never reach the count, so the second is the demo's
        # `tier3 train-now` once every trace is in (the manual trigger). The check interval is only a fallback
        # and long on purpose: right after a run it has always passed, and a short one would start a run for
        # every trace that trickles in meanwhile.
        # A real student on CPU (SmolLM2) trains once, on every trace, when all are in: two runs would not fit
        # the demo's 20 minutes on 2 cores. The tiny test student trains twice.
        tiny_student = student_name() == "tiny"
        min_traces = max(8, expected_sampled // 2 + 1) if tiny_student else expected_sampled + 1
        overrides: dict[str, str] = {}
        if tiny_student:
            # the random-weight student never stops: bound its evaluation; batches of 4 keep its many tiny
            # steps few (the defaults are for real students)
            overrides = {k: v for k, v in (("TIER3_EVAL_MAX_NEW_TOKENS", "128"), ("TIER3_BATCH_SIZE", "4"))
                         if not os.environ.get(k)}
        if not tiny_student and not os.environ.get("TIER3_PHASES"):
            # one epoch, answer-only: ~150 traces x ~3 s a step on 2 CPU cores fit the demo's 20 minutes; the
            # product default (answer:2) takes twice as long and learns more
            overrides["TIER3_PHASES"] = "answer:1"
        console.print(f"demo training: {'two runs' if tiny_student else 'one run, on every trace, when all are in'}"
                      f", curriculum {overrides.get('TIER3_PHASES') or os.environ.get('TIER3_PHASES') or 'default'}; "
                      "the gate keeps the product's thresholds (docs/settings.md)")
        trainer_env = {**env, **overrides, "TIER3_BASE_MODEL": student, "TIER3_TRAINER_GROUP": trainer_group,
                       "TIER3_MIN_TRACES": str(min_traces),
                       "TIER3_CHECK_INTERVAL_S": str(publish_seconds + 90.0),
                       "TIER3_TRAINER_STATUS_INTERVAL_S": "1", "TIER3_TRAINER_BACKOFF_INITIAL_S": "2",
                       "TIER3_TRAINER_BACKOFF_MAX_S": "10"}
        state.children.append(start_child("trainer", ["trainer"], trainer_env, demo_dir, keep_running=keep_running))
        if "close-loop" in commands:
            closer_env = trainer_env
        if "train-now" in commands:
            train_now_env = trainer_env
    for child in state.children:
        console.print(f"started {child.name} (pid {child.pid}), log: {child.log_path}")
    if have_worker:
        console.print(f"status: [bold]{status_url}[/]   dashboard: [bold]http://127.0.0.1:{web_port}/[/]")

    obs = Observed()
    state.monitor = Monitor(settings, trainer_group, status_url, obs)
    state.monitor.start()
    display = Display(len(experiences), expected_sampled, have_worker, have_trainer)

    # 4. publish, 5. follow
    capture = Capture(CaptureSettings.model_validate(settings.model_dump()))
    told: set[tuple[str, int]] = set()
    deadline = time.monotonic() + publish_seconds + timeout_s
    done_reason = "timed out"
    next_line, last_line = 0.0, ""
    # a live display redraws in a terminal; in a log (CI) it would print only at the end: lines instead
    live_ctx = Live(display.renderable(), console=console, refresh_per_second=4, transient=False) \
        if console.is_terminal else contextlib.nullcontext()
    with live_ctx as live:
        t0 = time.monotonic()
        i = 0
        while True:
            now = time.monotonic()
            # publish the ones that are due: evenly spread over publish_seconds
            due = len(experiences) if publish_seconds <= 0 else int(len(experiences) * (now - t0) / publish_seconds)
            while i < min(due, len(experiences)):
                e = experiences[i]
                capture.publish(e.model_copy(update={"created_at_ms": int(time.time() * 1000)}))
                i += 1
            if i == len(experiences):
                capture.flush(0)
            for child in state.children:
                if not child.alive():
                    raise DemoError(f"{child.name} exited with code {child.proc.returncode}; its log "
                                    f"({child.log_path}) ends with:\n{child.log_tail()}")
            with state.monitor.lock:
                display.update(capture.stats().delivered, obs, expected_sampled)
                _narrate(display, obs, told)
                _start_closers(obs, state.closers, closer_env, demo_dir, eval_wait_s)
                _maybe_train_now(obs, expected_sampled, train_now_env, demo_dir, train_now_requested, state.oneshots)
                finished, why = _finished(obs, i == len(experiences), capture.stats().delivered, len(experiences),
                                          expected_sampled, have_worker, have_trainer, state.closers, eval_wait_s,
                                          export_wait_s)
                line = display.text_line()
                # in a log: a line when something moved (at most every 2 s), else one every 30 s as a heartbeat
                if not console.is_terminal and (time.monotonic() >= next_line + 28.0
                                                or (line != last_line and time.monotonic() >= next_line)):
                    next_line, last_line = time.monotonic() + 2.0, line
                    console.print(line)
                if finished and promote and not state.forced and closer_env is not None:
                    finished = not _force_promote(obs, state, closer_env, demo_dir)
            if live is not None:
                live.update(display.renderable())
            if finished:
                done_reason = why
                break
            if now > deadline:
                break
            time.sleep(0.25)
        capture.close()
        display.update(capture.stats().delivered, obs, expected_sampled)
        if live is not None:
            live.update(display.renderable())
        else:
            console.print(display.text_line())

    # 6. summary
    with state.monitor.lock:
        summary = _summary(obs, settings, run_name, demo_dir, status_url, trainer_group, len(experiences),
                           capture.stats().as_dict(), expected_sampled, state, done_reason, missing,
                           time.monotonic() - t_start, keep_running, have_worker)
    _print_summary(summary, obs)
    path = summary_json or demo_dir / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    if path != demo_dir / "summary.json":
        (demo_dir / "summary.json").write_bytes(path.read_bytes())
    console.print(f"summary: {path}")
    if keep_running:
        pids = ", ".join(f"{c.name} {c.pid}" for c in state.children)
        console.print(f"[bold]still running[/] ({pids}); stop them with `kill <pid>`"
                      + (" and the broker with `tier3 broker down`" if state.started_broker else ""))
    return 0 if done_reason == "complete" else 1


def _narrate(display: Display, obs: Observed, told: set[tuple[str, int]]) -> None:
    """One line per lifecycle event, each once (also what a log without a terminal shows)."""
    for n, note in enumerate(obs.notes_live):
        if ("demo", n) not in told:
            told.add(("demo", n))
            display.last_events.append(f"demo: {note}")
            if not console.is_terminal:
                console.print(f"demo: {note}")
    for r in sorted(obs.runs.values(), key=lambda x: x.first_ms):
        for n, ev in enumerate(r.events):
            if (r.run_id, n) in told:
                continue
            told.add((r.run_id, n))
            text = f"{r.run_id[:24]}: {_version(r)} {ev}"
            if ev == "evaluated" and r.metrics:
                text += " · " + ", ".join(f"{k} {v:.2f}" for k, v in _headline_metrics(r.metrics).items())
            if ev in VERDICTS and r.reasons:
                text += f" · {'; '.join(map(str, r.reasons))[:160]}" if isinstance(r.reasons, list) else ""
            if ev == "failed" and r.error:
                text += f" · {r.error[:100]}"
            display.last_events.append(text)
            if not console.is_terminal:
                console.print(text)


def _headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    flat: dict[str, float] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"{prefix}{k}"] = float(v)

    walk(metrics, "")
    wanted = ("json_valid_rate", "schema_valid_rate", "f1", "field_f1", "exact_match", "baseline_f1",
              "baseline_field_f1", "latency_ms_p95")
    out = {}
    for w in wanted:
        for k, v in flat.items():
            if k == w or k.endswith("." + w):
                out[k] = v
                break
    return out


def _finished(obs: Observed, all_published: bool, delivered: int, n: int, expected_sampled: int,
              have_worker: bool, have_trainer: bool, closers: dict[str, Child], eval_wait_s: float,
              export_wait_s: float) -> tuple[bool, str]:
    """Is every stage done? Every sampled experience enriched or dead-lettered, every trace inside a trained model
    (committed), and every run through its close-the-loop steps (see :func:`_run_pending`)."""
    if not all_published or delivered < n:
        return False, ""
    if not have_worker:
        return True, "complete"
    if len(obs.trace_ids) + obs.dead_letters < expected_sampled:
        return False, ""
    if not have_trainer:
        return True, "complete"
    # (the offsets probe runs every second: until it has seen every trace the consumer read, it is stale)
    if obs.traces_total == 0 or obs.traces_total < obs.trace_messages or obs.traces_committed < obs.traces_total:
        return False, ""
    if any(_run_pending(r, closers.get(r.run_id), eval_wait_s, export_wait_s) for r in obs.runs.values()):
        return False, ""
    hb = obs.heartbeat
    if hb is not None and hb.training_in_progress:
        return False, ""
    return True, "complete"


def _run_pending(r: RunInfo, closer: Child | None, eval_wait_s: float, export_wait_s: float) -> bool:
    """Is this run still on its way? started -> succeeded|failed -> evaluated -> promoted|rejected -> exported
    (when promoted). The trainer, or the demo's ``tier3 close-loop`` (``closer``) when the trainer sends no
    evaluation, takes the later steps; each wait is bounded, so a missing step ends in a note, not a hang."""
    if "started" in r.events and not {"succeeded", "failed"} & set(r.events):
        return True  # still training
    if "succeeded" not in r.events:
        return False
    if closer is not None and closer.alive():
        return True
    if "evaluated" not in r.events:
        since, bound = r.seen_mono["succeeded"], eval_wait_s
    elif r.verdict is None:
        since, bound = r.seen_mono["evaluated"], eval_wait_s
    elif r.verdict == "promoted" and "exported" not in r.events:
        since, bound = r.seen_mono["promoted"], export_wait_s
    else:
        return False
    if closer is not None:
        return closer.exited_for_s() < 10.0  # it just finished: its events may still be on their way to us
    if r.trainer_closes:  # the trainer's gate and export follow its commit: give them the export's time
        bound = max(bound, export_wait_s)
    return time.monotonic() - since < bound


def _maybe_train_now(obs: Observed, expected_sampled: int, env: dict[str, str] | None, log_dir: Path,
                     requested: set[int], oneshots: list[Child]) -> None:
    """Once every sampled experience is enriched, ask the trainer for a run over the traces it has not trained on
    (``tier3 train-now``, the manual trigger) instead of waiting for its check interval."""
    if env is None or len(obs.trace_ids) + obs.dead_letters < expected_sampled:
        return
    total = obs.traces_total
    if total < obs.trace_messages:  # the offsets probe (every second) has not caught up with the consumer yet
        return
    if total == 0 or obs.traces_committed >= total or total in requested:
        return
    hb = obs.heartbeat
    if hb is None or hb.training_in_progress:
        return
    # only once the trainer has read every trace it has not trained on (else the run would take a few of them
    # and the rest would wait for the next trigger)
    if int(hb.details.get("pending_messages") or 0) < total - obs.traces_committed:
        return
    if any("started" in r.events and not {"succeeded", "failed"} & set(r.events) for r in obs.runs.values()):
        return
    requested.add(total)
    oneshots.append(start_child(f"train-now-{len(requested)}", ["train-now"], env, log_dir))
    display_note = f"all {len(obs.trace_ids)} traces are in: `tier3 train-now` for the ones not yet trained"
    obs.notes_live.append(display_note)


def _force_promote(obs: Observed, state: DemoState, env: dict[str, str], log_dir: Path) -> bool:
    """``--promote``: when no version earned a promotion, promote the newest evaluated one by hand (``tier3 promote
    --force``, as an operator would) and export it (``tier3 export``), so the last stages run too. True if it
    started."""
    if any(r.verdict == "promoted" for r in obs.runs.values()):
        return False
    evaluated = sorted((r for r in obs.runs.values() if "evaluated" in r.events), key=lambda r: r.first_ms)
    if not evaluated:
        return False
    run = evaluated[-1]
    state.forced = run.run_id
    cli = [sys.executable, "-m", "streams.cli"]
    script = (f"{shlex.join([*cli, 'promote', run.run_id, '--force', '--reason', 'tier3 demo --promote'])} && "
              f"{shlex.join([*cli, 'export', run.run_id])}")
    log_path = log_dir / f"promote-{_version(run)}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(["/bin/sh", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(REPO_ROOT))
    state.closers[run.run_id] = Child(f"promote-{_version(run)}", proc, log_path)
    obs.notes_live.append(f"--promote: promoting {_version(run)} by hand (`tier3 promote --force`) and exporting it")
    return True


def _start_closers(obs: Observed, closers: dict[str, Child], env: dict[str, str] | None, log_dir: Path,
                   eval_wait_s: float) -> None:
    """``tier3 close-loop RUN_ID`` (evaluation, the gate's verdict, export when promoted) for each run that
    succeeded ``eval_wait_s`` ago with no ``evaluated`` event: a trainer that does not close the loop itself."""
    if env is None:
        return
    for r in obs.runs.values():
        if ("succeeded" in r.events and "evaluated" not in r.events and r.run_id not in closers
                and not r.trainer_closes and time.monotonic() - r.seen_mono["succeeded"] >= eval_wait_s):
            closers[r.run_id] = start_child(f"close-loop-{_version(r)}", ["close-loop", r.run_id], env, log_dir)


def _summary(obs: Observed, settings: KafkaSettings, run_name: str, demo_dir: Path, status_url: str,
             trainer_group: str, n: int, capture_stats: dict[str, int], expected_sampled: int, state: DemoState,
             done_reason: str, missing: list[str], wall_s: float, keep_running: bool, have_worker: bool
             ) -> dict[str, Any]:
    runs = sorted(obs.runs.values(), key=lambda r: r.first_ms)
    reports = [r.report for r in runs if r.report]
    notes = []
    closed_by_demo = [_version(r) for r in runs if r.run_id in state.closers and r.run_id != state.forced]
    if state.forced:
        forced = obs.runs.get(state.forced)
        notes.append(f"--promote: {_version(forced) if forced else state.forced} was promoted by hand "
                     f"(`tier3 promote --force`), not by the gate; log: {state.closers[state.forced].log_path}")
    if closed_by_demo:
        notes.append(f"the trainer sent no evaluation for {', '.join(closed_by_demo)}: the demo ran "
                     "`tier3 close-loop RUN_ID` (evaluation, gate, export) itself")
    unevaluated = [_version(r) for r in runs if "succeeded" in r.events and "evaluated" not in r.events]
    if unevaluated:
        logs = ", ".join(str(state.closers[r.run_id].log_path) for r in runs if r.run_id in state.closers)
        notes.append(f"no `evaluated` event for {', '.join(unevaluated)}"
                     + (f" (see {logs})" if logs else " and no `tier3 close-loop` command here"))
    promoted_not_exported = [_version(r) for r in runs if r.verdict == "promoted" and "exported" not in r.events]
    if promoted_not_exported:
        notes.append(f"promoted but not exported (yet): {', '.join(promoted_not_exported)}")
    counts = (obs.status or {}).get("counts") or {}
    return {
        "result": done_reason,
        "run_name": run_name,
        "topic_prefix": settings.tier3_topic_prefix,
        "bootstrap": settings.kafka_bootstrap_servers,
        "demo_dir": str(demo_dir),
        "status_url": status_url if have_worker else None,
        "dashboard_url": status_url.removesuffix("status") if have_worker else None,
        "wall_s": round(wall_s, 1),
        "missing": missing,
        "published": capture_stats,
        "experiences_in_log": obs.experiences,
        "expected_sampled": expected_sampled,
        "worker_counts": counts,
        "traces": {"distinct": len(obs.trace_ids), "messages": obs.trace_messages},
        "counted_in_windows": obs.counted(),
        "dead_letters": {"count": obs.dead_letters, "by_reason": obs.dead_by_reason},
        "trainer_group": trainer_group,
        "offsets": {"topic": settings.traces_topic, "end": {str(p): o for p, o in sorted(obs.traces_end.items())},
                    "committed": {str(p): o for p, o in sorted(obs.committed.items())},
                    "all_committed": bool(obs.traces_end) and obs.traces_committed == obs.traces_total},
        "runs": [{"run_id": r.run_id, "model_version": r.model_version, "events": r.events, "verdict": r.verdict,
                  "metrics": r.metrics, "report": r.report, "reasons": r.reasons, "error": r.error,
                  "gguf": r.exported, "ollama": r.ollama} for r in runs],
        "evaluation_report": reports[-1] if reports else None,
        "processes": [{"name": c.name, "pid": c.pid, "log": str(c.log_path)}
                      for c in [*state.children, *state.closers.values()]],
        "kept_running": keep_running,
        "errors": obs.errors,
        "notes": notes,
    }


def _print_summary(s: dict[str, Any], obs: Observed) -> None:
    table = Table(title="tier3 demo: summary", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("result", justify="right")
    table.add_column("detail")
    pub = s["published"]
    table.add_row("published", str(pub.get("delivered", 0)), f"of {pub.get('sent', 0)} sent; "
                  f"{pub.get('dropped', 0)} dropped, {pub.get('failed', 0)} failed")
    wc = s["worker_counts"]
    table.add_row("sampled", str(wc.get("sampled", "?")), f"expected {s['expected_sampled']} "
                  f"(hash share + confidence > 0.8); {wc.get('not_sampled', '?')} not sampled")
    table.add_row("enriched", str(s["traces"]["distinct"]), f"{s['traces']['messages']} trace messages (recorded "
                  "teacher)")
    table.add_row("dead letters", str(s["dead_letters"]["count"]),
                  ", ".join(f"{k} {v}" for k, v in s["dead_letters"]["by_reason"].items()) or "-")
    table.add_row("counted", str(s["counted_in_windows"]), "enriched traces in the worker's tumbling windows")
    off = s["offsets"]
    table.add_row("committed", f"{sum(min(off['committed'].get(p, 0), e) for p, e in off['end'].items())}"
                  f"/{sum(off['end'].values())}", "traces inside a trained model (trainer group's offsets)")
    for r in s["runs"]:
        m = _headline_metrics(r["metrics"])
        detail = ", ".join(f"{k} {v:.2f}" for k, v in m.items()) or (r["error"] or "")
        table.add_row(f"run {r['model_version'] if r['model_version'] is not None else '?'}",
                      r["verdict"] or r["events"][-1] if r["events"] else "-", detail)
        if "exported" in r["events"]:
            table.add_row("exported", str(len(r["gguf"])) + " GGUF", "\n".join([*r["gguf"], r["ollama"] or ""]))
    console.print(table)
    if s["result"] != "complete":
        console.print(f"[yellow]the pipeline did not finish: {s['result']}[/]")
    if s["missing"]:
        console.print(f"[yellow]not installed: {', '.join(s['missing'])}[/]")
    for e in [*s["notes"], *s["errors"]]:
        console.print(f"[yellow]{e}[/]")
    console.print(f"evaluation report: [bold]{s['evaluation_report'] or '(none yet)'}[/]")
    # the URLs only while they answer: printed at the start when the worker started, and here only when it keeps
    # running (without --keep-running the worker is stopped right after this summary)
    if s["status_url"] and s["kept_running"]:
        console.print(f"status: [bold]{s['status_url']}[/]   dashboard: [bold]{s['dashboard_url']}[/] "
                      "(the worker keeps running)")
    console.print(f"logs and state: {s['demo_dir']}")
