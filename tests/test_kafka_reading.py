"""schemas.kafka.reading against the real broker: read "until now" right after a topic is created, gaps, a missing
topic, produce-and-wait, and which errors the one retry policy treats as transient."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.kafka import reading as kio
from schemas.settings import RELIABLE_PRODUCER, KafkaSettings
from tests.kafka_utils import NotDelivered, produce_and_wait, produce_values


def test_read_until_now_reads_every_partition_to_the_end_and_stops(make_settings: Callable[..., KafkaSettings]
                                                                     ) -> None:
    s = make_settings(tier3_partitions=3)
    produce_values(s, s.traces_topic, [(f"k{i}", f"v{i}".encode()) for i in range(60)])
    got = list(kio.read_until_now(s, s.traces_topic, "test", timeout_s=30))
    assert sorted(m.value() for m in got) == sorted(f"v{i}".encode() for i in range(60))
    # per partition in offset order, no duplicates
    for p in {m.partition() for m in got}:
        offs = [m.offset() for m in got if m.partition() == p]
        assert offs == sorted(offs) and len(set(offs)) == len(offs)


def test_until_now_means_the_end_offsets_at_the_call(make_settings: Callable[..., KafkaSettings]) -> None:
    s = make_settings(tier3_partitions=1)
    produce_values(s, s.traces_topic, [(None, b"before")] * 5)
    it = kio.read_until_now(s, s.traces_topic, "test", timeout_s=30)
    first = next(it)  # the slice is fixed now
    produce_values(s, s.traces_topic, [(None, b"after")] * 5)
    rest = list(it)
    assert [m.value() for m in [first, *rest]] == [b"before"] * 5


def test_an_empty_and_a_missing_topic(make_settings: Callable[..., KafkaSettings]) -> None:
    s = make_settings()
    assert list(kio.read_until_now(s, s.dead_letters_topic, "test", timeout_s=10)) == []
    with pytest.raises(kio.TopicMissing):
        list(kio.read_until_now(s, f"{s.tier3_topic_prefix}never-created", "test", timeout_s=5))


def test_watermarks_of_a_topic_created_a_moment_ago(make_settings: Callable[..., KafkaSettings]) -> None:
    """Right after CreateTopics the partition leaders may still be moving in: the broker answers
    NOT_LEADER_FOR_PARTITION for a moment. That is asked again, never raised (the CI failure this module fixes)."""
    s = make_settings(create_topics=False)
    admin = AdminClient(s.client_config())
    for round_ in range(5):
        topic = f"{s.tier3_topic_prefix}fresh{round_}-{uuid.uuid4().hex[:6]}"
        fut = admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])[topic]
        fut.result(timeout=30)
        c = kio.reader(s, "test")
        try:
            marks = kio.watermarks(c, topic, timeout_s=30)  # no waiting for metadata first, on purpose
        finally:
            c.close()
        assert marks == {p: (0, 0) for p in range(6)}


def test_produce_and_wait_counts_and_refuses_loudly(make_settings: Callable[..., KafkaSettings]) -> None:
    s = make_settings(tier3_partitions=1)
    producer = Producer({**s.client_config(), **RELIABLE_PRODUCER})
    assert produce_and_wait(producer, s.traces_topic, [(b"k", b"x" * 10)] * 7) == 7
    assert len(list(kio.read_until_now(s, s.traces_topic, "test"))) == 7
    too_big = b"x" * (s.topic_max_message_bytes + 1024)
    with pytest.raises((NotDelivered, KafkaException)):
        produce_and_wait(producer, s.traces_topic, [(None, too_big)], timeout_s=20)


def test_only_transient_errors_are_retried() -> None:
    assert kio.is_transient(KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION)))
    assert kio.is_transient(KafkaException(KafkaError(KafkaError._TIMED_OUT)))
    assert not kio.is_transient(KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)))
    assert not kio.is_transient(kio.TopicMissing(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)))
    assert not kio.is_transient(ValueError("no"))

    calls = []

    @kio.transient_retry(5.0)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise KafkaException(KafkaError(KafkaError.LEADER_NOT_AVAILABLE))
        return "ok"

    assert flaky() == "ok" and len(calls) == 3

    @kio.transient_retry(0.3)
    def always() -> None:
        raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))

    with pytest.raises(KafkaException):  # the deadline passes: the last error, as it was
        always()
