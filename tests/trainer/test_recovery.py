"""Recognising a recorded run after a restart, without Kafka: the group's committed offsets are a dict here."""

from __future__ import annotations

from tests.synthetic import synthetic_traces
from trainer.accumulation import Accumulator
from trainer.manifest import DatasetInfo, OffsetRange, RunManifest
from trainer.projection import TraceRecord
from trainer.recovery import Recovery


def manifest(run_id: str, offsets: dict[int, tuple[int, int]], state: str = "trained") -> RunManifest:
    rng = {p: OffsetRange(start=a, end=b) for p, (a, b) in offsets.items()}
    return RunManifest.model_validate({
        "run_id": run_id, "state": state, "created_at_ms": 1, "model_name": "m", "model_version": 1,
        "base_model": "tiny", "backend": "fake", "hyperparameters": {}, "topic": "t", "group": "g",
        "offsets": rng, "dataset_offsets": rng, "scope": "new", "n_messages": 1, "n_unique": 1, "n_bad": 0,
        "dataset": DatasetInfo(sha256="x", n_train=1, n_holdout=0, train_path="a", holdout_path="b"),
        "holdout_ids": [], "metrics": {}})


class Group:
    """The group's committed offsets, and how often they were asked for."""

    def __init__(self, committed: dict[int, int]) -> None:
        self.committed = committed
        self.asked: list[list[int]] = []

    def __call__(self, ps: list[int]) -> dict[int, int]:
        self.asked.append(ps)
        return {p: self.committed.get(p, -1001) for p in ps}


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def held(offsets: dict[int, range]) -> Accumulator:
    acc = Accumulator()
    traces = iter(synthetic_traces(sum(len(r) for r in offsets.values()), seed=5))
    for p, r in offsets.items():
        for off in r:
            acc.add(p, off, TraceRecord(p, off, next(traces)))
    return acc


def test_reconcile_announces_committed_runs_and_remembers_the_others() -> None:
    group = Group({0: 10})
    rec = Recovery(group, wait_s=30.0)
    announced: list[str] = []
    rec.reconcile([manifest("covered", {0: (5, 10)}), manifest("said", {1: (0, 3)}, state="committed"),
                   manifest("open", {0: (10, 12)})], lambda m: announced.append(m.run_id))
    assert announced == ["covered", "said"]
    assert [m.run_id for m in rec.uncommitted] == ["open"]


def test_a_recorded_batch_is_committed_once_it_is_back_in_full() -> None:
    clock = Clock()
    rec = Recovery(Group({0: 10}), wait_s=30.0, clock=clock)
    m = manifest("r1", {0: (10, 13)})
    rec.remember(m)
    acc = held({0: range(10, 12)})
    assert list(rec.ready({0}, acc)) == [] and rec.awaiting  # offset 12 is still on its way: no run may start
    assert list(rec.ready(set(), acc)) == [] and not rec.awaiting  # not ours now
    acc.add(0, 12, None)
    assert list(rec.ready({0}, acc)) == [m] and not rec.awaiting
    rec.done(m)
    assert rec.uncommitted == []


def test_a_manifest_the_log_moved_past_is_stale() -> None:
    clock = Clock()
    # another trainer of the group committed past the start of partition 1 meanwhile
    group = Group({0: 10, 1: 6})
    rec = Recovery(group, wait_s=30.0, clock=clock)
    rec.remember(manifest("r1", {0: (10, 12), 1: (4, 8)}))
    assert list(rec.ready({0, 1}, held({0: range(10, 12)}))) == []
    assert group.asked == [[1]] and rec.uncommitted == [] and not rec.awaiting
    # reading starts elsewhere than the manifest's start: stale too, without asking the broker
    group.asked.clear()
    rec.remember(manifest("r2", {0: (10, 12)}))
    assert list(rec.ready({0}, held({0: range(11, 13)}))) == [] and rec.uncommitted == [] and group.asked == []


def test_a_batch_that_does_not_come_back_in_time_is_given_up_and_the_broker_is_asked_once_a_second() -> None:
    clock = Clock()
    group = Group({})
    rec = Recovery(group, wait_s=30.0, clock=clock)
    rec.remember(manifest("r1", {0: (10, 12)}))
    empty = Accumulator()
    assert list(rec.ready({0}, empty)) == [] and rec.awaiting
    clock.t = 0.5
    assert list(rec.ready({0}, empty)) == [] and len(group.asked) == 1  # at most once a second
    clock.t = 1.0
    assert list(rec.ready({0}, empty)) == [] and len(group.asked) == 2 and rec.awaiting
    clock.t = 31.0
    assert list(rec.ready({0}, empty)) == [] and rec.uncommitted == [] and not rec.awaiting
