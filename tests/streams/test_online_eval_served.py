"""Each online-eval window carries the earliest and latest **served** time of the answers it sums (their
experiences' ``created_at_ms``), while the window itself is one of enrichment time; a value an older worker began
(restored from the changelog without them) publishes them as None (unknown), never as the newer traces' bounds."""

from __future__ import annotations

from typing import Any

import orjson

from schemas import EnrichedTrace, Experience, OnlineEval, ServedBy, TeacherInfo, decode, encode
from streams.online_eval import OnlineEvaluator, add_trace, empty, merge
from streams.settings import StreamsSettings

TEACHER = {"widgets": ["cpu_usage", "memory_usage"], "time_range": "24h"}


def _trace(i: int, served_ms: int, enriched_ms: int | None = None) -> EnrichedTrace:
    exp = Experience(experience_id=f"e-{i}", task="widget_selector", created_at_ms=served_ms,
                     messages=[{"role": "user", "content": f"q{i}"}],  # type: ignore[list-item]
                     response=orjson.dumps(TEACHER).decode(),
                     served_by=ServedBy(arm="student", model="m", model_version="3"), confidence=0.1,
                     latency_ms=10.0)
    return EnrichedTrace(experience_id=exp.experience_id, task=exp.task,
                         enriched_at_ms=enriched_ms if enriched_ms is not None else served_ms + 1000,
                         sample_reason="shadow", experience=exp,
                         teacher=TeacherInfo(kind="openai", model="t", latency_ms=1.0, attempts=1),
                         reasoning="r", answer=TEACHER, shadow=True)


class _Table(dict):  # type: ignore[type-arg]
    def __getitem__(self, k: str) -> Any:
        return self.get(k, {})


def test_values_keep_the_served_time_bounds() -> None:
    acc = empty()
    assert acc["first_served_ms"] is None and acc["last_served_ms"] is None
    for i, served in enumerate((5_000, 2_000, 9_000, 4_000)):  # out of order: a slow teacher, a backlog
        acc = add_trace(acc, _trace(i, served))
    assert (acc["first_served_ms"], acc["last_served_ms"], acc["n"]) == (2_000, 9_000, 4)
    other = add_trace(empty(), _trace(9, 1_000))
    both = merge(acc, other)
    assert (both["first_served_ms"], both["last_served_ms"]) == (1_000, 9_000)
    assert merge(empty(), acc)["first_served_ms"] == 2_000  # an empty value is not legacy
    assert merge(empty(), empty())["first_served_ms"] is None
    # a value an older worker began (no bounds, but traces): unknown, and stays so as traces are added
    legacy = {"n": 2, "json_valid_n": 2, "schema_valid_n": 2, "exact_n": 2, "f1_sum": 2.0, "task_f1_sum": 2.0}
    assert merge(legacy, acc)["first_served_ms"] is None and merge(legacy, acc)["last_served_ms"] is None
    grown = add_trace(add_trace(legacy, _trace(10, 7_000)), _trace(11, 8_000))
    assert grown["n"] == 4 and grown["first_served_ms"] is None and grown["last_served_ms"] is None


def test_published_windows_carry_the_bounds_and_the_window_is_of_enrichment_time() -> None:
    table = _Table()
    ev = OnlineEvaluator(StreamsSettings(tier3_window_s=10, tier3_online_grace_s=1), table)  # type: ignore[call-arg]
    # served at 91.0 s and 95.5 s (window 90), enriched at 101 s and 103 s: windowed at 100 by enrichment
    for i, (served, enriched) in enumerate(((95_500, 101_000), (91_000, 103_000), (96_000, 104_000))):
        t = _trace(i, served, enriched)
        ev.observe(encode(t), i % 2, enriched / 1000, enriched / 1000)
    table["widget_selector|student|3|100@2"] = {"n": 1, "json_valid_n": 1, "schema_valid_n": 1, "exact_n": 1,
                                               "f1_sum": 1.0, "task_f1_sum": 1.0}  # an older worker's
    due = sorted(ev.due(200.0), key=lambda r: r.partition)
    assert [(r.window_start_ms, r.partition, r.n) for r in due] == [(100_000, 0, 2), (100_000, 1, 1),
                                                                    (100_000, 2, 1)]
    assert [(r.first_served_ms, r.last_served_ms) for r in due] == [(95_500, 96_000), (91_000, 91_000),
                                                                    (None, None)]
    assert decode(encode(due[0]), OnlineEval) == due[0]
    # /status's history shows them too (summed over partitions: unknown when one partition does not know)
    hist = ev.block(200.0)["tasks"]["widget_selector"]["versions"]["3"]["history"]
    assert [(h["first_served_ms"], h["last_served_ms"]) for h in hist] == [(None, None)]
    del table["widget_selector|student|3|100@2"]
    hist = ev.block(200.0)["tasks"]["widget_selector"]["versions"]["3"]["history"]
    assert [(h["n"], h["first_served_ms"], h["last_served_ms"]) for h in hist] == [(3, 91_000, 96_000)]


def test_a_record_without_the_bounds_decodes() -> None:
    rec = OnlineEval(task="widget_selector", arm="student", model_version="3", window_start_ms=0, window_end_ms=10,
                     partition=0, n=1, json_valid_n=1, schema_valid_n=1, exact_n=1, f1_sum=1.0, published_at_ms=1,
                     first_served_ms=3, last_served_ms=4)
    raw = orjson.loads(encode(rec))
    del raw["first_served_ms"], raw["last_served_ms"]
    old = decode(orjson.dumps(raw), OnlineEval)
    assert old.first_served_ms is None and old.last_served_ms is None
