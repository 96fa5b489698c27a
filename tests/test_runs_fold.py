"""The one fold of training-runs (schemas/runs.py) and its typed event details, on their own (no broker)."""

from __future__ import annotations

from typing import Any

from schemas import TrainingRun
from schemas.runs import (
    EvaluatedDetails,
    ExportedDetails,
    FailedDetails,
    RollbackDetails,
    VerdictDetails,
    fold_runs,
    metrics_of,
    run_details,
)


def ev(run_id: str, event: str, at: int, version: int | None = None, **details: Any) -> TrainingRun:
    return TrainingRun(run_id=run_id, event=event, at_ms=at, model_version=version,  # type: ignore[arg-type]
                       details=details)


def test_details_are_typed_by_event_kind_and_keep_unknown_fields() -> None:
    d = run_details(ev("r", "evaluated", 1, 1, metrics={"f1": 0.7}, report_dir="/r/x", extra_field=3))
    assert isinstance(d, EvaluatedDetails) and d.metrics == {"f1": 0.7} and d.report_path == "/r/x"
    assert d.model_extra == {"extra_field": 3}
    old = run_details(ev("r", "evaluated", 1, 1, report={"report_md": "/r/x/report.md"}))
    assert isinstance(old, EvaluatedDetails) and old.report_path == "/r/x/report.md"
    v = run_details(ev("r", "rejected", 1, 1, reasons=["f1: 0.1 is not >= 0.5"]))
    assert isinstance(v, VerdictDetails) and v.kind == "rejected" and v.reasons == ["f1: 0.1 is not >= 0.5"]
    x = run_details(ev("r", "exported", 1, 1, files={"q4_k_m": {"path": "/e/m-q4.gguf"}, "f16": {"path": "/e/m"}},
                       ollama={"registered": True, "tags": ["m:v1"]}))
    assert isinstance(x, ExportedDetails) and x.gguf_paths == ["/e/m-q4.gguf"]
    assert x.ollama is not None and x.ollama.registered and x.ollama.tags == ["m:v1"]
    assert isinstance(run_details(ev("r", "exported", 1, 1, files=["/e/a.gguf", "/e/b.bin"])), ExportedDetails)
    assert run_details(ev("r", "exported", 1, 1, files=["/e/a.gguf", "/e/b.bin"])).gguf_paths == ["/e/a.gguf"]  # type: ignore[union-attr]


def test_details_that_do_not_fit_read_as_defaults() -> None:
    d = run_details(ev("r", "evaluated", 1, 1, metrics="not an object"))
    assert isinstance(d, EvaluatedDetails) and d.metrics == {}
    assert metrics_of(ev("r", "evaluated", 1, 1, metrics=[1, 2])) == {} and metrics_of(None) == {}
    f = run_details(ev("r", "failed", 1, error={"nested": 1}))
    assert isinstance(f, FailedDetails) and f.message == "{'nested': 1}"
    assert isinstance(run_details(ev("r", "rollback", 1, rolled_back_version="x")), RollbackDetails)


def test_fold_stack_versions_and_run_records() -> None:
    events = [ev("r1", "started", 1, 1), ev("r1", "succeeded", 2, 1, metrics={"evaluation": {"f1": 0.6}}),
              ev("r1", "evaluated", 3, 1, metrics={"f1": 0.6}, report_dir="/rep/r1"),
              ev("r1", "promoted", 4, 1, reasons=[]),
              ev("r1", "exported", 5, 1, files={"q": {"path": "/e/r1.gguf"}}, ollama={"registered": False,
                                                                                  "commands": ["ollama create"]}),
              ev("r2", "started", 6, 2), ev("r2", "failed", 7, reason="CUDA out of memory"),
              ev("r3", "evaluated", 8, 3, metrics={"f1": 0.8}), ev("r3", "promoted", 9, 3),
              ev("r3", "rollback", 10, 1, reason="online")]
    view = fold_runs(events)
    assert view.current is not None and view.current.run_id == "r1" and view.in_force == ("r1", 1)
    assert view.max_version == 3 and view.next_version() == 4 and view.version_of("r3") == 3
    assert view.history() == [(1, {"f1": 0.6}), (3, {"f1": 0.8})]
    assert set(view.evaluated) == {"r1", "r3"} and set(view.exported) == {"r1"} and set(view.succeeded) == {"r1"}
    r1, r2, r3 = (view.runs[r] for r in ("r1", "r2", "r3"))
    assert r1.evaluated_by_trainer and r1.report == "/rep/r1" and r1.exported == ["/e/r1.gguf"]
    assert r1.ollama is not None and r1.ollama.commands == ["ollama create"] and r1.reasons == []
    assert r2.error == "CUDA out of memory" and view.status_of(r2) == "failed"
    assert r3.model_version == 3 and r3.rolled_back and view.status_of(r3) == "rolled back"
    s = view.summary()
    assert s["in_force"] == {"run_id": "r1", "model_version": 1}
    assert [(v["model_version"], v["status"]) for v in s["versions"]] == [(1, "in force"), (3, "rolled back")]
    assert s["runs"][0]["stages"] == {"started": 1, "succeeded": 2, "evaluated": 3, "promoted": 4, "exported": 5}


def test_bounded_fold_forgets_old_runs_but_keeps_totals_and_the_stack() -> None:
    view = fold_runs([e for i in range(1, 6) for e in (ev(f"r{i}", "evaluated", i, i), ev(f"r{i}", "promoted", i, i))],
                     max_runs=2)
    assert list(view.runs) == ["r4", "r5"] and set(view.evaluated) == {"r4", "r5"}
    assert len(view.promoted_stack) == 5 and view.summary()["totals"]["runs"] == 5 and view.max_version == 5
