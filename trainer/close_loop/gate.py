"""The promotion gate: a rule from settings decides whether an evaluated student replaces the one in force.

State is a projection of the ``training-runs`` topic (one partition, so events are read in the order they
happened), never a local file: :func:`schemas.runs.fold_runs` folds the events into which runs were evaluated
(with which model version and metrics) and which promotions are in force. The router, the worker's /status and
the demo fold the same events with the same fold (``schemas/runs.py``):

- ``promoted`` puts its run on top of the stack of promotions;
- ``rollback`` removes its run from the stack; the model in force is the top of the stack (none: teacher).

Model versions are numbered by the trainer when a run starts (``model_version`` in its manifest and events);
evaluation, verdicts, exports and the router keep that number, and ``<name>:v<N>`` in Ollama is it.

The evidence is the served artifact (``trainer/close_loop/served_eval.py``): the exported GGUF of the serving
quantisation through the real server, asked as the router asks. The rule (every check must pass; the verdict
event lists each check with its value, bound and whether the bound is inclusive; docs/close_loop.md):

1. at least ``tier3_gate_min_examples`` holdout examples (>=);
2. JSON validity >= ``tier3_gate_min_json_valid``; schema validity >= ``tier3_gate_min_schema_valid``;
3. the task's primary metric (``task_f1`` for the widget selector: the widget set weighs 0.8, the time range
   0.2) against production, **paired on the same items** (:mod:`trainer.close_loop.verdict`): "better" or "no
   worse within ``tier3_gate_baseline_margin``" passes, "worse" or "not enough evidence" does not;
4. the same against the version in force (when one is and ``tier3_gate_require_beat_promoted``);
5. the golden set (``TIER3_GOLDEN_SET``, when set): primary metric >= ``tier3_gate_min_golden`` and > the
   constant answer's;
6. served latency p95 <= ``tier3_gate_max_latency_p95_ms``.

Metrics without paired comparisons (``tier3 eval`` by hand, older events) are judged on point figures (3: F1 >=
production's − margin; 4: F1 >= the promoted version's).
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


def served_metrics(metrics: Mapping[str, Any]) -> bool:
    """Whether an evaluation was taken on a served artifact (a GGUF through a server), not on the merged PyTorch
    model (``model == "merged"``: ``tier3 eval`` without ``--served``, the commit protocol's diagnostic)."""
    return metrics.get("model") != "merged"


def _paired_check(p: Mapping[str, Any]) -> tuple[str, bool]:
    verdict = str(p.get("verdict"))
    shown = (f"{verdict} (mean diff {_num(p.get('mean_diff'))}, {p.get('confidence')} interval "
             f"[{_num(p.get('ci_low'))}, {_num(p.get('ci_high'))}], n {p.get('n')})")
    return shown, verdict in PAIRED_PASS


def _num(v: Any) -> str:
    return f"{v:+.3f}" if isinstance(v, int | float) else "–"


#: the paired verdicts that let a candidate through: better, or no worse within the margin
PAIRED_PASS = ("better", "no_worse")


def decide(metrics: Mapping[str, Any], settings: CloseLoopSettings,
           promoted_metrics: Mapping[str, Any] | None) -> Verdict:
    """Apply the promotion rule to a candidate's evaluation metrics (see the module docstring).

    Metrics of a served evaluation (``trainer/close_loop/served_eval.py``) carry paired comparisons on the task's
    primary metric; the gate then decides on those ("better" or "no worse within the margin" pass; "worse" and
    "not enough evidence" do not). Metrics without them (an evaluation by hand, older events) are judged on the
    point figures as before."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, value: Any, op: str, bound: Any) -> None:
        if value is None or bound is None:
            ok = False if value is None else True  # a missing bound (no baseline) cannot fail the candidate
        else:
            ok = value >= bound if op == ">=" else value <= bound
        checks[name] = {"value": value, "op": op, "bound": bound, "passed": ok, "inclusive": True}

    def paired(name: str, p: Mapping[str, Any]) -> None:
        shown, ok = _paired_check(p)
        checks[name] = {"value": shown, "op": "in", "bound": list(PAIRED_PASS), "passed": ok,
                        "interval": [p.get("ci_low"), p.get("ci_high")], "n": p.get("n"),
                        "margin": p.get("margin"), "verdict": p.get("verdict")}

    primary = str(metrics.get("primary_metric") or "f1")
    f1 = metrics.get(primary, metrics.get("f1"))
    pairs = metrics.get("paired") if isinstance(metrics.get("paired"), Mapping) else None
    if not served_metrics(metrics):
        checks["served_artifact"] = {"value": metrics.get("model"), "op": "==", "bound": "a served GGUF",
                                     "passed": False}
    check("n_examples", metrics.get("n_examples"), ">=", settings.tier3_gate_min_examples)
    check("json_valid_rate", metrics.get("json_valid_rate"), ">=", settings.tier3_gate_min_json_valid)
    check("schema_valid_rate", metrics.get("schema_valid_rate"), ">=", settings.tier3_gate_min_schema_valid)
    if pairs is not None and isinstance(pairs.get("vs_production"), Mapping):
        paired(f"{primary}_vs_production", pairs["vs_production"])
    else:
        base = metrics.get(f"baseline_{primary}", metrics.get("baseline_f1"))
        check("f1_vs_baseline", f1, ">=",
              None if base is None else round(base - settings.tier3_gate_baseline_margin, 12))
    if settings.tier3_gate_require_beat_promoted and promoted_metrics is not None:
        if pairs is not None and isinstance(pairs.get("vs_in_force"), Mapping):
            paired(f"{primary}_vs_in_force", pairs["vs_in_force"])
        else:
            check("f1_vs_promoted", f1, ">=", promoted_metrics.get(primary, promoted_metrics.get("f1")))
    golden = metrics.get("golden")
    if isinstance(golden, Mapping):
        g = golden.get(primary, golden.get("f1"))
        check(f"golden_{primary}", g, ">=", settings.tier3_gate_min_golden)
        const = ((metrics.get("slices") or {}).get("golden") or {}).get("constant") or {}
        c = const.get(primary)
        if c is not None:
            checks[f"golden_{primary}_vs_constant"] = {"value": g, "op": ">", "bound": c,
                                                      "passed": g is not None and g > c, "inclusive": False}
    check("latency_ms_p95", metrics.get("latency_ms_p95"), "<=", settings.tier3_gate_max_latency_p95_ms)
    reasons = [_reason(n, c) for n, c in checks.items() if not c["passed"]]
    return Verdict(promote=not reasons, reasons=reasons, checks=checks)


def _reason(name: str, c: Mapping[str, Any]) -> str:
    if c.get("verdict") == "not_enough_evidence":
        return (f"{name}: not enough evidence: {c['value']}; the interval is wider than the margin "
                f"{c.get('margin')}, so the run does not promote on noise (more traces, a larger holdout, decide)")
    if c.get("verdict") is not None:
        return f"{name}: {c['value']}"
    return f"{name}: {c['value']!r} is not {c['op']} {c['bound']!r}"


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
    """The close-loop steps the log does not show for a committed run, in their order: exported (the candidate's
    GGUF, which the gate judges), evaluated (the served artifact), verdict, registered (a promoted version's
    Ollama registration, with ``tier3_auto_export``)."""
    missing = []
    if run_id not in view.exported:
        missing.append("exported")
    if run_id not in view.evaluated or not served_metrics(metrics_of(view.evaluated[run_id])):
        missing.append("evaluated")
    verdict = view.verdicts.get(run_id)
    if verdict is None:
        missing.append("verdict")
    if auto_export and (verdict is None or verdict.event == "promoted") and not _registered(view, run_id):
        missing.append("registered")
    return missing


def _registered(view: RunsFold, run_id: str) -> bool:
    ev = view.exported.get(run_id)
    return ev is not None and not ev.details.get("candidate", False)


def close_loop_pending(settings: CloseLoopSettings, manifests: Sequence[Any]) -> list[str]:
    """Ids of the committed runs (manifests) whose close loop the log does not show complete: no verdict yet, or
    promoted and not registered (with ``tier3_auto_export``). One read of training-runs. What a restarted trainer
    resumes (a kill during the export, the evaluation or the gate)."""
    view = fold_runs(read_run_events(settings))
    out = []
    for m in manifests:
        if {"verdict", "registered"} & set(close_loop_missing(view, m.run_id, settings.tier3_auto_export)):
            out.append(m.run_id)
    return out


def after_run(settings: CloseLoopSettings, run_id: str, *,
              fault: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Close the loop for one committed run, in the order that makes the verdict about what ships: export the
    candidate (merge, GGUF f16 + the serving quantisation; ``exported`` with ``candidate: true``, not registered
    with Ollama, not served), evaluate that GGUF through the real server (``evaluated``), the gate's verdict, and
    for a promoted version its registration (Ollama or the printed commands; a second ``exported`` event without
    ``candidate``). Called by the trainer after ``succeeded``, and again after a restart for a run the log shows
    unfinished: each step is done only if the log does not show it yet, so a run gets exactly one ``evaluated``
    and one verdict however often the trainer is killed (docs/guarantees.md). A failed export or served evaluation
    leaves the run without a verdict (pending: retried at the next start); a failed registration is reported and
    never undoes the verdict."""
    from trainer.close_loop.export import export_run, register_run
    from trainer.close_loop.served_eval import evaluate_served_run
    from trainer.stage import set_stage

    hit = fault or (lambda point: None)
    view = fold_runs(read_run_events(settings))
    out: dict[str, Any] = {"verdict": None, "exported": None, "export_error": None, "resumed": []}
    if run_id not in view.exported:
        set_stage("exporting")
        export_run(settings, run_id, fault=hit, candidate=True)
        hit("kill_after_export")
    else:
        out["resumed"].append("exported")
    if run_id not in view.evaluated or not served_metrics(metrics_of(view.evaluated[run_id])):
        set_stage("evaluating_served")
        evaluate_served_run(settings, run_id)  # an evaluation of the PyTorch model (`tier3 eval`) never decides
        hit("kill_after_evaluated")
    else:
        out["resumed"].append("evaluated")
    events = read_run_events(settings)
    view = fold_runs(events)
    verdict = view.verdicts.get(run_id)
    if verdict is None:
        set_stage("gating")
        verdict = gate_run(settings, run_id, events=events, fault=hit)
        hit("kill_after_verdict")
    else:
        out["resumed"].append("verdict")
        log.info("run %s: its verdict (%s) is already on the log; not deciding again", run_id, verdict.event)
    out["verdict"] = verdict
    if verdict.event == "promoted" and settings.tier3_auto_export:
        if _registered(view, run_id):
            out["exported"] = view.exported[run_id]
            out["resumed"].append("registered")
        else:
            try:
                set_stage("registering")
                out["exported"] = register_run(settings, run_id).event
            except TrainerError as exc:
                log.error("run %s promoted but its registration failed: %s", run_id, exc)
                out["export_error"] = str(exc)
    return out
