"""The demo's ending (tier3/demo/): what it reports is true.

- The committed-offsets probe (the trainer group's offsets on enriched-traces, read every second) retries a
  transient error such as NOT_COORDINATOR (the group's coordinator moving or loading) and never reports it; an
  error that persists, or one that is not transient, is reported. The probe is a real consumer on the real broker;
  the only thing injected is the coordinator's answer, which a single local broker cannot be made to give on cue.
- The summary prints the status and dashboard URLs only when they still answer (``--keep-running``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from schemas import TrainingRun
from schemas.settings import RELIABLE_PRODUCER, KafkaSettings
from tier3.demo import display, monitor, summary
from tier3.demo.options import DemoOptions, Session
from tier3.demo.supervise import DemoState


class FlakyProbe(Consumer):  # type: ignore[misc]
    """A real consumer whose ``committed()`` first fails ``fail`` times with ``code`` (-1: always)."""

    def __init__(self, conf: dict[str, Any], code: int, fail: int) -> None:
        super().__init__(conf)
        self.code, self.fail, self.calls = code, fail, 0

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        self.calls += 1
        if self.fail < 0 or self.calls <= self.fail:
            raise KafkaException(KafkaError(self.code))
        return super().committed(partitions, timeout=timeout)


def _traces_with_commits(make_settings: Callable[..., KafkaSettings]) -> tuple[KafkaSettings, str, dict[int, int],
                                                                             dict[int, int]]:
    """A traces topic with 5/3/1 messages and a trainer group that committed 4/3/0 of them."""
    s = make_settings(tier3_partitions=3)
    group = f"{s.tier3_topic_prefix}trainer"
    counts, commits = {0: 5, 1: 3, 2: 1}, {0: 4, 1: 3}
    prod = Producer({**s.client_config(), **RELIABLE_PRODUCER})
    for p, n in counts.items():
        for _ in range(n):
            prod.produce(s.traces_topic, value=b"{}", partition=p)
    assert prod.flush(30) == 0
    committer = Consumer({**s.client_config(), "group.id": group, "enable.auto.commit": False})
    try:
        committer.commit(offsets=[TopicPartition(s.traces_topic, p, o) for p, o in commits.items()],
                         asynchronous=False)
    finally:
        committer.close()
    return s, group, counts, {0: 4, 1: 3, 2: 0}


def _monitor(s: KafkaSettings, group: str) -> monitor.Monitor:
    return monitor.Monitor(s, group, "http://127.0.0.1:9/status", monitor.Observed())


def test_a_transient_not_coordinator_is_retried_and_never_reported(make_settings: Any) -> None:
    s, group, ends, committed = _traces_with_commits(make_settings)
    mon = _monitor(s, group)
    probe = FlakyProbe({**s.client_config(), "group.id": group, "enable.auto.commit": False},
                       KafkaError.NOT_COORDINATOR, fail=2)
    try:
        for _ in range(2):
            mon._probe(probe, [0, 1, 2])
            assert mon.obs.errors == [] and mon.obs.committed == {}
        mon._probe(probe, [0, 1, 2])
    finally:
        probe.close()
    assert mon.obs.errors == []
    assert mon.probe_retries == 2 and mon.probe_failing_since is None
    assert mon.obs.traces_end == ends and mon.obs.committed == committed
    assert mon.obs.traces_committed == 7 and mon.obs.traces_total == 9


def test_a_persistent_or_fatal_probe_error_is_reported(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s, group, _ends, _committed = _traces_with_commits(make_settings)
    conf = {**s.client_config(), "group.id": group, "enable.auto.commit": False}
    # a coordinator that never comes back: reported once the give-up time has passed
    monkeypatch.setattr(monitor, "PROBE_GIVE_UP_S", 1.0)
    mon = _monitor(s, group)
    probe = FlakyProbe(conf, KafkaError.NOT_COORDINATOR, fail=-1)
    try:
        mon._probe(probe, [0, 1, 2])
        assert mon.obs.errors == []
        time.sleep(1.1)
        mon._probe(probe, [0, 1, 2])
    finally:
        probe.close()
    assert len(mon.obs.errors) == 1 and "NOT_COORDINATOR" in mon.obs.errors[0], mon.obs.errors
    assert "failing for" in mon.obs.errors[0]
    # an error no retry mends (no access to the group): reported at once
    mon = _monitor(s, group)
    probe = FlakyProbe(conf, KafkaError.GROUP_AUTHORIZATION_FAILED, fail=-1)
    try:
        mon._probe(probe, [0, 1, 2])
    finally:
        probe.close()
    assert len(mon.obs.errors) == 1 and "GROUP_AUTHORIZATION_FAILED" in mon.obs.errors[0]


def test_transient_classification() -> None:
    assert monitor.transient(KafkaException(KafkaError(KafkaError.NOT_COORDINATOR)))
    assert monitor.transient(KafkaException(KafkaError(KafkaError._TIMED_OUT)))
    assert monitor.transient(KafkaException(KafkaError(KafkaError.INVALID_CONFIG, retriable=True)))
    assert not monitor.transient(KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED)))
    assert not monitor.transient(ValueError("not Kafka's"))


@pytest.mark.parametrize("keep_running", [False, True])
def test_summary_prints_the_urls_only_while_they_answer(keep_running: bool, tmp_path: Path) -> None:
    s = KafkaSettings(tier3_topic_prefix=f"t{uuid.uuid4().hex[:8]}.")
    url = "http://127.0.0.1:6123/status"
    session = Session(settings=s, run_name="demo-x", demo_dir=tmp_path, web_port=6123, trainer_group="g",
                      n_examples=10, expected_sampled=3)
    assert session.status_url == url
    built = summary.build_summary(monitor.Observed(), session, DemoOptions(keep_running=keep_running), DemoState(),
                                  capture_stats={"sent": 10, "delivered": 10}, done_reason="complete", wall_s=1.0)
    assert built["kept_running"] is keep_running and built["status_url"] == url
    with display.console.capture() as cap:
        summary.print_summary(built)
    out = cap.get()
    if keep_running:
        assert url in out and "http://127.0.0.1:6123/" in out and "keeps running" in out
    else:  # the worker is stopped right after the summary: a URL there would point at nothing
        assert "127.0.0.1:6123" not in out
    assert "summary" in out  # the table itself was printed


def test_the_ab_phase_reads_the_served_versions_figures_from_the_status_block() -> None:
    """The A/B phase's figures are the worker's /status online_eval block for the served version (built here by
    the worker's own OnlineEvaluator): n summed over the windows, rates weighted by n, the worst window's
    latency; another version's windows and an empty block give nothing."""
    from streams.client.router import ab_bucket
    from streams.online_eval import OnlineEvaluator, latency_bucket, window_key
    from streams.settings import StreamsSettings
    from tier3.demo import ab

    table: dict[str, Any] = {
        window_key("widget_selector", "student", "3", 1500, 0):
            {"n": 2, "json_valid_n": 2, "schema_valid_n": 1, "exact_n": 0, "f1_sum": 1.0,
             "latency_hist": {latency_bucket(40): 2}},
        window_key("widget_selector", "student", "3", 1515, 1):
            {"n": 1, "json_valid_n": 0, "schema_valid_n": 0, "exact_n": 0, "f1_sum": 0.0,
             "latency_hist": {latency_bucket(400): 1}},
        window_key("widget_selector", "student", "2", 1515, 1): {"n": 5, "json_valid_n": 5, "f1_sum": 5.0},
    }
    block = OnlineEvaluator(StreamsSettings(tier3_window_s=15), table).block(1520)
    fig = ab.online_figures({"online_eval": block}, "widget_selector", 3)
    assert fig is not None
    assert fig["n"] == 3 and [w["n"] for w in fig["windows"]] == [2, 1]
    assert fig["json_valid_rate"] == pytest.approx(2 / 3, abs=1e-5)
    assert fig["f1"] == pytest.approx(1 / 3, abs=1e-5)
    assert 400 <= fig["latency_ms_p95"] <= 450 and fig["latency_ms_p50"] == fig["latency_ms_p95"]
    assert ab.online_figures({"online_eval": block}, "widget_selector", 4) is None
    assert ab.online_figures({"online_eval": {}}, "widget_selector", 3) is None and ab.online_figures(
        None, "widget_selector", 3) is None
    assert "n 3" in display.ab_figures_note(fig) and "F1 vs teacher 0.33" in display.ab_figures_note(fig)

    # the users alternate between the student's and the teacher's sticky arm, by the router's own hash
    users = ab.ab_users(7, 0.5, "tier3-ab-v1")
    assert len(set(users)) == 7
    assert [ab_bucket(u, "tier3-ab-v1") < 0.5 for u in users] == [i % 2 == 0 for i in range(7)]


def test_the_ab_phase_is_skipped_with_a_reason_when_nothing_can_be_served(tmp_path: Path) -> None:
    """No promoted (or no exported) version: the phase says why and the demo goes on (no exception)."""
    from tier3.demo import ab

    s = KafkaSettings(tier3_topic_prefix=f"t{uuid.uuid4().hex[:8]}.")
    session = Session(settings=s, run_name="demo-x", demo_dir=tmp_path, web_port=6123, trainer_group="g",
                      n_examples=10, expected_sampled=3)
    obs = monitor.Observed()
    state = DemoState(monitor=monitor.Monitor(s, "g", session.status_url, obs))
    disp = display.Display(10, 3)
    out = ab.run_ab_phase(state, session, DemoOptions(), obs, disp, [])
    assert out["status"] == "skipped" and "--promote" in out["reason"]
    run = monitor.RunInfo("run-1", events=["started", "succeeded", "evaluated", "promoted"], model_version=2,
                          seen_mono={"promoted": time.monotonic()})
    obs.runs[run.run_id] = run
    assert state.monitor is not None
    state.monitor.fold.apply(TrainingRun(run_id="run-1", event="promoted", at_ms=1, model_version=2))
    out = ab.run_ab_phase(state, session, DemoOptions(), obs, disp, [])
    assert out["status"] == "skipped" and "v2" in out["reason"] and "no exported" in out["reason"]
    assert ab.run_ab_phase(state, session, DemoOptions(ab_prompts=0), obs, disp, [])["status"] == \
        "skipped"


def _beat(stage: str | None, at_ms: int, training: bool, **details: Any) -> TrainingRun:
    return TrainingRun(run_id="trainer:g", event="heartbeat", at_ms=at_ms, training_in_progress=training,
                       next_check_in_s=30.0,
                       details={**({"stage": stage} if stage else {}), "run_id": "run-20260101T000000Z-abcd",
                                **details})


def test_the_training_row_shows_the_trainers_stage_step_loss_and_eta() -> None:
    """The training row follows the trainer's heartbeat (details.stage, trainer/stage.py): while a run trains, its
    steps, the latest loss and the ETA (counted from the heartbeat's time); in the close loop, which step runs and
    for how long; idle, what it waits for. The log line (text_line) says the same."""
    now = int(time.time() * 1000)  # Display.update counts the ETA from the heartbeat's time to the clock's
    disp = display.Display(10, 3)
    obs = monitor.Observed(traces_end={0: 100, 1: 68}, committed={0: 0, 1: 0})
    obs.heartbeat = _beat("training", now - 10_000, True, step=37, total_steps=168, loss=0.41234, eta_s=380.0,
                          stage_since_ms=now - 600_000)
    assert display.trainer_note(obs.heartbeat, now) == "training 37/168 · loss 0.412 · ETA 6m10s"
    disp.update(10, obs, 3)
    row = disp.progress.tasks[disp.tasks["training"]]
    assert (row.completed, row.total) == (37, 168)
    assert "loss 0.412" in row.fields["note"] and "ETA" in row.fields["note"]
    assert "training 37/168 · loss 0.412 · ETA 6m10s · evaluated" in disp.text_line()
    import io

    from rich.console import Console

    wide = Console(file=io.StringIO(), width=220)
    wide.print(disp.renderable())
    text = wide.file.getvalue()  # type: ignore[attr-defined]
    assert "37/168" in text and "loss 0.412 · ETA 6m10s · steps of run-20260101T000000Z-a" in text, text

    # not a step yet (dataset, model loading): no step count, the bar shows the traces
    obs.heartbeat = _beat("training", now, True, step=0, total_steps=0, loss=None, eta_s=None)
    assert display.trainer_note(obs.heartbeat, now) == "training: preparing the dataset and the model"

    # the close loop: the stage and how long it has been running; the bar counts the traces trained again
    obs.committed = {0: 100, 1: 68}
    for stage, label in [("close_loop", "closing the loop"), ("exporting", "exporting"),
                         ("evaluating_served", "evaluating (served)"), ("gating", "gating"),
                         ("registering", "registering"), ("evaluating", "evaluating")]:
        obs.heartbeat = _beat(stage, now, True, step=168, total_steps=168, loss=0.3, stage_since_ms=now - 65_000)
        assert display.trainer_note(obs.heartbeat, now) == f"{label} for 1m05s"
    disp.update(10, obs, 3)
    row = disp.progress.tasks[disp.tasks["training"]]
    assert (row.completed, row.total) == (168, 168) and row.fields["note"].startswith("evaluating for ")
    assert "training 168/168 traces · evaluating for " in disp.text_line()

    # idle: what it waits for; a trainer older than the stage field: from training_in_progress
    obs.heartbeat = _beat("idle", now, False, pending_traces=12, min_traces=100)
    assert display.trainer_note(obs.heartbeat, now) == "idle · 12 new traces waiting (>= 100 or 30 s)"
    obs.heartbeat = _beat(None, now, True, step=5, total_steps=10)
    assert display.trainer_note(obs.heartbeat, now) == "training 5/10"
    assert display.trainer_note(None) == ""
    assert [display.duration(s) for s in (0.4, 45, 370, 3725)] == ["0s", "45s", "6m10s", "1h02m"]


def test_the_summary_names_the_base_model_of_each_run_and_of_the_demo(tmp_path: Path) -> None:
    s = KafkaSettings(tier3_topic_prefix=f"t{uuid.uuid4().hex[:8]}.")
    session = Session(settings=s, run_name="demo-x", demo_dir=tmp_path, web_port=6123, trainer_group="g",
                      n_examples=10, expected_sampled=3)
    mon = monitor.Monitor(s, "g", session.status_url, monitor.Observed())
    for ev in ("started", "succeeded"):
        mon._apply_run(TrainingRun(run_id="run-1", event=ev, at_ms=1, model_version=1, base_model="tiny/base"))
    mon._apply_run(TrainingRun(run_id="run-1", event="evaluated", at_ms=2, model_version=1))  # none named here
    built = summary.build_summary(mon.obs, session, DemoOptions(), DemoState(),
                                  capture_stats={"sent": 10, "delivered": 10}, done_reason="complete", wall_s=1.0)
    assert built["base_model"] == "tiny/base" and built["runs"][0]["base_model"] == "tiny/base"
    assert not any("base models" in n for n in built["notes"])
    mon._apply_run(TrainingRun(run_id="run-2", event="started", at_ms=3, model_version=2, base_model="other/base"))
    built = summary.build_summary(mon.obs, session, DemoOptions(), DemoState(),
                                  capture_stats={"sent": 10, "delivered": 10}, done_reason="complete", wall_s=1.0)
    assert built["base_model"] == "other/base" and [r["base_model"] for r in built["runs"]] == ["tiny/base",
                                                                                                 "other/base"]
    assert any("different base models: tiny/base, other/base" in n for n in built["notes"])
    with display.console.capture() as cap:
        summary.print_summary(built)
    assert "other/base" in cap.get()


def test_the_summary_shows_what_the_gate_saw() -> None:
    from tier3.demo.display import served_line
    from tier3.demo.summary import served_figures

    m = {"primary_metric": "task_f1", "contamination_rate": 0.0, "pytorch": {"task_f1": 0.74, "f1": 0.82},
         "slices": {"holdout": {"served": {"n_examples": 21, "task_f1": 0.744, "baseline_task_f1": 0.806,
                                           "set_f1_widgets": 0.69, "f1": 0.82, "json_valid_rate": 1.0},
                                "constant": {"task_f1": 0.232}, "f16": {"task_f1": 0.744}},
                    "golden": {"served": {"n_examples": 54, "task_f1": 0.65}, "constant": {"task_f1": 0.222}}},
         "paired": {"vs_production": {"mean_diff": -0.062, "ci_low": -0.268, "ci_high": 0.156,
                                      "verdict": "not_enough_evidence"}}}
    text = served_figures(m)
    assert "holdout (n 21): served task_f1 0.74" in text and "production 0.81" in text
    assert "constant answer 0.23" in text and "golden (n 54): served task_f1 0.65" in text
    assert "PyTorch (diagnostic)" in text and "not_enough_evidence" in text
    line = served_line(m)
    assert "vs production not_enough_evidence [-0.27, 0.16]" in line and "constant 0.22" in line
    assert served_figures({"f1": 0.5}) == "" and served_line({"f1": 0.5}) == ""
