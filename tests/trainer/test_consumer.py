"""The trainer consumer against the real broker: commit only after success, retry, dedup, group membership."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.synthetic import synthetic_traces
from tests.trainer.trainer_kafka import (
    committed,
    control_log,
    end_offsets,
    events,
    heartbeats,
    lifecycle,
    produce_traces,
    sft_config,
    trainer_settings,
    wait_for_event,
)
from trainer.consumer import TrainerConsumer
from trainer.control import send_train_now
from trainer.dataset import BuiltDataset, read_jsonl
from trainer.errors import TrainingFailed
from trainer.manifest import find_manifest, list_manifests
from trainer.sft_config import SFTConfig
from trainer.tiny_model import cached_tiny_model

INVALID = -1001  # librdkafka's OFFSET_INVALID: the group has no committed offset


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return cached_tiny_model()


class FakeAdapter:
    """What a fake training returns: an adapter folder and the numbers the manifest records."""

    def __init__(self, adapter_dir: Path) -> None:
        self.adapter_dir = adapter_dir
        self.backend = "fake"
        self.steps = 1
        self.train_loss = 0.5
        self.tokens = 10
        self.wall_s = 0.01
        self.hyperparameters: dict[str, Any] = {"fake": True}


def fake_train(calls: list[BuiltDataset], fail_first: int = 0, sleep_s: float = 0.0
               ) -> Callable[..., FakeAdapter]:
    def train(dataset: BuiltDataset, cfg: SFTConfig, out_dir: Path, *, on_step: Any = None) -> FakeAdapter:
        import time

        calls.append(dataset)
        if len(calls) <= fail_first:
            raise TrainingFailed("injected: CUDA out of memory (not really)")
        if sleep_s:
            time.sleep(sleep_s)
        adapter = out_dir / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(b"fake")
        return FakeAdapter(adapter)

    return train


def read_all(tc: TrainerConsumer, n_messages: int, timeout_s: float = 30.0) -> None:
    """Start ``tc`` and poll until it holds ``n_messages`` (no run starts: the test's trigger is not met)."""
    import time

    tc.start()
    deadline = time.monotonic() + timeout_s
    while tc.pending.n_messages < n_messages:
        assert time.monotonic() < deadline, f"read {tc.pending.n_messages} of {n_messages} messages"
        tc.poll(0.2)
        assert tc.due() is None


@pytest.mark.slow
def test_a_full_run_trains_the_tiny_model_and_commits_exactly_what_it_read(
        make_settings: Callable[..., Any], tiny_model: Path) -> None:
    s = trainer_settings(make_settings, tier3_min_traces=1000)
    traces = synthetic_traces(30, seed=1)
    # enrichment is at-least-once: five traces arrive twice; they count once and train once
    produce_traces(s, [*traces, *traces[:5]])
    ends = end_offsets(s)
    assert sum(ends.values()) == 35

    tc = TrainerConsumer(s, sft_config(tiny_model))
    read_all(tc, 35)  # then ask for a run, as `tier3 train-now` does
    send_train_now(s, group=s.tier3_trainer_group, wait_s=0)
    stats = tc.run(max_runs=1, timeout_s=180)

    assert stats.runs_succeeded == 1 and stats.runs_failed == 0
    assert committed(s) == {p: ends.get(p, INVALID) for p in range(s.tier3_partitions)}
    m = find_manifest(s.runs_dir, stats.last_run_id or "")
    assert m.state == "published"
    assert m.commit_offsets() == ends
    assert m.n_messages == 35 and m.n_unique == 30
    assert m.dataset.n_train + m.dataset.n_holdout == 30
    assert m.backend == "trl" and m.metrics["steps"] > 0 and m.metrics["train_loss"] > 0
    run_dir = s.runs_dir / m.run_id
    assert (run_dir / m.adapter_dir / "adapter_config.json").exists()
    assert not list(run_dir.glob(".work-*")), "the scratch folder is removed once the adapter is in place"
    train_ids = {r["experience_id"] for r in read_jsonl(run_dir / m.dataset.train_path)}
    assert len(train_ids) == m.dataset.n_train
    assert not train_ids & set(m.holdout_ids), "a holdout id was in the training file"
    # the committed model is a trained LoRA adapter (lora_B starts at zero) that loads and generates
    from safetensors.torch import load_file

    from trainer.inference import generate, load_student

    weights = load_file(str(run_dir / m.adapter_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in weights.items())
    model, tok = load_student(run_dir / m.adapter_dir)
    text, _n, _latency_s = generate(model, tok, [{"role": "user", "content": "Show me CPU for checkout."}], 8)
    assert isinstance(text, str)
    assert [e for e, _ in lifecycle(s)] == ["started", "succeeded"]
    assert not [e for e in events(s) if e.event == "heartbeat"], "heartbeats on the lifecycle topic"
    beats = heartbeats(s)
    assert {b.run_id for b in beats} == {f"trainer:{s.tier3_trainer_group}"}
    assert beats and beats[0].check_interval_s == s.tier3_check_interval_s
    assert beats[0].last_check_time_ms is not None and beats[0].next_check_in_s is not None
    # the training callback's losses reached the heartbeat (trainer/stage.py, bound to the training thread)
    last = beats[-1].details
    assert last["stage"] == "idle" and last["step"] == last["total_steps"] == m.metrics["steps"]
    assert isinstance(last["loss"], float) and last["loss"] > 0


@pytest.mark.chaos
def test_training_raises_nothing_is_committed_and_the_same_traces_come_back(
        make_settings: Callable[..., Any], tiny_model: Path) -> None:
    s = trainer_settings(make_settings, tier3_min_traces=12, tier3_trainer_backoff_initial_s=5.0)
    produce_traces(s, synthetic_traces(12, seed=2))
    ends = end_offsets(s)
    calls: list[BuiltDataset] = []
    tc = TrainerConsumer(s, sft_config(tiny_model, tier3_scope="new"), train=fake_train(calls, fail_first=1))
    seen: dict[str, Any] = {}

    def watch() -> None:  # while the trainer backs off after the failure, read the broker's committed offsets
        seen["failed"] = wait_for_event(s, "failed", timeout_s=60)
        seen["committed_after_failure"] = committed(s)

    watcher = threading.Thread(target=watch)
    watcher.start()
    stats = tc.run(max_runs=1, timeout_s=90)
    watcher.join(60)

    assert seen["failed"].details["retryable"] is True
    # lifecycle events carry the check times too, so /status stays complete between heartbeats
    assert seen["failed"].check_interval_s == s.tier3_check_interval_s and seen["failed"].next_check_in_s is not None
    assert "injected" in seen["failed"].details["error"]
    assert set(seen["committed_after_failure"].values()) == {INVALID}, "a failed run committed offsets"
    assert stats.runs_failed == 1 and stats.runs_succeeded == 1
    assert len(calls) == 2
    assert calls[0].train_ids == calls[1].train_ids and calls[0].sha256 == calls[1].sha256
    assert committed(s) == {p: ends.get(p, INVALID) for p in range(s.tier3_partitions)}
    kinds = [e for e, _ in lifecycle(s)]
    assert kinds == ["started", "failed", "started", "succeeded"]
    m = find_manifest(s.runs_dir, stats.last_run_id or "")
    assert m.trigger == "retry" and m.attempt == 2


def test_duplicates_count_once_towards_min_traces(make_settings: Callable[..., Any], tiny_model: Path) -> None:
    s = trainer_settings(make_settings, tier3_min_traces=10)
    traces = synthetic_traces(10, seed=3)
    produce_traces(s, [*traces[:9], *traces[:9]])  # 18 messages, 9 distinct: below the trigger
    calls: list[BuiltDataset] = []
    tc = TrainerConsumer(s, sft_config(tiny_model), train=fake_train(calls))
    try:
        read_all(tc, 18)  # no run may start on 9 distinct traces
        assert tc.pending.n_messages == 18 and tc.pending.n_unique == 9
        assert tc.due() is None
        produce_traces(s, traces[9:])
        stats = tc.run(max_runs=1, timeout_s=60)
    finally:
        tc.close()
    assert stats.runs_succeeded == 1 and len(calls) == 1
    assert calls[0].n_train + calls[0].n_holdout == 10 and calls[0].n_duplicates == 9
    m = find_manifest(s.runs_dir, stats.last_run_id or "")
    assert m.n_unique == 10 and m.n_messages == 19


def test_interval_and_train_now_trigger_a_run_below_min_traces(make_settings: Callable[..., Any],
                                                                tiny_model: Path) -> None:
    s = trainer_settings(make_settings, tier3_min_traces=1000, tier3_check_interval_s=3600)
    produce_traces(s, synthetic_traces(5, seed=4))
    calls: list[BuiltDataset] = []
    tc = TrainerConsumer(s, sft_config(tiny_model), train=fake_train(calls))
    read_all(tc, 5)
    req, _ = send_train_now(s, group=s.tier3_trainer_group, wait_s=0)  # what `tier3 train-now` does
    stats = tc.run(max_runs=1, timeout_s=60)
    assert stats.runs_succeeded == 1
    m = find_manifest(s.runs_dir, stats.last_run_id or "")
    assert m.trigger == "train_now" and m.n_unique == 5
    answers = [a for a in control_log(s) if a.kind == "answer" and a.request_id == req.request_id]
    assert [(a.answer, a.run_id) for a in answers] == [("accepted", m.run_id)]

    s2 = trainer_settings(make_settings, tier3_min_traces=1000, tier3_check_interval_s=2.0)
    produce_traces(s2, synthetic_traces(4, seed=5))
    tc2 = TrainerConsumer(s2, sft_config(tiny_model), train=fake_train(calls))
    stats2 = tc2.run(max_runs=1, timeout_s=60)
    m2 = find_manifest(s2.runs_dir, stats2.last_run_id or "")
    assert m2.trigger == "interval" and m2.n_unique == 4


@pytest.mark.slow
def test_a_run_longer_than_max_poll_interval_keeps_the_group(make_settings: Callable[..., Any],
                                                             tiny_model: Path) -> None:
    # max.poll.interval.ms = 6 s; real training slowed by 1 s per step (8 or more steps: the near-twin split keeps
    # whole template groups of the synthetic traces in the holdout): well over 6 s
    s = trainer_settings(make_settings, tier3_min_traces=40, tier3_trainer_max_poll_interval_ms=6000,
                         tier3_trainer_step_delay_s=1.0)
    produce_traces(s, synthetic_traces(40, seed=6))
    ends = end_offsets(s)
    tc = TrainerConsumer(s, sft_config(tiny_model, tier3_scope="new"))
    stats = tc.run(max_runs=1, timeout_s=180)
    m = find_manifest(s.runs_dir, stats.last_run_id or "")
    assert m.metrics["steps"] * s.tier3_trainer_step_delay_s > 6.0
    assert m.metrics["wall_s"] > 6.0, "the run did not outlast max.poll.interval.ms"
    assert stats.runs_succeeded == 1 and stats.runs_failed == 0
    assert stats.revoked == 0 and stats.lost == 0, "the group took partitions away during the run"
    assert stats.assigned == s.tier3_partitions  # the one initial assignment, no re-join
    assert committed(s) == {p: ends.get(p, INVALID) for p in range(s.tier3_partitions)}


@pytest.mark.slow
def test_tier3_trainer_closes_the_loop_evaluate_before_the_manifest_gate_after_the_commit(
        make_settings: Callable[..., Any], tiny_model: Path, tmp_path: Path) -> None:
    """The command as users run it (TIER3_TRAINER_CLOSE_LOOP defaults to on), in a subprocess."""
    from tests.trainer.trainer_kafka import start_trainer, stop

    s = trainer_settings(make_settings, tier3_min_traces=20)
    produce_traces(s, synthetic_traces(20, seed=9))
    log = tmp_path / "trainer.log"
    proc = start_trainer(s, sft_config(tiny_model, tier3_holdout_fraction=0.3, tier3_phases="answer:1"), log,
                         max_runs=1, tier3_trainer_close_loop="true", tier3_auto_export="false",
                         tier3_eval_max_new_tokens=24)
    try:
        assert proc.wait(180) == 0, log.read_text()[-3000:]
    finally:
        stop(proc)
    (m,) = list_manifests(s.runs_dir)
    assert m.dataset.n_holdout > 0 and "json_valid_rate" in m.metrics["evaluation"]
    kinds = [e for e, _ in lifecycle(s)]
    # the close loop's order: the candidate's export, the served GGUF's evaluation, the verdict
    assert kinds[:4] == ["started", "succeeded", "exported", "evaluated"] and kinds[4] in ("promoted", "rejected")


@pytest.mark.chaos
def test_a_refused_commit_is_retried_from_the_manifest_without_training_again(
        make_settings: Callable[..., Any], tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.errors import CommitFailed

    s = trainer_settings(make_settings, tier3_min_traces=9)
    produce_traces(s, synthetic_traces(9, seed=10))
    ends = end_offsets(s)
    calls: list[BuiltDataset] = []
    real_commit = TrainerConsumer.commit
    refused: list[dict[int, int]] = []

    def flaky_commit(self: TrainerConsumer, offsets: dict[int, int]) -> None:
        if not refused:
            refused.append(offsets)
            raise CommitFailed("injected: broker answered NOT_COORDINATOR")
        real_commit(self, offsets)

    monkeypatch.setattr(TrainerConsumer, "commit", flaky_commit)
    stats = TrainerConsumer(s, sft_config(tiny_model), train=fake_train(calls)).run(max_runs=1, timeout_s=60)
    assert len(calls) == 1, "the batch was trained twice"
    assert stats.runs_failed == 1 and stats.recognised == 1
    assert committed(s) == {p: ends.get(p, INVALID) for p in range(s.tier3_partitions)}
    life = lifecycle(s)
    assert [e for e, _ in life] == ["started", "failed", "succeeded"]
    assert life[0][1] == life[2][1]  # the recorded run is the one announced


def test_undecodable_traces_are_dead_lettered_and_committed_with_the_batch(
        make_settings: Callable[..., Any], tiny_model: Path) -> None:
    from schemas import DeadLetter, decode
    from tests.kafka_utils import consume_values, produce_values

    s = trainer_settings(make_settings, tier3_min_traces=1000)
    produce_traces(s, synthetic_traces(8, seed=15))
    produce_values(s, s.traces_topic, [(b"bad-1", b"{not json"), (b"bad-2", b'{"schema_version": 99}')])
    ends = end_offsets(s)
    calls: list[BuiltDataset] = []
    tc = TrainerConsumer(s, sft_config(tiny_model), train=fake_train(calls))
    read_all(tc, 10)
    send_train_now(s, group=s.tier3_trainer_group, wait_s=0)
    stats = tc.run(max_runs=1, timeout_s=60)
    m = find_manifest(s.runs_dir, stats.last_run_id or "")
    assert m.n_bad == 2 and m.n_messages == 10 and m.n_unique == 8
    assert committed(s) == {p: ends.get(p, INVALID) for p in range(s.tier3_partitions)}
    letters = [decode(x.value(), DeadLetter) for x in consume_values(s, s.dead_letters_topic, expected=2)]
    assert sorted(d.error_kind for d in letters) == ["not_json", "unknown_version"]
    assert {d.stage for d in letters} == {"decode"} and all(d.source_topic == s.traces_topic for d in letters)


def test_a_2_mb_garbage_trace_with_a_long_prefix_is_dead_lettered_and_the_trainer_goes_on(
        make_settings: Callable[..., Any], tiny_model: Path) -> None:
    """Issue 11b: a 2,096,600-byte undecodable trace, with a 200-character topic prefix (a dead letter's key of
    ~220 bytes): the letter used to be refused (MSG_SIZE_TOO_LARGE), the trainer exited and read it again on
    every restart. Now the letter fits, the trace is committed with its batch, and training goes on."""
    import hashlib
    import os

    from schemas import DeadLetter, decode
    from tests.kafka_utils import consume_values, produce_values

    prefix = "g" * 190 + f"{os.urandom(4).hex()}."  # 199 characters
    s = trainer_settings(make_settings, tier3_min_traces=1000, tier3_topic_prefix=prefix, tier3_partitions=1)
    garbage = os.urandom(2_096_600)
    produce_values(s, s.traces_topic, [(b"garbage", garbage)])
    produce_traces(s, synthetic_traces(6, seed=21))
    ends = end_offsets(s)
    calls: list[BuiltDataset] = []
    tc = TrainerConsumer(s, sft_config(tiny_model), train=fake_train(calls))
    read_all(tc, 7)
    assert tc.stats.dead_lettered == 1
    [m] = consume_values(s, s.dead_letters_topic, expected=1)
    assert m.key() == f"{s.traces_topic}/0/0".encode() and len(m.key() or b"") > 200
    assert len(m.value() or b"") + len(m.key() or b"") + 36 <= s.max_record_bytes
    dl = decode(m.value() or b"", DeadLetter, max_bytes=s.max_record_bytes)
    assert dl.stage == "decode" and dl.original_truncated and dl.original_size == 2_096_600
    assert dl.original_sha256 == hashlib.sha256(garbage).hexdigest() and garbage.startswith(
        __import__("base64").b64decode(dl.original_b64))
    assert (dl.source_topic, dl.source_partition, dl.source_offset) == (s.traces_topic, 0, 0)
    send_train_now(s, group=s.tier3_trainer_group, wait_s=0)
    stats = tc.run(max_runs=1, timeout_s=60)
    assert stats.runs_succeeded == 1 and len(calls) == 1
    assert committed(s) == {0: ends[0]}  # past the garbage: a restart does not read it again
    assert tc.events.dead_letters_failed == 0


def test_a_refused_dead_letter_is_written_smaller_and_never_raised(make_settings: Callable[..., Any]) -> None:
    """A dead-letters topic stricter than ours (someone else's cluster): the letter is refused by the broker, then
    written without the original; nothing is raised to the trainer."""
    import os
    from dataclasses import replace

    from schemas import DeadLetter, decode
    from streams.topics import ensure_topics
    from tests.kafka_utils import consume_values
    from trainer.events import TrainerEvents

    s = trainer_settings(make_settings, create_topics=False, tier3_partitions=1)
    specs = [replace(t, config={**t.config, "max.message.bytes": "4096"}) if t.name == s.dead_letters_topic else t
             for t in s.topic_specs()]
    ensure_topics(s, specs)
    with TrainerEvents(s) as ev:
        ev.dead_letter(topic=s.traces_topic, partition=1_000, offset=10**12, key=b"k", value=os.urandom(50_000),
                       reason="not json", error_kind="not_json")
        assert ev.flush(30)  # the smaller letter is written from the refused one's report, within the flush
    [m] = consume_values(s, s.dead_letters_topic, expected=1)
    dl = decode(m.value() or b"", DeadLetter)
    assert dl.original_b64 == "" and dl.original_truncated and "first write refused" in dl.reason
    assert (dl.source_partition, dl.source_offset, dl.original_size) == (1_000, 10**12, 50_000)
    assert ev.dead_letters_failed == 0


@pytest.mark.chaos
def test_ids_of_a_recognised_run_are_not_counted_as_new_again(
        make_settings: Callable[..., Any], tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from trainer.errors import CommitFailed

    s = trainer_settings(make_settings, tier3_min_traces=9)
    traces = synthetic_traces(13, seed=17)
    produce_traces(s, traces[:9])
    real_commit = TrainerConsumer.commit
    refused: list[dict[int, int]] = []

    def flaky_commit(self: TrainerConsumer, offsets: dict[int, int]) -> None:
        if not refused:  # the first run's commit fails: its manifest is committed by the recognition path
            refused.append(offsets)
            raise CommitFailed("injected: broker answered NOT_COORDINATOR")
        real_commit(self, offsets)

    monkeypatch.setattr(TrainerConsumer, "commit", flaky_commit)
    calls: list[BuiltDataset] = []
    tc = TrainerConsumer(s, sft_config(tiny_model), train=fake_train(calls))
    tc.start()
    try:
        deadline = time.monotonic() + 60
        while tc.stats.recognised < 1:
            assert time.monotonic() < deadline, "the recorded run was not recognised"
            tc.turn()
        # enrichment is at-least-once: five of the committed traces arrive again, with four new ones
        produce_traces(s, [*traces[:5], *traces[9:]])
        deadline = time.monotonic() + 60
        while tc.pending.n_messages < 9:
            assert time.monotonic() < deadline, f"read {tc.pending.n_messages} of 9"
            tc.turn()
            assert tc.stats.runs_succeeded == 0, "duplicates of the recognised run counted as new traces"
        assert tc.pending.n_new == 4 and tc.pending.n_unique == 9
        assert len(calls) == 1
    finally:
        tc.close()


def test_a_trigger_takes_everything_up_to_the_end_offsets_within_the_max_batch(
        make_settings: Callable[..., Any], tiny_model: Path) -> None:
    # 40 traces wait on 3 partitions; the trigger fires at the 5th read. The run must take all 40 (everything
    # available when it fired), not the first 5 (which left the rest for back-to-back runs)
    s = trainer_settings(make_settings, tier3_min_traces=5)
    produce_traces(s, synthetic_traces(40, seed=18))
    ends = end_offsets(s)
    calls: list[BuiltDataset] = []
    stats = TrainerConsumer(s, sft_config(tiny_model), train=fake_train(calls)).run(max_runs=1, timeout_s=60)
    m = find_manifest(s.runs_dir, stats.last_run_id or "")
    assert m.trigger == "min_traces" and m.n_messages == 40 and m.commit_offsets() == ends
    assert len(m.offsets) == len(ends) == 3

    # bounded: at most TIER3_MAX_TRACES_PER_RUN messages per run, the rest waits for the next one
    s2 = trainer_settings(make_settings, tier3_min_traces=5, tier3_max_traces_per_run=12)
    produce_traces(s2, synthetic_traces(40, seed=19))
    stats2 = TrainerConsumer(s2, sft_config(tiny_model), train=fake_train(calls)).run(max_runs=1, timeout_s=60)
    m2 = find_manifest(s2.runs_dir, stats2.last_run_id or "")
    assert m2.n_messages == 12 and sum(r.end - r.start for r in m2.offsets.values()) == 12
    assert committed(s2) == {p: m2.commit_offsets().get(p, INVALID) for p in range(s2.tier3_partitions)}


def test_train_now_is_a_kafka_request_answered_by_the_trainer(make_settings: Callable[..., Any],
                                                               tiny_model: Path) -> None:
    import json
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, settings_env

    s = trainer_settings(make_settings, tier3_min_traces=1000, tier3_check_interval_s=3600)
    produce_traces(s, synthetic_traces(6, seed=20))
    ends = end_offsets(s)
    calls: list[BuiltDataset] = []
    tc = TrainerConsumer(s, sft_config(tiny_model), train=fake_train(calls))
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.setdefault("stats", tc.run(timeout_s=120)))
    t.start()
    # another process (any machine reaching the bootstrap servers): no shared disk with the trainer
    env = {**settings_env(s), "TIER3_RUNS_DIR": "/nonexistent/elsewhere"}

    def train_now() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tier3", "train-now", "--wait", "60"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    try:
        first = train_now()
        assert first.returncode == 0, first.stdout + first.stderr[-2000:]
        accepted = json.loads(first.stdout.splitlines()[-1])
        assert accepted["answer"] == "accepted" and accepted["run_id"]
        deadline = time.monotonic() + 60
        while tc.stats.runs_succeeded < 1:
            assert time.monotonic() < deadline and t.is_alive(), "the accepted run did not commit"
            time.sleep(0.2)
        assert tc.stats.last_run_id == accepted["run_id"]
        second = train_now()  # nothing new is waiting now: declined, with the reason
        assert second.returncode == 3, second.stdout + second.stderr[-2000:]
        declined = json.loads(second.stdout.splitlines()[-1])
        assert declined["answer"] == "declined" and "no new traces" in declined["reason"]
    finally:
        tc.stop()
        t.join(60)
    m = find_manifest(s.runs_dir, accepted["run_id"])
    assert m.trigger == "train_now" and m.commit_offsets() == ends and len(calls) == 1
    # the log records who asked and what the trainer answered, in order
    log = control_log(s)
    assert [(x.kind, x.answer) for x in log] == [("request", None), ("answer", "accepted"), ("request", None),
                                                 ("answer", "declined")]
    assert log[0].request_id == log[1].request_id and log[1].run_id == accepted["run_id"]
    assert log[0].group == s.tier3_trainer_group and log[0].requested_by


def test_heartbeats_go_to_the_compacted_status_topic_not_the_lifecycle_log(
        make_settings: Callable[..., Any], tiny_model: Path) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource

    s = trainer_settings(make_settings, tier3_min_traces=1000, tier3_trainer_status_interval_s=0.2)
    tc = TrainerConsumer(s, sft_config(tiny_model), train=fake_train([]))
    tc.run(timeout_s=4)
    beats = heartbeats(s)
    assert len(beats) >= 3 and {b.run_id for b in beats} == {f"trainer:{s.tier3_trainer_group}"}
    assert beats[-1].details["trainer_id"].startswith(s.tier3_trainer_group)
    assert events(s) == [], "heartbeats (or anything else) on training-runs"
    admin = AdminClient(s.client_config())
    res = ConfigResource(ConfigResource.Type.TOPIC, s.trainer_status_topic)
    configs = admin.describe_configs([res])[res].result(timeout=30)
    assert configs["cleanup.policy"].value == "compact"


def test_heartbeats_say_the_stage_with_step_loss_and_eta_while_training_then_idle(
        make_settings: Callable[..., Any], tiny_model: Path) -> None:
    """The heartbeat's ``details.stage`` follows the run: training (step, total, the latest loss, an ETA),
    evaluating (the commit protocol's hook), close_loop and the steps ``after_run`` reports with
    ``trainer.stage.set_stage``, then idle. A stage change is sent at once, not at the next interval (here 30 s).
    ``training_in_progress`` is true while training and evaluating only, not while the gate and export run."""
    import time

    from trainer.stage import record_loss, set_stage

    s = trainer_settings(make_settings, tier3_min_traces=3, tier3_trainer_status_interval_s=30.0)
    produce_traces(s, synthetic_traces(3, seed=7))

    def beat_sent() -> None:
        """Wait (in the worker thread) until the loop thread sent a heartbeat after the last stage change."""
        deadline = time.monotonic() + 20
        while tc.heartbeat.sent < tc.stage.changes:
            assert time.monotonic() < deadline, "no heartbeat after a stage change"
            time.sleep(0.02)

    def train(dataset: BuiltDataset, cfg: SFTConfig, out_dir: Path, *, on_step: Any = None) -> FakeAdapter:
        beat_sent()
        for step in (1, 2, 3):  # what trainer.sft_trainer._Progress does in the training thread
            on_step(step, 8)
            record_loss(1.0 / step)
            time.sleep(0.4)
        # a periodic heartbeat while training (forced here: the interval is long)
        tc.heartbeat.next_mono = 0.0
        deadline = time.monotonic() + 20
        while tc.heartbeat.next_mono == 0.0:
            assert time.monotonic() < deadline, "no heartbeat while training"
            time.sleep(0.02)
        adapter = out_dir / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(b"fake")
        return FakeAdapter(adapter)

    def evaluate(adapter_dir: Path, built: BuiltDataset, cfg: SFTConfig, *, run_id: str,
                 model_version: int) -> dict[str, Any]:
        beat_sent()
        return {"fake": 1.0}

    def after_run(_manifest: Any) -> None:  # stands for trainer.close_loop.gate.after_run
        beat_sent()
        for stage in ("exporting", "evaluating_served", "gating", "registering"):
            set_stage(stage)
            beat_sent()

    tc = TrainerConsumer(s, sft_config(tiny_model), train=train, evaluate=evaluate, after_success=after_run)
    stats = tc.run(max_runs=1, timeout_s=60)
    assert stats.runs_succeeded == 1 and stats.closed == 1
    beats = heartbeats(s)
    stages = [b.details["stage"] for b in beats]
    seen = [st for i, st in enumerate(stages) if i == 0 or stages[i - 1] != st]
    assert seen == ["idle", "training", "evaluating", "close_loop", "exporting", "evaluating_served", "gating",
                    "registering", "idle"], seen
    training = [b for b in beats if b.details["stage"] == "training"]
    assert all(b.training_in_progress and b.details["run_id"] == stats.last_run_id for b in training)
    assert training[0].details["step"] == 0 and training[0].details["loss"] is None
    late = training[-1].details
    assert late["step"] == 3 and late["total_steps"] == 8 and late["loss"] == pytest.approx(1 / 3, abs=1e-3)
    assert 0.0 < late["eta_s"] <= 5.0, late  # 5 steps left at about 0.4 s a step
    assert all(b.training_in_progress and b.details["held_for"] == ["run"] for b in beats
               if b.details["stage"] in ("training", "evaluating"))
    # the gate and the export are not training: the heartbeat says which step runs, and that the partitions are
    # held for the close loop (the next batch waits for it)
    closing = [b for b in beats if b.details["stage"] in ("close_loop", "exporting", "evaluating_served", "gating",
                                                          "registering")]
    assert closing and all(b.training_in_progress is False and b.details["held_for"] == ["close_loop"]
                           and b.details["run_id"] == stats.last_run_id for b in closing), closing
    assert beats[-1].details["stage"] == "idle" and beats[-1].training_in_progress is False
    assert beats[-1].details["held_for"] == []
    assert beats[-1].details["eta_s"] is None and beats[-1].details["stage_since_ms"] <= beats[-1].at_ms
