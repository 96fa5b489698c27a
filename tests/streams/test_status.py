"""/status and /metrics built from a WorkerState, without Faust: the agreed JSON shape and the router block."""

from __future__ import annotations

import time

from schemas import TrainingRun
from streams.app import WorkerState
from streams.metrics import metrics_text
from streams.settings import StreamsSettings
from streams.teachers import RecordedTeacher
from tests.streams.helpers import metric_value

SHAPE = {"app", "worker_id", "uptime_s", "counts", "windows", "lag", "teacher", "dead_letters", "trainer", "router",
         "online_eval", "offset_guard"}


def state(tmp_path) -> WorkerState:  # type: ignore[no-untyped-def]
    rec = tmp_path / "rec.jsonl"
    rec.write_text("")
    s = StreamsSettings(tier3_teacher="recorded", tier3_teacher_recorded_path=rec, tier3_worker_id="w9",
                        openai_api_key="sk-should-never-show")
    return WorkerState(s, RecordedTeacher(rec, model="rec-model"))


def test_status_shape_and_metrics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    st = state(tmp_path)
    st.counts.update(consumed=10, sampled=4, enriched=3, dead_lettered=1, not_sampled=6)
    st.dead_by_reason["not_json"] += 1
    st.teacher_stats.calls, st.teacher_stats.errors = 5, 1
    st.teacher_stats.latencies_ms.extend([10.0, 20.0, 30.0, 40.0])
    st.lag = lambda: {"0": 2, "1": 0}
    st.windows = lambda: {"size_s": 1800, "current": {"start_ms": 0, "end_ms": 1_800_000,
                                                      "by_task": {"widget_selector": 3}}, "recent": []}
    now = int(time.time() * 1000)
    st.trainer.apply(TrainingRun(run_id="trainer", event="heartbeat", at_ms=now, training_in_progress=False,
                                 last_check_time_ms=now, check_interval_s=1800.0, next_check_in_s=60.0))
    out = st.status()
    assert set(out) == SHAPE
    assert out["counts"] == {"consumed": 10, "sampled": 4, "enriched": 3, "dead_lettered": 1, "not_sampled": 6}
    assert out["teacher"] == {"kind": "recorded", "model": "rec-model", "in_flight": 0, "calls": 5, "errors": 1,
                              "error_rate": 0.2, "latency_ms_p50": 25.0, "latency_ms_p95": 38.5}  # linear
    assert out["dead_letters"] == {"count": 1, "by_reason": {"not_json": 1}}
    assert out["trainer"]["tier3_sft"]["training_in_progress"] is False
    assert set(out["router"]) == {"mode", "promoted_version", "arms"}
    text = metrics_text(out)
    assert metric_value(text, "tier3_worker_enriched_total", worker_id="w9") == 3
    assert metric_value(text, "tier3_worker_consumer_lag", worker_id="w9", partition="0") == 2
    assert metric_value(text, "tier3_teacher_error_rate", worker_id="w9", kind="recorded", model="rec-model") == 0.2
    assert metric_value(text, "tier3_teacher_latency_ms", worker_id="w9", kind="recorded", model="rec-model",
                        quantile="0.95") == 38.5
    assert metric_value(text, "tier3_trainer_training_in_progress", worker_id="w9") == 0
    assert metric_value(text, "tier3_trainer_next_check_in_seconds", worker_id="w9") is not None
    assert "# TYPE tier3_worker_enriched_total counter" in text and "# TYPE tier3_worker_consumer_lag gauge" in text
    assert "sk-should-never-show" not in text and "sk-should-never-show" not in str(out)


def test_router_block_is_the_states_and_never_takes_status_down(tmp_path) -> None:  # type: ignore[no-untyped-def]
    st = state(tmp_path)
    st.router = lambda: {"mode": "ab", "promoted_version": 2, "arms": {}}
    assert st.status()["router"]["mode"] == "ab"
    st.router = lambda: 1 / 0  # type: ignore[assignment,return-value]
    out = st.status()
    assert out["router"] == {"error": "ZeroDivisionError"}  # display-only statistics never take /status down
    assert set(out) == SHAPE


def test_trainer_view_newest_event_decides_across_the_two_topics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # heartbeats (trainer-status) and lifecycle events (training-runs) are read from two topics, so a reader
    # may get an older heartbeat after a newer `started`: the newest one says whether the trainer trains
    st = state(tmp_path)
    now = int(time.time() * 1000)
    st.trainer.apply(TrainingRun(run_id="run-1", event="started", at_ms=now + 5))
    st.trainer.apply(TrainingRun(run_id="trainer:g", event="heartbeat", at_ms=now, training_in_progress=False,
                                 last_check_time_ms=now, check_interval_s=60.0, next_check_in_s=60.0))
    block = st.trainer.block(now + 10)
    assert block["tier3_sft"]["training_in_progress"] is True and block["tier3_sft"]["check_interval_s"] == 60.0
    st.trainer.apply(TrainingRun(run_id="trainer:g", event="heartbeat", at_ms=now + 20, training_in_progress=False,
                                 last_check_time_ms=now, check_interval_s=60.0, next_check_in_s=50.0))
    assert st.trainer.block(now + 20)["tier3_sft"]["training_in_progress"] is False
    assert [r["last_event"] for r in block["runs"]] == ["started"]


def test_trainer_live_block_shows_the_stage_step_loss_and_eta_of_the_newest_heartbeat(tmp_path) -> None:  # type: ignore[no-untyped-def]
    st = state(tmp_path)
    now = int(time.time() * 1000)
    assert st.trainer.block(now)["live"] is None  # no heartbeat yet
    st.trainer.apply(TrainingRun(run_id="trainer:g", event="heartbeat", at_ms=now, training_in_progress=True,
                                 details={"stage": "training", "stage_since_ms": now - 60_000, "run_id": "run-1",
                                          "step": 37, "total_steps": 168, "loss": 0.412, "eta_s": 370.0,
                                          "pending_traces": 0}))
    st.trainer.apply(TrainingRun(run_id="run-1", event="started", at_ms=now + 1))  # a lifecycle event: not live
    live = st.trainer.block(now + 10_000)["live"]
    assert live == {"stage": "training", "stage_since_ms": now - 60_000, "run_id": "run-1", "step": 37,
                    "total_steps": 168, "loss": 0.412, "eta_s": 360.0, "stage_for_s": 70.0,
                    "at_ms": now}  # counted down from the heartbeat's time
    assert st.status()["trainer"]["live"]["stage"] == "training"
    st.trainer.apply(TrainingRun(run_id="trainer:g", event="heartbeat", at_ms=now - 5, training_in_progress=True,
                                 details={"stage": "idle"}))  # an older one read late: ignored
    st.trainer.apply(TrainingRun(run_id="trainer:g", event="heartbeat", at_ms=now + 20, training_in_progress=True,
                                 details={"stage": "gating", "stage_since_ms": now + 15, "run_id": "run-1",
                                          "step": 168, "total_steps": 168, "loss": 0.3, "eta_s": None}))
    live = st.trainer.block(now + 30)["live"]
    assert live["stage"] == "gating" and live["eta_s"] is None and live["loss"] == 0.3 and live["stage_for_s"] == 0.0
    # a trainer that sends no stage: the fields are there, None
    st.trainer.apply(TrainingRun(run_id="trainer:g", event="heartbeat", at_ms=now + 40, training_in_progress=False))
    assert st.trainer.block(now + 40)["live"] == {**dict.fromkeys(st.trainer.LIVE_FIELDS), "stage_for_s": None,
                                                      "at_ms": now + 40}
