"""A re-promoted version is judged only on answers it served after its latest promotion (per answer, by the
served time the worker puts in each window: ``first_served_ms``), not on every window that ends after it; and
``tier3 watch`` logs every judgement, one line each.

The scenario of the outside check: 30-minute windows, v2 serves wrong answers, is rolled back 10 minutes into a
window and re-promoted 15 minutes in. The window closes after the re-promotion, so it *ends* after it, but every
answer in it was served before the rollback: it must not roll the re-promoted version back again."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import orjson
import pytest

from schemas import EnrichedTrace, Experience, OnlineEval, ServedBy, TeacherInfo, TrainingRun, encode, get_task
from schemas.runs import fold_runs
from streams.online_eval import OnlineEvaluator
from streams.settings import StreamsSettings
from trainer.close_loop import online_watch
from trainer.close_loop.online_watch import OnlineView, Watcher, describe, judge, standing_rollbacks
from trainer.close_loop.settings import CloseLoopSettings

WINDOW_S = 1800
MIN = 60_000
T0 = 1_000 * WINDOW_S * 1000  # a window start (ms)
TEACHER = {"widgets": ["cpu_usage", "memory_usage"], "time_range": "24h"}
WRONG = {"widgets": ["crystal_ball"], "time_range": "forever"}  # off-schema: scores 0


def _settings() -> CloseLoopSettings:
    return CloseLoopSettings(tier3_online_windows=1, tier3_online_min_n=5, tier3_online_min_f1=0.5,  # type: ignore[call-arg]
                             tier3_online_min_fraction=0.8)


def _trace(i: int, served_ms: int, answer: dict[str, Any] = WRONG, version: str = "2") -> EnrichedTrace:
    task = get_task("widget_selector")
    exp = Experience(experience_id=f"e-{i}", task="widget_selector", created_at_ms=served_ms,
                     messages=[{"role": "system", "content": task.system_prompt},  # type: ignore[list-item]
                               {"role": "user", "content": f"q{i}"}],
                     response=orjson.dumps(answer).decode(),
                     served_by=ServedBy(arm="student", model="ws:v2", model_version=version), confidence=0.2,
                     latency_ms=30.0)
    return EnrichedTrace(experience_id=exp.experience_id, task=exp.task, enriched_at_ms=served_ms + 5_000,
                         sample_reason="shadow", experience=exp,
                         teacher=TeacherInfo(kind="openai", model="t", latency_ms=5_000.0, attempts=1),
                         reasoning="r", answer=TEACHER, shadow=True, student_answer=answer)


class _Table(dict):  # type: ignore[type-arg]
    def __getitem__(self, k: str) -> Any:
        return self.get(k, {})


class _Worker:
    """The worker's table logic (streams/online_eval.py) on a dict: what it publishes is what the watcher reads."""

    def __init__(self) -> None:
        self.ev = OnlineEvaluator(StreamsSettings(tier3_window_s=WINDOW_S, tier3_online_grace_s=5,  # type: ignore[call-arg]
                                                  tier3_online_keep_windows=100), _Table())

    def serve(self, traces: list[EnrichedTrace], partitions: int = 2) -> None:
        for k, t in enumerate(traces):  # windowed by when they were enriched, as the worker does
            self.ev.observe(encode(t), k % partitions, t.enriched_at_ms / 1000, t.enriched_at_ms / 1000)

    def publish(self, view: OnlineView, now_ms: int) -> list[OnlineEval]:
        out = self.ev.due(now_ms / 1000)
        for rec in out:
            view.apply(rec)
            self.ev.mark_published(rec)
        return out


def _events() -> list[TrainingRun]:
    return [TrainingRun(run_id="run-1", event="evaluated", at_ms=T0 - 120 * MIN, model_version=1,
                        details={"metrics": {"f1": 0.9}}),
            TrainingRun(run_id="run-1", event="promoted", at_ms=T0 - 120 * MIN, model_version=1),
            TrainingRun(run_id="run-2", event="evaluated", at_ms=T0 - 2 * MIN, model_version=2,
                        details={"metrics": {"f1": 0.9}}),
            TrainingRun(run_id="run-2", event="promoted", at_ms=T0 - MIN, model_version=2),
            # by hand, 10 minutes into the window (a 30-minute window had not closed yet)
            TrainingRun(run_id="run-2", event="rollback", at_ms=T0 + 10 * MIN, model_version=1,
                        details={"reason": "manual"}),
            TrainingRun(run_id="run-2", event="promoted", at_ms=T0 + 15 * MIN, model_version=2)]


def test_answers_served_before_the_rollback_never_condemn_the_repromoted_version() -> None:
    s, view, worker, events = _settings(), OnlineView(), _Worker(), _events()
    # wrong answers, all served before the rollback (minutes 1..9), enriched in the window [T0, T0 + 30 min)
    worker.serve([_trace(i, T0 + MIN + i * 10_000) for i in range(40)])
    runs = fold_runs(events)
    assert runs.current is not None and runs.current.at_ms == T0 + 15 * MIN
    assert not worker.publish(view, T0 + 20 * MIN)  # not closed yet
    (r0, r1) = sorted(worker.publish(view, T0 + 31 * MIN), key=lambda r: r.partition)
    assert r0.window_end_ms == T0 + 30 * MIN > runs.current.at_ms  # ends after the re-promotion
    assert min(r0.first_served_ms or 0, r1.first_served_ms or 0) == T0 + MIN  # served before the rollback
    j = judge(runs, view, s, standing_rollbacks(events))
    assert j.action == "wait", (j.why, j.numbers)  # today's code: rollback (the window ends after the promotion)
    assert j.numbers["windows"] == [] and j.numbers["windows_served_before"] == 1
    assert j.numbers["promoted_at_ms"] == T0 + 15 * MIN

    # no new answers: still nothing to judge on
    assert not worker.publish(view, T0 + 61 * MIN)
    assert judge(runs, view, s, standing_rollbacks(events)).action == "wait"

    # new wrong answers served after the re-promotion, in the next window: rolled back on them
    worker.serve([_trace(100 + i, T0 + 31 * MIN + i * 10_000) for i in range(10)])
    worker.publish(view, T0 + 61 * MIN)
    j = judge(runs, view, s, standing_rollbacks(events))
    assert j.action == "rollback", (j.why, j.numbers)
    (w,) = j.numbers["windows"]
    assert w["start_ms"] == T0 + 30 * MIN and w["n"] == 10 and w["value"] == 0.0
    assert w["first_served_ms"] == T0 + 31 * MIN and w["last_served_ms"] == T0 + 31 * MIN + 90_000


def test_a_window_straddling_the_promotion_is_not_counted_but_a_first_promotion_counts_at_once() -> None:
    s, view, worker = _settings(), OnlineView(), _Worker()
    events = _events()
    # the window that holds the pre-rollback answers also gets wrong answers served after the re-promotion
    worker.serve([_trace(i, T0 + MIN + i * 10_000) for i in range(20)]
                 + [_trace(50 + i, T0 + 20 * MIN + i * 10_000) for i in range(20)])
    worker.publish(view, T0 + 31 * MIN)
    assert judge(fold_runs(events), view, s, standing_rollbacks(events)).action == "wait"  # sums cannot be split
    # a version promoted mid-window for the first time served nothing before it: that window counts
    first = [e for e in events[:4]]
    first[3] = TrainingRun(run_id="run-2", event="promoted", at_ms=T0 + 30 * MIN + 2 * MIN, model_version=2)
    worker.serve([_trace(200 + i, T0 + 33 * MIN + i * 10_000) for i in range(10)])
    worker.publish(view, T0 + 61 * MIN)
    j = judge(fold_runs(first), view, s)
    assert j.action == "rollback" and [w["start_ms"] for w in j.numbers["windows"]] == [T0 + 30 * MIN]


def test_windows_of_an_older_worker_count_only_when_they_start_after_the_promotion() -> None:
    s, view, events = _settings(), OnlineView(), _events()

    def legacy(start: int, partition: int = 0, first: int | None = None) -> OnlineEval:
        return OnlineEval(task="widget_selector", arm="student", model_version="2", window_start_ms=start,
                          window_end_ms=start + WINDOW_S * 1000, partition=partition, n=10, json_valid_n=0,
                          schema_valid_n=0, exact_n=0, f1_sum=0.0, task_f1_sum=0.0, published_at_ms=1,
                          first_served_ms=first, last_served_ms=first)

    view.apply(legacy(T0))  # no served bounds, starts before the re-promotion: not counted
    assert judge(fold_runs(events), view, s, standing_rollbacks(events)).action == "wait"
    # decodes without the fields (written before them)
    raw = orjson.loads(encode(legacy(T0)))
    del raw["first_served_ms"], raw["last_served_ms"]
    assert OnlineEval.model_validate(raw).first_served_ms is None
    # a window starting after it counts, even with no bounds; a new-format partition of the same window that
    # shows an answer served before the promotion excludes it
    view.apply(legacy(T0 + 30 * MIN))
    assert judge(fold_runs(events), view, s, standing_rollbacks(events)).action == "rollback"
    view.apply(legacy(T0 + 30 * MIN, partition=1, first=T0 + 14 * MIN))
    j = judge(fold_runs(events), view, s, standing_rollbacks(events))
    assert j.action == "wait" and j.numbers["windows_served_before"] == 2


class _Tail:
    feeds: ClassVar[dict[str, list[bytes]]] = {}

    def __init__(self, _settings: Any, topic: str) -> None:
        self.topic = topic

    def read_new(self, timeout_s: float = 10.0) -> list[bytes]:
        out, _Tail.feeds[self.topic] = _Tail.feeds.get(self.topic, []), []
        return out

    def close(self) -> None:
        pass


def test_watch_logs_every_judgement_one_line_each(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    s = CloseLoopSettings(tier3_online_windows=2, tier3_online_min_n=5, tier3_online_min_f1=0.5,  # type: ignore[call-arg]
                          tier3_online_min_fraction=0.8)
    monkeypatch.setattr(online_watch, "TopicTail", _Tail)
    events = _events()[:4]  # v2 promoted at T0 - 1 min
    worker, view = _Worker(), OnlineView()
    worker.serve([_trace(i, T0 + MIN + i * 10_000) for i in range(10)])  # one failing window of 2 required
    recs = worker.publish(view, T0 + 31 * MIN)
    _Tail.feeds = {s.training_runs_topic: [encode(e) for e in events],
                   s.online_eval_topic: [encode(r) for r in recs]}
    w = Watcher(s)
    caplog.set_level(logging.INFO, logger="tier3.trainer.watch")
    for _ in range(3):  # the same judgement three times: three lines (today: one, then silence)
        assert w.step() is None
    lines = [r for r in caplog.records if r.name == "tier3.trainer.watch"]
    assert len(lines) == 3 and all(r.levelno == logging.INFO for r in lines)
    msg = lines[-1].getMessage()
    assert w.last is not None and msg == describe(w.last) and "\n" not in msg
    assert msg.startswith("watch: wait: v2 (run run-2") and "1 of 2 windows counted" in msg
    assert f"{T0}..{T0 + 30 * MIN}:n=10,task_f1=0.000" in msg and "bound 0.720" in msg
    assert "pooled 0.000 over n=10" in msg


def test_describe_without_numbers() -> None:
    assert describe(online_watch.Judgement("none", "no promoted student is in force")) == \
        "watch: none: no promoted student is in force"
