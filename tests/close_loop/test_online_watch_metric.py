"""The rollback rule judges on the task's primary metric (task_f1 for the widget selector), with its offline figure
from the same metric, falls back to f1 for windows (and evaluations) without it, and fails a window at or below
the bound (inclusive). The worker's side: windows carry task_f1_sum, None for a value an older worker began."""

from __future__ import annotations

from typing import Any

import orjson

from schemas import EnrichedTrace, Experience, OnlineEval, ServedBy, TeacherInfo, decode, encode
from schemas.runs import fold_runs
from schemas.tasks import get_task, score_output
from streams.online_eval import OnlineEvaluator, add_trace, empty, figures, merge
from streams.settings import StreamsSettings
from trainer.close_loop.online_watch import OnlineView, Window, fails, judge, offline_figure, primary_metric
from trainer.close_loop.settings import CloseLoopSettings

W = 10_000
TEACHER = {"widgets": ["cpu_usage", "memory_usage"], "time_range": "24h"}
WRONG_WIDGETS = {"widgets": ["revenue_trend"], "time_range": "24h"}


def _runs(metrics: dict[str, Any]) -> list[Any]:
    from schemas import TrainingRun

    return [TrainingRun(run_id="run-1", event="evaluated", at_ms=1, model_version=1, details={"metrics": metrics}),
            TrainingRun(run_id="run-1", event="promoted", at_ms=2, model_version=1)]


def _window(view: OnlineView, i: int, n: int, f1: float, task_f1: float | None, partitions: int = 2,
            legacy_partition: int | None = None) -> None:
    for p in range(partitions):
        k = n // partitions + (p < n % partitions)
        tf = None if task_f1 is None or p == legacy_partition else task_f1 * k
        view.apply(OnlineEval(task="widget_selector", arm="student", model_version="1", window_start_ms=i * W,
                              window_end_ms=(i + 1) * W, partition=p, n=k, json_valid_n=k, schema_valid_n=k,
                              exact_n=0, f1_sum=f1 * k, task_f1_sum=tf, published_at_ms=1))


def test_defaults_roll_back_right_time_range_wrong_widgets() -> None:
    s = CloseLoopSettings(tier3_online_min_n=10)  # type: ignore[call-arg]
    assert primary_metric(s.tier3_task) == "task_f1"
    view, runs = OnlineView(), fold_runs(_runs({"f1": 0.5, "task_f1": 0.2}))
    for i in range(1, 4):
        _window(view, i, 10, 0.5, 0.2)
    j = judge(runs, view, s)
    assert j.action == "rollback", j
    assert "task_f1" in j.why and "at or below 0.500" in j.why
    nums = j.numbers
    assert nums["metric"] == "task_f1" and nums["value"] == 0.2 and nums["f1"] == 0.5 and nums["bound"] == 0.5
    assert nums["offline_metric"] == "task_f1" and nums["offline"] == 0.2 and nums["offline_f1"] == 0.5
    assert all(w["metric"] == "task_f1" and w["value"] == 0.2 and w["f1"] == 0.5 for w in nums["windows"])


def test_bound_is_inclusive_and_windows_without_task_f1_fall_back_to_f1() -> None:
    s = CloseLoopSettings(tier3_online_min_n=10, tier3_online_min_fraction=0.0)  # type: ignore[call-arg]
    runs = fold_runs(_runs({"f1": 0.9}))
    # windows published before task_f1_sum existed: judged on f1; exactly at the bound fails (<=)
    old = OnlineView()
    for i in range(1, 4):
        _window(old, i, 10, 0.5, None)
    j = judge(runs, old, s)
    assert j.action == "rollback" and all(w["metric"] == "f1" for w in j.numbers["windows"])
    # one partition of a window without it: the whole window falls back (a partial sum would understate it)
    mixed = OnlineView()
    for i in range(1, 4):
        _window(mixed, i, 10, 0.9, 0.2, legacy_partition=1 if i == 2 else None)
    j = judge(runs, mixed, s)
    assert [w["metric"] for w in j.numbers["windows"]] == ["task_f1", "f1", "task_f1"]
    assert j.action == "keep" and j.why.startswith("2 of the last 3 windows at or below 0.500")
    # just above the bound: kept
    above = OnlineView()
    for i in range(1, 4):
        _window(above, i, 10, 0.6, 0.5 + 1 / 64)
    assert judge(runs, above, s).action == "keep"
    assert fails(0.5, 0.5) and not fails(0.5 + 1e-9, 0.5) and not fails(None, 0.5)


def test_offline_figure_is_the_same_metric_else_f1() -> None:
    assert offline_figure({"f1": 0.9, "task_f1": 0.7}, "task_f1") == ("task_f1", 0.7)
    assert offline_figure({"f1": 0.9}, "task_f1") == ("f1", 0.9)
    assert offline_figure({}, "task_f1") == ("task_f1", None)
    assert offline_figure({"task_f1": True, "f1": 0.4}, "task_f1") == ("f1", 0.4)
    s = CloseLoopSettings(tier3_online_min_n=10, tier3_online_min_f1=0.1)  # type: ignore[call-arg]
    view = OnlineView()
    for i in range(1, 4):
        _window(view, i, 10, 0.9, 0.6)
    # relative bound from task_f1 0.9 -> 0.72: 0.6 fails; from an f1-only evaluation 0.7 -> 0.56: kept
    assert judge(fold_runs(_runs({"f1": 0.5, "task_f1": 0.9})), view, s).action == "rollback"
    assert judge(fold_runs(_runs({"f1": 0.7})), view, s).action == "keep"
    w = Window(0, W, 4, 2.0, None, 1)
    assert w.value("task_f1") == 0.5 and w.value("exact_match") == 0.25 and w.metric_sum("task_f1")[0] == "f1"


def _trace(i: int, answer: dict[str, Any]) -> EnrichedTrace:
    exp = Experience(experience_id=f"e-{i}", task="widget_selector", created_at_ms=1,
                     messages=[{"role": "user", "content": f"q{i}"}],  # type: ignore[list-item]
                     response=orjson.dumps(answer).decode(),
                     served_by=ServedBy(arm="student", model="m", model_version="3"), confidence=0.1,
                     latency_ms=10.0)
    return EnrichedTrace(experience_id=exp.experience_id, task=exp.task, enriched_at_ms=2, sample_reason="shadow",
                         experience=exp, teacher=TeacherInfo(kind="openai", model="t", latency_ms=1.0, attempts=1),
                         reasoning="r", answer=TEACHER, shadow=True)


def test_worker_windows_carry_task_f1_and_legacy_values_say_unknown() -> None:
    task = get_task("widget_selector")
    acc = empty()
    for i, ans in enumerate((TEACHER, WRONG_WIDGETS, WRONG_WIDGETS)):
        acc = add_trace(acc, _trace(i, ans))
    want = sum(score_output(task, orjson.dumps(a).decode(), TEACHER).task_f1
               for a in (TEACHER, WRONG_WIDGETS, WRONG_WIDGETS))
    assert abs(acc["task_f1_sum"] - want) < 1e-9 and abs(want - 1.4) < 1e-9
    f = figures(acc)
    assert abs(f["task_f1"] - 1.4 / 3) < 1e-6 and abs(f["f1"] - 2 / 3) < 1e-6
    # a value an older worker began (restored from the changelog): task_f1 unknown, not 0
    legacy = {"n": 2, "json_valid_n": 2, "schema_valid_n": 2, "exact_n": 2, "f1_sum": 2.0}
    assert "task_f1_sum" not in merge(legacy, acc) and figures(merge(legacy, acc))["task_f1"] is None
    assert "task_f1_sum" not in add_trace(legacy, _trace(9, TEACHER))
    assert merge(empty(), acc)["task_f1_sum"] == acc["task_f1_sum"]  # an empty value is not legacy

    class Table(dict):  # type: ignore[type-arg]
        def __getitem__(self, k: str) -> Any:
            return self.get(k, {})

    table = Table()
    ev = OnlineEvaluator(StreamsSettings(tier3_window_s=10, tier3_online_grace_s=1), table)
    ev.observe(encode(_trace(1, WRONG_WIDGETS)), 0, 100.5, 100.5)
    table["widget_selector|student|3|100@1"] = legacy
    due = sorted(ev.due(200.0), key=lambda r: r.partition)
    assert [(r.partition, r.task_f1_sum) for r in due] == [(0, 0.2), (1, None)]
    # the message round-trips, and a record without the field (an older worker's) decodes with None
    assert decode(encode(due[0]), OnlineEval) == due[0]
    raw = orjson.loads(encode(due[0]))
    del raw["task_f1_sum"]
    assert decode(orjson.dumps(raw), OnlineEval).task_f1_sum is None
