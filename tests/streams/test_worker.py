"""The worker end to end: real broker, `tier3 worker` as a subprocess, the fake teacher on 127.0.0.1."""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from schemas import DeadLetter, EnrichedTrace, decode, encode
from streams.settings import StreamsSettings
from tests.fakes.teacher_server import FakeTeacherServer, expected_answer, question_of
from tests.kafka_utils import consume_values, produce_values
from tests.streams.conftest import API_KEY
from tests.streams.helpers import (
    WorkerProcess,
    as_records,
    expected_sampled,
    experiences,
    make_experience,
    metric_value,
)

MAX_BYTES = 20_000


def poison_messages(n: int) -> list[tuple[bytes, bytes, str]]:
    """(key, bytes, expected error kind): five kinds of bad input, n in all."""
    good = orjson.loads(encode(make_experience(0, 0.95)))
    out: list[tuple[bytes, bytes, str]] = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            raw, why = f"this is not json {i}".encode(), "not_json"
        elif kind == 1:
            raw, why = orjson.dumps({**good, "experience_id": f"bad-{i}", "confidence": "high"}), "invalid"
        elif kind == 2:
            raw, why = orjson.dumps({**good, "experience_id": f"bad-{i}", "schema_version": 7}), "unknown_version"
        elif kind == 3:
            raw, why = orjson.dumps({**good, "experience_id": f"bad-{i}", "response": "x" * MAX_BYTES}), "oversize"
        else:
            raw, why = b'{"experience_id": "bad-\xff\xfe", "schema_version": 1}', "not_json"
        out.append((f"poison-{i}".encode(), raw, why))
    return out


def test_sampled_set_poison_status_and_metrics(streams_settings: Callable[..., StreamsSettings],
                                               start_worker: Callable[..., WorkerProcess],
                                               teacher_server: FakeTeacherServer) -> None:
    s = streams_settings(tier3_max_message_bytes=MAX_BYTES)
    exps = experiences(1000)
    expected = expected_sampled(exps)
    poison = poison_messages(500)
    # interleave: one poison message after every second experience
    records: list[tuple[bytes, bytes]] = []
    good = as_records(exps)
    for i, rec in enumerate(good):
        records.append(rec)
        if i % 2 == 1:
            key, raw, _ = poison[i // 2]
            records.append((key, raw))
    produce_values(s, s.experiences_topic, records)

    w = start_worker(s)
    w.wait_ready()
    st = w.wait_for(lambda st: st["counts"]["consumed"] >= 1500 and st["teacher"]["in_flight"] == 0
                    and st["counts"]["enriched"] + st["counts"]["dead_lettered"] >= len(expected) + 500, 120)

    traces = [decode(m.value() or b"", EnrichedTrace) for m in consume_values(s, s.traces_topic, len(expected), 60)]
    ids = [t.experience_id for t in traces]
    assert set(ids) == expected and len(ids) == len(expected)  # no more, no less, no duplicate
    by_id = {e.experience_id: e for e in exps}
    for t in traces:
        prod = [m.model_dump() for m in by_id[t.experience_id].messages]
        assert t.answer == expected_answer(question_of(prod))
        assert t.sample_reason == ("high_confidence" if by_id[t.experience_id].confidence > 0.8 else "random")
        assert t.teacher.kind == "openai" and t.teacher.attempts == 1 and not t.teacher.recorded

    dls = [decode(m.value() or b"", DeadLetter) for m in consume_values(s, s.dead_letters_topic, 500, 60)]
    assert len(dls) == 500
    sent = {key.decode(): (raw, why) for key, raw, why in poison}
    for d in dls:
        assert d.key_b64 is not None
        raw, why = sent[base64.b64decode(d.key_b64).decode()]
        assert base64.b64decode(d.original_b64) == raw and d.error_kind == why and d.stage == "decode"
    assert w.proc.poll() is None  # still running

    # /status: exactly the known counts
    st = w.wait_for(lambda st: sum(st["windows"]["current"]["by_task"].values()) == len(expected)
                    and all(v == 0 for v in st["lag"]["experiences"].values()), 30)
    assert st["counts"] == {"consumed": 1500, "sampled": len(expected), "enriched": len(expected),
                            "dead_lettered": 500, "not_sampled": 1000 - len(expected)}
    assert st["dead_letters"] == {"count": 500, "by_reason": dict(Counter(why for _, _, why in poison))}
    assert st["windows"]["current"]["by_task"] == {"widget_selector": len(expected)}
    assert st["windows"]["size_s"] == 1800 and len(st["windows"]["recent"]) == 5
    assert set(st["lag"]["experiences"]) == {"0", "1", "2"}
    assert st["teacher"]["calls"] == len(expected) and st["teacher"]["errors"] == 0
    assert st["teacher"]["latency_ms_p50"] is not None and st["teacher"]["in_flight"] == 0
    assert set(st["trainer"]["tier3_sft"]) == {"training_in_progress", "last_check_time", "check_interval_s",
                                               "next_check_in_s"}
    assert st["worker_id"] == "w1" and st["app"] == "tier3-worker" and "router" in st

    metrics = httpx.get(f"{w.url}/metrics", timeout=5).text
    assert metric_value(metrics, "tier3_worker_enriched_total", worker_id="w1") == len(expected)
    assert metric_value(metrics, "tier3_worker_consumed_total", worker_id="w1") == 1500
    assert metric_value(metrics, "tier3_worker_dead_letters_total", worker_id="w1", reason="oversize") == 100
    assert metric_value(metrics, "tier3_window_enriched_traces", worker_id="w1",
                        task="widget_selector") == len(expected)
    index = httpx.get(f"{w.url}/", timeout=5)
    assert index.status_code == 200

    # the key reached the teacher, and nowhere else
    assert API_KEY in teacher_server.keys_seen
    assert API_KEY not in orjson.dumps(st).decode() and API_KEY not in metrics
    w.stop()
    assert API_KEY not in w.log_text()


def _dead_lettered_is(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda st: bool(st["counts"]["dead_lettered"] == n)


def test_teacher_faults_retried_then_dead_lettered(streams_settings: Callable[..., StreamsSettings],
                                                   start_worker: Callable[..., WorkerProcess],
                                                   teacher_server: FakeTeacherServer) -> None:
    s = streams_settings(tier3_teacher_max_attempts=3, tier3_teacher_retry_max_s=2.0)
    w = start_worker(s)
    w.wait_ready()
    batches: dict[str, list[str]] = {}

    def publish(name: str, n: int) -> None:
        exps = [make_experience(i, 0.95, prefix=name) for i in range(n)]  # all sampled (high confidence)
        batches[name] = [e.experience_id for e in exps]
        produce_values(s, s.experiences_topic, as_records(exps))

    phases = [("off_schema", None, "invalid_answer", "enrich"), ("invalid_json", None, "invalid_answer", "enrich"),
              ("500", None, "server_error", "teacher")]
    total_dead = 0
    for mode, count, _kind, _stage in phases:
        teacher_server.set_mode(mode, count)
        publish(mode, 8)
        total_dead += 8
        w.wait_for(_dead_lettered_is(total_dead), 60)
    # transient faults that clear: retried, then enriched
    teacher_server.set_mode("429", count=6)
    publish("flaky", 8)
    st = w.wait_for(lambda st: st["counts"]["enriched"] == 8, 60)
    assert st["counts"]["dead_lettered"] == total_dead and st["teacher"]["errors"] > 6

    dls = [decode(m.value() or b"", DeadLetter) for m in consume_values(s, s.dead_letters_topic, total_dead, 30)]
    by_id = {d.experience_id: d for d in dls}
    assert len(dls) == total_dead == len(by_id)
    for mode, _count, kind, stage in phases:
        for eid in batches[mode]:
            d = by_id[eid]
            assert (d.error_kind, d.stage) == (kind, stage), d
            assert d.reason and "gave up after" in d.reason
            if kind == "invalid_answer":
                assert d.attempts == 3
            else:
                assert d.attempts >= 2
    traces = [decode(m.value() or b"", EnrichedTrace) for m in consume_values(s, s.traces_topic, 8, 30)]
    assert sorted(t.experience_id for t in traces) == sorted(batches["flaky"])
    assert sum(t.teacher.attempts for t in traces) == 8 + 6
    assert st["dead_letters"]["by_reason"] == {"invalid_answer": 16, "server_error": 8}


def test_status_trainer_block_from_training_runs(streams_settings: Callable[..., StreamsSettings],
                                                 start_worker: Callable[..., WorkerProcess]) -> None:
    from schemas import TrainingRun

    s = streams_settings()
    now = int(time.time() * 1000)
    # heartbeats live on the compacted trainer-status topic, lifecycle events on training-runs
    beat = TrainingRun(run_id="trainer:g", event="heartbeat", at_ms=now, training_in_progress=False,
                       last_check_time_ms=now - 1000, check_interval_s=1800.0, next_check_in_s=1799.0)
    produce_values(s, s.trainer_status_topic, [(beat.run_id.encode(), encode(beat))])
    runs = [TrainingRun(run_id="run-1", event="started", at_ms=now + 1),
            TrainingRun(run_id="run-1", event="evaluated", at_ms=now + 2, model_version=1,
                        details={"metrics": {"json_valid": 1.0}})]
    produce_values(s, s.training_runs_topic, [(r.run_id.encode(), encode(r)) for r in runs])
    w = start_worker(s)
    w.wait_ready()
    st = w.wait_for(lambda st: st["trainer"]["totals"]["events"] == 2, 30)
    sft = st["trainer"]["tier3_sft"]
    assert sft["training_in_progress"] is True and sft["check_interval_s"] == 1800.0
    assert sft["last_check_time"] == (now - 1000) / 1000 and 0 < sft["next_check_in_s"] <= 1799.0
    # one record per run (the heartbeat is the trainer's, not a run's)
    assert st["trainer"]["totals"] == {"runs": 1, "events": 2, "by_event": {"started": 1, "evaluated": 1},
                                       "runs_kept": 1}
    run = st["trainer"]["runs"][-1]
    assert (run["run_id"], run["model_version"], run["stages"], run["status"]) == (
        "run-1", 1, {"started": now + 1, "evaluated": now + 2}, "evaluated")
    assert st["trainer"]["versions"] == [{"model_version": 1, "run_id": "run-1", "metrics": {"json_valid": 1.0},
                                          "verdict": None, "rolled_back": False, "in_force": False,
                                          "status": "evaluated", "evaluated_ms": now + 2}]


def test_two_workers_share_partitions(streams_settings: Callable[..., StreamsSettings],
                                      start_worker: Callable[..., WorkerProcess]) -> None:
    s = streams_settings(tier3_partitions=4)
    w1, w2 = start_worker(s, "w1"), start_worker(s, "w2")
    assert w1.web_port != w2.web_port
    # both in the group, each with its own partitions
    w1.wait_for(lambda st: len(st["lag"]["experiences"]) == 2, 90)
    w2.wait_for(lambda st: len(st["lag"]["experiences"]) == 2, 30)
    p1, p2 = set(w1.status()["lag"]["experiences"]), set(w2.status()["lag"]["experiences"])
    assert p1.isdisjoint(p2) and p1 | p2 == {"0", "1", "2", "3"}

    exps = [make_experience(i, 0.95, prefix="pair") for i in range(400)]
    produce_values(s, s.experiences_topic, as_records(exps))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = w1.status()["counts"]["enriched"] + w2.status()["counts"]["enriched"]
        if done >= 400:
            break
        time.sleep(0.3)
    c1, c2 = w1.status()["counts"], w2.status()["counts"]
    assert c1["enriched"] > 0 and c2["enriched"] > 0 and c1["enriched"] + c2["enriched"] == 400
    traces = consume_values(s, s.traces_topic, 400, 30)
    ids = [decode(m.value() or b"", EnrichedTrace).experience_id for m in traces]
    assert len(ids) == 400 and set(ids) == {e.experience_id for e in exps}


def test_anthropic_teacher_end_to_end(streams_settings: Callable[..., StreamsSettings],
                                      start_worker: Callable[..., WorkerProcess],
                                      teacher_server: FakeTeacherServer) -> None:
    s = streams_settings(tier3_teacher="anthropic", tier3_teacher_base_url=teacher_server.url,
                         anthropic_api_key=API_KEY, openai_api_key=None)
    exps = [make_experience(i, 0.95, prefix="claude") for i in range(30)]
    produce_values(s, s.experiences_topic, as_records(exps))
    w = start_worker(s)
    w.wait_ready()
    w.wait_for(lambda st: st["counts"]["enriched"] == 30, 60)
    traces = [decode(m.value() or b"", EnrichedTrace) for m in consume_values(s, s.traces_topic, 30, 30)]
    assert {t.experience_id for t in traces} == {e.experience_id for e in exps}
    assert all(t.teacher.kind == "anthropic" and t.teacher.input_tokens for t in traces)
    assert teacher_server.counters["anthropic:ok"] == 30 and API_KEY in teacher_server.keys_seen
    w.stop()
    assert API_KEY not in w.log_text()


def test_untrusted_teacher_text_is_dead_lettered_and_counted(streams_settings: Callable[..., StreamsSettings],
                                                            start_worker: Callable[..., WorkerProcess],
                                                            teacher_server: FakeTeacherServer) -> None:
    s = streams_settings()
    w = start_worker(s)
    w.wait_ready()
    for n, (mode, prefix) in enumerate((("inject_tag", "tag"), ("inject_token", "tok"), ("inject_lookalike", "like")),
                                       1):
        teacher_server.set_mode(mode)
        produce_values(s, s.experiences_topic, as_records([make_experience(i, 0.95, prefix=prefix)
                                                           for i in range(5)]))
        w.wait_for(lambda st, n=n: st["counts"]["consumed"] == 5 * n and st["teacher"]["in_flight"] == 0  # type: ignore[misc]
                   and st["counts"]["dead_lettered"] == 5 * n, 60)
    teacher_server.set_mode("ok")
    produce_values(s, s.experiences_topic, as_records([make_experience(0, 0.95, prefix="clean")]))
    st = w.wait_for(lambda st: st["counts"]["enriched"] == 1, 60)
    assert st["dead_letters"]["by_reason"] == {"unsafe_text": 10, "tag_lookalike": 5}  # each kind its own reason
    assert st["teacher"]["calls"] == 16  # dead-lettered at once: a retry would get the same text
    metrics = httpx.get(f"{w.url}/metrics", timeout=5).text
    assert metric_value(metrics, "tier3_worker_dead_letters_total", worker_id="w1", reason="unsafe_text") == 10
    assert metric_value(metrics, "tier3_worker_dead_letters_total", worker_id="w1", reason="tag_lookalike") == 5
    dls = [decode(m.value() or b"", DeadLetter) for m in consume_values(s, s.dead_letters_topic, 15, 30)]
    assert len(dls) == 15 and {(d.stage, d.error_kind) for d in dls} == {("enrich", "unsafe_text"),
                                                                        ("enrich", "tag_lookalike")}
    assert sum("<|im_end|>" in d.reason for d in dls) == 5
    assert sum("tags appear as" in d.reason for d in dls) == 5 and sum("look" in d.reason for d in dls) == 5
    [trace] = [decode(m.value() or b"", EnrichedTrace) for m in consume_values(s, s.traces_topic, 1, 30)]
    assert trace.experience_id == "clean-000000"


def test_first_record_finds_what_the_range_holds(streams_settings: Callable[..., StreamsSettings]) -> None:
    """The offset guard's check against the log: the first record in a range, clamped to what the partition
    holds (None: nothing there, e.g. only transaction markers or past the end)."""
    from streams.app import first_record

    s = streams_settings(tier3_partitions=1)
    produce_values(s, s.experiences_topic, [(f"k{i}", b"{}") for i in range(10)])
    assert first_record(s, s.experiences_topic, 0, 2, 7) == 2
    assert first_record(s, s.experiences_topic, 0, 8, 50) == 8  # up to the high watermark
    assert first_record(s, s.experiences_topic, 0, 10, 12) is None
