"""schemas.kafka.follow.TopicFollower against the real broker: catch-up then live records, offset gaps left by
transactions, missing topics (raised or waited for), errors handed over after the records read before them, and
reconnects after the one retry policy's pause, resuming at the positions read (nothing twice, nothing skipped)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from tenacity import wait_exponential

from schemas.kafka import reading as kio
from schemas.kafka.follow import TopicFollower
from schemas.settings import RELIABLE_PRODUCER, KafkaSettings
from tests.kafka_utils import produce_values


def _poll_until(f: TopicFollower, done: Callable[[list[Message]], bool], timeout_s: float = 30.0
                ) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while not done(got):
        assert time.monotonic() < deadline, f"timed out with {len(got)} records, positions {f.positions}"
        got.extend(f.poll(0.2))
    return got


def test_catches_up_then_follows_live_records(make_settings: Callable[..., KafkaSettings]) -> None:
    s = make_settings(tier3_partitions=3)
    produce_values(s, s.traces_topic, [(f"k{i}", f"old{i}".encode()) for i in range(30)])
    with TopicFollower(s, s.traces_topic, "test") as f:
        assert not f.caught_up
        got = _poll_until(f, lambda _g: f.caught_up)
        assert sorted(m.value() for m in got) == sorted(f"old{i}".encode() for i in range(30))
        produce_values(s, s.traces_topic, [(f"k{i}", f"new{i}".encode()) for i in range(10)])
        live = _poll_until(f, lambda g: len(g) >= 10)
        time.sleep(0.5)
        live.extend(f.poll(0.5))  # and nothing more
        assert sorted(m.value() for m in live) == sorted(f"new{i}".encode() for i in range(10))
        assert sum(f.positions.values()) == 40
        # per partition in offset order
        for p in range(3):
            offs = [m.offset() for m in [*got, *live] if m.partition() == p]
            assert offs == sorted(offs) and len(set(offs)) == len(offs)


def test_an_empty_topic_is_caught_up_at_once(make_settings: Callable[..., KafkaSettings]) -> None:
    s = make_settings(tier3_partitions=2)
    with TopicFollower(s, [s.traces_topic, s.dead_letters_topic], "test") as f:
        assert f.poll(0.2) == [] and f.caught_up


def test_transaction_markers_and_an_aborted_transaction_leave_gaps(make_settings: Callable[..., KafkaSettings]
                                                                   ) -> None:
    """Offsets 0-4 committed, 5 its marker, 6-8 aborted, 9 the abort marker: the log ends at 10 with the last
    record at 4. Caught up must still be reached (positions, not counts), and read_new must come back at once."""
    s = make_settings(tier3_partitions=1)
    topic = s.traces_topic
    p = Producer({**s.client_config(), **RELIABLE_PRODUCER, "transactional.id": f"follow-{topic}"})
    p.init_transactions(30)
    for values, commit in (([b"a", b"b", b"c", b"d", b"e"], True), ([b"x", b"y", b"z"], False)):
        p.begin_transaction()
        for v in values:
            p.produce(topic, value=v, partition=0)
        if commit:
            p.commit_transaction(30)
        else:
            assert p.flush(30) == 0
            p.abort_transaction(30)
    with TopicFollower(s, topic, "test") as f:
        got = _poll_until(f, lambda _g: f.caught_up)
        assert [m.value() for m in got] == [b"a", b"b", b"c", b"d", b"e"]
        assert f.positions == {(topic, 0): 10}
    with TopicFollower(s, topic, "test") as tail:  # the stepwise read: ends as of the call, gaps included
        t0 = time.monotonic()
        assert [m.value() for m in tail.read_new(20)] == [b"a", b"b", b"c", b"d", b"e"]
        assert time.monotonic() - t0 < 10, "read_new waited for offsets that hold no record"
        assert tail.read_new(5) == []
        p.begin_transaction()
        p.produce(topic, value=b"f", partition=0)
        p.commit_transaction(30)
        assert [m.value() for m in tail.read_new(20)] == [b"f"]


def test_a_missing_topic_is_raised_or_waited_for(make_settings: Callable[..., KafkaSettings]) -> None:
    s = make_settings(tier3_partitions=1)
    topic = f"{s.tier3_topic_prefix}later"
    with TopicFollower(s, topic, "test") as f:
        with pytest.raises(kio.TopicMissing):
            f.poll(0.1)
        with pytest.raises(kio.TopicMissing):
            f.read_new(2)
    with TopicFollower(s, [topic, s.traces_topic], "test", missing="wait", recheck_s=0.5) as f:
        assert f.poll(0.2) == [] and f.missing == {topic} and not f.caught_up
        admin = AdminClient(s.client_config())
        admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)
        produce_values(s, topic, [(None, b"v1"), (None, b"v2")])
        got = _poll_until(f, lambda g: len(g) >= 2)
        assert sorted(m.value() for m in got) == [b"v1", b"v2"] and f.missing == set() and f.caught_up


class _Flaky:
    """A real consumer whose answers follow ``plan``: an exception is raised by the next ``consume``; a
    message-level error is put after the records of the next batch that has any."""

    plan: ClassVar[list[Any]] = []

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def consume(self, n: int, timeout: float) -> list[Message]:
        if _Flaky.plan and isinstance(_Flaky.plan[0], BaseException):
            raise _Flaky.plan.pop(0)
        msgs: list[Message] = self._inner.consume(n, timeout)
        if _Flaky.plan and msgs:
            msgs.append(Message(topic="x", partition=0, error=_Flaky.plan.pop(0)))
        return msgs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_reconnects_after_the_policy_pause_and_resumes_at_its_positions(
        make_settings: Callable[..., KafkaSettings], monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_settings(tier3_partitions=2)
    produce_values(s, s.traces_topic, [(f"k{i}", f"v{i}".encode()) for i in range(20)])
    made: list[str] = []
    real_reader = kio.reader

    def reader(settings: KafkaSettings, purpose: str, **extra: Any) -> Any:
        made.append(purpose)
        if len(made) == 1:  # the first connection finds no broker: transient answers until the setup deadline
            dead = settings.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:9"})
            return real_reader(dead, purpose, **extra)
        return _Flaky(real_reader(settings, purpose, **extra))

    monkeypatch.setattr(kio, "reader", reader)
    _Flaky.plan = []
    with TopicFollower(s, s.traces_topic, "test", setup_timeout_s=1.0) as f:
        with pytest.raises(KafkaException) as err:
            f.poll(0.2)
        assert kio.is_transient(err.value) and f.failures == 1
        t0 = time.monotonic()
        got = _poll_until(f, lambda _g: f.caught_up)  # a fresh client after the pause
        assert len(made) == 2 and f.failures == 0 and time.monotonic() - t0 >= kio.retry_pause_s(1) * 0.9
        # a fatal client error: the client is dropped, a fresh one resumes at the positions read
        _Flaky.plan = [KafkaException(KafkaError(KafkaError._FATAL, "gone", fatal=True))]
        produce_values(s, s.traces_topic, [(f"k{i}", f"w{i}".encode()) for i in range(6)])
        with pytest.raises(KafkaException):
            f.poll(0.2)
        got += _poll_until(f, lambda g: len(g) >= 6)
        time.sleep(0.3)
        got += f.poll(0.5)
        assert len(made) == 3
        assert sorted(m.value() for m in got) == sorted([*(f"v{i}".encode() for i in range(20)),
                                                        *(f"w{i}".encode() for i in range(6))])


def test_an_error_comes_after_the_records_read_before_it(make_settings: Callable[..., KafkaSettings],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_settings(tier3_partitions=1)
    real_reader = kio.reader
    monkeypatch.setattr(kio, "reader", lambda *a, **k: _Flaky(real_reader(*a, **k)))
    with TopicFollower(s, s.traces_topic, "test") as f:
        assert f.poll(0.2) == [] and f.caught_up
        produce_values(s, s.traces_topic, [(None, b"r1")])
        # a transient error is the client's business: never raised
        _Flaky.plan = [KafkaError(KafkaError._TRANSPORT)]
        got = _poll_until(f, lambda g: len(g) >= 1)
        assert [m.value() for m in got] == [b"r1"] and _Flaky.plan == []
        # one that is not comes after the records of its batch: raised by the next read, once
        _Flaky.plan = [KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)]
        produce_values(s, s.traces_topic, [(None, b"r2")])
        got = _poll_until(f, lambda g: len(g) >= 1)
        assert [m.value() for m in got] == [b"r2"] and _Flaky.plan == []
        with pytest.raises(KafkaException) as err:
            f.poll(0.2)
        assert err.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
        assert f.poll(0.2) == [] and f.positions == {(s.traces_topic, 0): 2}  # the client goes on


def test_the_reconnect_pause_is_the_retry_policy() -> None:
    policy = wait_exponential(multiplier=kio.RETRY_FIRST_S, max=kio.RETRY_MAX_S)

    class State:
        attempt_number = 0

    for n in range(1, 10):
        State.attempt_number = n
        assert kio.retry_pause_s(n) == pytest.approx(policy(State()))  # type: ignore[arg-type]
    assert kio.retry_pause_s(1) == 0.05 and kio.retry_pause_s(30) == 1.0
