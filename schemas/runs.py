"""The ``training-runs`` log read back: typed event details and the one fold of the lifecycle events.

Every reader of the log (the trainer's promotion gate, serve and online watch, the router in the application, the
worker's /status trainer block, the demo's monitor) folds the same events with :class:`RunsFold`, so they agree on
which model is in force, which runs were evaluated, exported, promoted or rolled back, and what each run went
through. The fold is pure (no I/O, no clock) and ignores heartbeats (they belong to the trainer, not to a run).

The promotion rule of the log:

- ``promoted`` puts its run on top of the stack of promotions (a repeat moves it to the top);
- ``rollback`` removes its run from the stack; the model in force is the top of the stack (none: the teacher).

A ``rollback`` event names the rolled-back run, but its ``model_version`` is the version in force *after* it (None:
the teacher), so it never changes which version a run record shows.

Typed details: :class:`~schemas.messages.TrainingRun` keeps ``details`` as a free-form object on the wire (records
already in the topic decode unchanged); :func:`run_details` reads it as the model of its event kind (a pydantic
discriminated union on ``kind``). Every field is optional and unknown fields are kept, so old and new writers both
read; a ``details`` that does not fit its model (a field of the wrong type) reads as that model's defaults.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from schemas.messages import TrainingRun

#: the events that belong to a run, in the order they usually happen (heartbeats are the trainer's, not a run's)
LIFECYCLE = ("started", "succeeded", "failed", "evaluated", "promoted", "rejected", "exported", "rollback")

# ------------------------------------------------------------------------------------------- typed details


class _Details(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class StartedDetails(_Details):
    """The batch a run trains on (``trainer.protocol.Batch.describe``)."""

    kind: Literal["started"] = "started"
    offsets: dict[str, list[int]] = Field(default_factory=dict)  # partition -> [start, end)
    n_messages: int | None = None
    n_unique: int | None = None
    n_new: int | None = None
    n_bad: int | None = None
    trigger: str | None = None
    attempt: int | None = None


class SucceededDetails(_Details):
    """A committed run: where it lives and its manifest's metrics (``metrics["evaluation"]`` when the trainer
    evaluated it before the commit)."""

    kind: Literal["succeeded"] = "succeeded"
    run_dir: str | None = None
    adapter_dir: str | None = None
    manifest: str | None = None
    dataset_sha256: str | None = None
    n_train: int | None = None
    n_holdout: int | None = None
    n_unique: int | None = None
    offsets: dict[str, list[int]] = Field(default_factory=dict)
    backend: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    trigger: str | None = None
    attempt: int | None = None

    @property
    def evaluated_by_trainer(self) -> bool:
        """The trainer evaluated the run inside its commit (the close loop runs in the trainer)."""
        return "evaluation" in self.metrics


class FailedDetails(_Details):
    kind: Literal["failed"] = "failed"
    error: Any = None
    error_type: str | None = None
    reason: Any = None
    retryable: bool | None = None
    retry_in_s: float | None = None

    @property
    def message(self) -> str | None:
        """What went wrong, at most 300 characters (None: nothing said)."""
        return str(self.error or self.reason or "")[:300] or None


class EvaluatedDetails(_Details):
    """A holdout evaluation: its metrics and the report folder. (Older writers sent ``report`` as an object with
    ``report_md``.)"""

    kind: Literal["evaluated"] = "evaluated"
    metrics: dict[str, Any] = Field(default_factory=dict)
    report_dir: str | None = None
    report: dict[str, Any] | None = None

    @property
    def report_path(self) -> str | None:
        """The report's markdown file if the event names it, else the report folder."""
        md = self.report.get("report_md") if self.report else None
        return str(md) if md else self.report_dir


class VerdictDetails(_Details):
    """The gate's ``promoted`` / ``rejected``: every check, the failed ones as reasons."""

    kind: Literal["promoted", "rejected"] = "promoted"
    reasons: list[str] | None = None
    checks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    rule_passed: bool | None = None
    forced: bool | None = None
    previous_run_id: str | None = None
    previous_version: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class OllamaRegistration(_Details):
    registered: bool = False
    host: str | None = None
    tags: list[str] = Field(default_factory=list)
    modelfile: str | None = None
    commands: list[str] = Field(default_factory=list)  # what to run by hand when no server answered


class ExportedDetails(_Details):
    """An export: the GGUF files (``files``: quantisation -> file info with ``path``; older writers sent a list of
    paths) and the Ollama registration."""

    kind: Literal["exported"] = "exported"
    merged_dir: str | None = None
    files: dict[str, Any] | list[Any] = Field(default_factory=dict)
    gguf: dict[str, Any] = Field(default_factory=dict)
    ollama: OllamaRegistration | None = None
    converter: str | None = None
    pre_tokenizer: str | None = None

    def paths(self) -> list[str]:
        items = self.files.values() if isinstance(self.files, dict) else self.files
        return [str(f.get("path") if isinstance(f, dict) else f) for f in items]

    @property
    def gguf_paths(self) -> list[str]:
        return sorted(p for p in self.paths() if p.endswith(".gguf"))


class RollbackDetails(_Details):
    kind: Literal["rollback"] = "rollback"
    reason: str | None = None
    why: str | None = None
    rolled_back_version: int | None = None
    restored_run_id: str | None = None
    restored_version: int | None = None


class HeartbeatDetails(_Details):
    kind: Literal["heartbeat"] = "heartbeat"
    trainer_id: str | None = None


AnyDetails = (StartedDetails | SucceededDetails | FailedDetails | EvaluatedDetails | VerdictDetails
              | ExportedDetails | RollbackDetails | HeartbeatDetails)
RunDetails = Annotated[AnyDetails, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(RunDetails)
_BY_KIND: dict[str, type[_Details]] = {
    "started": StartedDetails, "succeeded": SucceededDetails, "failed": FailedDetails,
    "evaluated": EvaluatedDetails, "promoted": VerdictDetails, "rejected": VerdictDetails,
    "exported": ExportedDetails, "rollback": RollbackDetails, "heartbeat": HeartbeatDetails}


def run_details(run: TrainingRun) -> AnyDetails:
    """``run.details`` as the model of its event kind (one of :data:`RunDetails`); never raises."""
    raw = run.details if isinstance(run.details, dict) else {}
    try:
        out: AnyDetails = _ADAPTER.validate_python({**raw, "kind": run.event})
    except ValidationError:
        out = _BY_KIND[run.event](kind=run.event)  # type: ignore[assignment]
    return out


def metrics_of(run: TrainingRun | None) -> dict[str, Any]:
    """The metrics an ``evaluated`` (or verdict, succeeded) event carries; {} for None or none."""
    if run is None:
        return {}
    metrics = getattr(run_details(run), "metrics", None)
    return dict(metrics) if isinstance(metrics, dict) else {}


# ------------------------------------------------------------------------------------------- the fold


@dataclass
class RunRecord:
    """What the log says about one run (one record per run, however many events)."""

    run_id: str
    first_ms: int
    last_ms: int
    model_version: int | None = None
    stages: dict[str, int] = field(default_factory=dict)  # event -> at_ms of its first occurrence
    events: int = 0
    last_event: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # the latest `evaluated` event's metrics
    verdict: str | None = None  # promoted | rejected (the latest)
    rolled_back: bool = False  # promoted, then withdrawn by a rollback (and not promoted again)
    error: str | None = None
    reasons: list[str] | None = None  # the latest verdict's reasons
    report: str | None = None  # the latest evaluation's report (markdown file or folder)
    exported: list[str] = field(default_factory=list)  # the latest export's GGUF files
    ollama: OllamaRegistration | None = None  # the latest export's registration
    evaluated_by_trainer: bool = False  # a `succeeded` event carried the evaluation (the trainer closes the loop)


class RunsFold:
    """The one fold of ``training-runs``. ``apply`` each event in log order (the topic has one partition).

    ``max_runs`` bounds what is kept per run (the oldest-seen runs are forgotten first; None: every run, as the
    gate needs). The promotion stack, ``max_version`` and the totals always cover every event.
    """

    def __init__(self, max_runs: int | None = None) -> None:
        self.max_runs = max_runs
        self.runs: OrderedDict[str, RunRecord] = OrderedDict()  # first seen first (the topic's order)
        self.evaluated: dict[str, TrainingRun] = {}  # run_id -> its latest evaluated event
        self.succeeded: dict[str, TrainingRun] = {}
        self.exported: dict[str, TrainingRun] = {}
        self.verdicts: dict[str, TrainingRun] = {}  # run_id -> latest promoted/rejected
        self.promoted_stack: list[TrainingRun] = []  # promoted events in force, oldest first
        self.max_version = 0
        self.seen: set[str] = set()
        self.by_event: Counter[str] = Counter()
        self.events = 0

    # -- folding ------------------------------------------------------------------------------------------
    def apply(self, run: TrainingRun) -> None:
        if run.event not in LIFECYCLE:
            return
        self.events += 1
        self.by_event[run.event] += 1
        self.seen.add(run.run_id)
        if run.model_version is not None:
            self.max_version = max(self.max_version, run.model_version)
        self._apply_record(run)
        if run.event == "evaluated":
            self.evaluated[run.run_id] = run
        elif run.event == "succeeded":
            self.succeeded[run.run_id] = run
        elif run.event == "exported":
            self.exported[run.run_id] = run
        elif run.event in ("promoted", "rejected"):
            self.verdicts[run.run_id] = run
        if run.event == "promoted":
            self.promoted_stack = [p for p in self.promoted_stack if p.run_id != run.run_id] + [run]
        elif run.event == "rollback":
            self.promoted_stack = [p for p in self.promoted_stack if p.run_id != run.run_id]

    def apply_all(self, runs: Iterable[TrainingRun]) -> RunsFold:
        for r in runs:
            self.apply(r)
        return self

    def _apply_record(self, run: TrainingRun) -> None:
        rec = self.runs.get(run.run_id)
        if rec is None:
            rec = self.runs[run.run_id] = RunRecord(run.run_id, run.at_ms, run.at_ms)
            while self.max_runs is not None and len(self.runs) > self.max_runs:
                gone, _ = self.runs.popitem(last=False)
                for by_run in (self.evaluated, self.succeeded, self.exported, self.verdicts):
                    by_run.pop(gone, None)
        rec.events += 1
        rec.last_event = run.event
        rec.first_ms, rec.last_ms = min(rec.first_ms, run.at_ms), max(rec.last_ms, run.at_ms)
        rec.stages.setdefault(run.event, run.at_ms)
        if run.model_version is not None and run.event != "rollback":
            rec.model_version = run.model_version
        d = run_details(run)
        if isinstance(d, EvaluatedDetails):
            rec.metrics = dict(d.metrics)
            rec.report = d.report_path
        elif isinstance(d, VerdictDetails):
            rec.verdict = run.event
            rec.rolled_back = False
            rec.reasons = d.reasons
        elif isinstance(d, FailedDetails):
            rec.error = d.message
        elif isinstance(d, SucceededDetails):
            rec.evaluated_by_trainer = rec.evaluated_by_trainer or d.evaluated_by_trainer
        elif isinstance(d, ExportedDetails):
            rec.exported, rec.ollama = d.gguf_paths, d.ollama
        elif isinstance(d, RollbackDetails):
            rec.rolled_back = rec.verdict == "promoted"

    # -- what the log says --------------------------------------------------------------------------------
    @property
    def current(self) -> TrainingRun | None:
        """The promoted event of the model in force (None: no student promoted, the teacher serves)."""
        return self.promoted_stack[-1] if self.promoted_stack else None

    @property
    def in_force(self) -> tuple[str, int | None] | None:
        """(run id, model version) in force; the version falls back to the run's when the promotion has none."""
        cur = self.current
        if cur is None:
            return None
        rec = self.runs.get(cur.run_id)
        return cur.run_id, cur.model_version if cur.model_version is not None else (rec.model_version if rec
                                                                                     else None)

    def version_of(self, run_id: str) -> int | None:
        ev = self.evaluated.get(run_id)
        return ev.model_version if ev is not None else None

    def next_version(self) -> int:
        return self.max_version + 1

    def history(self) -> list[tuple[int, dict[str, Any]]]:
        """(model_version, metrics) of every evaluated run, by version."""
        rows = [(int(ev.model_version), metrics_of(ev)) for ev in self.evaluated.values()
                if ev.model_version is not None]
        return sorted(rows, key=lambda r: r[0])

    def status_of(self, rec: RunRecord) -> str:
        top = self.in_force
        if top is not None and rec.run_id == top[0]:
            return "in force"
        if rec.rolled_back:
            return "rolled back"
        return rec.verdict or ("evaluated" if "evaluated" in rec.stages else rec.last_event)

    def summary(self, shown_runs: int = 50, shown_versions: int = 50) -> dict[str, Any]:
        """Totals, the run in force, the latest runs (one record each, with their stages) and the evaluated
        versions: the history part of /status's trainer block."""
        top = self.in_force
        in_force = top[0] if top else None
        runs = list(self.runs.values())
        versions: dict[int, RunRecord] = {}
        for rec in runs:  # the latest evaluated run of each version
            if rec.model_version is not None and "evaluated" in rec.stages:
                versions[rec.model_version] = rec
        return {
            "totals": {"runs": len(self.seen), "events": self.events, "by_event": dict(self.by_event),
                       "runs_kept": len(runs)},
            "in_force": None if top is None else {"run_id": top[0], "model_version": top[1]},
            "runs": [{"run_id": r.run_id, "model_version": r.model_version, "first_ms": r.first_ms,
                      "last_ms": r.last_ms, "stages": dict(r.stages), "events": r.events,
                      "last_event": r.last_event, "verdict": r.verdict, "rolled_back": r.rolled_back,
                      "in_force": r.run_id == in_force, "status": self.status_of(r), "error": r.error}
                     for r in runs[-shown_runs:]],
            # ordered by version number (not by when each was evaluated)
            "versions": [{"model_version": v, "run_id": r.run_id, "metrics": r.metrics, "verdict": r.verdict,
                          "rolled_back": r.rolled_back, "in_force": r.run_id == in_force,
                          "status": self.status_of(r), "evaluated_ms": r.stages["evaluated"]}
                         for v, r in sorted(versions.items())[-shown_versions:]],
        }


def fold_runs(events: Iterable[TrainingRun], max_runs: int | None = None) -> RunsFold:
    """Every event folded, in order."""
    return RunsFold(max_runs).apply_all(events)


__all__ = [
    "LIFECYCLE", "AnyDetails", "EvaluatedDetails", "ExportedDetails", "FailedDetails", "HeartbeatDetails",
    "OllamaRegistration", "RollbackDetails", "RunDetails", "RunRecord", "RunsFold", "StartedDetails",
    "SucceededDetails", "VerdictDetails", "fold_runs", "metrics_of", "run_details",
]
