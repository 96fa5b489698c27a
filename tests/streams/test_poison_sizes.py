"""No message of any size stops a partition: the worker against the real broker at the exact boundary sizes of
every limit (docs/guarantees.md, "Size limits"), and dead-letter / trace writes the broker refuses."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from dataclasses import replace

import orjson
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from schemas import DeadLetter, EnrichedTrace, decode, encode
from schemas.kafka import reading as kio
from schemas.settings import RELIABLE_PRODUCER
from streams.app import changelog_spec
from streams.dlq import Letter, read_source, redrive
from streams.settings import StreamsSettings
from streams.topics import ensure_topics
from tests.fakes.teacher_server import FakeTeacherServer
from tests.kafka_utils import consume_values, produce_values
from tests.streams.conftest import API_KEY
from tests.streams.helpers import WorkerProcess, make_experience

ISSUE_SIZE = 2_096_600  # the experience that stopped a partition for good (issue 11)


def random_text(n: int) -> str:
    return base64.urlsafe_b64encode(os.urandom(n))[:n].decode()  # 1 byte per character in JSON, incompressible


def experience_bytes(i: int, size: int, prefix: str) -> bytes:
    """A valid, sampled experience encoded in exactly ``size`` bytes (padded in metadata, not sent to the teacher)."""
    d = orjson.loads(encode(make_experience(i, 0.95, prefix=prefix)))
    d["metadata"] = {"pad": ""}
    d["metadata"]["pad"] = random_text(size - len(orjson.dumps(d)))
    raw = orjson.dumps(d)
    assert len(raw) == size
    return raw


def largest(accepts: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with accepts(n), accepts being monotone (bisection)."""
    assert accepts(lo) and not accepts(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if accepts(mid):
            lo = mid
        else:
            hi = mid
    return lo


def test_boundary_sizes_never_stop_a_partition(streams_settings: Callable[..., StreamsSettings],
                                               start_worker: Callable[..., WorkerProcess]) -> None:
    s = streams_settings()  # the real limits: TIER3_MAX_MESSAGE_BYTES=1,000,000, records up to 2 MiB
    limit, record = s.tier3_max_message_bytes, s.max_record_bytes
    key = b"boundary-key"

    # a topic created with the experiences topic's config, to probe the limits on
    spec = next(t for t in s.topic_specs() if t.name == s.experiences_topic)
    probe_topic = f"{s.tier3_topic_prefix}size-probe"
    admin = AdminClient(s.client_config())
    admin.create_topics([NewTopic(probe_topic, 1, 1, config=spec.config)])[probe_topic].result(30)

    # the producer-side limit: the largest value any tier3 producer (librdkafka, message.max.bytes) accepts
    local = Producer({**s.client_config(), **RELIABLE_PRODUCER})

    def producer_accepts(n: int) -> bool:
        try:
            local.produce(probe_topic, value=b"\0" * n, key=key)
        except KafkaException:
            return False
        return True

    max_value = largest(producer_accepts, 1, record + 1)
    assert local.flush(60) == 0
    assert record - 1024 < max_value < record

    # the broker-side limit, probed by a client that is not tier3's (bigger message.max.bytes, no compression:
    # the record batch is what the broker counts)
    foreign_conf = {**s.client_config(), "message.max.bytes": record * 2, "compression.type": "none",
                    "linger.ms": 0, "acks": "all"}
    foreign = Producer({**foreign_conf, "retries": 0})
    watermarks = Consumer({**s.client_config(), "group.id": "unused"})

    def broker_accepts(n: int) -> bool:
        # accepted = appended to the log (no delivery callback: one after a refused record left confluent-kafka
        # 2.16 with a stray exception in this test)
        before = kio.watermarks(watermarks, probe_topic, [0], 10)[0][1]
        foreign.produce(probe_topic, value=os.urandom(n), key=key)
        assert foreign.flush(60) == 0
        return bool(kio.watermarks(watermarks, probe_topic, [0], 10)[0][1] > before)

    broker_max = largest(broker_accepts, max_value, s.topic_max_message_bytes + 1)
    assert broker_max >= max_value  # whatever a tier3 producer writes, the topics accept

    sizes: list[tuple[str, bytes]] = [
        ("limit-1", experience_bytes(1, limit - 1, "b")),
        ("limit", experience_bytes(2, limit, "b")),
        ("limit+1", experience_bytes(3, limit + 1, "b")),
        ("issue", experience_bytes(4, ISSUE_SIZE, "b")),
        ("producer-max", os.urandom(max_value)),
        ("broker-max-1", os.urandom(broker_max - 1)),
        ("broker-max", os.urandom(broker_max)),
        ("after", encode(make_experience(5, 0.95, prefix="b"))),
    ]
    reports: list[object] = []
    for name, raw in sizes:  # one partition, in this order: each must be passed for the next to be reached
        foreign.produce(s.experiences_topic, value=raw, key=name.encode(), partition=0,
                        on_delivery=lambda e, _m: reports.append(e))
        assert foreign.flush(60) == 0
    assert reports == [None] * len(sizes), reports
    refused: list[object] = []
    foreign.produce(s.experiences_topic, value=os.urandom(broker_max + 1), key=b"broker-max+1", partition=0,
                    on_delivery=lambda e, _m: refused.append(e))
    foreign.flush(60)
    assert refused[0] is not None and "too large" in str(refused[0]).lower()  # the broker's own limit holds

    w = start_worker(s)
    w.wait_ready()
    st = w.wait_for(lambda st: st["counts"]["consumed"] == len(sizes) and st["teacher"]["in_flight"] == 0
                    and st["counts"]["enriched"] + st["counts"]["dead_lettered"] == len(sizes)
                    and st["lag"]["experiences"].get("0") == 0, 180)
    assert st["counts"]["enriched"] == 3 and st["counts"]["dead_lettered"] == 5
    assert st["dead_letters"]["by_reason"] == {"oversize": 5}  # over TIER3_MAX_MESSAGE_BYTES, JSON or not

    traces = [decode(m.value() or b"", EnrichedTrace, max_bytes=record)
              for m in consume_values(s, s.traces_topic, 3, 60)]
    assert sorted(t.experience_id for t in traces) == ["b-000001", "b-000002", "b-000005"]
    sent = dict(sizes)
    letters = {}
    for m in consume_values(s, s.dead_letters_topic, 5, 60):
        assert len(m.value() or b"") <= record
        dl = decode(m.value() or b"", DeadLetter, max_bytes=record)
        assert dl.key_b64 is not None
        letters[base64.b64decode(dl.key_b64).decode()] = (m, dl)
    assert set(letters) == {"limit+1", "issue", "producer-max", "broker-max-1", "broker-max"}
    for name, (_m, dl) in letters.items():
        raw = sent[name]
        assert dl.original_size == len(raw) and dl.original_sha256 == hashlib.sha256(raw).hexdigest()
        assert (dl.source_topic, dl.source_partition) == (s.experiences_topic, 0) and dl.stage == "decode"
        kept = base64.b64decode(dl.original_b64)
        if name == "limit+1":  # the largest accepted experience + 1 still fits whole
            assert not dl.original_truncated and kept == raw
        else:
            assert dl.original_truncated and raw.startswith(kept) and len(kept) > 1_000_000
    # re-drive from the source: the 2,096,600 bytes come back exactly, and are dead-lettered again
    m, issue = letters["issue"]
    found = read_source(s, issue)
    assert found is not None and found[1] == sent["issue"]
    assert redrive(s, [Letter(m.partition() or 0, m.offset() or 0, issue, m.value() or b"")]) == 1
    w.wait_for(lambda st: st["counts"]["consumed"] == len(sizes) + 1 and st["counts"]["dead_lettered"] == 6, 120)
    assert w.proc.poll() is None


def test_refused_trace_and_dead_letter_writes_fall_back(make_settings: Callable[..., object],
                                                        start_worker: Callable[..., WorkerProcess],
                                                        teacher_server: FakeTeacherServer) -> None:
    # a cluster whose topics are stricter than ours (e.g. created by someone else): the broker refuses the trace,
    # then the dead letter with the original; the worker writes a metadata-only dead letter and keeps going
    s = make_settings(StreamsSettings, create_topics=False, tier3_teacher="openai",
                      tier3_teacher_model="fake-teacher", tier3_teacher_base_url=f"{teacher_server.url}/v1",
                      openai_api_key=API_KEY, tier3_session_timeout_s=6.0, tier3_commit_interval_s=0.5)
    assert isinstance(s, StreamsSettings)
    strict = {s.traces_topic: "1024", s.dead_letters_topic: "2048"}
    specs = [replace(t, config={**t.config, "max.message.bytes": strict[t.name]}) if t.name in strict else t
             for t in s.topic_specs()]
    ensure_topics(s, [*specs, changelog_spec(s)])
    raw = experience_bytes(7, 12_000, "strict")
    produce_values(s, s.experiences_topic, [(b"strict-7", raw)])
    w = start_worker(s)
    w.wait_ready()
    st = w.wait_for(lambda st: st["counts"]["dead_lettered"] == 1, 90)
    assert st["counts"]["enriched"] == 0 and st["dead_letters"]["by_reason"] == {"trace_too_large": 1}
    [m] = consume_values(s, s.dead_letters_topic, 1, 30)
    dl = decode(m.value() or b"", DeadLetter)
    assert dl.stage == "publish" and dl.error_kind == "trace_too_large" and dl.experience_id == "strict-000007"
    assert dl.original_b64 == "" and dl.original_truncated and "first write refused" in dl.reason
    assert dl.original_size == len(raw) and dl.original_sha256 == hashlib.sha256(raw).hexdigest()
    found = read_source(s, dl)
    assert found is not None and found == (b"strict-7", raw)
    # and the partition goes on: the next experience is processed the same way
    produce_values(s, s.experiences_topic, [(b"strict-8", experience_bytes(8, 12_000, "strict"))])
    w.wait_for(lambda st: st["counts"]["dead_lettered"] == 2, 90)
    assert w.proc.poll() is None
    assert "writing it again without the original bytes" in w.log_text()

