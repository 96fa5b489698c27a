"""``tier3 train-now`` over Kafka: a ``train_now`` request on ``trainer-control``, and the trainer's answer.

Any machine that reaches the bootstrap servers can ask; the request and the answer stay on the topic (the log
says who asked, when, and which run it started or why not). The trainer's side is in ``trainer/consumer.py``
(``_poll_control``): it reads the topic in the group ``<trainer group>.control``, answers each request for its
group (``accepted`` with the run id once the run starts, ``declined`` with the reason) and commits the request's
offset after its answer is acknowledged, so a request sent while no trainer runs is answered by the next one.
"""

from __future__ import annotations

import getpass
import socket
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas import TrainerControl, decode, encode
from schemas.errors import SchemaError
from schemas.settings import RELIABLE_PRODUCER, KafkaSettings
from trainer.errors import TrainerError
from trainer.events import now_ms


class ControlError(TrainerError):
    """The request could not be sent (broker unreachable, topic missing, delivery failed)."""

    retryable = True


def _requester() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


def send_train_now(settings: KafkaSettings, *, group: str | None, wait_s: float,
                   timeout_s: float = 15.0) -> tuple[TrainerControl, TrainerControl | None]:
    """Send a train_now request for ``group`` and wait up to ``wait_s`` for its answer; (request, answer|None)."""
    topic = settings.trainer_control_topic
    req = TrainerControl(kind="request", command="train_now", request_id=uuid.uuid4().hex, at_ms=now_ms(),
                         group=group, requested_by=_requester())
    producer = Producer({**settings.client_config(), **RELIABLE_PRODUCER, "linger.ms": 0,
                         "message.timeout.ms": int(timeout_s * 1000), "client.id": "tier3-train-now"})
    where: dict[str, Any] = {}
    try:
        try:
            md = producer.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            raise ControlError(f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {exc.args[0]}") from None
        if topic not in md.topics:
            raise ControlError(f"topic {topic} does not exist: run `tier3 topics create`")

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            where.update(error=err, partition=msg.partition(), offset=msg.offset())

        producer.produce(topic, key=req.request_id.encode(), value=encode(req), on_delivery=on_delivery)
        producer.flush(timeout_s + 5)
    finally:
        producer.flush(0)
    if where.get("error") is not None or "offset" not in where:
        raise ControlError(f"the request was not delivered to {topic}: {where.get('error') or 'timed out'}")
    if wait_s <= 0:
        return req, None
    return req, wait_for_answer(settings, req, where["partition"], where["offset"], wait_s)


def wait_for_answer(settings: KafkaSettings, req: TrainerControl, partition: int, offset: int,
                    wait_s: float) -> TrainerControl | None:
    """Read trainer-control from the request's offset until its answer shows up, or ``wait_s`` passed."""
    topic = settings.trainer_control_topic
    consumer = Consumer({**settings.client_config(), "group.id": f"tier3-train-now-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "client.id": "tier3-train-now"})
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            msg = consumer.poll(min(0.5, max(0.0, deadline - time.monotonic())))
            if msg is None or msg.error() is not None:
                continue
            try:
                ev = decode(msg.value() or b"", TrainerControl)
            except SchemaError:
                continue
            if ev.kind == "answer" and ev.request_id == req.request_id:
                return ev
        return None
    finally:
        consumer.close()
