"""Write tier3's example data for the widget selector: production experiences and recorded teacher answers.

This is *example data written for tier3*, not a capture of a real application. It stands in for a month of a
dashboard product's traffic so that ``tier3 demo`` can show the whole flywheel offline:

- ``experiences.jsonl``: one :class:`schemas.Experience` per line, as the production app's capture hook would
  publish it: the task's system prompt plus the user's question, the production model's response (of mixed
  quality: correct, partly wrong, off-schema, not JSON), a confidence in [0, 1], latency, user and session ids.
- ``recorded_teacher.jsonl``: one answer per distinct prompt from a *rule-based example teacher* (the rules
  below know the right widgets for each kind of question; no LLM wrote them), in the reasoned output format of
  ``schemas/tasks.py`` (``<reasoning>...</reasoning><answer>{json}</answer>``), keyed by the hash the recorded
  teacher looks answers up by (:func:`prompt_key`).

Deterministic: the same seed writes byte-identical files. Run from the repository root::

    .venv/bin/python examples/widget_selector/make_examples.py            # 336 experiences, seed 3
    .venv/bin/python examples/widget_selector/make_examples.py --n 500 --seed 7 --out /tmp/ex
    .venv/bin/python examples/widget_selector/make_examples.py --variety wide --out /tmp/wide   # issue 20, item 5
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# Run as a script from anywhere: make the repository root importable for ``schemas``.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from schemas import Experience, ServedBy, get_task
from schemas.tasks import TaskDefinition

TASK_NAME = "widget_selector"
DEFAULT_N = 336
DEFAULT_SEED = 3
# 2026-10-26 08:00 UTC: the example month starts here; experiences are spread over the following 30 days.
START_MS = 1_793_001_600_000
SPAN_MS = 30 * 24 * 3600 * 1000

#: what the recorded answers say made them: the rules below, not an LLM (traces, /status, reports show this name)
VARIETIES = ("base", "wide")
TEACHER_MODEL = "rule-based example teacher (tier3 example data, not an LLM)"
PROD_MODEL = "widget-selector-prod"
PROD_VERSION = "2026.09"


def prompt_key(messages_for_teacher: Sequence[Mapping[str, str]]) -> str:
    """The recorded teacher's lookup key: sha256 of the messages as sent to the teacher (orjson, sorted keys).

    ``messages_for_teacher`` is ``task.messages_for_model(experience.messages)``: the production messages plus the
    one output-format instruction. Keep in step with ``streams/teachers.py`` (RecordedTeacher).
    """
    body = [{"role": m["role"], "content": m["content"]} for m in messages_for_teacher]
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


# --- what users ask ------------------------------------------------------------------------------------------

# Time phrases and the time range they mean. "{t}" in a template is replaced by one of these.
TIME_PHRASES: dict[str, list[str]] = {
    "1h": ["in the last hour", "right now", "over the past 60 minutes", "in the last few minutes",
           "since the top of the hour", "at the moment"],
    "24h": ["today", "in the last 24 hours", "since yesterday", "overnight", "since this morning",
            "over the last day"],
    "7d": ["this week", "over the last 7 days", "since Monday", "over the past week", "for the last few days",
           "week to date"],
    "30d": ["this month", "over the last 30 days", "in the past month", "month to date", "since the 1st",
            "over the last four weeks"],
    "90d": ["this quarter", "over the last 90 days", "since the quarter started", "over the past three months",
            "quarter to date", "in Q3"],
}


@dataclass(frozen=True)
class Scenario:
    """One kind of question: phrasings, the things it is asked about, and what a good answer shows."""

    name: str
    domain: str  # systems | business | operations
    templates: tuple[str, ...]  # with {e} (entity) and {t} (time phrase)
    entities: tuple[str, ...]
    widgets: tuple[str, ...]  # the right widgets, most important first
    times: tuple[str, ...]  # plausible time ranges for this question
    why: str  # the reasoning's first sentence: what the user is after
    # widgets that are plausible but wrong: what a weaker production model tends to pick instead
    distractors: tuple[str, ...] = ()


SCENARIOS: tuple[Scenario, ...] = (
    # ---- systems ----
    Scenario("slow_service", "systems",
             ("Why is {e} so slow {t}?", "{e} feels sluggish {t}, what's going on?",
              "users are complaining that {e} is slow {t}", "show me response times for {e} {t}",
              "is {e} slower than usual {t}?", "{e} latency {t}"),
             ("the checkout API", "the search service", "payments-gateway", "the login page", "api.eu-west",
              "the mobile backend", "the GraphQL gateway", "inventory-svc"),
             ("latency_percentiles", "error_rate", "cpu_usage", "incident_timeline"), ("1h", "24h", "7d"),
             "The user wants to know whether and why a service is slow, so request latency is the core signal",
             ("uptime_sla", "network_traffic", "kpi_summary")),
    Scenario("errors_spike", "systems",
             ("Are we seeing more 500s on {e} {t}?", "error spike on {e} {t}?", "why is {e} throwing errors {t}",
              "show errors for {e} {t}", "did the last deploy break {e}? errors {t}",
              "{e} is failing requests {t}, show me"),
             ("the checkout API", "orders-service", "the auth service", "payments-gateway", "the storefront",
              "notification-worker", "the public API", "billing-svc"),
             ("error_rate", "incident_timeline", "log_volume", "active_alerts", "latency_percentiles"),
             ("1h", "24h", "7d"),
             "The user is asking about failing requests, so the error rate against its SLO threshold comes first",
             ("uptime_sla", "support_tickets", "deployment_frequency")),
    Scenario("host_resources", "systems",
             ("How are the {e} hosts doing on CPU and memory {t}?", "resource usage of {e} {t}",
              "is {e} running hot {t}?", "do we need to scale {e}? show load {t}",
              "memory pressure on {e} {t}?", "CPU and RAM for {e} {t}"),
             ("db-primary", "the Kafka brokers", "the web tier", "k8s node pool b", "the ML inference fleet",
              "redis-cache", "the batch workers", "elastic-data nodes"),
             ("cpu_usage", "memory_usage", "disk_io", "network_traffic"), ("1h", "24h", "7d"),
             "The user wants the resource load of a group of hosts, which is CPU and memory first",
             ("latency_percentiles", "cost_breakdown", "queue_depth")),
    Scenario("disk", "systems",
             ("disk IO on {e} {t}", "is {e} disk-bound {t}?", "why are writes slow on {e} {t}",
              "storage throughput for {e} {t}", "IOPS on {e} {t}"),
             ("db-primary", "the Postgres replicas", "elastic-data nodes", "the Kafka brokers", "the backup server",
              "ceph cluster 2"),
             ("disk_io", "latency_percentiles", "cpu_usage"), ("1h", "24h", "7d"),
             "The user suspects storage is the bottleneck, so disk throughput and IOPS are the main view",
             ("memory_usage", "log_volume")),
    Scenario("network", "systems",
             ("bandwidth usage on {e} {t}", "is {e} saturating its network {t}?", "network traffic for {e} {t}",
              "egress from {e} {t} — are we paying too much?", "packet throughput on {e} {t}"),
             ("the CDN edge", "the VPN gateway", "the load balancers", "api.eu-west", "the data pipeline",
              "the office uplink"),
             ("network_traffic", "latency_percentiles", "cost_breakdown"), ("1h", "24h", "7d", "30d"),
             "The user asks about bandwidth, so ingress/egress per interface is the direct answer",
             ("disk_io", "error_rate")),
    Scenario("availability", "systems",
             ("what was our uptime for {e} {t}?", "did {e} meet its SLA {t}?", "availability report for {e} {t}",
              "how many nines did {e} have {t}", "SLO compliance of {e} {t}"),
             ("the checkout API", "the public API", "the storefront", "the mobile backend", "the auth service",
              "all customer-facing services"),
             ("uptime_sla", "incident_timeline", "error_rate", "kpi_summary"), ("7d", "30d", "90d"),
             "The user wants availability against the SLA target, which is exactly the uptime gauge",
             ("latency_percentiles", "active_alerts")),
    Scenario("on_call", "systems",
             ("what's on fire {t}?", "anything I should know about before my on-call shift? {t}",
              "show me current alerts for {e}", "what is alerting on {e} {t}", "status of {e} {t} — any pages?",
              "give me the on-call overview for {e}"),
             ("the platform team", "production", "the payments stack", "the EU region", "the data platform",
              "everything"),
             ("active_alerts", "incident_timeline", "error_rate", "uptime_sla"), ("1h", "24h"),
             "The user is on call and wants to know what needs attention, so firing alerts come first",
             ("cpu_usage", "deployment_frequency", "log_volume")),
    Scenario("incident_review", "systems",
             ("what happened during the {e} outage {t}?", "timeline of the {e} incident {t}",
              "post-mortem data for {e} {t}", "walk me through the {e} incident {t}"),
             ("checkout", "DNS", "database failover", "login", "payments", "search"),
             ("incident_timeline", "error_rate", "latency_percentiles", "deployment_frequency", "log_volume"),
             ("24h", "7d"),
             "The user is reviewing an incident, so the timeline of incidents, deploys and changes is the backbone",
             ("active_alerts", "support_tickets")),
    Scenario("deploys", "systems",
             ("how often did {e} deploy {t}?", "deployment frequency for {e} {t}", "DORA metrics for {e} {t}",
              "change failure rate of {e} {t}", "are {e} shipping faster {t}?"),
             ("the platform team", "the mobile team", "the payments squad", "all teams", "the growth team",
              "backend services"),
             ("deployment_frequency", "incident_timeline", "error_rate"), ("7d", "30d", "90d"),
             "The user asks about delivery performance, which the deployment frequency chart shows directly",
             ("uptime_sla", "kpi_summary")),
    Scenario("logs", "systems",
             ("log volume for {e} {t}", "why are {e} logs exploding {t}?", "how many warnings is {e} logging {t}",
              "noisy logs from {e} {t}", "errors in the {e} logs {t}"),
             ("orders-service", "the ingress controller", "notification-worker", "the auth service",
              "the batch workers", "billing-svc"),
             ("log_volume", "error_rate", "cost_breakdown"), ("1h", "24h", "7d"),
             "The user wants to see how much and what level of logging a service produces",
             ("disk_io", "active_alerts")),
    Scenario("queues", "systems",
             ("is the {e} queue backing up {t}?", "consumer lag on {e} {t}", "why is {e} processing delayed {t}",
              "how deep is the {e} backlog {t}", "are the {e} consumers keeping up {t}?"),
             ("email", "orders", "webhooks", "image-resize", "payments-events", "search-indexing"),
             ("queue_depth", "cpu_usage", "error_rate", "latency_percentiles"), ("1h", "24h"),
             "The user asks whether a queue is keeping up, which is the queue depth / consumer lag",
             ("network_traffic", "log_volume")),
    Scenario("cloud_cost", "operations",
             ("what are we spending on {e} {t}?", "cloud costs for {e} {t}", "why did the {e} bill go up {t}?",
              "cost breakdown of {e} {t}", "which team spends the most on {e} {t}?"),
             ("AWS", "GCP", "Kubernetes", "the data warehouse", "GPU instances", "egress", "S3 storage"),
             ("cost_breakdown", "kpi_summary", "cpu_usage"), ("7d", "30d", "90d"),
             "The user wants to know where money goes, which the cost treemap by service or team shows",
             ("revenue_trend", "network_traffic")),
    # ---- business ----
    Scenario("revenue", "business",
             ("how is revenue trending {t}?", "show me revenue for {e} {t}", "are we up or down on {e} sales {t}?",
              "revenue vs last period for {e} {t}", "did {e} revenue grow {t}?", "{e} revenue {t}"),
             ("the US store", "enterprise plans", "the marketplace", "subscriptions", "the EU business",
              "add-ons", "all products"),
             ("revenue_trend", "kpi_summary", "sales_by_region", "top_customers"), ("7d", "30d", "90d"),
             "The user asks how revenue is developing, so the revenue trend with a previous-period comparison leads",
             ("conversion_funnel", "churn_rate", "cost_breakdown")),
    Scenario("funnel", "business",
             ("where are we losing people in the {e} funnel {t}?", "conversion rate of {e} {t}",
              "why did {e} sign-ups drop {t}?", "funnel for {e} {t}", "how well does {e} convert {t}?"),
             ("checkout", "the free trial", "onboarding", "the pricing page", "mobile sign-up", "the new landing page"),
             ("conversion_funnel", "active_users", "kpi_summary", "revenue_trend"), ("24h", "7d", "30d"),
             "The user wants to find where visitors drop out, which is step conversion in the funnel",
             ("churn_rate", "error_rate")),
    Scenario("engagement", "business",
             ("how many active users did {e} have {t}?", "DAU and MAU for {e} {t}", "is usage of {e} growing {t}?",
              "engagement on {e} {t}", "active users of {e} {t} compared to before"),
             ("the mobile app", "the web app", "the API", "the new editor", "team workspaces", "the free tier"),
             ("active_users", "kpi_summary", "churn_rate"), ("7d", "30d", "90d"),
             "The user asks about usage, so daily/weekly/monthly active users are the main chart",
             ("conversion_funnel", "revenue_trend")),
    Scenario("churn", "business",
             ("are we losing customers in {e} {t}?", "churn for {e} {t}", "retention of the {e} cohort {t}",
              "why are {e} customers cancelling {t}?", "how sticky is {e} {t}?"),
             ("SMB", "enterprise", "the Pro plan", "the annual plan", "EMEA", "self-serve"),
             ("churn_rate", "active_users", "support_tickets", "kpi_summary"), ("30d", "90d"),
             "The user wants to understand retention, which the churn and cohort view shows directly",
             ("revenue_trend", "conversion_funnel")),
    Scenario("customers", "business",
             ("who are our biggest customers {e} {t}?", "top accounts by revenue {e} {t}",
              "which customers spend the most {e} {t}?", "largest customers {e} {t}"),
             ("in EMEA", "on enterprise plans", "in North America", "for the API", "in retail", "overall"),
             ("top_customers", "revenue_trend", "kpi_summary"), ("30d", "90d"),
             "The user asks for the largest accounts, which is the top-customers table",
             ("sales_by_region", "churn_rate")),
    Scenario("regions", "business",
             ("sales by region {t}", "which countries bought the most {e} {t}?", "how is {e} selling in APAC {t}?",
              "regional breakdown of {e} sales {t}", "where do {e} orders come from {t}?"),
             ("hardware", "subscriptions", "the new model", "gift cards", "accessories", "enterprise licences"),
             ("sales_by_region", "revenue_trend", "top_customers", "kpi_summary"), ("7d", "30d", "90d"),
             "The user asks where sales come from geographically, which the regional map answers",
             ("order_fulfillment", "active_users")),
    Scenario("exec_summary", "business",
             ("give me the headline numbers for {e} {t}", "exec summary of {e} {t}", "how did {e} do {t}?",
              "board-meeting numbers for {e} {t}", "quick overview of {e} {t}"),
             ("the business", "the company", "the EU unit", "the SaaS line", "the marketplace"),
             ("kpi_summary", "revenue_trend", "active_users", "churn_rate", "cost_breakdown"), ("7d", "30d", "90d"),
             "The user wants an overview, so headline KPI tiles first, then the trends behind them",
             ("top_customers", "uptime_sla")),
    # ---- operations ----
    Scenario("inventory", "operations",
             ("which {e} are running low {t}?", "stock levels for {e} {t}", "do we need to reorder {e}?",
              "inventory of {e} vs reorder point {t}", "are we about to run out of {e} {t}?"),
             ("SKUs in the Berlin warehouse", "spare parts", "winter jackets", "phone cases", "packaging material",
              "best-sellers"),
             ("inventory_levels", "order_fulfillment", "sales_by_region"), ("24h", "7d", "30d"),
             "The user asks about stock against reorder points, which the inventory levels chart shows",
             ("top_customers", "revenue_trend")),
    Scenario("fulfillment", "operations",
             ("how many orders shipped late {t}?", "order fulfillment for {e} {t}", "are {e} orders going out on time "
              "{t}?", "shipping backlog at {e} {t}", "late deliveries from {e} {t}"),
             ("the Berlin warehouse", "the US DC", "marketplace sellers", "same-day delivery", "returns",
              "the Rotterdam hub"),
             ("order_fulfillment", "inventory_levels", "support_tickets", "kpi_summary"), ("24h", "7d", "30d"),
             "The user wants orders received, shipped and late, which is the fulfillment chart",
             ("queue_depth", "sales_by_region")),
    Scenario("support", "operations",
             ("how is support doing {t}?", "open tickets for {e} {t}", "time to resolve {e} tickets {t}",
              "is the {e} support queue growing {t}?", "support backlog for {e} {t}"),
             ("billing", "enterprise customers", "the mobile app", "shipping issues", "login problems",
              "tier-2 support"),
             ("support_tickets", "kpi_summary", "churn_rate"), ("24h", "7d", "30d"),
             "The user asks about the support workload, which the tickets chart with time to resolve shows",
             ("incident_timeline", "error_rate")),
    # ---- mixed: questions that span domains ----
    Scenario("outage_impact", "mixed",
             ("did the {e} outage cost us sales {t}?", "business impact of the {e} incident {t}",
              "how much revenue did we lose when {e} went down {t}?"),
             ("checkout", "payments", "search", "login"),
             ("incident_timeline", "revenue_trend", "error_rate", "conversion_funnel", "support_tickets"),
             ("24h", "7d"),
             "The user connects an incident to money, so the incident timeline goes next to revenue and conversion",
             ("uptime_sla", "active_alerts")),
    Scenario("launch", "mixed",
             ("how is the {e} launch going {t}?", "launch dashboard for {e} {t}", "is {e} holding up after launch "
              "{t}?"),
             ("new checkout", "mobile v5", "the EU store", "the API v2", "dark mode"),
             ("kpi_summary", "active_users", "error_rate", "latency_percentiles", "conversion_funnel"),
             ("1h", "24h", "7d"),
             "The user wants both adoption and health of a launch: headline numbers, usage and error signals",
             ("revenue_trend", "deployment_frequency")),
    Scenario("capacity_cost", "mixed",
             ("can we cut costs on {e} without hurting performance? {t}", "is {e} over-provisioned {t}?",
              "right-size {e}: usage vs cost {t}"),
             ("the web tier", "the ML inference fleet", "the Kafka brokers", "the data warehouse", "k8s node pool b"),
             ("cost_breakdown", "cpu_usage", "memory_usage", "latency_percentiles"), ("7d", "30d"),
             "The user weighs cost against load, so the cost breakdown sits next to CPU and memory utilisation",
             ("network_traffic", "kpi_summary")),
)

# Prefixes and suffixes real users add; some questions get one (lower case, typos and all).
PREFIXES = ("", "", "", "", "hey, ", "quick one: ", "hi — ", "question: ", "pls ", "dashboard: ")
SUFFIXES = ("", "", "", "", " thanks", " asap", " for the standup", " for my report", "?", " — urgent")


def widget_phrase(task: TaskDefinition, widget: str) -> str:
    """A widget's catalog description without its chart type, lower-cased: 'request latency p50/p95/p99'."""
    desc = task.catalog.get(widget, widget)
    desc = desc.split(" (")[0]
    return desc[0].lower() + desc[1:]


def reasoning_for(task: TaskDefinition, sc: Scenario, entity: str, time_phrase: str, time_range: str,
                  widgets: Sequence[str], rng: random.Random) -> str:
    """The teacher's reasoning: what the user wants, why each widget, which time range and why."""
    lines = [f"{sc.why}."]
    scope = re.sub(r"^(in|on|for) ", "", entity)
    if scope and scope not in ("overall", "everything"):
        lines.append(f"The question is scoped to {scope}, so every widget should be filtered to it.")
    lead, *rest = widgets
    lines.append(f"`{lead}` goes first: {widget_phrase(task, lead)} answers the question most directly.")
    for w in rest:
        lines.append(rng.choice((
            f"`{w}` adds context: {widget_phrase(task, w)}.",
            f"`{w}` helps explain the cause: {widget_phrase(task, w)}.",
            f"`{w}` shows {widget_phrase(task, w)}, which the user will likely ask about next.",
        )))
    if sc.distractors:
        d = rng.choice(sc.distractors)
        lines.append(f"`{d}` is related but would not answer this question, so I leave it out.")
    if time_phrase:
        lines.append(f'"{time_phrase}" maps to the {time_range} range.')
    else:
        lines.append(f"No period is named; {time_range} is the natural default for this kind of question.")
    return "\n".join(lines)


# --- the wide variety (``--variety wide``): more phrasings, entities, time phrases, framings and typos ---------
#
# Written for issue 20's item 5 (does the example data hold generalisation back?). The base variety above is
# unchanged (the committed files are its output); ``wide`` adds, per scenario, more templates and entities, more
# time phrases per range, ways people frame a question (a context sentence, an indirect ask) and typing noise.
# The labels follow the same rules: the scenario's widgets trimmed by the template's index, the named period's
# range or the scenario's default. The golden set (golden.jsonl) stays outside: tests/test_golden_set.py checks
# that no golden question and no golden time phrase is one this variety produces.

WIDE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "slow_service": ("{e} takes forever to respond {t}", "can you check if {e} got slower {t}",
                     "page loads on {e} are crawling {t}", "p99 for {e} {t}", "what's dragging down {e} {t}?",
                     "response time regression on {e} {t}?"),
    "errors_spike": ("we're getting a lot of failures from {e} {t}", "{e} returns 5xx {t}, how bad is it",
                     "error budget burn on {e} {t}", "count of failed calls to {e} {t}",
                     "something is broken in {e} {t}", "is {e} erroring more than normal {t}?"),
    "host_resources": ("are the {e} machines overloaded {t}", "utilisation of {e} {t}", "{e} box health {t}",
                       "how much headroom is left on {e} {t}", "is {e} out of memory {t}?",
                       "load on {e} {t}"),
    "disk": ("{e} storage latency {t}", "are the disks on {e} maxed out {t}", "read/write throughput {e} {t}",
             "disk queue on {e} {t}?", "why is {e} waiting on IO {t}"),
    "network": ("how much data is {e} pushing {t}", "throughput in and out of {e} {t}",
                "is the pipe to {e} full {t}?", "network usage {e} {t}", "traffic spike on {e} {t}?"),
    "availability": ("was {e} up {t}?", "downtime minutes for {e} {t}", "uptime numbers {e} {t}",
                     "did we breach the SLA on {e} {t}", "reliability of {e} {t}"),
    "on_call": ("handing over the pager for {e}, what's open", "any active incidents on {e} {t}?",
                "what paged {t}?", "is anything red for {e} {t}", "current alert status {e}"),
    "incident_review": ("root cause of the {e} problem {t}", "sequence of events in the {e} incident {t}",
                        "need the facts for the {e} retro {t}", "what broke during the {e} issue {t}?"),
    "deploys": ("release cadence for {e} {t}", "how many releases did {e} push {t}?",
                "lead time and deploy count for {e} {t}", "is {e} deploying less {t}?",
                "ship rate of {e} {t}"),
    "logs": ("what is {e} writing to its logs {t}", "{e} log lines per minute {t}",
             "why did log ingestion from {e} jump {t}", "warn and error logs for {e} {t}",
             "is {e} spamming the logs {t}?"),
    "queues": ("backlog in {e} {t}", "are messages piling up in {e} {t}?", "lag of the {e} consumers {t}",
               "{e} jobs stuck {t}?", "how far behind is {e} {t}"),
    "cloud_cost": ("cost of {e} {t}", "where is our {e} money going {t}", "{e} spend by team {t}",
                   "is our {e} bill under control {t}?", "breakdown of {e} charges {t}"),
    "revenue": ("how much did {e} bring in {t}", "sales numbers for {e} {t}", "income from {e} {t}",
                "{e} bookings trend {t}", "is {e} making more money {t}?"),
    "funnel": ("drop-off in {e} {t}", "how many people finish {e} {t}?", "{e} completion rate {t}",
               "which step of {e} loses the most users {t}", "conversion through {e} {t}"),
    "engagement": ("how many people use {e} {t}", "weekly active users on {e} {t}", "adoption of {e} {t}",
                   "is {e} getting more users {t}?", "usage numbers for {e} {t}"),
    "churn": ("cancellation rate in {e} {t}", "how many {e} accounts left {t}?", "{e} retention {t}",
              "are {e} subscribers leaving {t}", "logo churn for {e} {t}"),
    "customers": ("biggest spenders {e} {t}", "list our top clients {e} {t}", "highest value accounts {e} {t}",
                  "who pays us the most {e} {t}"),
    "regions": ("{e} revenue per country {t}", "geographic split of {e} orders {t}",
                "which markets buy {e} {t}?", "{e} sales by country {t}", "map of {e} sales {t}"),
    "exec_summary": ("key metrics for {e} {t}", "one-page summary of {e} {t}", "topline for {e} {t}",
                     "how is {e} doing overall {t}?", "KPIs for {e} {t}"),
    "inventory": ("how much {e} is left {t}", "stock on hand for {e} {t}", "{e} below safety stock {t}?",
                  "what {e} should we restock", "inventory status {e} {t}"),
    "fulfillment": ("are we shipping {e} on time {t}", "delayed shipments at {e} {t}",
                    "on-time delivery rate for {e} {t}", "how many {e} orders are stuck {t}?",
                    "{e} dispatch performance {t}"),
    "support": ("ticket volume for {e} {t}", "how fast are we closing {e} tickets {t}?",
                "customer complaints about {e} {t}", "helpdesk load from {e} {t}", "{e} support SLAs {t}"),
    "outage_impact": ("what did the {e} downtime cost {t}?", "lost orders from the {e} outage {t}",
                      "revenue hit from the {e} incident {t}", "did customers notice the {e} outage {t}?"),
    "launch": ("first numbers for {e} {t}", "did {e} go well {t}?", "{e} rollout health {t}",
               "adoption and errors for {e} {t}", "how are users taking {e} {t}?"),
    "capacity_cost": ("are we paying for idle {e} {t}?", "can {e} run on fewer machines {t}?",
                      "cost vs utilisation for {e} {t}", "is {e} too big for its load {t}?"),
}

WIDE_ENTITIES: dict[str, tuple[str, ...]] = {
    "slow_service": ("the booking API", "cart-service", "the admin console", "recommendations"),
    "errors_spike": ("the image API", "shipping-svc", "the partner API", "sso"),
    "host_resources": ("the API pods", "the reporting cluster", "worker group c", "the cache nodes"),
    "disk": ("the MySQL primary", "the log archive", "the build servers", "clickhouse"),
    "network": ("the transit gateway", "the media servers", "us-east-1", "the NAT gateways"),
    "availability": ("the booking API", "the status page", "the partner API", "the admin console"),
    "on_call": ("the checkout team", "the infra team", "the US region", "the core services"),
    "incident_review": ("cache", "CDN", "billing", "SSO"),
    "deploys": ("the web team", "the infra team", "the data team", "frontend"),
    "logs": ("the API gateway", "the cron jobs", "sso", "the mobile backend"),
    "queues": ("sms", "invoice-generation", "pdf-export", "analytics-events"),
    "cloud_cost": ("Azure", "the CI runners", "Snowflake", "log storage"),
    "revenue": ("the app store", "the partner channel", "the LATAM business", "services"),
    "funnel": ("the signup flow", "the upgrade flow", "the demo-request form", "account activation"),
    "engagement": ("the desktop client", "reports", "the chat feature", "the Android app"),
    "churn": ("the monthly plan", "APAC", "mid-market", "the starter plan"),
    "customers": ("in APAC", "in healthcare", "on the monthly plan", "in Germany"),
    "regions": ("the starter kit", "refurbished devices", "the premium tier", "spare parts"),
    "exec_summary": ("the APAC unit", "the hardware line", "the group", "the payments business"),
    "inventory": ("SKUs in the Madrid warehouse", "printer toner", "running shoes", "the top 50 products"),
    "fulfillment": ("the Madrid warehouse", "express orders", "the UK hub", "international orders"),
    "support": ("refund requests", "the API", "onboarding", "VIP accounts"),
    "outage_impact": ("cart", "CDN", "signup", "SSO"),
    "launch": ("the loyalty programme", "the iPad app", "the new pricing", "one-click checkout"),
    "capacity_cost": ("the reporting cluster", "the CI runners", "the cache nodes", "the GPU pool"),
}

WIDE_TIME_PHRASES: dict[str, list[str]] = {
    "1h": ["within the last hour", "over the last 60 minutes", "this hour", "for the last hour", "in the last 60 mins",
           "just now", "currently"],
    "24h": ["over the last 24h", "in the last day", "since yesterday morning", "for today", "since midnight",
            "in the past 24h", "today so far"],
    "7d": ["in the last week", "over the last seven days", "past 7 days", "since last Monday", "this past week",
           "for the week", "over the last 7d"],
    "30d": ["in the last month", "past 30 days", "over the last thirty days", "since the start of the month",
            "this calendar month", "for the month", "in the last 4 weeks"],
    "90d": ["in the last quarter", "past 90 days", "over the last three months", "for the quarter",
            "this fiscal quarter", "in the last 3 months", "quarter so far"],
}

# How people frame a question: a sentence of context first, or an indirect ask around it ("{q}": the question).
WIDE_FRAMES = (
    "We have a review tomorrow. {q}", "Context: a customer escalated this morning. {q}", "My manager asked me: {q}",
    "I just joined the team, so bear with me. {q}", "{q} I need it for a meeting.", "{q} Keep it simple.",
    "Can you build a dashboard for this: {q}", "I need a view that answers: {q}",
    "Which widgets would you show for \"{q}\"", "help me set up a dashboard. {q}",
    "Not sure where to look. {q}", "{q} (asking for the weekly report)",
)

# Typing noise: contractions without apostrophes, chat abbreviations, a letter dropped, swapped or doubled.
WIDE_ABBREVIATIONS = (("what's", "whats"), ("don't", "dont"), ("you", "u"), ("are", "r"), ("please", "pls"),
                      ("because", "bc"), ("with", "w/"), ("it's", "its"))


def typo(text: str, rng: random.Random) -> str:
    """One or two slips of the keyboard in words of four letters or more (never in the time phrase's digits)."""
    words = text.split(" ")
    for _ in range(rng.randint(1, 2)):
        idx = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
        if not idx:
            break
        i = rng.choice(idx)
        w, j = words[i], rng.randrange(1, len(words[i]) - 1)
        kind = rng.choice(("drop", "swap", "double"))
        if kind == "drop":
            w = w[:j] + w[j + 1:]
        elif kind == "swap":
            w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        else:
            w = w[:j] + w[j] + w[j:]
        words[i] = w
    return " ".join(words)


def abbreviate(text: str, rng: random.Random) -> str:
    """Chat-style short forms for the whole words that have one (each applied with probability one half)."""
    for long, short in WIDE_ABBREVIATIONS:
        if rng.random() < 0.5:
            text = re.sub(rf"\b{re.escape(long)}\b", short, text)
    return text


def scenario_templates(sc: Scenario, variety: str) -> tuple[str, ...]:
    return sc.templates + WIDE_TEMPLATES.get(sc.name, ()) if variety == "wide" else sc.templates


def scenario_entities(sc: Scenario, variety: str) -> tuple[str, ...]:
    return sc.entities + WIDE_ENTITIES.get(sc.name, ()) if variety == "wide" else sc.entities


def time_phrases(time_range: str, variety: str) -> list[str]:
    return TIME_PHRASES[time_range] + WIDE_TIME_PHRASES[time_range] if variety == "wide" else TIME_PHRASES[time_range]


# --- production responses of mixed quality -------------------------------------------------------------------

def production_response(answer: dict[str, Any], sc: Scenario, rng: random.Random) -> tuple[str, str, float]:
    """(response text, quality label, confidence) of the production model for a question whose right answer is
    ``answer``. Quality mix: ~50 % correct, ~25 % partly wrong widgets or range, ~10 % off-schema, ~15 % not JSON.
    Confidence follows quality loosely (a production model is often confidently wrong)."""
    widgets, tr = list(answer["widgets"]), answer["time_range"]
    roll = rng.random()
    if roll < 0.50:
        quality = "correct"
        if rng.random() < 0.3 and len(widgets) > 2:  # same set, different order: still right as a set
            widgets = [widgets[0], *rng.sample(widgets[1:], len(widgets) - 1)]
        body: Any = {"widgets": widgets, "time_range": tr}
        conf = rng.betavariate(6, 2)
    elif roll < 0.75:
        quality = "partial"
        kind = rng.choice(("drop", "swap", "range", "extra"))
        if kind == "drop" and len(widgets) > 1:
            widgets = widgets[: rng.randint(1, len(widgets) - 1)]
        elif kind == "swap" and sc.distractors:
            widgets[rng.randrange(len(widgets))] = rng.choice(sc.distractors)
            widgets = list(dict.fromkeys(widgets))
        elif kind == "extra" and sc.distractors and len(widgets) < 6:
            widgets.append(rng.choice(sc.distractors))
            widgets = list(dict.fromkeys(widgets))
        else:
            tr = rng.choice([r for r in TIME_PHRASES if r != tr])
        body = {"widgets": widgets, "time_range": tr}
        conf = rng.betavariate(4, 3)
    elif roll < 0.85:
        quality = "off_schema"
        kind = rng.choice(("unknown_widget", "bad_range", "too_many", "wrong_key"))
        if kind == "unknown_widget":
            body = {"widgets": [*widgets[:2], rng.choice(("response_time_heatmap", "sales_map", "cpu_graph",
                                                          "error_log", "customer_list"))], "time_range": tr}
        elif kind == "bad_range":
            body = {"widgets": widgets, "time_range": rng.choice(("2w", "last_week", "1d", "today", "quarter"))}
        elif kind == "too_many":
            extra = [w for w in ("kpi_summary", "cpu_usage", "error_rate", "revenue_trend", "active_users",
                                 "log_volume", "active_alerts") if w not in widgets]
            body = {"widgets": (widgets + extra)[:8], "time_range": tr}
        else:
            body = {"widget_ids": widgets, "range": tr}
        conf = rng.betavariate(3, 3)
    else:
        quality = "not_json"
        raw = orjson.dumps({"widgets": widgets, "time_range": tr}).decode()
        kind = rng.choice(("truncated", "prose", "single_quotes", "trailing_comma", "fenced_prose"))
        if kind == "truncated":
            text = raw[: rng.randint(10, len(raw) - 5)]
        elif kind == "prose":
            text = f"I'd suggest showing {', '.join(widgets)} for the {tr} range."
        elif kind == "single_quotes":
            text = raw.replace('"', "'")
        elif kind == "trailing_comma":
            text = raw[:-2] + '",}' if raw.endswith('"}') else raw[:-1] + ",}"
        else:
            text = f"Sure! Here are the widgets:\n```json\n{raw}\n```\nLet me know if you need anything else."
        return text, quality, round(rng.betavariate(2, 4), 3)
    return orjson.dumps(body).decode(), quality, round(conf, 3)


# --- the whole file ------------------------------------------------------------------------------------------

def build(n: int, seed: int, variety: str = "base") -> tuple[list[Experience], list[dict[str, Any]]]:
    """``n`` experiences with distinct questions, and one recorded teacher answer per distinct prompt.

    ``variety``: ``base`` (the committed files) or ``wide`` (more phrasings, entities, time phrases, framings and
    typing noise; same scenarios, same labelling rules)."""
    if variety not in VARIETIES:
        raise ValueError(f"variety must be one of {VARIETIES}, not {variety!r}")
    task = get_task(TASK_NAME)
    rng = random.Random(seed)
    users = [f"u-{i:04d}" for i in rng.sample(range(10_000), 64)]
    sessions: dict[str, tuple[str, int]] = {}  # user -> (session id, number of questions left in it)

    seen: set[str] = set()
    experiences: list[Experience] = []
    recorded: dict[str, dict[str, Any]] = {}
    times = sorted(START_MS + rng.randrange(SPAN_MS) for _ in range(n))
    attempts = 0
    while len(experiences) < n:
        attempts += 1
        if attempts > n * 200:
            raise SystemExit(f"could only make {len(experiences)} distinct questions; add templates or entities")
        sc = rng.choice(SCENARIOS)
        templates = scenario_templates(sc, variety)
        template = rng.choice(templates)
        entity = rng.choice(scenario_entities(sc, variety)) if "{e}" in template else ""
        time_range = rng.choice(sc.times)
        time_phrase = rng.choice(time_phrases(time_range, variety)) if "{t}" in template else ""
        if not time_phrase:  # the question names no period: the scenario's first range is its natural default
            time_range = sc.times[0]
        question = template.format(e=entity, t=time_phrase).replace("  ", " ").strip()
        question = (rng.choice(PREFIXES) + question).rstrip() + rng.choice(SUFFIXES)
        question = question.replace("??", "?")
        if variety == "wide":
            if rng.random() < 0.35:
                question = rng.choice(WIDE_FRAMES).format(q=question)
            if rng.random() < 0.25:
                question = abbreviate(question, rng)
            if rng.random() < 0.2:
                question = typo(question, rng)
        if rng.random() < 0.15:
            question = question.lower()
        question = question[0].upper() + question[1:] if rng.random() < 0.7 else question
        if question in seen:
            continue
        seen.add(question)

        # the right answer: the scenario's widgets, trimmed for some phrasings (a narrower question needs fewer)
        # (how many depends on the phrasing, so the same kind of question always gets the same number)
        k = max(2, len(sc.widgets) - templates.index(template) % 3)
        widgets = list(sc.widgets[:k])
        answer = task.validate_answer({"widgets": widgets, "time_range": time_range})
        reasoning = reasoning_for(task, sc, entity, time_phrase, time_range, widgets, rng)

        messages = [{"role": "system", "content": task.system_prompt}, {"role": "user", "content": question}]
        response, quality, confidence = production_response(answer, sc, rng)
        user = rng.choice(users)
        sid, left = sessions.get(user, ("", 0))
        if left <= 0:
            sid, left = f"s-{rng.getrandbits(48):012x}", rng.randint(1, 6)
        sessions[user] = (sid, left - 1)
        i = len(experiences)
        reward = None
        if rng.random() < 0.4:  # the user kept (1.0) or replaced (0.0) the suggested dashboard
            reward = 1.0 if quality == "correct" and rng.random() < 0.85 else float(rng.random() < 0.2)
        exp = Experience(
            experience_id=f"ws-{seed:02d}-{i:05d}-{rng.getrandbits(32):08x}",
            task=TASK_NAME,
            created_at_ms=times[i],
            messages=messages,  # type: ignore[arg-type]  # pydantic validates dicts into ChatMessage
            response=response,
            served_by=ServedBy(arm="baseline", model=PROD_MODEL, model_version=PROD_VERSION),
            confidence=confidence,
            reward=reward,
            latency_ms=round(rng.lognormvariate(6.6, 0.45), 1),  # median ~735 ms, a long tail
            user_id=user,
            session_id=sid,
            metadata={"app": "dashboards-web", "domain": sc.domain, "scenario": sc.name,
                      "example_quality": quality, "example_data": "tier3",
                      **({"example_variety": variety} if variety != "base" else {})},
        )
        experiences.append(exp)

        teacher_messages = task.messages_for_model(messages, reasoning=True)
        key = prompt_key(teacher_messages)
        text = task.format_output(answer, reasoning)
        task.parse_output(text)  # the recorded answer must parse and validate, like a live teacher's
        recorded.setdefault(key, {
            "prompt_hash": key,
            "task": TASK_NAME,
            "model": TEACHER_MODEL,
            "text": text,
            # rough token counts (~4 characters per token), as a live teacher would report them
            "input_tokens": sum(len(m["content"]) for m in teacher_messages) // 4,
            "output_tokens": len(text) // 4,
            "experience_id": exp.experience_id,
        })
    return experiences, list(recorded.values())


def write(out_dir: Path, n: int, seed: int, variety: str = "base") -> tuple[Path, Path]:
    experiences, recorded = build(n, seed, variety)
    out_dir.mkdir(parents=True, exist_ok=True)
    exp_path, rec_path = out_dir / "experiences.jsonl", out_dir / "recorded_teacher.jsonl"
    exp_path.write_bytes(b"".join(orjson.dumps(e.model_dump(mode="json")) + b"\n" for e in experiences))
    rec_path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recorded))
    return exp_path, rec_path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=DEFAULT_N, help="number of experiences")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (same seed, same bytes)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    p.add_argument("--variety", choices=VARIETIES, default="base",
                   help="base: the committed files' phrasings; wide: more phrasings, entities, time phrases, "
                        "framings and typing noise (same scenarios and labelling rules)")
    args = p.parse_args(argv)
    exp_path, rec_path = write(args.out, args.n, args.seed, args.variety)
    print(f"wrote {args.n} experiences to {exp_path} and their teacher answers to {rec_path}")


if __name__ == "__main__":
    main()
