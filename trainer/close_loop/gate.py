"""The promotion gate: a rule from settings decides whether an evaluated student replaces the one in force.

State is a projection of the ``training-runs`` topic (one partition, so events are read in the order they
happened), never a local file: :func:`schemas.runs.fold_runs` folds the events into which runs were evaluated
(with which model version and metrics) and which promotions are in force. The router, the worker's /status and
the demo fold the same events with the same fold (``schemas/runs.py``):

- ``promoted`` puts its run on top of the stack of promotions;
- ``rollback`` removes its run from the stack; the model in force is the top of the stack (none: teacher).

Model versions are numbered by the trainer when a run starts (``model_version`` in its manifest and events);
evaluation, verdicts, exports and the router keep that number, and ``<name>:v<N>`` in Ollama is it.

The rule (every check must pass; the verdict event lists each check with its value and bound):

1. at least ``tier3_gate_min_examples`` holdout examples;
2. JSON validity >= ``tier3_gate_min_json_valid``; schema validity >= ``tier3_gate_min_schema_valid``;
3. field F1 vs the teacher >= the production baseline's F1 − ``tier3_gate_baseline_margin``;
4. field F1 >= the promoted student's F1 (when one is in force and ``tier3_gate_require_beat_promoted``);
5. generation latency p95 <= ``tier3_gate_max_latency_p95_ms``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas import TrainingRun
from schemas.runs import RunsFold, fold_runs, metrics_of
from trainer.close_loop.settings import CloseLoopSettings
from trainer.errors import ConfigError, RunNotEvaluated, TrainerError
from trainer.events import TrainerEvents, now_ms, read_run_events

log = logging.getLogger("tier3.trainer.gate")


# ------------------------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reasons: list[str]  # the failed checks (empty when promoted), human-readable
    checks: dict[str, dict[str, Any]]  # every check: value, bound, passed


def decide(metrics: Mapping[str, Any], settings: CloseLoopSettings,
           promoted_metrics: Mapping[str, Any] | None) -> Verdict:
    """Apply the promotion rule to a candidate's evaluation metrics (see the module docstring)."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, value: Any, op: str, bound: Any) -> None:
        if value is None or bound is None:
            ok = False if value is None else True  # a missing bound (no baseline) cannot fail the candidate
        else:
            ok = value >= bound if op == ">=" else value <= bound
        checks[name] = {"value": value, "op": op, "bound": bound, "passed": ok}

    f1 = metrics.get("f1")
    check("n_examples", metrics.get("n_examples"), ">=", settings.tier3_gate_min_examples)
    check("json_valid_rate", metrics.get("json_valid_rate"), ">=", settings.tier3_gate_min_json_valid)
    check("schema_valid_rate", metrics.get("schema_valid_rate"), ">=", settings.tier3_gate_min_schema_valid)
    base = metrics.get("baseline_f1")
    check("f1_vs_baseline", f1, ">=", None if base is None else round(base - settings.tier3_gate_baseline_margin, 12))
    if settings.tier3_gate_require_beat_promoted and promoted_metrics is not None:
        check("f1_vs_promoted", f1, ">=", promoted_metrics.get("f1"))
    check("latency_ms_p95", metrics.get("latency_ms_p95"), "<=", settings.tier3_gate_max_latency_p95_ms)
    reasons = [f"{name}: {c['value']!r} is not {c['op']} {c['bound']!r}" for name, c in checks.items()
               if not c["passed"]]
    return Verdict(promote=not reasons, reasons=reasons, checks=checks)


def gate_run(settings: CloseLoopSettings, run_id: str, *, force: bool = False, reason: str | None = None,
             events: list[TrainingRun] | None = None, publish: bool = True,
             fault: Callable[[str], None] | None = None) -> TrainingRun:
    """Decide on an evaluated run and publish the ``promoted`` / ``rejected`` event; return it.

    ``force`` (``tier3 promote --force``) promotes whatever the rule says, recording the rule's verdict and the
    operator's reason in the event.
    """
    events = read_run_events(settings) if events is None else events
    view = fold_runs(events)
    ev = view.evaluated.get(run_id)
    if ev is None:
        raise RunNotEvaluated(f"run {run_id} has no `evaluated` event on {settings.training_runs_topic}; run "
                          f"`tier3 eval {run_id}` first")
    current = view.current
    promoted_metrics = None
    if current is not None and current.run_id != run_id:
        cur_eval = view.evaluated.get(current.run_id)
        promoted_metrics = metrics_of(cur_eval) if cur_eval else None
    verdict = decide(metrics_of(ev), settings, promoted_metrics)
    promote = verdict.promote or force
    details: dict[str, Any] = {
        "reasons": verdict.reasons if not force else [reason or "manual promotion (tier3 promote --force)",
                                                      *verdict.reasons],
        "checks": verdict.checks,
        "rule_passed": verdict.promote,
        "forced": force,
        "previous_run_id": current.run_id if current else None,
        "previous_version": current.model_version if current else None,
        "metrics": metrics_of(ev),
    }
    out = TrainingRun(run_id=run_id, event="promoted" if promote else "rejected", at_ms=now_ms(),
                      model_name=settings.tier3_student_name, model_version=ev.model_version,
                      base_model=ev.base_model, details=details)
    if fault is not None:
        fault("kill_in_gate")
    if publish:
        with TrainerEvents(settings) as writer:
            writer.record(out)
    return out


def rollback(settings: CloseLoopSettings, *, reason: str = "manual rollback (tier3 rollback)",
             events: list[TrainingRun] | None = None, publish: bool = True) -> TrainingRun:
    """Withdraw the promoted model in force; the one promoted before it (or the teacher) serves again."""
    events = read_run_events(settings) if events is None else events
    view = fold_runs(events)
    current = view.current
    if current is None:
        raise ConfigError("nothing to roll back: no promoted student is in force")
    restored = view.promoted_stack[-2] if len(view.promoted_stack) > 1 else None
    out = TrainingRun(
        run_id=current.run_id, event="rollback", at_ms=now_ms(), model_name=current.model_name,
        # model_version is the version in force after the rollback (None: the teacher serves)
        model_version=restored.model_version if restored else None,
        details={"reason": reason, "rolled_back_version": current.model_version,
                 "restored_run_id": restored.run_id if restored else None,
                 "restored_version": restored.model_version if restored else None},
    )
    if publish:
        with TrainerEvents(settings) as writer:
            writer.record(out)
    return out


# ------------------------------------------------------------------------------------------- after a run


def close_loop_missing(view: RunsFold, run_id: str, auto_export: bool) -> list[str]:
    """The close-loop steps the log does not show for a committed run: evaluated, verdict, exported."""
    missing = []
    if run_id not in view.evaluated:
        missing.append("evaluated")
    verdict = view.verdicts.get(run_id)
    if verdict is None:
        missing.append("verdict")
    if auto_export and run_id not in view.exported and (verdict is None or verdict.event == "promoted"):
        missing.append("exported")
    return missing


def close_loop_pending(settings: CloseLoopSettings, manifests: Sequence[Any]) -> list[str]:
    """Ids of the committed runs (manifests) whose close loop the log does not show complete: no verdict yet, or
    promoted and not exported (with ``tier3_auto_export``). One read of training-runs. What a restarted trainer
    resumes (a kill during the evaluation, the gate or the export)."""
    view = fold_runs(read_run_events(settings))
    out = []
    for m in manifests:
        if {"verdict", "exported"} & set(close_loop_missing(view, m.run_id, settings.tier3_auto_export)):
            out.append(m.run_id)
    return out


def after_run(settings: CloseLoopSettings, run_id: str, *,
              fault: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Close the loop for one committed run: ``evaluated`` event (evaluating now if the commit protocol's hook did
    not), the gate's verdict, and the export when promoted and ``tier3_auto_export``. Called by the trainer after
    ``succeeded``, and again after a restart for a run the log shows unfinished: each step is done only if the log
    does not show it yet, so a run gets exactly one ``evaluated`` and one verdict however often the trainer is
    killed (docs/guarantees.md). An export failure is reported, never undoes the verdict."""
    from trainer.close_loop.evaluate import evaluate_run, evaluated_event
    from trainer.close_loop.export import export_run
    from trainer.manifest import find_manifest

    hit = fault or (lambda point: None)
    manifest = find_manifest(settings.runs_dir, run_id)
    events = read_run_events(settings)
    view = fold_runs(events)
    out: dict[str, Any] = {"verdict": None, "exported": None, "export_error": None, "resumed": []}
    if run_id not in view.evaluated:
        metrics = manifest.metrics.get("evaluation")
        if metrics is None:
            evaluate_run(settings, run_id)
        else:
            with TrainerEvents(settings) as writer:
                writer.record(evaluated_event(run_id, manifest, dict(metrics)))
        hit("kill_after_evaluated")
        events = read_run_events(settings)
        view = fold_runs(events)
    else:
        out["resumed"].append("evaluated")
    verdict = view.verdicts.get(run_id)
    if verdict is None:
        verdict = gate_run(settings, run_id, events=events, fault=hit)
        hit("kill_after_verdict")
    else:
        out["resumed"].append("verdict")
        log.info("run %s: its verdict (%s) is already on the log; not deciding again", run_id, verdict.event)
    out["verdict"] = verdict
    if verdict.event == "promoted" and settings.tier3_auto_export:
        if run_id in view.exported:
            out["exported"] = view.exported[run_id]
            out["resumed"].append("exported")
        else:
            try:
                out["exported"] = export_run(settings, run_id, fault=hit).event
            except TrainerError as exc:
                log.error("run %s promoted but its export failed: %s", run_id, exc)
                out["export_error"] = str(exc)
    return out
