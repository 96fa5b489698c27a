"""Online evaluation of the served student: agreement with the teacher per model version and tumbling window.

The loop (README, "Online evaluation and automatic rollback"):

1. The router records which arm and model version served each request (``served_by``). The worker enriches a
   shadow sample of the student's experiences (``TIER3_SHADOW_RATE``, by hash: ``streams/sampling.py``), so
   each shadow trace holds the student's served answer and the teacher's answer side by side.
2. This module scores every shadow trace with the offline evaluation's rule (:func:`schemas.tasks.score_output`)
   and adds it to a Faust table keyed by task, arm, model version, window and partition (sums of the field F1
   ``f1`` and of the task's weighted score ``task_f1``, the widget selector's primary metric, among others); the
   production baseline arm's randomly sampled traces are scored the same way, for comparison in the same windows.
3. When a window has been closed for ``TIER3_ONLINE_GRACE_S``, its figures are published on the compacted
   ``online-eval`` topic (:class:`schemas.OnlineEval`, one record per partition; again if a late trace changes
   it). The trainer side (``tier3 watch``, ``trainer/close_loop/online_watch.py``) reads them and rolls the promoted
   version back when it drifts.

Windows are those of the trace's timestamp (when it was enriched), like the count table's, so a window closes
as soon as the teacher has answered, whatever the teacher's latency. Keys carry the partition of the trace
(= its experience's): each key is written to its own changelog partition, so partitions never overwrite each
other and a restarted worker restores exactly its partitions' figures from the changelog.

Since an answer's window is its enrichment time, a window may hold answers served well before it (a backlog, a
slow teacher) and, around a promotion, answers served before and after it. So each value also keeps the earliest
and latest **served** time of its answers (``first_served_ms``/``last_served_ms``: the experiences'
``created_at_ms``, stamped by the router when it served them), published with the window; the watcher counts a
window for a version only if every answer in it was served at or after the version's latest promotion
(``first_served_ms >= at_ms``, docs/close_loop.md). A value begun by an older worker (restored from the changelog
without them) publishes them as None (unknown), never as the bounds of only the newer traces.

Values are sums (and a log-bucket latency histogram, 10 % wide buckets), so windows and partitions add up; one
table write per scored trace (only shadow and baseline-random traces are scored).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from schemas import EnrichedTrace, OnlineEval, SchemaError, decode, encode, get_task
from schemas.settings import TopicSpec
from schemas.tasks import score_output
from streams.settings import StreamsSettings

if TYPE_CHECKING:
    import faust

log = logging.getLogger("tier3.online_eval")

ONLINE_TABLE = "online_eval"
_BASE = 1.1  # latency histogram: bucket i holds (1.1**i, 1.1**(i+1)] ms
_FIELDS = ("n", "json_valid_n", "schema_valid_n", "exact_n", "f1_sum", "task_f1_sum", "extra_teacher_calls")


def changelog_spec(settings: StreamsSettings) -> TopicSpec:
    """The online-eval table's changelog, created up front with the source's partition count (Faust's rule)."""
    keep_ms = settings.tier3_window_s * (settings.tier3_online_keep_windows + 2) * 1000
    return TopicSpec(f"{settings.faust_app_id}-{ONLINE_TABLE}-changelog", settings.tier3_partitions,
                     {"cleanup.policy": "compact,delete", "retention.ms": str(keep_ms)})


# ------------------------------------------------------------------------------------------------ values


def window_key(task: str, arm: str, version: str | None, start_s: int, partition: int) -> str:
    return f"{task}|{arm}|{version or '-'}|{start_s}@{partition}"


def parse_key(key: str) -> tuple[str, str, str | None, int, int] | None:
    """(task, arm, version or None, window start s, partition), or None for a key that is not ours."""
    try:
        name, partition = key.rsplit("@", 1)
        task, arm, version, start = name.rsplit("|", 3)
        return task, arm, (None if version == "-" else version), int(start), int(partition)
    except ValueError:
        return None


def empty() -> dict[str, Any]:
    return {"n": 0, "json_valid_n": 0, "schema_valid_n": 0, "exact_n": 0, "f1_sum": 0.0, "task_f1_sum": 0.0,
            "set_f1_sums": {}, "extra_teacher_calls": 0, "latency_hist": {}, "first_served_ms": None,
            "last_served_ms": None}


def latency_bucket(ms: float) -> str:
    return str(math.floor(math.log(max(ms, 0.01)) / math.log(_BASE)))


def hist_quantile(hist: Mapping[str, int], q: float) -> float | None:
    """The q-quantile (0..1) of a latency histogram: the upper bound of the bucket that holds it (ms)."""
    items = sorted((int(k), int(v)) for k, v in hist.items() if int(v) > 0)
    total = sum(v for _, v in items)
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket, count in items:
        seen += count
        if seen >= rank:
            return round(_BASE ** (bucket + 1), 3)
    return round(_BASE ** (items[-1][0] + 1), 3)


def arm_of(trace: EnrichedTrace) -> tuple[str, str | None] | None:
    """Which series a trace is scored in: the student's shadow sample (per model version), the production
    baseline's uniform sample (``sample_reason`` random), or none (teacher-served or confidence-picked)."""
    served = trace.experience.served_by
    if trace.shadow and served.arm == "student" and served.model_version:
        return "student", served.model_version
    if served.arm == "baseline" and trace.sample_reason == "random":
        return "baseline", None
    return None


def add_trace(acc: Mapping[str, Any], trace: EnrichedTrace) -> dict[str, Any]:
    """``acc`` plus one trace's scores (a new dict: Faust tables persist assignments, not mutations)."""
    task = get_task(trace.task)
    score = score_output(task, trace.experience.response, trace.answer)
    out = merge(empty(), acc)
    served = trace.experience.created_at_ms
    if not out["n"]:  # the first answer: its served time is both bounds
        out["first_served_ms"] = out["last_served_ms"] = served
    elif out["first_served_ms"] is not None and out["last_served_ms"] is not None:  # None: unknown, stays so
        out["first_served_ms"] = min(out["first_served_ms"], served)
        out["last_served_ms"] = max(out["last_served_ms"], served)
    out["n"] += 1
    out["json_valid_n"] += int(score.json_valid)
    out["schema_valid_n"] += int(score.schema_valid)
    out["exact_n"] += int(score.exact)
    out["f1_sum"] = round(out["f1_sum"] + score.f1, 9)
    if "task_f1_sum" in out:  # absent: a value an older worker began (see merge)
        out["task_f1_sum"] = round(out["task_f1_sum"] + score.task_f1, 9)
    for k, v in score.set_f1.items():
        out["set_f1_sums"][k] = round(out["set_f1_sums"].get(k, 0.0) + v, 9)
    out["extra_teacher_calls"] += int(trace.sample_reason == "shadow")
    if trace.experience.latency_ms is not None:
        b = latency_bucket(trace.experience.latency_ms)
        out["latency_hist"][b] = out["latency_hist"].get(b, 0) + 1
    return out


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """The sum of two values (windows or partitions).

    A value with traces but no ``task_f1_sum`` was begun by a worker that did not score it (restored from the
    changelog across an upgrade): the sum then has no ``task_f1_sum`` either (unknown, not 0), so the published
    window says None and the watcher falls back to ``f1_sum`` for it. Likewise the served-time bounds: the min
    and max over the values with traces, None (unknown) when any of them lacks its bounds."""
    out = empty()
    for src in (a, b):
        for f in _FIELDS:
            out[f] += src.get(f) or 0
        for key in ("set_f1_sums", "latency_hist"):
            for k, v in (src.get(key) or {}).items():
                out[key][k] = out[key].get(k, 0) + v
    out["f1_sum"] = round(out["f1_sum"], 9)
    out["task_f1_sum"] = round(out["task_f1_sum"], 9)
    if any(src.get("n") and src.get("task_f1_sum") is None for src in (a, b)):
        del out["task_f1_sum"]
    full = [src for src in (a, b) if src.get("n")]
    if full and all(src.get("first_served_ms") is not None and src.get("last_served_ms") is not None
                    for src in full):
        out["first_served_ms"] = min(int(src["first_served_ms"]) for src in full)
        out["last_served_ms"] = max(int(src["last_served_ms"]) for src in full)
    return out


def figures(acc: Mapping[str, Any]) -> dict[str, Any]:
    """Rates and percentiles of one value (None where n is 0)."""
    n = int(acc.get("n", 0))

    def rate(x: float) -> float | None:
        return round(x / n, 6) if n else None

    out: dict[str, Any] = {
        "n": n, "json_valid_rate": rate(acc.get("json_valid_n", 0)),
        "schema_valid_rate": rate(acc.get("schema_valid_n", 0)), "exact_match": rate(acc.get("exact_n", 0)),
        "f1": rate(acc.get("f1_sum", 0.0)),
        "task_f1": rate(acc["task_f1_sum"]) if acc.get("task_f1_sum") is not None else None,
        "latency_ms_p50": hist_quantile(acc.get("latency_hist") or {}, 0.50),
        "latency_ms_p95": hist_quantile(acc.get("latency_hist") or {}, 0.95),
        "extra_teacher_calls": int(acc.get("extra_teacher_calls", 0)),
    }
    for k, v in sorted((acc.get("set_f1_sums") or {}).items()):
        out[f"set_f1_{k}"] = rate(v)
    return out


def _peek(value: bytes | None) -> bool:
    """Cheap pre-check before the full decode: only student-served or sampled-at-random traces matter."""
    return value is not None and (b'"shadow":true' in value or b'"sample_reason":"random"' in value)


# ------------------------------------------------------------------------------------------------ the worker


class OnlineEvaluator:
    """The table's logic: score traces into it, expire old windows, publish closed ones, the /status block."""

    def __init__(self, settings: StreamsSettings, table: Any, assigned: Any = lambda: None) -> None:
        self.settings = settings
        self.table = table
        self.size_s = settings.tier3_window_s
        self.assigned = assigned  # () -> set of partitions this worker owns, or None (not known yet)
        self.published: dict[str, int] = {}  # key -> n last published (memory: a restart republishes, idempotently)
        self.published_total = 0
        self.scored = 0
        self.errors = 0
        self._swept: dict[int, int] = {}  # partition -> the window in which its old keys were last removed

    def window_start(self, ts_s: float) -> int:
        return int(ts_s // self.size_s) * self.size_s

    def observe(self, value: bytes | None, partition: int, ts_s: float, now_s: float) -> None:
        """Score one encoded trace into the table (:meth:`observe_trace`)."""
        if not _peek(value):
            return
        try:
            trace = decode(value or b"", EnrichedTrace, max_bytes=self.settings.tier3_max_message_bytes)
        except SchemaError as exc:
            self.errors += 1
            log.warning("online eval: skipping an undecodable trace on partition %s: %s", partition, exc)
            return
        self.observe_trace(trace, partition, ts_s, now_s)

    def observe_trace(self, trace: EnrichedTrace, partition: int, ts_s: float, now_s: float) -> None:
        """Score one trace into the table. Must run inside the event the trace was written for (the changelog
        partition is its partition: the worker writes a trace to its experience's partition number)."""
        series = arm_of(trace)
        if series is None:
            return
        key = window_key(trace.task, series[0], series[1], self.window_start(ts_s), partition)
        self.table[key] = add_trace(self.table[key], trace)
        self.scored += 1
        cur = self.window_start(now_s)
        if self._swept.get(partition) == cur:
            return  # old keys are removed once per window and partition, not on every trace
        self._swept[partition] = cur
        cutoff = cur - self.settings.tier3_online_keep_windows * self.size_s
        for old in [k for k in list(self.table.keys()) if _old(k, partition, cutoff)]:
            del self.table[old]
            self.published.pop(old, None)

    def _items(self) -> list[tuple[str, tuple[str, str, str | None, int, int], dict[str, Any]]]:
        parts = self.assigned()
        out = []
        for key, value in list(self.table.items()):
            parsed = parse_key(str(key))
            if parsed is None or (parts is not None and parsed[4] not in parts) or not isinstance(value, dict):
                continue
            out.append((str(key), parsed, value))
        return out

    def due(self, now_s: float) -> list[OnlineEval]:
        """Closed windows (ended ``grace`` ago) not yet published with their current n."""
        out = []
        for key, (task, arm, version, start, partition), value in self._items():
            if start + self.size_s + self.settings.tier3_online_grace_s > now_s:
                continue
            n = int(value.get("n", 0))
            if self.published.get(key) == n:
                continue
            out.append(OnlineEval(
                task=task, arm=arm, model_version=version, window_start_ms=start * 1000,  # type: ignore[arg-type]
                window_end_ms=(start + self.size_s) * 1000, partition=partition, n=n,
                json_valid_n=int(value.get("json_valid_n", 0)), schema_valid_n=int(value.get("schema_valid_n", 0)),
                exact_n=int(value.get("exact_n", 0)), f1_sum=float(value.get("f1_sum", 0.0)),
                set_f1_sums=dict(value.get("set_f1_sums") or {}),
                task_f1_sum=(float(value["task_f1_sum"]) if value.get("task_f1_sum") is not None
                             else None if n else 0.0),
                extra_teacher_calls=int(value.get("extra_teacher_calls", 0)),
                latency_hist={str(k): int(v) for k, v in (value.get("latency_hist") or {}).items()},
                published_at_ms=int(time.time() * 1000), worker_id=self.settings.worker_id,
                first_served_ms=_served(value, "first_served_ms"), last_served_ms=_served(value, "last_served_ms")))
        return out

    def mark_published(self, rec: OnlineEval) -> None:
        key = window_key(rec.task, rec.arm, rec.model_version, rec.window_start_ms // 1000, rec.partition)
        self.published[key] = rec.n
        self.published_total += 1

    def block(self, now_s: float) -> dict[str, Any]:
        """The /status ``online_eval`` block: per task, per student version and for the baseline, the current
        and previous windows and the kept history; shadow calls per window; what bounds their cost."""
        s = self.settings
        merged: dict[tuple[str, str, str | None, int], dict[str, Any]] = {}
        for _key, (task, arm, version, start, _p), value in self._items():
            k = (task, arm, version, start)
            merged[k] = merge(merged.get(k, empty()), value)
        cur = self.window_start(now_s)
        prev = cur - self.size_s
        tasks: dict[str, Any] = {}
        shadow_by_window: dict[int, dict[str, int]] = {}
        for (task, arm, version, start), value in sorted(merged.items(), key=lambda kv: kv[0][3]):
            t = tasks.setdefault(task, {"versions": {}, "baseline": {"current": None, "previous": None,
                                                                     "history": []}})
            series = t["baseline"] if arm == "baseline" else t["versions"].setdefault(
                str(version), {"current": None, "previous": None, "history": []})
            fig = figures(value)
            series["history"].append({"start_ms": start * 1000, "end_ms": (start + self.size_s) * 1000, **fig,
                                      "first_served_ms": _served(value, "first_served_ms"),
                                      "last_served_ms": _served(value, "last_served_ms")})
            if start == cur:
                series["current"] = fig
            elif start == prev:
                series["previous"] = fig
            if arm == "student":
                w = shadow_by_window.setdefault(start, {"shadow_traces": 0, "extra_teacher_calls": 0})
                w["shadow_traces"] += fig["n"]
                w["extra_teacher_calls"] += fig["extra_teacher_calls"]
        return {
            "window_s": self.size_s, "current_window_start_ms": cur * 1000, "grace_s": s.tier3_online_grace_s,
            "tasks": tasks,
            "cost": {"shadow_rate": s.tier3_shadow_rate, "teacher_concurrency": s.tier3_teacher_concurrency,
                     "bound": "extra teacher calls <= shadow_rate x student-served experiences, and at most "
                              "teacher_concurrency calls in flight (shared with every other sampled experience)",
                     "shadow_calls_by_window": [{"start_ms": st * 1000, **v}
                                                for st, v in sorted(shadow_by_window.items())]},
            "scored_traces": self.scored, "published_windows": self.published_total,
        }


def _served(value: Mapping[str, Any], key: str) -> int | None:
    """A served-time bound of a value; None (unknown) unless both are known and it holds traces."""
    if not value.get("n") or value.get("first_served_ms") is None or value.get("last_served_ms") is None:
        return None
    return int(value[key])


def _old(key: Any, partition: int, cutoff: int) -> bool:
    parsed = parse_key(str(key))
    return parsed is not None and parsed[4] == partition and parsed[3] < cutoff


def install(app: faust.App, settings: StreamsSettings, table: Any, assigned: Any) -> OnlineEvaluator:
    """Add the publishing timer to ``app``; return the logic. The worker scores each trace it writes
    (:meth:`OnlineEvaluator.observe_trace`, inside the experience's event): no second read of enriched-traces."""
    online = OnlineEvaluator(settings, table, assigned)
    out_topic = app.topic(settings.online_eval_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw")

    @app.timer(min(1.0, settings.tier3_window_s / 4))
    async def publish_closed_windows() -> None:
        for rec in online.due(time.time()):
            key = window_key(rec.task, rec.arm, rec.model_version, rec.window_start_ms // 1000, rec.partition)
            await out_topic.send(key=key.encode(), value=encode(rec))
            online.mark_published(rec)

    return online


__all__ = ["ONLINE_TABLE", "OnlineEvaluator", "add_trace", "arm_of", "changelog_spec", "figures", "hist_quantile",
           "install", "merge", "parse_key", "window_key"]
