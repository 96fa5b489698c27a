"""``tier3 watch``: roll the promoted student back when its online agreement with the teacher drifts.

The worker scores a shadow sample of what the student served against the teacher's answers and publishes each
closed window on ``online-eval`` (``streams/online_eval.py``, :class:`schemas.OnlineEval`). This loop reads
that topic and ``training-runs`` (both from the beginning, then incrementally; nothing is committed, so its
state is a projection of the log and a restart loses nothing) and publishes ``rollback`` with reason
``online_eval`` and the numbers that triggered it when the rule below holds. The router follows rollbacks
(``streams/client/router.py``): the version promoted before, or the teacher, serves again.

**Why a separate loop** (not the trainer's consumer loop): a training run holds the trainer's loop for minutes
or hours, and a drifting student must go within windows; the watcher is small, stateless and can run beside
the trainer (``docker compose`` or ``tier3 watch``), and one watcher or several publish the same decision.

**The rule**, for the version in force (the top of the promotion stack) and ``TIER3_TASK``:

- *the metric*: the task's primary metric (``primary_metric`` in its task file, :mod:`schemas.tasks`; the widget
  selector's is ``task_f1``, the weighted field score, so right time range + wrong widgets scores 0.2, not the
  field F1's 0.5). A window without it (published by an older worker: ``task_f1_sum`` None) is judged on its
  field F1 instead, and says so (``windows[].metric``);
- *eligible windows*: closed windows of that version whose answers were **all served at or after its latest
  promotion** (``first_served_ms >= at_ms``: the earliest served time, i.e. experience ``created_at_ms``, of the
  answers the window sums; a window an older worker published without it counts only if it *starts* at or after
  the promotion), with at least ``TIER3_ONLINE_MIN_N`` shadow traces (smaller windows are too noisy to count
  either way). Per answer, not per window end: the worker windows answers by when the teacher answered them,
  so a window ending after a promotion may sum answers served long before it (before a rollback, say), and a
  window that straddles a promotion is not counted at all (its sums cannot be split);
- *bound*: ``max(TIER3_ONLINE_MIN_F1, TIER3_ONLINE_MIN_FRACTION x its offline holdout figure)``, the offline
  figure being the same metric in the ``evaluated`` event's metrics (``task_f1``; ``f1`` when the event has no
  such key: evaluated before the metric existed). Same rule as offline: :func:`schemas.tasks.score_output`;
- *a window fails* when its value is **at or below** the bound (``value <= bound``): the student must stay
  strictly above it. Inclusive on purpose: scores are discrete (a field is right or wrong), so a degenerate
  student can land exactly on a bound, as one that got only the time range right did on 0.5;
- *roll back* when the last ``TIER3_ONLINE_WINDOWS`` eligible windows **each** fail **and** their pooled value
  (sum over those windows / their traces) is at or below the bound too.

Hysteresis, so a good student never flaps: one good window among the last ``TIER3_ONLINE_WINDOWS`` resets the
count (a noisy dip never triggers alone); a version is rolled back at most once per promotion (a standing
``online_eval`` rollback of that promotion blocks another); a re-promoted version is judged only on answers
it served after its new promotion (windows with ``first_served_ms`` at or after it), so the answers that
condemned it, or any it served before a rollback, never count again.

Every judgement is logged at INFO, one line each (version, windows counted, their values, the bound, the
decision), not only when it changes: a run of windows below the bound is visible before it triggers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException

from schemas import OnlineEval, TrainingRun, decode, get_task
from schemas.errors import SchemaError
from schemas.kafka import reading as kio
from schemas.kafka.follow import TopicFollower
from schemas.runs import RunsFold, fold_runs, metrics_of
from schemas.settings import KafkaSettings
from trainer.close_loop.settings import CloseLoopSettings
from trainer.events import EventLogError, TrainerEvents, now_ms

log = logging.getLogger("tier3.trainer.watch")

REASON = "online_eval"


# ------------------------------------------------------------------------------------------- the projection


@dataclass(frozen=True)
class Window:
    """One closed window of one series, added up over partitions."""

    start_ms: int
    end_ms: int
    n: int
    f1_sum: float
    task_f1_sum: float | None = None  # None when any partition's record predates it
    exact_n: int = 0
    first_served_ms: int | None = None  # earliest served time of its answers; None when any record lacks it
    last_served_ms: int | None = None  # latest served time of its answers; None when any record lacks it
    served_from_ms: int | None = None  # what the rule compares with a promotion: see served_since

    def served_since(self, at_ms: int) -> bool:
        """Whether every answer in the window was served at or after ``at_ms`` (a promotion): its earliest served
        time, or, for a partition's record without one (an older worker), that record's window start."""
        since = self.served_from_ms if self.served_from_ms is not None else (
            self.first_served_ms if self.first_served_ms is not None else self.start_ms)
        return since >= at_ms

    @property
    def f1(self) -> float | None:
        return self.f1_sum / self.n if self.n else None

    def metric_sum(self, metric: str) -> tuple[str, float]:
        """(the metric used, its sum over the window): ``metric``, or ``f1`` when the window lacks it."""
        if metric == "task_f1" and self.task_f1_sum is not None:
            return "task_f1", self.task_f1_sum
        if metric == "exact_match":
            return "exact_match", float(self.exact_n)
        return "f1", self.f1_sum

    def value(self, metric: str) -> float | None:
        """The window's mean of :meth:`metric_sum` (None when empty)."""
        return self.metric_sum(metric)[1] / self.n if self.n else None


@dataclass
class OnlineView:
    """The latest ``online-eval`` record per key (task, arm, version, window, partition)."""

    latest: dict[tuple[str, str, str | None, int, int], OnlineEval] = field(default_factory=dict)

    def apply(self, rec: OnlineEval) -> None:
        self.latest[(rec.task, rec.arm, rec.model_version, rec.window_start_ms, rec.partition)] = rec

    def windows(self, task: str, arm: str, version: str | None) -> list[Window]:
        sums: dict[int, list[Any]] = {}
        for (t, a, v, start, _p), rec in self.latest.items():
            if t == task and a == arm and v == version:
                acc = sums.setdefault(start, [rec.window_end_ms, 0, 0.0, 0.0, 0, _BIG, -1, _BIG])
                acc[1] += rec.n
                acc[2] += rec.f1_sum
                # a partition's record without task_f1 makes the window's sum unknown (not partial)
                acc[3] = None if acc[3] is None or rec.task_f1_sum is None else acc[3] + rec.task_f1_sum
                acc[4] += rec.exact_n
                known = rec.first_served_ms is not None and rec.last_served_ms is not None
                # likewise the served bounds; the rule then uses the record's window start in its place
                acc[5] = None if acc[5] is None or not known else min(acc[5], rec.first_served_ms)
                acc[6] = None if acc[6] is None or not known else max(acc[6], rec.last_served_ms)
                acc[7] = min(acc[7], rec.first_served_ms if known and rec.first_served_ms is not None
                             else rec.window_start_ms)
        return [Window(start, int(end), int(n), float(f), None if tf is None else float(tf), int(x),
                       _known(first), _known(last), _known(since))
                for start, (end, n, f, tf, x, first, last, since) in sorted(sums.items())]


_BIG = 1 << 62  # "no record yet" for the running minimum of served times


def _known(ms: int | None) -> int | None:
    return None if ms is None or ms < 0 or ms >= _BIG else int(ms)


# ------------------------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class Judgement:
    action: str  # rollback | keep | wait (too few eligible windows) | none (no student in force) | standing
    why: str
    numbers: dict[str, Any] = field(default_factory=dict)


def standing_rollbacks(events: Iterable[TrainingRun]) -> set[tuple[str, int]]:
    """(run_id, promoted at_ms) of every promotion withdrawn by an ``online_eval`` rollback."""
    promoted_at: dict[str, int] = {}
    out: set[tuple[str, int]] = set()
    for ev in events:
        if ev.event == "promoted":
            promoted_at[ev.run_id] = ev.at_ms
        elif ev.event == "rollback" and ev.details.get("reason") == REASON and ev.run_id in promoted_at:
            out.add((ev.run_id, promoted_at[ev.run_id]))
    return out


def primary_metric(task: str) -> str:
    """The task's primary metric (its task file's ``primary_metric``); ``task_f1`` for a task not known here."""
    try:
        return get_task(task).primary_metric
    except SchemaError:
        return "task_f1"


def offline_figure(metrics: Mapping[str, Any], metric: str) -> tuple[str, float | None]:
    """(the key read, its value) of the offline holdout figure for ``metric``: that key, else ``f1``."""
    for key in (metric, "f1"):
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return key, float(v)
    return metric, None


def fails(value: float | None, bound: float) -> bool:
    """The one comparison of the rule: a value fails when it is at or below the bound (inclusive)."""
    return value is not None and value <= bound


def judge(runs: RunsFold, online: OnlineView, settings: CloseLoopSettings,
          standing: AbstractSet[tuple[str, int]] = frozenset()) -> Judgement:
    """Apply the rule (module docstring) to the version in force."""
    cur = runs.current
    if cur is None or cur.model_version is None:
        return Judgement("none", "no promoted student is in force")
    if (cur.run_id, cur.at_ms) in standing:
        return Judgement("standing", f"an {REASON} rollback of run {cur.run_id} already stands")
    version = str(cur.model_version)
    task = settings.tier3_task
    metric = primary_metric(task)
    offline_metrics = metrics_of(runs.evaluated.get(cur.run_id))
    offline_key, offline = offline_figure(offline_metrics, metric)
    _, offline_f1 = offline_figure(offline_metrics, "f1")
    frac = settings.tier3_online_min_fraction
    bound = max(settings.tier3_online_min_f1, frac * offline if offline is not None and frac > 0 else 0.0)
    closed = [w for w in online.windows(task, "student", version) if w.end_ms > cur.at_ms]
    after = [w for w in closed if w.served_since(cur.at_ms)]  # every answer served since the promotion
    eligible = [w for w in after if w.n >= settings.tier3_online_min_n]
    need = settings.tier3_online_windows
    last = eligible[-need:]
    base = {w.start_ms: w for w in online.windows(task, "baseline", None)}
    n = sum(w.n for w in last)
    pooled = sum(w.metric_sum(metric)[1] for w in last) / n if n else None
    pooled_f1 = sum(w.f1_sum for w in last) / n if n else None
    numbers: dict[str, Any] = {
        "task": task, "model_version": cur.model_version, "run_id": cur.run_id, "metric": metric,
        "value": _r(pooled), "f1": _r(pooled_f1), "n": n, "bound": _r(bound), "fails_when": "value <= bound",
        "min_f1": settings.tier3_online_min_f1, "min_fraction": frac, "offline_metric": offline_key,
        "offline": _r(offline), "offline_f1": _r(offline_f1), "windows_required": need,
        "min_n": settings.tier3_online_min_n, "promoted_at_ms": cur.at_ms,
        "counts_when": "every answer served at or after promoted_at_ms (first_served_ms >= promoted_at_ms; "
                       "window start for a window without it)",
        "windows_served_before": len(closed) - len(after),
        "windows": [{"start_ms": w.start_ms, "end_ms": w.end_ms, "n": w.n, "metric": w.metric_sum(metric)[0],
                     "first_served_ms": w.first_served_ms, "last_served_ms": w.last_served_ms,
                     "value": _r(w.value(metric)), "f1": _r(w.f1),
                     "baseline_n": base[w.start_ms].n if w.start_ms in base else 0,
                     "baseline_value": _r(base[w.start_ms].value(metric)) if w.start_ms in base else None,
                     "baseline_f1": _r(base[w.start_ms].f1) if w.start_ms in base else None} for w in last],
    }
    if len(last) < need:
        return Judgement("wait", f"{len(last)} of {need} windows with >= {settings.tier3_online_min_n} shadow "
                                 f"traces served since v{version} was promoted", numbers)
    failing = [w for w in last if fails(w.value(metric), bound)]
    if len(failing) == need and pooled is not None and fails(pooled, bound):
        return Judgement("rollback", f"v{version}'s online {metric} vs the teacher {pooled:.3f} is at or below "
                                     f"{bound:.3f} in each of the last {need} windows ({n} shadow traces)", numbers)
    return Judgement("keep", f"{len(failing)} of the last {need} windows at or below {bound:.3f} ({metric}; "
                             f"pooled {_fmt(pooled)})", numbers)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def describe(j: Judgement) -> str:
    """One log line for a judgement: the decision, the version, the windows counted with their values, the
    pooled value and the bound, and why (``tier3 watch`` logs one per judgement)."""
    nums = j.numbers
    if not nums:
        return f"watch: {j.action}: {j.why}"
    metric = nums.get("metric")
    wins = " ".join(f"{w['start_ms']}..{w['end_ms']}:n={w['n']},{w['metric']}={_fmt(w['value'])}"
                    for w in nums.get("windows") or [])
    return (f"watch: {j.action}: v{nums.get('model_version')} (run {nums.get('run_id')}, promoted at "
            f"{nums.get('promoted_at_ms')}): {len(nums.get('windows') or [])} of {nums.get('windows_required')} "
            f"windows counted [{wins}] ({nums.get('windows_served_before', 0)} skipped: answers served before "
            f"the promotion); {metric} pooled {_fmt(nums.get('value'))} over n={nums.get('n')}, bound "
            f"{_fmt(nums.get('bound'))} (fails when value <= bound): {j.why}")


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def rollback_event(runs: RunsFold, j: Judgement) -> TrainingRun:
    """The ``rollback`` event for a judgement (same shape as ``tier3 rollback``'s, plus the numbers)."""
    cur = runs.current
    assert cur is not None
    restored = runs.promoted_stack[-2] if len(runs.promoted_stack) > 1 else None
    return TrainingRun(
        run_id=cur.run_id, event="rollback", at_ms=now_ms(), model_name=cur.model_name,
        model_version=restored.model_version if restored else None,  # the version in force after it
        details={"reason": REASON, "why": j.why, "rolled_back_version": cur.model_version,
                 "restored_run_id": restored.run_id if restored else None,
                 "restored_version": restored.model_version if restored else None,
                 "online_eval": j.numbers})


# ------------------------------------------------------------------------------------------- the loop


class TopicTail:
    """Every record of a topic from the beginning, then only the new ones (no group, nothing committed): the
    one follower (:class:`schemas.kafka.follow.TopicFollower`), read in steps."""

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.topic = topic
        self._follower = TopicFollower(settings, topic, "watch")

    def read_new(self, timeout_s: float = 10.0) -> list[bytes]:
        try:
            return [msg.value() or b"" for msg in self._follower.read_new(timeout_s)]
        except kio.TopicMissing as exc:
            raise EventLogError(exc.args[0].str() if exc.args else str(exc)) from None
        except KafkaException as exc:
            raise EventLogError(f"cannot read {self.topic}: {exc}") from None

    def close(self) -> None:
        self._follower.close()


@dataclass
class Watcher:
    """One process's watch: the two projections, and what it published (so it never repeats itself)."""

    settings: CloseLoopSettings
    events: list[TrainingRun] = field(default_factory=list)
    online: OnlineView = field(default_factory=OnlineView)
    published: set[tuple[str, int]] = field(default_factory=set)
    last: Judgement | None = None

    def __post_init__(self) -> None:
        self._runs = TopicTail(self.settings, self.settings.training_runs_topic)
        self._evals = TopicTail(self.settings, self.settings.online_eval_topic)

    def close(self) -> None:
        self._runs.close()
        self._evals.close()

    def step(self) -> TrainingRun | None:
        """Read what is new, judge, and publish a rollback when the rule says so; return it."""
        limit = self.settings.tier3_max_message_bytes
        for raw in self._runs.read_new():
            try:
                self.events.append(decode(raw, TrainingRun, max_bytes=limit))
            except SchemaError:
                continue  # the gate's rule: one bad record must not block decisions
        for raw in self._evals.read_new():
            try:
                self.online.apply(decode(raw, OnlineEval, max_bytes=limit))
            except SchemaError as exc:
                log.warning("watch: skipping a bad online-eval record: %s", exc)
        runs = fold_runs(self.events)
        j = judge(runs, self.online, self.settings, standing_rollbacks(self.events) | self.published)
        log.info("%s", describe(j))  # every judgement, not only a changed one (one line each)
        self.last = j
        if j.action != "rollback":
            return None
        ev = rollback_event(runs, j)
        with TrainerEvents(self.settings) as writer:
            writer.record(ev)
        cur = runs.current
        assert cur is not None
        self.published.add((cur.run_id, cur.at_ms))
        log.warning("watch: rolled back v%s (run %s): %s", cur.model_version, cur.run_id, j.why)
        return ev


def watch(settings: CloseLoopSettings, *, once: bool = False, stop: Any = None) -> list[TrainingRun]:
    """Run the watch loop every ``tier3_watch_interval_s`` until ``stop`` (an Event) is set; return what it
    published. Broker errors are logged and retried (the loop must outlive a broker restart)."""
    w = Watcher(settings)
    out: list[TrainingRun] = []
    try:
        while True:
            try:
                ev = w.step()
                if ev is not None:
                    out.append(ev)
            except EventLogError as exc:
                log.warning("watch: %s; retrying", exc)
            if once or (stop is not None and stop.wait(settings.tier3_watch_interval_s)):
                return out
            if stop is None:
                time.sleep(settings.tier3_watch_interval_s)
    finally:
        w.close()


__all__ = ["REASON", "Judgement", "OnlineView", "TopicTail", "Watcher", "Window", "describe", "fails", "judge",
           "offline_figure", "primary_metric", "rollback_event", "standing_rollbacks", "watch"]
