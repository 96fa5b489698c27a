"""The promotion gate: a rule from settings decides whether an evaluated student replaces the one in force.

State is a projection of the ``training-runs`` topic (one partition, so events are read in the order they
happened), never a local file: :func:`fold_runs` folds the events into which runs were evaluated (with which
model version and metrics) and which promotions are in force. The router in ``streams/client/router.py`` folds the
same events with the same rule (duplicated on purpose: ``streams`` and ``trainer`` never import each other):

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from schemas import TrainingRun, decode, encode
from schemas.errors import SchemaError
from schemas.kafka_io import ReadTimeout, TopicMissing, read_until_now
from schemas.settings import RELIABLE_PRODUCER, KafkaSettings
from trainer.close_loop.settings import CloseLoopSettings
from trainer.errors import ConfigError, RunNotEvaluated, TrainerError
from trainer.events import now_ms

log = logging.getLogger("tier3.trainer.close_loop.gate")


class EventLogError(TrainerError):
    """training-runs could not be read or written (broker down, delivery failed)."""

    retryable = True


# ------------------------------------------------------------------------------------------- the event log


def publish_run_events(settings: KafkaSettings, events: Iterable[TrainingRun], timeout_s: float = 30.0) -> None:
    """Publish lifecycle events on training-runs (key = run_id) and wait until the broker acknowledged each."""
    producer = Producer({**settings.client_config(), **RELIABLE_PRODUCER, "linger.ms": 0})
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(str(err))

    for ev in events:
        producer.produce(settings.training_runs_topic, key=ev.run_id.encode(), value=encode(ev),
                         on_delivery=on_delivery)
    left = producer.flush(timeout_s)
    if left or errors:
        raise EventLogError(f"training-runs event not delivered ({left} pending): {'; '.join(errors[:3])}")


def read_run_events(settings: KafkaSettings, timeout_s: float = 30.0) -> list[TrainingRun]:
    """Every event on training-runs from the beginning up to now (no consumer group, nothing committed).

    Undecodable records are skipped: the log is shared, one bad record must not block promotions.
    """
    topic = settings.training_runs_topic
    out: list[TrainingRun] = []
    try:
        for msg in read_until_now(settings, topic, "gate-reader", timeout_s=timeout_s):
            try:
                out.append(decode(msg.value() or b"", TrainingRun, max_bytes=settings.max_record_bytes))
            except SchemaError:
                continue
    except TopicMissing:
        raise EventLogError(f"topic {topic} does not exist (run `tier3 topics create`)") from None
    except ReadTimeout as exc:
        raise EventLogError(str(exc)) from None
    except KafkaException as exc:
        raise EventLogError(f"cannot reach the broker to read {topic}: {exc}") from None
    return out


# ------------------------------------------------------------------------------------------- the projection


@dataclass
class RunsView:
    """What the training-runs log says about evaluations, versions and promotions."""

    evaluated: dict[str, TrainingRun] = field(default_factory=dict)  # run_id -> its latest evaluated event
    succeeded: dict[str, TrainingRun] = field(default_factory=dict)
    exported: dict[str, TrainingRun] = field(default_factory=dict)
    verdicts: dict[str, TrainingRun] = field(default_factory=dict)  # run_id -> latest promoted/rejected
    promoted_stack: list[TrainingRun] = field(default_factory=list)  # promotions in force, oldest first
    max_version: int = 0

    @property
    def current(self) -> TrainingRun | None:
        """The promoted event of the model in force (None: no student promoted, the teacher serves)."""
        return self.promoted_stack[-1] if self.promoted_stack else None

    def version_of(self, run_id: str) -> int | None:
        ev = self.evaluated.get(run_id)
        return ev.model_version if ev is not None else None

    def next_version(self) -> int:
        return self.max_version + 1

    def history(self) -> list[tuple[int, dict[str, Any]]]:
        """(model_version, metrics) of every evaluated run, by version."""
        rows = [(int(ev.model_version), dict(ev.details.get("metrics", {}))) for ev in self.evaluated.values()
                if ev.model_version is not None]
        return sorted(rows, key=lambda r: r[0])


def fold_runs(events: Iterable[TrainingRun]) -> RunsView:
    view = RunsView()
    for ev in events:
        if ev.model_version is not None:
            view.max_version = max(view.max_version, ev.model_version)
        if ev.event == "evaluated":
            view.evaluated[ev.run_id] = ev
        elif ev.event == "succeeded":
            view.succeeded[ev.run_id] = ev
        elif ev.event == "exported":
            view.exported[ev.run_id] = ev
        elif ev.event == "promoted":
            view.verdicts[ev.run_id] = ev
            view.promoted_stack = [p for p in view.promoted_stack if p.run_id != ev.run_id] + [ev]
        elif ev.event == "rejected":
            view.verdicts[ev.run_id] = ev
        elif ev.event == "rollback":
            view.promoted_stack = [p for p in view.promoted_stack if p.run_id != ev.run_id]
    return view


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
        promoted_metrics = dict(cur_eval.details.get("metrics", {})) if cur_eval else None
    verdict = decide(dict(ev.details.get("metrics", {})), settings, promoted_metrics)
    promote = verdict.promote or force
    details: dict[str, Any] = {
        "reasons": verdict.reasons if not force else [reason or "manual promotion (tier3 promote --force)",
                                                      *verdict.reasons],
        "checks": verdict.checks,
        "rule_passed": verdict.promote,
        "forced": force,
        "previous_run_id": current.run_id if current else None,
        "previous_version": current.model_version if current else None,
        "metrics": dict(ev.details.get("metrics", {})),
    }
    out = TrainingRun(run_id=run_id, event="promoted" if promote else "rejected", at_ms=now_ms(),
                      model_name=settings.tier3_student_name, model_version=ev.model_version,
                      base_model=ev.base_model, details=details)
    if fault is not None:
        fault("kill_in_gate")
    if publish:
        publish_run_events(settings, [out])
    return out


def rollback(settings: KafkaSettings, *, reason: str = "manual rollback (tier3 rollback)",
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
        publish_run_events(settings, [out])
    return out


# ------------------------------------------------------------------------------------------- after a run


def close_loop_missing(view: RunsView, run_id: str, auto_export: bool) -> list[str]:
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
            publish_run_events(settings, [evaluated_event(run_id, manifest, dict(metrics))])
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
