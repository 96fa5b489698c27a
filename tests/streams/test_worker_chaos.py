"""Fault injection: a teacher outage, and workers killed mid-stream (SIGKILL, then SIGTERM) and restarted."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable

import pytest

from schemas import EnrichedTrace, decode
from streams.settings import StreamsSettings
from tests.fakes.teacher_server import FakeTeacherServer
from tests.kafka_utils import consume_values, produce_values
from tests.streams.helpers import WorkerProcess, as_records, expected_sampled, experiences, make_experience

OUTAGE_S = 20.0  # 10 s of HTTP 500, then 10 s of refused/reset connections


@pytest.mark.chaos
def test_teacher_outage_loses_nothing_and_applies_back_pressure(
        streams_settings: Callable[..., StreamsSettings], start_worker: Callable[..., WorkerProcess],
        teacher_server: FakeTeacherServer) -> None:
    max_pending = 16
    s = streams_settings(tier3_teacher_concurrency=8, tier3_max_pending=max_pending,
                         tier3_teacher_backoff_max_s=1.0)
    first = [make_experience(i, 0.95, prefix="before") for i in range(100)]
    during = [make_experience(i, 0.95, prefix="during") for i in range(200)]
    w = start_worker(s)
    w.wait_ready()
    produce_values(s, s.experiences_topic, as_records(first))
    w.wait_for(lambda st: st["counts"]["enriched"] == 100, 60)

    teacher_server.set_mode("500")
    produce_values(s, s.experiences_topic, as_records(during))
    t0 = time.monotonic()
    time.sleep(OUTAGE_S / 2)
    teacher_server.set_mode("reset")
    st = w.status()
    # back-pressure: the worker stopped reading; nothing was dropped or dead-lettered
    assert st["counts"]["dead_lettered"] == 0
    assert st["counts"]["consumed"] - st["counts"]["enriched"] <= max_pending
    assert sum(st["lag"]["experiences"].values()) >= 200 - max_pending
    assert st["teacher"]["errors"] > 0 and st["teacher"]["error_rate"] > 0.5
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t0)))
    teacher_server.set_mode("ok")
    st = w.wait_for(lambda st: st["counts"]["enriched"] == 300, 90)
    assert st["counts"]["dead_lettered"] == 0
    # the outage is in the log: one line when it began, one when it ended (500s then resets: one outage)
    log = w.log_text()
    assert log.count("teacher is down since ") == 1, log[-3000:]
    assert re.search(r"teacher recovered after (\d+)\.\d s \(down since [^)]+\); (\d+) calls failed", log)
    m = re.search(r"teacher recovered after (\d+)\.\d s \(down since [^)]+\); (\d+) calls failed", log)
    assert m is not None and int(m.group(1)) >= OUTAGE_S - 2 and int(m.group(2)) == st["teacher"]["errors"]

    traces = consume_values(s, s.traces_topic, 300, 60)
    ids = Counter(decode(m.value() or b"", EnrichedTrace).experience_id for m in traces)
    assert set(ids) == {e.experience_id for e in first + during}
    assert sum(ids.values()) == 300  # no restart, so not even a duplicate
    assert consume_values(s, s.dead_letters_topic, None, 10, idle_s=1.0) == []


@pytest.mark.chaos
def test_killed_workers_restart_at_least_once(streams_settings: Callable[..., StreamsSettings],
                                              start_worker: Callable[..., WorkerProcess],
                                              teacher_server: FakeTeacherServer,
                                              record_property: Callable[[str, object], None]) -> None:
    teacher_server.set_mode("ok", latency_ms=100)  # slow enough to kill mid-stream
    s = streams_settings(tier3_teacher_concurrency=4)
    exps = experiences(1000, prefix="kill")
    expected = expected_sampled(exps)
    produce_values(s, s.experiences_topic, as_records(exps))

    w1 = start_worker(s, "w1")
    w1.wait_ready()
    w1.wait_for(lambda st: st["counts"]["enriched"] >= 60, 60)
    w1.kill()  # SIGKILL: no shutdown code runs
    killed_at = len(consume_values(s, s.traces_topic, None, 10, idle_s=1.0))

    w2 = start_worker(s, "w2")
    w2.wait_ready()
    w2.wait_for(lambda st: st["counts"]["enriched"] >= 40, 60)
    assert w2.stop() == 0  # SIGTERM mid-stream: in-flight work is cancelled and not acknowledged

    w3 = start_worker(s, "w3")
    w3.wait_ready()
    deadline = time.monotonic() + 120
    ids: Counter[str] = Counter()
    while time.monotonic() < deadline:
        ids = Counter(decode(m.value() or b"", EnrichedTrace).experience_id
                      for m in consume_values(s, s.traces_topic, None, 30, idle_s=1.5))
        if set(ids) >= expected:
            break
        time.sleep(1)
    assert set(ids) == expected, f"missing {len(expected - set(ids))}, extra {len(set(ids) - expected)}"
    duplicates = sum(ids.values()) - len(ids)
    record_property("duplicates", duplicates)
    print(f"\nkill/restart: {len(expected)} sampled, {killed_at} traces before SIGKILL, "
          f"{duplicates} duplicate traces (the trainer deduplicates by experience_id)")
    # at-least-once, but the redelivered window is bounded by what was in flight, not the whole topic
    assert duplicates <= 2 * s.max_pending + 50


@pytest.mark.chaos
def test_wrong_api_key_stops_the_worker_without_committing(streams_settings: Callable[..., StreamsSettings],
                                                           start_worker: Callable[..., WorkerProcess],
                                                           teacher_server: FakeTeacherServer) -> None:
    s = streams_settings()
    exps = [make_experience(i, 0.95, prefix="auth") for i in range(20)]
    teacher_server.set_mode("401")
    w1 = start_worker(s, "w1")
    w1.wait_ready()
    produce_values(s, s.experiences_topic, as_records(exps))
    deadline = time.monotonic() + 60
    while w1.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert w1.proc.returncode not in (None, 0), "the worker should stop on a configuration error"
    assert "stopping the worker" in w1.log_text() and "HTTP 401" in w1.log_text()
    assert consume_values(s, s.dead_letters_topic, None, 10, idle_s=1.0) == []  # not dead-lettered either

    teacher_server.set_mode("ok")  # the key is fixed: the same experiences come back, nothing was committed
    w2 = start_worker(s, "w2")
    w2.wait_ready()
    w2.wait_for(lambda st: st["counts"]["enriched"] == 20, 60)
    traces = consume_values(s, s.traces_topic, 20, 30)
    assert {decode(m.value() or b"", EnrichedTrace).experience_id for m in traces} == {e.experience_id for e in exps}


#: runs of the scale-out test: 1 in the suite; ``TIER3_CHAOS_RUNS=20 pytest -m chaos -k scale_out`` is the loop
CHAOS_RUNS = int(os.environ.get("TIER3_CHAOS_RUNS", "1"))


@pytest.mark.chaos
@pytest.mark.parametrize("run", range(CHAOS_RUNS))
def test_scale_out_three_workers_one_killed_one_added(run: int, streams_settings: Callable[..., StreamsSettings],
                                                      start_worker: Callable[..., WorkerProcess],
                                                      teacher_server: FakeTeacherServer,
                                                      record_property: Callable[[str, object], None]) -> None:
    """3 workers share 6 partitions; one is SIGKILLed mid-stream and a fourth joins: every sampled experience is
    traced (none lost), and the duplicates stay within what the killed worker had in flight plus what the
    rebalances hand over (each worker's uncommitted window)."""
    teacher_server.set_mode("ok", latency_ms=400)  # slow enough that the kill and the join land mid-stream
    s = streams_settings(tier3_partitions=6, tier3_teacher_concurrency=4)
    exps = experiences(2400, prefix="scale")
    expected = expected_sampled(exps)
    workers = [start_worker(s, f"w{i}") for i in (1, 2, 3)]
    for w in workers:
        w.wait_ready(180)
    produce_values(s, s.experiences_topic, as_records(exps))

    def traced() -> Counter[str]:
        return Counter(decode(m.value() or b"", EnrichedTrace).experience_id
                       for m in consume_values(s, s.traces_topic, None, 30, idle_s=1.5))

    def enriched() -> int:  # the workers' own counts (fast: /status), not a read of the topic
        return sum(w.status()["counts"]["enriched"] for w in workers if w.proc.poll() is None)

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and enriched() < len(expected) // 4:
        time.sleep(0.2)
    workers[1].kill()  # SIGKILL mid-stream: its partitions go to the others, from their committed offsets
    killed_at = enriched()
    assert killed_at < len(expected), "the kill should land mid-stream"
    w4 = start_worker(s, "w4")  # and a new one joins: another rebalance
    w4.wait_ready(180)

    def wait_all_traced(timeout_s: float) -> Counter[str]:
        deadline = time.monotonic() + timeout_s
        ids: Counter[str] = Counter()
        while time.monotonic() < deadline:
            ids = traced()
            if set(ids) >= expected:
                break
            time.sleep(2)
        return ids

    # no restart, no supervisor: a partition that stops being delivered is recovered in place by the worker's
    # stall watch (streams/stall.py, TIER3_STALL_S) and a hole in the delivered offsets by the offset guard's seek back
    ids = wait_all_traced(180 + 3 * s.tier3_stall_s)
    missing = expected - set(ids)
    guards = [w.status()["offset_guard"] for w in (*workers, w4) if w.proc.poll() is None]
    record_property("offset_guard", guards)
    print(f"\nscale-out: offset guard of the live workers {guards}")
    if missing:
        where = {exp_id: (p, off) for p, off, exp_id in experience_positions(s)}
        committed = group_committed(s)
        lost = sorted(where[e] for e in missing if committed.get(where[e][0], -1) > where[e][1])
        assert not lost, f"committed past unprocessed experiences (a loss): {lost[:10]}"
        stalled = sorted({where[e][0] for e in missing})
        record_property("stalled_partitions", stalled)
        # no supervisor's restart any more: 20 runs in a row recovered every stall and hole in place (docs/worker.md)
        pytest.fail(f"{len(missing)} sampled experiences not traced on partitions {stalled} (committed {committed}) "
                    f"after {180 + 3 * s.tier3_stall_s:.0f} s: a stall the worker did not recover in place "
                    f"(offset guard {guards}); worker logs:\n" + "\n".join(w.log_tail(3000) for w in (*workers, w4)))
    assert set(ids) == expected, f"missing {len(expected - set(ids))}, extra {len(set(ids) - expected)}"
    duplicates = sum(ids.values()) - len(ids)
    record_property("duplicates", duplicates)
    print(f"\nscale-out: {len(expected)} sampled on 6 partitions, 3 workers, 1 SIGKILLed, 1 added: "
          f"{killed_at} traced at the kill, {duplicates} duplicate traces")
    # at-least-once: the redelivered window is bounded by the uncommitted work of each worker that lost
    # partitions (the killed one, and the survivors at each rebalance), never the whole topic
    assert duplicates <= 4 * (2 * s.max_pending + 50)


def experience_positions(s: StreamsSettings) -> list[tuple[int, int, str]]:
    """(partition, offset, experience id) of every experience in the topic."""
    from schemas import Experience
    from schemas.kafka import reading as kio

    return [(m.partition() or 0, m.offset() or 0, decode(m.value() or b"", Experience).experience_id)
            for m in kio.read_until_now(s, s.experiences_topic, "test")]


def group_committed(s: StreamsSettings) -> dict[int, int]:
    """The worker group's committed offset per partition of the experiences topic (-1001: none)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**s.client_config(), "group.id": s.faust_app_id, "enable.auto.commit": False})
    try:
        tps = [TopicPartition(s.experiences_topic, p) for p in range(s.tier3_partitions)]
        return {tp.partition: tp.offset for tp in c.committed(tps, timeout=20)}
    finally:
        c.close()
