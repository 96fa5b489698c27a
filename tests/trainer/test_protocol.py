"""The commit protocol and its pieces without Kafka: step order, failure points, manifests, accumulation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition

from tests.synthetic import synthetic_traces
from trainer.accumulation import Accumulator
from trainer.dataset import BuiltDataset
from trainer.errors import CommitFailed, EvaluationError, TrainingFailed
from trainer.manifest import OffsetRange, list_manifests, read_manifest, write_atomic
from trainer.projection import TraceRecord
from trainer.protocol import Batch, RunContext, check_commit_result, commit_recognised, train_and_commit
from trainer.settings import TrainerSettings
from trainer.sft_config import SFTConfig


class Journal:
    """Records every side effect in order, so a test can assert the protocol's sequence."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.published: list[tuple[str, str, dict[str, Any]]] = []


class FakeEvents:
    def __init__(self, journal: Journal, flush_ok: bool = True) -> None:
        self.j = journal
        self.flush_ok = flush_ok

    def started(self, run_id: str, **kw: Any) -> None:
        self.j.steps.append("event:started")
        self.j.published.append(("started", run_id, kw))

    def succeeded(self, run_id: str, **kw: Any) -> None:
        self.j.steps.append("event:succeeded")
        self.j.published.append(("succeeded", run_id, kw))

    def flush(self, timeout_s: float | None = None) -> bool:
        return self.flush_ok


class FakeResult:
    def __init__(self, adapter_dir: Path) -> None:
        self.adapter_dir = adapter_dir
        self.backend, self.steps, self.train_loss, self.tokens, self.wall_s = "fake", 3, 0.25, 100, 0.1
        self.hyperparameters = {"backend": "fake"}


def _settings(tmp_path: Path, **kw: Any) -> TrainerSettings:
    return TrainerSettings(tier3_data_dir=tmp_path / "data", tier3_topic_prefix="unit.", **kw)


def _batch(n: int = 12) -> Batch:
    traces = synthetic_traces(n, seed=7)
    records = [TraceRecord(i % 3, i // 3, t) for i, t in enumerate(traces)]
    offsets = {p: OffsetRange(start=0, end=len([r for r in records if r.partition == p])) for p in range(3)}
    return Batch(topic="unit.enriched-traces", offsets=offsets, records=sorted(records), n_messages=n, n_unique=n,
                 n_bad=0, trigger="min_traces")


def _ctx(tmp_path: Path, journal: Journal, *, train_raises: Exception | None = None,
         commit_raises: Exception | None = None, evaluate: Any = None, flush_ok: bool = True) -> RunContext:
    s = _settings(tmp_path)

    def train(dataset: BuiltDataset, cfg: SFTConfig, out_dir: Path, *, on_step: Any = None) -> FakeResult:
        journal.steps.append("train")
        if train_raises is not None:
            raise train_raises
        adapter = out_dir / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "weights").write_bytes(b"w")
        return FakeResult(adapter)

    def commit(offsets: dict[int, int]) -> None:
        # the manifest must already be durable when the offsets are committed
        (manifest,) = [m for m in list_manifests(s.runs_dir) if m.state == "trained"]
        assert manifest.commit_offsets() == offsets
        journal.steps.append("commit")
        if commit_raises is not None:
            raise commit_raises

    return RunContext(settings=s, cfg=SFTConfig(tier3_base_model="unused"), events=FakeEvents(journal, flush_ok),
                      commit=commit, in_background=lambda fn: fn(), dataset_slice=lambda b: dict(b.offsets),
                      train=train, evaluate=evaluate)


def test_the_steps_happen_in_order_and_the_manifest_records_the_run(tmp_path: Path) -> None:
    j = Journal()
    ctx = _ctx(tmp_path, j)
    batch = _batch()
    m = train_and_commit(batch, "run-1", ctx)
    assert j.steps == ["event:started", "train", "commit", "event:succeeded"]
    assert m.state == "published" and read_manifest(ctx.settings.runs_dir / "run-1") == m
    assert m.commit_offsets() == batch.commit_offsets() == {0: 4, 1: 4, 2: 4}
    assert m.dataset_offsets == batch.offsets and m.model_version == 1
    assert m.dataset.n_train + m.dataset.n_holdout == 12 and len(m.holdout_ids) == m.dataset.n_holdout
    assert m.hyperparameters["tier3_holdout_fraction"] == 0.10 and m.hyperparameters["backend"] == "fake"
    run_dir = ctx.settings.runs_dir / "run-1"
    assert (run_dir / "adapter" / "weights").exists()
    assert not list(run_dir.glob(".work-*")), "the scratch folder is gone"
    assert j.published[-1][2]["details"]["dataset_sha256"] == m.dataset.sha256
    # a second run gets the next model version
    assert train_and_commit(_batch(), "run-2", _ctx(tmp_path, Journal())).model_version == 2


def test_training_raises_nothing_is_committed_and_no_manifest_is_written(tmp_path: Path) -> None:
    j = Journal()
    ctx = _ctx(tmp_path, j, train_raises=TrainingFailed("boom"))
    with pytest.raises(TrainingFailed):
        train_and_commit(_batch(), "run-1", ctx)
    assert j.steps == ["event:started", "train"]
    assert list_manifests(ctx.settings.runs_dir) == []
    assert not (ctx.settings.runs_dir / "run-1" / "adapter").exists()


def test_the_evaluation_hook_runs_before_the_manifest_and_its_metrics_are_recorded(tmp_path: Path) -> None:
    j = Journal()

    def evaluate(adapter: Path, built: BuiltDataset, cfg: SFTConfig, *, run_id: str,
                 model_version: int) -> dict[str, Any]:
        assert (run_id, model_version) == ("run-1", 1)  # passed in, not recovered from the folder or manifests
        assert (adapter / "weights").exists()  # the adapter is in place
        assert list_manifests(adapter.parent.parent) == []  # the manifest is not written yet
        j.steps.append("evaluate")
        return {"field_f1": 0.5, "n": built.n_holdout}

    m = train_and_commit(_batch(), "run-1", _ctx(tmp_path, j, evaluate=evaluate))
    assert j.steps == ["event:started", "train", "evaluate", "commit", "event:succeeded"]
    assert m.metrics["evaluation"] == {"field_f1": 0.5, "n": m.dataset.n_holdout}


def test_an_evaluation_that_raises_commits_nothing(tmp_path: Path) -> None:
    j = Journal()

    def evaluate(adapter: Path, built: BuiltDataset, cfg: SFTConfig, **_run: Any) -> dict[str, Any]:
        raise EvaluationError("student crashed")

    ctx = _ctx(tmp_path, j, evaluate=evaluate)
    with pytest.raises(EvaluationError):
        train_and_commit(_batch(), "run-1", ctx)
    assert "commit" not in j.steps and list_manifests(ctx.settings.runs_dir) == []


def test_a_failed_commit_leaves_a_recognisable_manifest_that_commits_later_without_training(tmp_path: Path) -> None:
    j = Journal()
    ctx = _ctx(tmp_path, j, commit_raises=CommitFailed("broker away"))
    with pytest.raises(CommitFailed):
        train_and_commit(_batch(), "run-1", ctx)
    (m,) = list_manifests(ctx.settings.runs_dir)
    assert m.state == "trained" and j.steps == ["event:started", "train", "commit"]

    j2 = Journal()
    m2 = commit_recognised(m, _ctx(tmp_path, j2))
    assert j2.steps == ["commit", "event:succeeded"]  # no training
    assert m2.state == "published" and m2.run_id == m.run_id


def test_an_unacknowledged_succeeded_event_leaves_the_manifest_committed(tmp_path: Path) -> None:
    m = train_and_commit(_batch(), "run-1", _ctx(tmp_path, Journal(), flush_ok=False))
    assert m.state == "committed" and m.committed_at_ms is not None


def test_check_commit_result() -> None:
    ok = [TopicPartition("t", 0, 5), TopicPartition("t", 1, 7)]
    check_commit_result(ok, {0: 5, 1: 7})
    with pytest.raises(CommitFailed, match="differs"):
        check_commit_result(ok, {0: 5, 1: 8})
    bad = SimpleNamespace(partition=1, offset=7, error=KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
    with pytest.raises(CommitFailed, match=r"\[1\]"):
        check_commit_result([ok[0], bad], {0: 5, 1: 7})
    with pytest.raises(CommitFailed):
        check_commit_result(None, {0: 5})


def test_accumulator_counts_distinct_ids_and_forgets_what_it_drops() -> None:
    traces = synthetic_traces(4, seed=8)
    acc = Accumulator()
    acc.add(0, 10, TraceRecord(0, 10, traces[0]))
    acc.add(0, 11, TraceRecord(0, 11, traces[1]))
    acc.add(1, 3, TraceRecord(1, 3, traces[0]))  # a duplicate on another partition
    acc.add(1, 4, None)  # undecodable: read (committed with the batch), not a trace
    acc.add(0, 11, TraceRecord(0, 11, traces[1]))  # a redelivery of an offset already held: ignored
    assert acc.n_unique == 2 and acc.n_messages == 4
    assert acc.first_offset(0) == 10 and acc.next_offset(0) == 12 and acc.next_offset(1) == 5
    acc.drop([1])
    assert acc.n_unique == 2 and acc.n_messages == 2
    acc.trim(0, 11)
    assert acc.n_unique == 1 and acc.first_offset(0) == 11 and acc.n_messages == 1
    acc.add(2, 0, TraceRecord(2, 0, traces[2]))
    b = acc.take("t", "min_traces", attempt=1)
    assert b.offsets == {0: OffsetRange(start=11, end=12), 2: OffsetRange(start=0, end=1)}
    assert b.n_unique == 2 and [r.offset for r in b.records] == [11, 0] and acc.n_messages == 0


def test_write_atomic_leaves_no_temp_file_and_replaces_whole(tmp_path: Path) -> None:
    p = tmp_path / "x" / "m.json"
    write_atomic(p, b"one")
    write_atomic(p, b"two")
    assert p.read_bytes() == b"two" and [q.name for q in p.parent.iterdir()] == ["m.json"]


def test_list_manifests_skips_runs_without_a_readable_manifest(tmp_path: Path) -> None:
    train_and_commit(_batch(), "run-1", _ctx(tmp_path, Journal()))
    runs = _settings(tmp_path).runs_dir
    (runs / "run-crashed").mkdir()  # killed before step (3)
    (runs / "run-torn").mkdir()
    (runs / "run-torn" / "manifest.json").write_text("{not json")
    assert [m.run_id for m in list_manifests(runs)] == ["run-1"]


def test_settings_refuse_a_poll_interval_below_the_session_timeout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MAX_POLL_INTERVAL"):
        _settings(tmp_path, tier3_trainer_max_poll_interval_ms=5000, tier3_trainer_session_timeout_ms=6000)
    s = _settings(tmp_path)
    conf = s.consumer_config()
    assert conf["enable.auto.commit"] is False and conf["enable.auto.offset.store"] is False
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert s.runs_dir == tmp_path / "data" / "runs"
