"""The automatic rollback rule (trainer/close_loop/online_watch.py) on synthetic online-eval windows: a degraded
student is rolled back within a bounded number of windows, a good one with noise never, and the rule's hysteresis."""

from __future__ import annotations

import random

from schemas import OnlineEval, TrainingRun
from schemas.runs import fold_runs
from trainer.close_loop.online_watch import OnlineView, judge, rollback_event, standing_rollbacks
from trainer.close_loop.settings import CloseLoopSettings

W = 10_000  # window length (ms)


def _settings(**kw: object) -> CloseLoopSettings:
    base: dict[str, object] = {"tier3_online_windows": 3, "tier3_online_min_n": 20, "tier3_online_min_f1": 0.5,
                               "tier3_online_min_fraction": 0.8}
    base.update(kw)
    return CloseLoopSettings(**base)  # type: ignore[arg-type]


def _runs(offline_f1: float = 0.9) -> list[TrainingRun]:
    return [TrainingRun(run_id="run-1", event="evaluated", at_ms=1, model_version=1, details={"metrics": {"f1": 0.9}}),
            TrainingRun(run_id="run-1", event="promoted", at_ms=2, model_version=1),
            TrainingRun(run_id="run-2", event="evaluated", at_ms=3, model_version=2,
                        details={"metrics": {"f1": offline_f1}}),
            TrainingRun(run_id="run-2", event="promoted", at_ms=4, model_version=2)]


def _window(view: OnlineView, i: int, n: int, f1: float, version: str = "2", partitions: int = 2) -> None:
    for p in range(partitions):  # split over partitions: the view adds them up
        view.apply(OnlineEval(task="widget_selector", arm="student", model_version=version, window_start_ms=i * W,
                              window_end_ms=(i + 1) * W, partition=p, n=n // partitions + (p < n % partitions),
                              json_valid_n=0, schema_valid_n=0, exact_n=0,
                              f1_sum=f1 * (n // partitions + (p < n % partitions)), published_at_ms=1))


def test_degraded_student_is_rolled_back_within_the_window_count() -> None:
    s, view, runs = _settings(), OnlineView(), fold_runs(_runs())
    verdicts = []
    for i in range(1, 10):
        _window(view, i, 40, 0.1)
        verdicts.append(judge(runs, view, s).action)
    assert verdicts[:2] == ["wait", "wait"] and verdicts[2] == "rollback"  # exactly TIER3_ONLINE_WINDOWS windows
    j = judge(runs, view, s)
    ev = rollback_event(runs, j)
    assert ev.event == "rollback" and ev.run_id == "run-2" and ev.model_version == 1
    assert ev.details["reason"] == "online_eval" and ev.details["restored_version"] == 1
    nums = ev.details["online_eval"]
    assert nums["f1"] == 0.1 and nums["n"] == 120 and abs(nums["bound"] - 0.72) < 1e-9  # 0.8 x offline 0.9
    assert [w["n"] for w in nums["windows"]] == [40, 40, 40]
    # once it stands, never again for that promotion: v1 is in force again and judged on its own windows
    after = judge(fold_runs([*_runs(), ev]), view, s)
    assert after.action == "wait" and after.numbers["run_id"] == "run-1"
    assert standing_rollbacks([*_runs(), ev]) == {("run-2", 4)}
    assert judge(runs, view, s, standing={("run-2", 4)}).action == "standing"


def test_good_student_with_noise_is_never_rolled_back() -> None:
    s, view, runs = _settings(), OnlineView(), fold_runs(_runs())
    rng = random.Random(7)
    for i in range(1, 500):  # 500 windows of 40 traces, each answer right with p = 0.85 (offline 0.9)
        n = 40
        f1 = sum(rng.random() < 0.85 for _ in range(n)) / n
        _window(view, i, n, f1)
        assert judge(runs, view, s).action in ("wait", "keep"), i


def test_hysteresis_small_windows_and_one_good_window() -> None:
    s, view, runs = _settings(), OnlineView(), fold_runs(_runs())
    _window(view, 1, 40, 0.1)
    _window(view, 2, 40, 0.1)
    _window(view, 3, 5, 0.0)  # too few traces: neither counts nor resets
    assert judge(runs, view, s).action == "wait"
    _window(view, 4, 40, 0.95)  # one good window among the last three: keep
    assert judge(runs, view, s).action == "keep"
    _window(view, 5, 40, 0.1)
    assert judge(runs, view, s).action == "keep"
    _window(view, 6, 40, 0.1)
    assert judge(runs, view, s).action == "keep"  # pooled (0.95+0.1+0.1)/3 and one window above
    _window(view, 7, 40, 0.1)
    assert judge(runs, view, s).action == "rollback"


def test_bound_is_the_larger_of_min_f1_and_the_offline_fraction() -> None:
    view, runs = OnlineView(), fold_runs(_runs(offline_f1=0.5))
    for i in range(1, 4):
        _window(view, i, 40, 0.45)
    assert judge(runs, view, _settings()).action == "rollback"  # 0.45 < min F1 0.5 (0.8 x 0.5 = 0.4)
    assert judge(runs, view, _settings(tier3_online_min_f1=0.3)).action == "keep"  # 0.45 >= max(0.3, 0.4)
    high = fold_runs(_runs(offline_f1=1.0))
    assert judge(high, view, _settings(tier3_online_min_f1=0.3)).action == "rollback"  # below 0.8 x 1.0
    assert judge(high, view, _settings(tier3_online_min_f1=0.3, tier3_online_min_fraction=0.0)).action == "keep"


def test_repromoted_version_is_judged_on_fresh_windows_only() -> None:
    s, view = _settings(), OnlineView()
    for i in range(1, 4):
        _window(view, i, 40, 0.1)
    events = _runs()
    ev = rollback_event(fold_runs(events), judge(fold_runs(events), view, s))
    events += [ev, TrainingRun(run_id="run-2", event="promoted", at_ms=4 * W + 1, model_version=2)]
    runs = fold_runs(events)
    assert runs.current is not None and runs.current.run_id == "run-2"
    assert judge(runs, view, s, standing_rollbacks(events)).action == "wait"  # old windows end before promotion
    for i in range(5, 8):
        _window(view, i, 40, 0.1)
    assert judge(runs, view, s, standing_rollbacks(events)).action == "rollback"


def test_only_the_version_in_force_is_judged() -> None:
    s, view = _settings(), OnlineView()
    for i in range(1, 4):
        _window(view, i, 40, 0.1, version="1")  # version 1 did badly, but version 2 is in force
    assert judge(fold_runs(_runs()), view, s).action == "wait"
    assert judge(fold_runs([]), view, s).action == "none"
