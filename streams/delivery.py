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
import functools
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
    """librdkafka's delivery reports served on the event loop: ``poll(0)`` after each send and, while messages
    are outstanding, every ``POLL_INTERVAL_S`` from a loop timer. No second Python thread: on a busy 2-core
    machine every hand-over of the GIL between threads cost more than the callbacks themselves (measured with
    py-spy: ``produce()`` waiting for the poll thread, one self-pipe wake-up per batch of reports)."""

    POLL_INTERVAL_S = 0.002  # the most a delivery report waits to be noticed, far below the latency goal

    def __init__(self, settings: KafkaSettings, client_id: str = "tier3-worker") -> None:
        self._producer = Producer({
            **settings.client_config(), **RELIABLE_PRODUCER,
            "client.id": client_id,
            "linger.ms": 2,  # ms; a little batching, far below the latency goal
            # message.max.bytes comes with client_config(): the one record limit of every tier3 producer and topic
        })
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._timer: asyncio.TimerHandle | None = None

    def _poll(self) -> None:
        self._timer = None
        self._producer.poll(0)  # runs the delivery callbacks of the reports that arrived
        if len(self._producer) and self._loop is not None and not self._loop.is_closed():
            self._timer = self._loop.call_later(self.POLL_INTERVAL_S, self._poll)

    def _report(self, fut: asyncio.Future[Message], err: KafkaError | None, msg: Message) -> None:
        if threading.get_ident() == self._loop_thread:
            _resolve(fut, err, msg)
        elif self._loop is not None and not self._loop.is_closed():  # flush() from another thread (shutdown)
            self._loop.call_soon_threadsafe(_resolve, fut, err, msg)

    async def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None
                   ) -> asyncio.Future[Message]:
        """Queue one message; the returned future resolves when it is acknowledged (acks=all)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        fut: asyncio.Future[Message] = loop.create_future()
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": functools.partial(self._report, fut)}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:  # librdkafka's queue is full: wait (back-pressure), never drop
                self._producer.poll(0)
                await asyncio.sleep(0.01)
            except KafkaException as exc:
                raise DeliveryError(f"cannot produce to {topic}: {exc.args[0].str()}", exc.args[0].code()) from None
        if self._timer is None:
            self._poll()
        return fut

    def flush(self, timeout_s: float = 10.0) -> int:
        """Deliver what is queued (at shutdown, from any thread); returns how many are still undelivered."""
        if self._timer is not None and threading.get_ident() == self._loop_thread:
            self._timer.cancel()
            self._timer = None
        # elsewhere (an executor thread) the loop's timer may poll too: librdkafka is thread-safe and _report
        # hands each callback to the loop's thread
        return int(self._producer.flush(timeout_s))


def _resolve(fut: asyncio.Future[Message], err: KafkaError | None, msg: Message) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(DeliveryError(f"delivery to {msg.topic()} failed: {err.str()}", err.code()))
    else:
        fut.set_result(msg)
