"""Online evaluation's pure parts: shadow sampling, scoring a trace into a window value, figures, the key."""

from __future__ import annotations

import time
from typing import Any

import orjson

from schemas import EnrichedTrace, Experience, ServedBy, TeacherInfo, decode, encode, get_task
from schemas.tasks import score_output
from streams.enrich import ToEnrich, served_answer, triage
from streams.online_eval import (
    OnlineEvaluator,
    add_trace,
    arm_of,
    empty,
    figures,
    hist_quantile,
    latency_bucket,
    merge,
    parse_key,
    window_key,
)
from streams.sampling import decide, hash_fraction, is_shadow
from streams.settings import StreamsSettings

TEACHER = {"widgets": ["cpu_usage", "memory_usage"], "time_range": "24h"}


def _exp(i: int, arm: str = "student", version: str | None = "3", response: Any = TEACHER,
         latency_ms: float | None = 100.0, confidence: float = 0.1) -> Experience:
    text = response if isinstance(response, str) else orjson.dumps(response).decode()
    return Experience(experience_id=f"e-{i}", task="widget_selector", created_at_ms=1,
                      messages=[{"role": "user", "content": f"q{i}"}], response=text,  # type: ignore[list-item]
                      served_by=ServedBy(arm=arm, model="m", model_version=version),  # type: ignore[arg-type]
                      confidence=confidence, latency_ms=latency_ms)


def _trace(exp: Experience, *, shadow: bool = True, reason: str = "shadow") -> EnrichedTrace:
    return EnrichedTrace(experience_id=exp.experience_id, task=exp.task, enriched_at_ms=2,
                         sample_reason=reason, experience=exp,  # type: ignore[arg-type]
                         teacher=TeacherInfo(kind="openai", model="t", latency_ms=1.0, attempts=1),
                         reasoning="r", answer=TEACHER, shadow=shadow,
                         student_answer=served_answer(exp.response) if shadow else None)


def test_shadow_sampling_is_by_hash_only_for_a_served_student_version() -> None:
    ids = [f"exp-{i}" for i in range(4000)]
    shadow = [e for e in ids if is_shadow(e, "student", "3", rate=0.2)]
    assert 0.17 < len(shadow) / len(ids) < 0.23
    assert shadow == [e for e in ids if hash_fraction(e) < 0.2]  # deterministic, the main rule's hash
    assert not any(is_shadow(e, "student", None, rate=1.0) for e in ids[:50])  # no version: not a promoted student
    assert not any(is_shadow(e, arm, "3", rate=1.0) for e in ids[:50] for arm in ("teacher", "baseline"))
    # the main rule keeps its reason; shadow-only picks say "shadow"; a random pick at 0.15 is also a shadow one
    for e in ids:
        reason, sh = decide(e, 0.1, "student", "3", rate=0.15, shadow_rate=0.2)
        h = hash_fraction(e)
        assert sh == (h < 0.2)
        assert reason == ("random" if h < 0.15 else "shadow" if h < 0.2 else None)
    assert decide("x", 0.95, "student", "3", shadow_rate=0.0) == ("high_confidence", False)


def test_triage_marks_shadow_samples() -> None:
    from streams.enrich import Source

    s = StreamsSettings(tier3_sample_rate=0.0, tier3_confidence_threshold=1.0, tier3_shadow_rate=0.5)
    src = Source("t", 0, 0)
    picked = 0
    for i in range(200):
        exp = _exp(i)
        got = triage(encode(exp), src, s)
        want = hash_fraction(exp.experience_id) < 0.5
        assert (got is not None) == want
        if got is not None:
            assert isinstance(got, ToEnrich) and got.shadow and got.reason == "shadow"
            picked += 1
        assert triage(encode(_exp(i, arm="baseline", version=None)), src, s) is None
    assert 60 < picked < 140


def test_scores_match_the_offline_rule_and_add_up() -> None:
    task = get_task("widget_selector")
    good = _trace(_exp(1))
    half = _trace(_exp(2, response={"widgets": ["cpu_usage"], "time_range": "24h"}, latency_ms=1000.0))
    off = _trace(_exp(3, response={"widgets": ["crystal_ball"], "time_range": "forever"}))
    broken = _trace(_exp(4, response="not json at all", latency_ms=None))
    acc = empty()
    for t in (good, half, off, broken):
        acc = add_trace(acc, t)
    f = figures(acc)
    want_f1 = sum(score_output(task, t.experience.response, TEACHER).f1 for t in (good, half, off, broken)) / 4
    assert f["n"] == 4 and abs(f["f1"] - want_f1) < 1e-6 and 0.4 < f["f1"] < 0.6
    assert f["json_valid_rate"] == 0.75 and f["schema_valid_rate"] == 0.5 and f["exact_match"] == 0.25
    assert abs(f["set_f1_widgets"] - (1 + 2 / 3 + 0 + 0) / 4) < 1e-6
    assert f["extra_teacher_calls"] == 4
    assert 100 <= f["latency_ms_p50"] <= 111 and 1000 <= f["latency_ms_p95"] <= 1101  # 10 % buckets
    assert figures(merge(acc, acc))["f1"] == f["f1"] and figures(merge(acc, acc))["n"] == 8
    assert off.student_answer == {"widgets": ["crystal_ball"], "time_range": "forever"}
    assert broken.student_answer is None
    # traces round-trip with the new fields; one written before them still decodes (backward compatible)
    assert decode(encode(good), EnrichedTrace) == good
    old = orjson.loads(encode(good))
    for k in ("shadow", "student_answer"):
        del old[k]
    old["sample_reason"] = "random"
    assert decode(orjson.dumps(old), EnrichedTrace).shadow is False


def test_which_series_a_trace_counts_in() -> None:
    assert arm_of(_trace(_exp(1))) == ("student", "3")
    assert arm_of(_trace(_exp(1), shadow=False, reason="random")) is None  # not in the shadow sample
    assert arm_of(_trace(_exp(1, arm="baseline", version=None), shadow=False, reason="random")) == ("baseline", None)
    assert arm_of(_trace(_exp(1, arm="baseline", version=None), shadow=False, reason="high_confidence")) is None
    assert arm_of(_trace(_exp(1, arm="teacher", version=None), shadow=False, reason="random")) is None


def test_histogram_quantiles_and_keys() -> None:
    hist: dict[str, int] = {}
    for ms in range(1, 101):
        b = latency_bucket(float(ms))
        hist[b] = hist.get(b, 0) + 1
    p50, p95 = hist_quantile(hist, 0.5), hist_quantile(hist, 0.95)
    assert p50 is not None and p95 is not None and 50 <= p50 <= 55 and 95 <= p95 <= 105
    assert hist_quantile({}, 0.5) is None
    k = window_key("widget_selector", "student", "12", 1800, 4)
    assert parse_key(k) == ("widget_selector", "student", "12", 1800, 4)
    assert parse_key(window_key("a|b", "baseline", None, 0, 0)) == ("a|b", "baseline", None, 0, 0)
    assert parse_key("rubbish") is None


def test_evaluator_publishes_closed_windows_once_and_again_when_they_change() -> None:
    s = StreamsSettings(tier3_window_s=10, tier3_online_grace_s=2, tier3_online_keep_windows=3)
    table: dict[str, Any] = {}

    class Table(dict):  # a plain mapping standing in for the Faust table (the worker tests use the real one)
        def __getitem__(self, k: str) -> Any:
            return self.get(k, {})

    table = Table()
    ev = OnlineEvaluator(s, table)
    good = encode(_trace(_exp(1)))
    bad = encode(_trace(_exp(2, response={"widgets": [], "time_range": "1h"})))
    ev.observe(good, 0, 100.5, 101.0)
    ev.observe(bad, 1, 101.0, 101.0)
    ev.observe(encode(_trace(_exp(3, arm="teacher", version=None), shadow=False, reason="random")), 0, 101, 101)
    assert ev.due(111.9) == []  # closed at 110, grace 2 s
    due = ev.due(112.0)
    assert sorted((r.partition, r.n, r.f1_sum) for r in due) == [(0, 1, 1.0), (1, 1, 0.0)]
    for r in due:
        ev.mark_published(r)
    assert ev.due(113.0) == []
    ev.observe(good, 0, 109.0, 113.0)  # a late trace of the closed window: published again
    assert [(r.partition, r.n) for r in ev.due(113.0)] == [(0, 2)]
    block = ev.block(113.0)
    v = block["tasks"]["widget_selector"]["versions"]["3"]
    assert v["current"] is None and v["previous"]["n"] == 3 and abs(v["previous"]["f1"] - 2 / 3) < 1e-6
    assert block["cost"]["shadow_calls_by_window"] == [{"start_ms": 100_000, "shadow_traces": 3,
                                                        "extra_teacher_calls": 3}]
    # windows older than the kept ones leave the table when their partition sees a new trace
    ev.observe(good, 0, 160.0, 160.0)
    assert sorted(parse_key(k)[4] for k in table if parse_key(k)[3] == 100) == [1]  # type: ignore[index]
    assert time.time() > 0
