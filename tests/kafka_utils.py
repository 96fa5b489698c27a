"""Small real-broker helpers for tests: produce raw values, consume a topic from the beginning."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from schemas import TrainingRun, encode
from schemas.settings import RELIABLE_PRODUCER, KafkaSettings


class NotDelivered(Exception):
    """Some records were not acknowledged by the broker before the deadline."""


def produce_and_wait(producer: Producer, topic: str, records: Iterable[tuple[bytes | None, bytes]],
                     timeout_s: float = 30.0) -> int:
    """Produce ``(key, value)`` records and wait for every delivery report; :class:`NotDelivered` (with the first
    errors) unless all were acknowledged. Returns how many were delivered."""
    errors: list[str] = []
    n = 0

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err.str())

    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain, then go on
                producer.poll(0.1)
        n += 1
    left = producer.flush(timeout_s)
    if left or errors:
        raise NotDelivered(f"{topic}: {left} record(s) still pending, {len(errors)} refused"
                           + (f": {'; '.join(errors[:3])}" if errors else ""))
    return n


def produce_values(settings: KafkaSettings, topic: str, items: Iterable[tuple[bytes | str | None, bytes]],
                   timeout_s: float = 60.0) -> int:
    """Produce (key, value) pairs and wait until every one is acknowledged; return the count."""
    producer = Producer({**settings.client_config(), **RELIABLE_PRODUCER, "linger.ms": 5})
    keyed = ((k.encode() if isinstance(k, str) else k, v) for k, v in items)
    return produce_and_wait(producer, topic, keyed, timeout_s)


def inject_run_events(settings: KafkaSettings, runs: Iterable[TrainingRun]) -> int:
    """Put lifecycle events on training-runs (key = run id), for tests that need the log in a given state; the
    product writes it only through ``trainer.events.TrainerEvents``."""
    return produce_values(settings, settings.training_runs_topic, [(r.run_id, encode(r)) for r in runs])


def consume_values(settings: KafkaSettings, topic: str, expected: int | None = None, timeout_s: float = 60.0,
                   idle_s: float = 3.0) -> list[Message]:
    """Read ``topic`` from the beginning (no group commits) until ``expected`` messages or ``idle_s`` of quiet."""
    consumer = Consumer({**settings.client_config(), "group.id": f"test-reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    md = consumer.list_topics(topic, timeout=10)
    parts = [TopicPartition(topic, p, 0) for p in md.topics[topic].partitions]
    consumer.assign(parts)
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if expected is not None and len(out) >= expected:
                # a short extra read catches duplicates beyond the expected count
                extra_until = time.monotonic() + 0.5
                while time.monotonic() < extra_until:
                    msg = consumer.poll(0.1)
                    if msg is not None and msg.error() is None:
                        out.append(msg)
                break
            msg = consumer.poll(0.2)
            if msg is None:
                if expected is None and time.monotonic() - last > idle_s:
                    break
                continue
            if msg.error() is not None:
                continue
            out.append(msg)
            last = time.monotonic()
    finally:
        consumer.close()
    return out
