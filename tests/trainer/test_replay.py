"""Replay against the real broker: a past run's dataset is rebuilt bit for bit, the live group is untouched."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ROOT, settings_env
from tests.synthetic import synthetic_traces
from tests.trainer.test_consumer import fake_train
from tests.trainer.trainer_kafka import committed, produce_traces, sft_config, trainer_settings
from trainer.consumer import TrainerConsumer
from trainer.dataset import BuiltDataset, read_jsonl
from trainer.manifest import find_manifest
from trainer.replay import ranges_from_beginning, ranges_from_time, replay
from trainer.tiny_model import cached_tiny_model


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return cached_tiny_model()


def test_replay_to_a_past_runs_offsets_rebuilds_its_sha256(make_settings: Callable[..., Any], tiny_model: Path,
                                                            tmp_path: Path) -> None:
    s = trainer_settings(make_settings, tier3_min_traces=15)
    cfg = sft_config(tiny_model)  # scope "all": run 2 trains on run 1's traces too
    calls: list[BuiltDataset] = []
    first = synthetic_traces(15, seed=21)
    produce_traces(s, [*first, first[0]])  # with a duplicate
    run1 = TrainerConsumer(s, cfg, train=fake_train(calls)).run(max_runs=1, timeout_s=60)
    m1 = find_manifest(s.runs_dir, run1.last_run_id or "")
    second = synthetic_traces(15, seed=22, id_prefix="more")
    produce_traces(s, second)
    run2 = TrainerConsumer(s, cfg, train=fake_train(calls)).run(max_runs=1, timeout_s=60)
    m2 = find_manifest(s.runs_dir, run2.last_run_id or "")
    # later traces arrive after both runs: a replay to a run's offsets must not see them
    produce_traces(s, synthetic_traces(5, seed=23, id_prefix="late"))
    group_before = committed(s)

    assert m2.scope == "all" and m2.dataset.n_train + m2.dataset.n_holdout == 30
    assert m2.n_new == 15  # a late duplicate of a run-1 trace is not new
    assert all(r.start == 0 for r in m2.dataset_offsets.values())
    for m in (m1, m2):
        res = replay(s, cfg, dict(m.dataset_offsets), tmp_path / m.run_id, manifest=m)
        assert res.matches is True, (res.dataset.sha256, m.dataset.sha256)
        assert res.dataset.holdout_ids == m.holdout_ids
    assert committed(s) == group_before, "replay moved the trainer group's offsets"

    # from the beginning: everything, including the late traces
    everything = replay(s, cfg, ranges_from_beginning(s, s.traces_topic), tmp_path / "all")
    assert everything.dataset.n_train + everything.dataset.n_holdout == 35
    assert everything.n_messages == 36 and everything.dataset.n_duplicates == 1

    # the CLI: `tier3 replay --run <id>` (here through `python -m tier3`), with the run's own config
    env = settings_env(s)
    env.update({k.upper(): str(v) for k, v in cfg.model_dump(mode="json").items()})
    env["TIER3_HOLDOUT_FRACTION"] = "0.5"  # a different setting now: the run's recorded one must win
    out = subprocess.run([sys.executable, "-m", "tier3", "replay", "--run", m1.run_id, "--out",
                          str(tmp_path / "cli")], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    summary = orjson.loads(out.stdout)
    assert summary["matches"] is True and summary["sha256"] == m1.dataset.sha256


def test_replay_from_a_timestamp_reads_only_later_traces(make_settings: Callable[..., Any], tiny_model: Path,
                                                         tmp_path: Path) -> None:
    s = trainer_settings(make_settings)
    produce_traces(s, synthetic_traces(6, seed=31, id_prefix="old"))
    time.sleep(0.05)
    since_ms = int(time.time() * 1000)
    time.sleep(0.05)
    new = synthetic_traces(7, seed=32, id_prefix="new")
    produce_traces(s, new)
    res = replay(s, sft_config(tiny_model, tier3_holdout_fraction=0.0), ranges_from_time(s, s.traces_topic, since_ms),
                 tmp_path / "since")
    assert sorted(res.dataset.train_ids) == sorted(t.experience_id for t in new)


@pytest.mark.slow
def test_replay_train_builds_a_new_adapter_from_the_log(make_settings: Callable[..., Any], tiny_model: Path,
                                                        tmp_path: Path) -> None:
    s = trainer_settings(make_settings)
    produce_traces(s, synthetic_traces(12, seed=41))
    cfg = sft_config(tiny_model, tier3_phases="answer:1")
    res = replay(s, cfg, ranges_from_beginning(s, s.traces_topic), tmp_path / "r", train=True)
    assert res.train is not None and res.train["steps"] > 0
    adapter = Path(res.train["adapter_dir"])
    assert (adapter / "adapter_config.json").exists() and adapter == tmp_path / "r" / "adapter"
    assert not list((tmp_path / "r").glob(".adapter-tmp-*"))
    assert len(read_jsonl(res.dataset.train_path)) == res.dataset.n_train  # one phase: one line per trace
    assert orjson.loads((tmp_path / "r" / "replay.json").read_bytes())["sha256"] == res.dataset.sha256


@pytest.mark.parametrize("batch", [1000, 3])
def test_read_ranges_exact_slices_over_transaction_gaps_with_bad_records_counted(
        make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """The bulk read (consume() batches): exactly [start, end) per partition, whatever the batch boundaries;
    commit markers and an aborted transaction leave offset gaps (positions decide the end); undecodable records
    are counted and handed to on_bad with their position; the collector's state is left as it was."""
    import gc

    from confluent_kafka import Producer

    from schemas import encode
    from schemas.kafka import reading
    from schemas.settings import RELIABLE_PRODUCER
    from trainer.manifest import OffsetRange
    from trainer.projection import read_ranges

    monkeypatch.setattr(reading, "SLICE_BATCH", batch)  # records per consume(): batch boundaries anywhere
    s = trainer_settings(make_settings, tier3_partitions=1)
    topic = s.traces_topic
    traces = synthetic_traces(40, partitions=1, seed=5, id_prefix="tx")
    bad = {7: b"not json", 19: b'{"schema_version": 1, "experience_id": ""}'}
    p = Producer({**s.client_config(), **RELIABLE_PRODUCER, "transactional.id": f"t-{topic}"})
    p.init_transactions(30)
    values: list[bytes] = []
    for i, t in enumerate(traces):
        values.append(bad.get(i, encode(t)))
    for chunk, commit in ((values[:15], True), ([encode(traces[0])] * 3, False), (values[15:], True)):
        p.begin_transaction()
        for v in chunk:
            p.produce(topic, value=v, partition=0)
        if commit:
            p.commit_transaction(30)
        else:
            assert p.flush(30) == 0  # written, then aborted (unsent records would just be purged)
            p.abort_transaction(30)
    # offsets: 0-14 values, 15 commit marker, 16-18 aborted, 19 abort marker, 20-44 values, 45 commit marker
    whole = ranges_from_beginning(s, topic)
    assert whole == {0: OffsetRange(start=0, end=46)}
    seen_bad: list[tuple[int, int, bytes | None]] = []
    gc.disable()
    try:
        read = read_ranges(s, topic, whole, timeout_s=60, on_bad=lambda p_, o, _k, v, _e: seen_bad.append((p_, o, v)))
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert read.n_messages == 40 and read.n_bad == 2
    assert seen_bad == [(0, 7, bad[7]), (0, 24, bad[19])]  # trace 19 sits after 5 extra offsets
    expected_offsets = [o for o in [*range(0, 15), *range(20, 45)] if o not in (7, 24)]
    assert [r.offset for r in read.records] == expected_offsets
    assert [r.trace.experience_id for r in read.records] == [
        t.experience_id for i, t in enumerate(traces) if i not in bad]
    # a slice whose end is the first commit marker, and one that starts inside the aborted transaction
    head = read_ranges(s, topic, {0: OffsetRange(start=0, end=16)}, timeout_s=60)
    assert head.n_messages == 15 and [r.offset for r in head.records][-1] == 14
    tail = read_ranges(s, topic, {0: OffsetRange(start=17, end=21)}, timeout_s=60)
    assert tail.n_messages == 1 and [r.offset for r in tail.records] == [20]
    assert gc.isenabled()
