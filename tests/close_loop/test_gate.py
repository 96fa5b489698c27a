"""The promotion gate decides by the rule; verdicts and rollbacks are events on training-runs (real broker)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from schemas import TrainingRun
from schemas.runs import fold_runs
from tests.kafka_utils import inject_run_events
from trainer.close_loop.gate import decide, gate_run, rollback
from trainer.close_loop.settings import CloseLoopSettings
from trainer.events import now_ms, read_run_events

GOOD: dict[str, Any] = {"n_examples": 20, "json_valid_rate": 1.0, "schema_valid_rate": 0.95, "f1": 0.80,
                        "baseline_f1": 0.82, "latency_ms_p95": 900.0}


def _settings(**kw: Any) -> CloseLoopSettings:
    return CloseLoopSettings(tier3_gate_min_examples=10, tier3_gate_min_json_valid=0.95,
                             tier3_gate_min_schema_valid=0.9, tier3_gate_baseline_margin=0.05,
                             tier3_gate_max_latency_p95_ms=1000.0, **kw)


def _evaluated(run_id: str, version: int, **metrics: Any) -> TrainingRun:
    return TrainingRun(run_id=run_id, event="evaluated", at_ms=now_ms(), model_name="m", model_version=version,
                       details={"metrics": {**GOOD, **metrics}})


def test_rule_each_check() -> None:
    s = _settings()
    assert decide(GOOD, s, None).promote
    # F1 0.80 >= baseline 0.82 - 0.05 passes; 0.76 does not
    v = decide({**GOOD, "f1": 0.76}, s, None)
    assert not v.promote and [r.split(":")[0] for r in v.reasons] == ["f1_vs_baseline"]
    assert not decide({**GOOD, "json_valid_rate": 0.94}, s, None).promote
    assert not decide({**GOOD, "schema_valid_rate": 0.5}, s, None).promote
    assert not decide({**GOOD, "latency_ms_p95": 1000.1}, s, None).promote
    assert not decide({**GOOD, "n_examples": 9}, s, None).promote
    # must not be worse than the promoted student
    assert not decide(GOOD, s, {"f1": 0.81}).promote
    assert decide(GOOD, s, {"f1": 0.80}).promote
    assert decide(GOOD, _settings(tier3_gate_require_beat_promoted=False), {"f1": 0.9}).promote
    # a missing metric fails its check; a missing baseline does not block
    assert not decide({k: v for k, v in GOOD.items() if k != "json_valid_rate"}, s, None).promote
    assert decide({k: v for k, v in GOOD.items() if k != "baseline_f1"}, s, None).promote


def _served(student: list[float], production: list[float], **extra: Any) -> dict[str, Any]:
    """Metrics as the served evaluation writes them: paired comparisons on the task's primary metric."""
    from trainer.close_loop.verdict import paired_comparison

    return {**GOOD, "model": "gguf-q8_0", "primary_metric": "task_f1", "task_f1": sum(student) / len(student),
            "paired": {"vs_production": paired_comparison(student, production, margin=0.05, min_n=10).as_dict()},
            **extra}


def test_the_served_rule_decides_on_paired_comparisons_of_the_primary_metric() -> None:
    s = _settings()
    # clearly better than production on 30 items: promoted
    better = _served([1.0] * 25 + [0.5] * 5, [0.5] * 25 + [0.5] * 5)
    v = decide(better, s, None)
    assert v.promote, v.reasons
    assert v.checks["task_f1_vs_production"]["verdict"] == "better"
    # 12 items, a mixed and small difference: not enough evidence, and the reason says so
    noisy = _served([1, 0, 1, 0.2, 1, 0, 1, 1, 0, 1, 0.8, 0], [0, 1, 1, 1, 0, 1, 0.2, 1, 1, 0, 1, 0.8])
    v = decide(noisy, s, None)
    assert not v.promote and v.checks["task_f1_vs_production"]["verdict"] == "not_enough_evidence"
    assert any("not enough evidence" in r and "more traces" in r for r in v.reasons)
    # the point figures alone would have let it through (F1 0.80 >= 0.82 - 0.05): paired decides, not them
    assert "f1_vs_baseline" not in v.checks
    # too few items: never promoted on noise
    few = _served([1.0] * 5, [0.0] * 5)
    assert decide(few, s, None).checks["task_f1_vs_production"]["verdict"] == "not_enough_evidence"
    assert not decide(few, s, None).promote


def test_an_evaluation_of_the_pytorch_model_never_decides() -> None:
    v = decide({**GOOD, "model": "merged"}, _settings(), None)
    assert not v.promote and [r.split(":")[0] for r in v.reasons] == ["served_artifact"]


def test_the_golden_slice_has_its_own_bound_and_must_beat_the_constant_answer() -> None:
    s = _settings(tier3_gate_min_golden=0.6)
    base = _served([1.0] * 25 + [0.5] * 5, [0.5] * 30)

    def with_golden(value: float, constant: float) -> dict[str, Any]:
        return {**base, "golden": {"task_f1": value},
                "slices": {"golden": {"constant": {"task_f1": constant}}}}

    assert decide(with_golden(0.7, 0.3), s, None).promote
    v = decide(with_golden(0.59, 0.3), s, None)  # below the bound (inclusive: 0.6 passes)
    assert not v.promote and [r.split(":")[0] for r in v.reasons] == ["golden_task_f1"]
    assert decide(with_golden(0.6, 0.3), s, None).promote
    v = decide(with_golden(0.7, 0.7), s, None)  # no better than always answering the most common answer
    assert not v.promote and [r.split(":")[0] for r in v.reasons] == ["golden_task_f1_vs_constant"]


def test_right_time_range_wrong_widgets_cannot_pass_on_the_time_range() -> None:
    from schemas import get_task
    from schemas.tasks import score_output

    task = get_task("widget_selector")
    ref = {"widgets": ["error_rate", "incident_timeline"], "time_range": "24h"}
    wrong = score_output(task, '{"widgets": ["revenue_trend"], "time_range": "24h"}', ref)
    assert wrong.f1 == 0.5 and wrong.task_f1 <= 0.2 + 1e-9
    # a student answering like that on every item, production right on half of them: not promoted
    m = _served([wrong.task_f1] * 30, [1.0] * 15 + [0.0] * 15)
    v = decide(m, _settings(), None)
    assert not v.promote and v.checks["task_f1_vs_production"]["verdict"] == "worse"


def test_fold_promotions_and_rollback() -> None:
    def ev(run: str, kind: str) -> TrainingRun:
        return TrainingRun(run_id=run, event=kind, at_ms=1, model_version=int(run[1:]))  # type: ignore[arg-type]

    view = fold_runs([ev("r1", "promoted"), ev("r2", "rejected"), ev("r3", "promoted"), ev("r3", "rollback")])
    assert view.current is not None and view.current.run_id == "r1"
    view = fold_runs([ev("r1", "promoted"), ev("r1", "rollback")])
    assert view.current is None


def test_gate_promotes_rejects_and_rolls_back_on_the_log(make_settings: Callable[..., CloseLoopSettings]) -> None:
    s = make_settings(cls=CloseLoopSettings, tier3_gate_min_examples=10, tier3_gate_max_latency_p95_ms=1000.0)
    inject_run_events(s, [_evaluated("run-1", 1), _evaluated("run-2", 2, f1=0.70),
                           _evaluated("run-3", 3, f1=0.85)])
    v1 = gate_run(s, "run-1")
    assert v1.event == "promoted" and v1.model_version == 1 and v1.details["reasons"] == []
    v2 = gate_run(s, "run-2")  # worse than v1 and than the baseline - margin
    assert v2.event == "rejected"
    assert {r.split(":")[0] for r in v2.details["reasons"]} == {"f1_vs_baseline", "f1_vs_promoted"}
    v3 = gate_run(s, "run-3")
    assert v3.event == "promoted" and v3.details["previous_version"] == 1

    rb = rollback(s)
    assert rb.event == "rollback" and rb.run_id == "run-3" and rb.model_version == 1
    events = read_run_events(s)
    assert [e.event for e in events] == ["evaluated"] * 3 + ["promoted", "rejected", "promoted", "rollback"]
    view = fold_runs(events)
    assert view.current is not None and view.current.model_version == 1

    forced = gate_run(s, "run-2", force=True, reason="operator says so")
    assert forced.event == "promoted" and forced.details["rule_passed"] is False
    assert forced.details["reasons"][0] == "operator says so"


def test_cli_promote_and_rollback_exit_codes(make_settings: Callable[..., CloseLoopSettings]) -> None:
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, settings_env

    s = make_settings(cls=CloseLoopSettings)
    inject_run_events(s, [_evaluated("good", 1), _evaluated("bad", 2, json_valid_rate=0.1)])
    env = settings_env(s)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tier3", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    bad = cli("promote", "bad")
    assert bad.returncode == 3 and json.loads(bad.stdout)["event"] == "rejected", bad.stderr[-2000:]
    good = cli("promote", "good")
    assert good.returncode == 0 and json.loads(good.stdout)["model_version"] == 1, good.stderr[-2000:]
    rb = cli("rollback", "--reason", "canary alarms")
    assert rb.returncode == 0 and json.loads(rb.stdout)["version_in_force"] is None, rb.stderr[-2000:]
    assert cli("rollback").returncode == 1  # nothing left to roll back: an error, said plainly
    last = read_run_events(s)[-1]
    assert last.event == "rollback" and last.details["reason"] == "canary alarms"
