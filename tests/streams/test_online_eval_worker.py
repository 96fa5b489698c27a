"""The online-eval table in a real worker: shadow traces scored per version, with the served-time bounds of their
answers, and restored from its changelog after a restart (the group's offsets are past every trace by then, so
nothing is recomputed from the traces)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from schemas import ChatMessage, Experience, ServedBy, encode, get_task
from streams.settings import StreamsSettings
from tests.fakes.teacher_server import expected_answer
from tests.kafka_utils import produce_values
from tests.streams.helpers import WorkerProcess


def _student_exp(i: int, right: bool) -> Experience:
    task = get_task("widget_selector")
    q = f"Which services page the on-call most? (shadow {i})"
    answer = expected_answer(q) if right else {"widgets": ["crystal_ball"], "time_range": "forever"}
    return Experience(experience_id=f"sh-{i:04d}", task="widget_selector", created_at_ms=int(time.time() * 1000),
                      messages=[ChatMessage(role="system", content=task.system_prompt),
                                ChatMessage(role="user", content=q)],
                      response=orjson.dumps(answer).decode(), confidence=0.3, latency_ms=40.0 + i,
                      served_by=ServedBy(arm="student", model="ws:v5", model_version="5"))


def _v5(st: dict[str, Any]) -> list[dict[str, Any]]:
    t = st.get("online_eval", {}).get("tasks", {}).get("widget_selector", {})
    return [w for w in t.get("versions", {}).get("5", {}).get("history", []) if w["n"]]


def test_table_survives_a_worker_restart(streams_settings: Callable[..., StreamsSettings],
                                         start_worker: Callable[..., WorkerProcess]) -> None:
    s = streams_settings(tier3_window_s=3600, tier3_sample_rate=0.0, tier3_confidence_threshold=1.0,
                         tier3_shadow_rate=1.0)
    exps = [_student_exp(i, right=i % 3 != 0) for i in range(30)]  # 20 right, 10 off-schema
    produce_values(s, s.experiences_topic, [(e.experience_id.encode(), encode(e)) for e in exps])
    w1 = start_worker(s, "w1")
    w1.wait_ready(timeout_s=180)
    st = w1.wait_for(lambda st: sum(w["n"] for w in _v5(st)) == 30, timeout_s=180)
    before = _v5(st)
    total_f1 = sum(w["f1"] * w["n"] for w in before)
    assert abs(total_f1 - 20) < 1e-3  # each right answer scores 1, each off-schema one 0
    # each window says when its answers were served (the experiences' created_at_ms), not only its window
    served = [e.created_at_ms for e in exps]
    assert min(w["first_served_ms"] for w in before) == min(served)
    assert max(w["last_served_ms"] for w in before) == max(served)
    assert all(w["first_served_ms"] <= w["last_served_ms"] for w in before)
    assert st["counts"]["enriched"] == 30
    assert w1.stop() == 0

    w2 = start_worker(s, "w2")
    w2.wait_ready(timeout_s=180)
    st2 = w2.wait_for(lambda st: _v5(st) == before, timeout_s=120)
    assert st2["counts"]["consumed"] == 0  # the figures came from the changelog, not from re-reading traces
