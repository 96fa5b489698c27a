"""/metrics: the numbers of /status in Prometheus' text format, through ``prometheus_client``.

The worker keeps its numbers in :class:`streams.app.WorkerState` (one asyncio loop, no locks); a custom collector
reads them at scrape time from the /status dict, so /status and /metrics never disagree. Every sample carries
the ``worker_id`` label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

CONTENT_TYPE = "text/plain; version=0.0.4"  # the text format generate_latest writes (aiohttp adds the charset)

_ONLINE_GAUGES = {"n": "traces scored", "f1": "field F1 vs the teacher", "exact_match": "exact match with the teacher",
                  "json_valid_rate": "JSON validity", "schema_valid_rate": "answer-schema validity",
                  "latency_ms_p50": "served latency p50 (ms)", "latency_ms_p95": "served latency p95 (ms)"}


def families(status: Mapping[str, Any]) -> list[Metric]:
    """The metric families of one /status dict."""
    wid = str(status["worker_id"])
    out: list[Metric] = []

    def metric(name: str, kind: str, help_: str, labels: Iterable[str],
               samples: Iterable[tuple[Iterable[str], float | int | None]]) -> None:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        fam = cls(name, help_, labels=["worker_id", *labels])
        for values, value in samples:
            if value is not None:
                fam.add_metric([wid, *(str(v) for v in values)], float(value))
        out.append(fam)

    metric("tier3_worker_uptime_seconds", "gauge", "seconds since the worker started", [],
           [((), status["uptime_s"])])
    for key, value in status["counts"].items():
        metric(f"tier3_worker_{key}_total", "counter", f"experiences {key.replace('_', ' ')} since start", [],
               [((), value)])
    metric("tier3_worker_dead_letters_total", "counter", "dead letters written since start, by reason", ["reason"],
           [((r,), n) for r, n in status["dead_letters"]["by_reason"].items()])
    metric("tier3_worker_consumer_lag", "gauge", "messages behind the end of the experiences topic", ["partition"],
           [((p,), n) for p, n in status["lag"]["experiences"].items()])
    cur = status["windows"].get("current") or {}
    metric("tier3_window_enriched_traces", "gauge", "enriched traces in the current tumbling window, by task",
           ["task"], [((t,), n) for t, n in (cur.get("by_task") or {}).items()])
    t = status["teacher"]
    tl = ("kind", "model")
    tv = (t["kind"], t["model"])
    metric("tier3_teacher_in_flight", "gauge", "teacher calls in flight", tl, [(tv, t["in_flight"])])
    metric("tier3_teacher_calls_total", "counter", "teacher call attempts", tl, [(tv, t["calls"])])
    metric("tier3_teacher_errors_total", "counter", "failed teacher call attempts", tl, [(tv, t["errors"])])
    metric("tier3_teacher_error_rate", "gauge", "failed / all teacher call attempts", tl, [(tv, t["error_rate"])])
    metric("tier3_teacher_latency_ms", "gauge", "teacher call latency (recent calls)", (*tl, "quantile"),
           [((*tv, "0.5"), t["latency_ms_p50"]), ((*tv, "0.95"), t["latency_ms_p95"])])
    sft = status["trainer"]["tier3_sft"]
    metric("tier3_trainer_training_in_progress", "gauge", "1 while the trainer trains (from training-runs)", [],
           [((), None if sft["training_in_progress"] is None else int(sft["training_in_progress"]))])
    metric("tier3_trainer_next_check_in_seconds", "gauge", "seconds to the trainer's next check", [],
           [((), sft["next_check_in_s"])])
    out += online_eval_families(status.get("online_eval"), wid)
    return out


def online_eval_families(block: Mapping[str, Any] | None, worker_id: str) -> list[Metric]:
    """Gauges of the online_eval block (streams/online_eval.py): the current and previous window per task, arm
    and model version, and the shadow traces of the latest window."""
    if not block or "tasks" not in block:
        return []
    labels = ["worker_id", "task", "arm", "model_version", "window"]
    gauges = {g: GaugeMetricFamily(f"tier3_online_eval_{g}", f"online evaluation: {help_}, per window",
                                   labels=labels) for g, help_ in _ONLINE_GAUGES.items()}
    for task, t in block["tasks"].items():
        series: list[tuple[str, str, Mapping[str, Any]]] = [("baseline", "-", t["baseline"])]
        series += [("student", v, s) for v, s in t["versions"].items()]
        for arm, version, s in series:
            for which in ("current", "previous"):
                fig = s.get(which)
                if not fig:
                    continue
                for g, fam in gauges.items():
                    if fig.get(g) is not None:
                        fam.add_metric([worker_id, str(task), arm, str(version), which], float(fig[g]))
    cur = (block["cost"]["shadow_calls_by_window"] or [{}])[-1]
    shadow = GaugeMetricFamily("tier3_online_eval_shadow_traces",
                               "shadow traces (teacher calls) in the latest window", labels=["worker_id"])
    shadow.add_metric([worker_id], int(cur.get("shadow_traces", 0)))
    return [*gauges.values(), shadow]


class StatusCollector(Collector):
    """A prometheus_client collector over a /status function, read at every scrape."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        return families(self._status())


def registry_for(status: Callable[[], Mapping[str, Any]]) -> CollectorRegistry:
    """A registry of its own (not the process-global default) holding the worker's /status collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return registry


def metrics_text(status: Mapping[str, Any]) -> str:
    """Prometheus text exposition of one /status dict."""
    return generate_latest(registry_for(lambda: status)).decode()


__all__ = ["CONTENT_TYPE", "StatusCollector", "families", "metrics_text", "online_eval_families", "registry_for"]
