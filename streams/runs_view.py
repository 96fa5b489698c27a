"""The training history of /status (and the dashboard), folded from every lifecycle event on ``training-runs``.

Every event is folded into one record per run: its stages and when each happened, its model version, its
evaluation metrics and the gate's verdict. The totals count every run and every event ever read, so they stay
right however many runs there were; memory is bounded by runs (the newest ``max_runs`` keep a record, plus one
id per run for the count), never by a number of events.

Which model is in force follows the gate's rule (``trainer/close_loop/gate.py``; the router's ``PromotionView``
folds the same way): ``promoted`` puts its run on top of a stack, ``rollback`` removes its run; the top is in force. A
``rollback`` event names the rolled-back run, but its ``model_version`` is the version in force *after* it, so a
run's version is never taken from its rollback.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from schemas import TrainingRun

#: the events that belong to a run, in the order they usually happen (heartbeats are the trainer's, not a run's)
LIFECYCLE = ("started", "succeeded", "failed", "evaluated", "promoted", "rejected", "exported", "rollback")


@dataclass
class RunRecord:
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


class RunHistory:
    """A fold of every lifecycle event; ``block()`` is the trainer block's history part of /status."""

    def __init__(self, max_runs: int = 1000, shown_runs: int = 50, shown_versions: int = 50) -> None:
        self.max_runs, self.shown_runs, self.shown_versions = max_runs, shown_runs, shown_versions
        self._runs: OrderedDict[str, RunRecord] = OrderedDict()  # first seen first (the topic's order)
        self._seen: set[str] = set()
        self._stack: list[tuple[str, int | None]] = []  # promotions in force: (run_id, model_version)
        self.by_event: Counter[str] = Counter()
        self.events = 0

    def apply(self, run: TrainingRun) -> None:
        if run.event not in LIFECYCLE:
            return
        self.events += 1
        self.by_event[run.event] += 1
        self._seen.add(run.run_id)
        rec = self._runs.get(run.run_id)
        if rec is None:
            rec = self._runs[run.run_id] = RunRecord(run.run_id, run.at_ms, run.at_ms)
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)
        rec.events += 1
        rec.last_event = run.event
        rec.first_ms, rec.last_ms = min(rec.first_ms, run.at_ms), max(rec.last_ms, run.at_ms)
        rec.stages.setdefault(run.event, run.at_ms)
        details = run.details if isinstance(run.details, dict) else {}
        if run.model_version is not None and run.event != "rollback":
            rec.model_version = run.model_version
        if run.event == "evaluated":
            metrics = details.get("metrics")
            rec.metrics = dict(metrics) if isinstance(metrics, dict) else {}
        elif run.event in ("promoted", "rejected"):
            rec.verdict = run.event
            rec.rolled_back = False
        elif run.event == "failed":
            rec.error = str(details.get("error") or details.get("reason") or "")[:300] or None
        if run.event == "promoted":
            version = run.model_version if run.model_version is not None else rec.model_version
            self._stack = [p for p in self._stack if p[0] != run.run_id] + [(run.run_id, version)]
        elif run.event == "rollback":
            rec.rolled_back = rec.verdict == "promoted"
            self._stack = [p for p in self._stack if p[0] != run.run_id]

    @property
    def in_force(self) -> tuple[str, int | None] | None:
        return self._stack[-1] if self._stack else None

    def _status(self, rec: RunRecord, in_force: str | None) -> str:
        if rec.run_id == in_force:
            return "in force"
        if rec.rolled_back:
            return "rolled back"
        return rec.verdict or ("evaluated" if "evaluated" in rec.stages else rec.last_event)

    def block(self) -> dict[str, Any]:
        top = self.in_force
        in_force = top[0] if top else None
        runs = list(self._runs.values())
        versions: dict[int, RunRecord] = {}
        for rec in runs:  # the latest evaluated run of each version
            if rec.model_version is not None and "evaluated" in rec.stages:
                versions[rec.model_version] = rec
        return {
            "totals": {"runs": len(self._seen), "events": self.events, "by_event": dict(self.by_event),
                       "runs_kept": len(runs)},
            "in_force": None if top is None else {"run_id": top[0], "model_version": top[1]},
            "runs": [{"run_id": r.run_id, "model_version": r.model_version, "first_ms": r.first_ms,
                      "last_ms": r.last_ms, "stages": dict(r.stages), "events": r.events,
                      "last_event": r.last_event, "verdict": r.verdict, "rolled_back": r.rolled_back,
                      "in_force": r.run_id == in_force, "status": self._status(r, in_force), "error": r.error}
                     for r in runs[-self.shown_runs:]],
            # ordered by version number (not by when each was evaluated)
            "versions": [{"model_version": v, "run_id": r.run_id, "metrics": r.metrics, "verdict": r.verdict,
                          "rolled_back": r.rolled_back, "in_force": r.run_id == in_force,
                          "status": self._status(r, in_force), "evaluated_ms": r.stages["evaluated"]}
                         for v, r in sorted(versions.items())[-self.shown_versions:]],
        }


__all__ = ["LIFECYCLE", "RunHistory", "RunRecord"]
