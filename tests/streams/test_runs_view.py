"""The training history of /status (streams/runs_view.py): a fold of every lifecycle event, one record per run.

The worker test (tests/streams/test_worker.py) and the dashboard test (tests/test_dashboard_browser.py) read the
same fold through the real worker and the real topic; these check its rules on their own.
"""

from __future__ import annotations

from typing import Any

from schemas import TrainingRun
from streams.router_stats import observed_mode
from streams.runs_view import RunHistory

T0 = 1_793_001_600_000


def ev(run_id: str, event: str, at: int, version: int | None = None, **details: Any) -> TrainingRun:
    return TrainingRun(run_id=run_id, event=event, at_ms=T0 + at, model_version=version,  # type: ignore[arg-type]
                       details=details)


def lifecycle(i: int, verdict: str = "rejected") -> list[TrainingRun]:
    rid = f"run-{i:03d}"
    return [ev(rid, "started", 10 * i, i), ev(rid, "succeeded", 10 * i + 1, i),
            ev(rid, "evaluated", 10 * i + 2, i, metrics={"f1": i / 100}), ev(rid, verdict, 10 * i + 3, i)]


def test_totals_count_every_run_however_many_events() -> None:
    h = RunHistory(max_runs=10, shown_runs=5, shown_versions=4)
    for i in range(1, 41):  # 40 runs, 160 events: far more than any window of recent events
        for e in lifecycle(i, "promoted" if i % 10 == 0 else "rejected"):
            h.apply(e)
    h.apply(TrainingRun(run_id="trainer", event="heartbeat", at_ms=T0, training_in_progress=False))
    b = h.block()
    assert b["totals"] == {"runs": 40, "events": 160, "runs_kept": 10,
                           "by_event": {"started": 40, "succeeded": 40, "evaluated": 40, "promoted": 4,
                                        "rejected": 36}}
    # bounded by runs: the newest records are kept whole, each with all its stages
    assert [r["run_id"] for r in b["runs"]] == [f"run-{i:03d}" for i in range(36, 41)]
    assert all(len(r["stages"]) == 4 and r["events"] == 4 for r in b["runs"])
    assert [v["model_version"] for v in b["versions"]] == [37, 38, 39, 40]
    assert b["in_force"] == {"run_id": "run-040", "model_version": 40}
    assert b["versions"][-1]["status"] == "in force" and b["versions"][0]["status"] == "rejected"
    # an old run's late event does not count it twice
    h.apply(ev("run-001", "exported", 5000, 1))
    assert h.block()["totals"]["runs"] == 40


def test_rollback_withdraws_the_promotion_and_versions_sort_by_number() -> None:
    h = RunHistory()
    for e in [*lifecycle(1, "promoted"), *lifecycle(3, "rejected"), *lifecycle(2, "promoted")]:
        h.apply(e)
    assert [v["model_version"] for v in h.block()["versions"]] == [1, 2, 3]  # not the order of evaluation
    assert [v["status"] for v in h.block()["versions"]] == ["promoted", "in force", "rejected"]
    # the rollback names the withdrawn run; its model_version is the one in force after it (v1), never run-2's
    h.apply(ev("run-002", "rollback", 100, 1))
    b = h.block()
    assert [(v["model_version"], v["status"]) for v in b["versions"]] == [(1, "in force"), (2, "rolled back"),
                                                                         (3, "rejected")]
    assert b["in_force"] == {"run_id": "run-001", "model_version": 1}
    h.apply(ev("run-001", "rollback", 110, None))
    b = h.block()
    assert [(v["model_version"], v["status"], v["verdict"], v["rolled_back"]) for v in b["versions"]] == [
        (1, "rolled back", "promoted", True), (2, "rolled back", "promoted", True), (3, "rejected", "rejected", False)]
    assert b["in_force"] is None
    # promoted again (tier3 promote --force): in force, no longer rolled back
    h.apply(ev("run-002", "promoted", 120, 2))
    assert [v["status"] for v in h.block()["versions"]] == ["rolled back", "in force", "rejected"]


def test_failed_runs_and_other_events() -> None:
    h = RunHistory()
    h.apply(ev("run-x", "started", 0))
    h.apply(ev("run-x", "failed", 5, error="CUDA out of memory"))
    b = h.block()
    assert b["runs"][0]["status"] == "failed" and b["runs"][0]["error"] == "CUDA out of memory"
    assert b["versions"] == [] and b["totals"]["runs"] == 1


def test_router_mode_observed_from_served_by() -> None:
    assert observed_mode(0, 0) == (None, None)
    assert observed_mode(10, 0) == ("teacher", 0.0)
    assert observed_mode(0, 3) == ("student", 1.0)
    assert observed_mode(3, 1) == ("ab", 0.25)
