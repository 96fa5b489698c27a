"""Writes traces and dead letters with librdkafka (confluent-kafka), awaited from asyncio until acknowledged.

Why not Faust's own producer (aiokafka): it has no idempotence outside transactions (so a retried produce may
duplicate a trace), and with hundreds of sends outstanding its throughput collapses on our 2-core machines
(measured: 64 outstanding -> ~8,000 msg/s; 1,000 outstanding -> ~800 msg/s, p50 ack 1.3 s). librdkafka batches
in its own C threads, is idempotent with ``acks=all`` (``RELIABLE_PRODUCER``), and retries internally until
``message.timeout.ms``. Faust still owns consuming, the table and its changelog.

A send returns an asyncio future that resolves when the broker acknowledged the message, or fails with the
delivery error; :mod:`streams.inflight` acknowledges the source offset only after that.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from schemas.settings import RELIABLE_PRODUCER, KafkaSettings
from streams.errors import StreamsError


class DeliveryError(StreamsError):
    """The broker did not acknowledge a trace or dead letter (after librdkafka's own retries)."""

    retryable = False

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # librdkafka's KafkaError code, when there is one

    @property
    def too_large(self) -> bool:
        """The record itself was refused for its size (by librdkafka or the broker): a smaller one may pass."""
        return self.code in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)

    @property
    def record_refused(self) -> bool:
        """This record was refused (size, or the broker's record validation): not an outage, another may pass."""
        return self.too_large or self.code in (KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG,
                                               KafkaError.INVALID_MSG_SIZE)


class DeliveryProducer:
    def __init__(self, settings: KafkaSettings, client_id: str = "tier3-worker") -> None:
        self._producer = Producer({
            **settings.client_config(), **RELIABLE_PRODUCER,
            "client.id": client_id,
            "linger.ms": 2,  # ms; a little batching, far below the latency goal
            # message.max.bytes comes with client_config(): the one record limit of every tier3 producer and topic
        })
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: list[tuple[asyncio.Future[Message], KafkaError | None, Message]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _start(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        # delivery callbacks run inside poll(): a thread polls, so the event loop never blocks on librdkafka
        self._thread = threading.Thread(target=self._poll_forever, name="tier3-delivery", daemon=True)
        self._thread.start()
        return self._loop

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)  # runs the delivery callbacks, which fill self._reports
            self._hand_over()

    def _hand_over(self) -> None:
        # one wake-up of the event loop per poll, not one per message (each costs a syscall and a GIL handoff)
        if self._reports and self._loop is not None:
            with self._lock:  # flush() runs callbacks in another thread
                reports, self._reports = self._reports, []
            self._loop.call_soon_threadsafe(_resolve_all, reports)

    async def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None
                   ) -> asyncio.Future[Message]:
        """Queue one message; the returned future resolves when it is acknowledged (acks=all)."""
        loop = self._loop or self._start()
        fut: asyncio.Future[Message] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:  # runs in the poll thread
            with self._lock:
                self._reports.append((fut, err, msg))

        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                return fut
            except BufferError:  # librdkafka's queue is full: wait (back-pressure), never drop
                await asyncio.sleep(0.01)
            except KafkaException as exc:
                raise DeliveryError(f"cannot produce to {topic}: {exc.args[0].str()}", exc.args[0].code()) from None

    def flush(self, timeout_s: float = 10.0) -> int:
        """Deliver what is queued (at shutdown); returns how many messages are still undelivered."""
        left = int(self._producer.flush(timeout_s))
        self._stop.set()
        self._hand_over()
        return left


def _resolve_all(reports: list[tuple[asyncio.Future[Message], KafkaError | None, Message]]) -> None:
    for fut, err, msg in reports:
        _resolve(fut, err, msg)


def _resolve(fut: asyncio.Future[Message], err: KafkaError | None, msg: Message) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(DeliveryError(f"delivery to {msg.topic()} failed: {err.str()}", err.code()))
    else:
        fut.set_result(msg)
