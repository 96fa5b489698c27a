"""streams.delivery on the real broker: reports served on the event loop, no second Python thread (issue 10)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from schemas.settings import KafkaSettings
from streams.delivery import DeliveryError, DeliveryProducer
from tests.kafka_utils import consume_values


def test_sends_resolve_when_acknowledged_without_a_python_thread(make_settings: Callable[..., KafkaSettings]
                                                                  ) -> None:
    s = make_settings()
    before = {t.ident for t in threading.enumerate()}

    async def run() -> tuple[list[int], set[int | None]]:
        out = DeliveryProducer(s, client_id="test-delivery")
        futs = [await out.send(s.traces_topic, f"k{i}".encode(), f"v{i}".encode(), i % 3) for i in range(500)]
        # a thread that polled librdkafka would show up here, while the sends are outstanding
        during = {t.ident for t in threading.enumerate()} - before
        msgs = await asyncio.wait_for(asyncio.gather(*futs), 60)
        assert out.flush(10) == 0
        return [m.partition() for m in msgs], during

    partitions, extra_threads = asyncio.run(run())
    assert partitions == [i % 3 for i in range(500)]
    assert extra_threads == set()
    assert len(consume_values(s, s.traces_topic, 500, 60)) == 500


def test_a_delivery_failure_fails_its_future(make_settings: Callable[..., KafkaSettings]) -> None:
    s = make_settings()

    async def run() -> None:
        out = DeliveryProducer(s, client_id="test-delivery")
        ok = await out.send(s.traces_topic, b"k", b"v", 0)
        with pytest.raises(DeliveryError):  # a partition the topic does not have: refused at once or reported
            bad = await out.send(s.traces_topic, b"k", b"v", 99)
            await asyncio.wait_for(bad, 60)
        await asyncio.wait_for(ok, 60)

    asyncio.run(run())


def test_flush_from_an_executor_thread_resolves_the_futures(make_settings: Callable[..., KafkaSettings]) -> None:
    s = make_settings()

    async def run() -> None:
        out = DeliveryProducer(s, client_id="test-delivery")
        futs = [await out.send(s.traces_topic, None, b"v", 1) for _ in range(50)]
        # as the worker does at shutdown: flush in a thread, the reports reach the loop's futures
        assert await asyncio.get_running_loop().run_in_executor(None, out.flush, 30.0) == 0
        await asyncio.wait_for(asyncio.gather(*futs), 10)

    asyncio.run(run())
