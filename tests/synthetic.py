"""Synthetic enriched traces of the widget-selector task, for tests and benchmarks (no teacher needed).

Deterministic: the same (n, seed) gives the same traces. Each has a plausible question, a short reasoning and a
schema-valid answer that follows simple rules (so a student can in principle learn them), and a source offset
spread round-robin over ``partitions``.
"""

from __future__ import annotations

import random

from schemas.messages import ChatMessage, EnrichedTrace, Experience, SourceOffset, TeacherInfo
from schemas.tasks import get_task

TASK = "widget_selector"

# (question template, widgets, time range, reasoning)
_RULES: tuple[tuple[str, list[str], str, str], ...] = (
    ("Why is {svc} slow since the last deploy?", ["latency_percentiles", "incident_timeline", "error_rate"], "24h",
     "Slowness after a deploy: latency percentiles first, then deploys on the incident timeline, then errors."),
    ("Which services are throwing errors right now on {svc}?", ["error_rate", "active_alerts", "log_volume"], "1h",
     "Errors happening now: the error rate, the firing alerts and the logs, over the last hour."),
    ("Show me CPU and memory for {svc} hosts.", ["cpu_usage", "memory_usage"], "1h",
     "The user names CPU and memory directly; a short range shows the current state."),
    ("How much revenue did {svc} make this quarter?", ["revenue_trend", "kpi_summary"], "90d",
     "Revenue over a quarter: the revenue trend over 90 days and headline KPI tiles."),
    ("Are we meeting our uptime SLA for {svc} this month?", ["uptime_sla", "incident_timeline"], "30d",
     "An SLA question over a month: the uptime gauge and the incidents that cost availability."),
    ("Is consumer lag growing on the {svc} queue?", ["queue_depth", "cpu_usage"], "24h",
     "Lag is queue depth over time; CPU shows whether consumers keep up."),
    ("How many users signed up and converted on {svc} this week?", ["conversion_funnel", "active_users"], "7d",
     "Sign-ups and conversion over a week: the funnel and active users."),
    ("What did {svc} cost per team last quarter?", ["cost_breakdown", "kpi_summary"], "90d",
     "Cost per team is the cost breakdown; the quarter means 90 days."),
)
_SERVICES = ("checkout", "search", "payments", "auth", "orders", "billing", "inventory", "api-gateway")


def synthetic_traces(n: int, *, seed: int = 0, topic: str = "tier3.enriched-traces", partitions: int = 3,
                     id_prefix: str = "exp") -> list[EnrichedTrace]:
    """``n`` distinct traces (ids ``{id_prefix}-{seed}-{i}``), deterministic in (n, seed)."""
    task = get_task(TASK)
    rng = random.Random(seed)
    out: list[EnrichedTrace] = []
    for i in range(n):
        q, widgets, time_range, reasoning = _RULES[rng.randrange(len(_RULES))]
        svc = _SERVICES[rng.randrange(len(_SERVICES))]
        answer = task.validate_answer({"widgets": widgets, "time_range": time_range})
        exp = Experience(
            experience_id=f"{id_prefix}-{seed}-{i}", task=TASK, created_at_ms=1_700_000_000_000 + i * 1000,
            messages=[ChatMessage(role="system", content=task.system_prompt),
                      ChatMessage(role="user", content=q.format(svc=svc))],
            response='{"widgets": ["kpi_summary"], "time_range": "24h"}', confidence=round(rng.random(), 3))
        out.append(EnrichedTrace(
            experience_id=exp.experience_id, task=TASK, enriched_at_ms=exp.created_at_ms + 500,
            sample_reason="random", experience=exp,
            teacher=TeacherInfo(kind="recorded", model="synthetic", latency_ms=1.0, attempts=1, recorded=True),
            reasoning=reasoning, answer=answer,
            source=SourceOffset(topic=topic, partition=i % partitions, offset=i // partitions)))
    return out
