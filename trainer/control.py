"""``tier3 train-now`` over Kafka: a ``train_now`` request on ``trainer-control``, and the trainer's answer.

Any machine that reaches the bootstrap servers can ask; the request and the answer stay on the topic (the log
says who asked, when, and which run it started or why not). The trainer's side is :class:`ControlRequests`: it
reads the topic in the group ``<trainer group>.control``, keeps each request for its group until the consumer
answers it (``accepted`` with the run id once the run starts, ``declined`` with the reason; an expired one is
declined at once) and commits the request's offset after its answer is acknowledged, so a request sent while no
trainer runs is answered by the next one.
"""

from __future__ import annotations

import getpass
import logging
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas import TrainerControl, decode, encode
from schemas.errors import SchemaError
from schemas.settings import RELIABLE_PRODUCER, KafkaSettings
from trainer.errors import TrainerError
from trainer.events import TrainerEvents, now_ms
from trainer.heartbeat import TrainerStats
from trainer.settings import TrainerSettings

log = logging.getLogger("tier3.trainer.control")


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


class ControlRequests:
    """The trainer's side of trainer-control: the train_now requests for its group, read and not answered yet
    (:attr:`waiting`), their answers (through the trainer's events producer), and the commit of what was answered.
    The requests are read in a group of their own: one trainer of the group answers each."""

    def __init__(self, settings: TrainerSettings, events: TrainerEvents, stats: TrainerStats, *,
                 error_cb: Callable[[KafkaError], None]) -> None:
        self.s = settings
        self._events = events
        self._stats = stats
        self.topic = settings.trainer_control_topic
        self.consumer = Consumer({**settings.client_config(), "group.id": f"{settings.tier3_trainer_group}.control",
                                  "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                  "isolation.level": "read_committed", "error_cb": error_cb,
                                  "client.id": f"tier3-trainer-control-{settings.tier3_trainer_group}"})
        self.waiting: list[TrainerControl] = []  # train_now requests read, not answered yet
        self._next: dict[int, int] = {}  # control partition -> one past the last message read
        self._committed: dict[int, int] = {}
        self._subscribed = False

    def subscribe(self) -> None:
        self.consumer.subscribe([self.topic])
        self._subscribed = True

    def poll(self) -> None:
        """Read every request available now (without waiting), then commit what is answered."""
        if not self._subscribed:
            return
        msg = self.consumer.poll(0)
        while msg is not None:
            err = msg.error()
            if err is None:
                self._on_message(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("trainer-control: %s", err.str())
            msg = self.consumer.poll(0)
        self._commit()

    def _on_message(self, msg: Message) -> None:
        p, off = msg.partition() or 0, msg.offset() or 0
        self._next[p] = off + 1
        try:
            req = decode(msg.value() or b"", TrainerControl, max_bytes=self.s.tier3_max_message_bytes)
        except SchemaError as exc:  # someone else's garbage on the control topic: not a reason to stop
            log.warning("trainer-control offset %d: not a request (%s); ignored", off, exc)
            return
        if req.kind != "request" or (req.group is not None and req.group != self.s.tier3_trainer_group):
            return  # an answer (ours or another trainer's), or a request for another group
        age_s = (now_ms() - req.at_ms) / 1000
        if age_s > self.s.tier3_train_now_max_age_s:
            self.answer(req, "declined", reason=f"expired: the request is {age_s:.0f} s old (more than "
                        f"TIER3_TRAIN_NOW_MAX_AGE_S={self.s.tier3_train_now_max_age_s:.0f})")
            return
        log.info("train-now request %s from %s", req.request_id, req.requested_by or "?")
        self.waiting.append(req)

    def answer(self, req: TrainerControl, answer: str, *, run_id: str | None = None, reason: str | None = None,
               details: dict[str, Any] | None = None) -> None:
        self._events.answer(req, answer=answer, run_id=run_id, reason=reason, details=details)
        self._stats.train_now_answered += 1
        log.info("train-now request %s: %s%s%s", req.request_id, answer, f" run {run_id}" if run_id else "",
                 f" ({reason})" if reason else "")

    def answer_all(self, answer: str, **kw: Any) -> None:
        """Answer every waiting request the same way (a run started for them, or nothing is new)."""
        todo, self.waiting = self.waiting, []
        for req in todo:
            self.answer(req, answer, **kw)

    def _commit(self) -> None:
        """Commit the control offsets read, up to the first request not answered yet (at-least-once answers:
        a trainer killed in between answers that request again after its restart)."""
        if self.waiting:
            return
        todo = {p: off for p, off in self._next.items() if off > self._committed.get(p, -1)}
        if not todo:
            return
        if not self._events.flush(5.0):  # the answers first: a committed request always has its answer
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, off) for p, off in todo.items()],
                                 asynchronous=False)
            self._committed.update(todo)
        except KafkaException as exc:
            log.warning("trainer-control: commit failed (%s); the requests may be answered again", exc)

    def close(self) -> None:
        self.consumer.close()
