"""The partition hold (trainer/hold.py) without a broker: what is paused, why, and what a rebalance changes."""

from __future__ import annotations

from confluent_kafka import TopicPartition

from trainer.hold import PartitionHold


class FakeConsumer:
    """Records pause/resume calls, like librdkafka's: a partition not assigned cannot be paused."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def pause(self, partitions: list[TopicPartition], /) -> None:
        self.calls.append(("pause", [tp.partition for tp in partitions]))

    def resume(self, partitions: list[TopicPartition], /) -> None:
        self.calls.append(("resume", [tp.partition for tp in partitions]))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(assigned: set[int] | None = None) -> tuple[PartitionHold, FakeConsumer, Clock]:
    consumer, clock = FakeConsumer(), Clock()
    hold = PartitionHold(consumer, "traces", clock=clock)
    hold.assign(assigned if assigned is not None else {0, 1, 2})
    return hold, consumer, clock


def test_a_hold_pauses_every_assigned_partition_and_its_release_resumes_them() -> None:
    hold, consumer, _ = make()
    assert not hold.held and hold.paused == frozenset() and hold.reasons == []
    hold.hold("run")
    assert hold.held and hold.holds("run") and not hold.holds("close_loop") and hold.reasons == ["run"]
    assert consumer.calls == [("pause", [0, 1, 2])] and hold.paused == {0, 1, 2}
    hold.hold("run")  # holding again pauses nothing twice
    assert consumer.calls == [("pause", [0, 1, 2])]
    hold.release("run")
    assert not hold.held and hold.paused == frozenset()
    assert consumer.calls[-1] == ("resume", [0, 1, 2])


def test_partitions_resume_only_when_the_last_reason_is_released() -> None:
    hold, consumer, _ = make()
    hold.hold("run")
    hold.hold("backoff", for_s=5.0)  # a failed run: it backs off before the run's hold ends
    hold.release("run")
    assert hold.held and hold.reasons == ["backoff"] and hold.paused == {0, 1, 2}
    assert [c for c, _ in consumer.calls] == ["pause"]
    hold.release("backoff")
    assert consumer.calls[-1] == ("resume", [0, 1, 2]) and not hold.held


def test_a_timed_hold_ends_in_resume_if_ready_at_its_deadline() -> None:
    hold, consumer, clock = make()
    hold.hold("backoff", for_s=2.0)
    assert hold.left_s("backoff") == 2.0 and hold.left_s("run") is None
    clock.t += 1.5
    assert hold.resume_if_ready() is False and hold.held and hold.left_s("backoff") == 0.5
    clock.t += 0.5
    assert hold.resume_if_ready() is True and not hold.held and hold.left_s("backoff") is None
    assert consumer.calls == [("pause", [0, 1, 2]), ("resume", [0, 1, 2])]
    hold.hold("close_loop")
    clock.t += 1e6
    assert hold.resume_if_ready() is False and hold.holds("close_loop"), "an untimed hold lasts until released"


def test_a_partition_assigned_while_held_is_paused_by_enforce() -> None:
    hold, consumer, _ = make({0})
    hold.hold("close_loop")
    hold.assign({1, 2})  # a rebalance while the gate runs: librdkafka delivers from new partitions
    assert hold.paused == {0}
    hold.enforce()
    assert hold.paused == {0, 1, 2} and consumer.calls[-1] == ("pause", [1, 2])
    hold.enforce()  # nothing new: no call
    assert len(consumer.calls) == 2
    hold.release("close_loop")
    assert consumer.calls[-1] == ("resume", [0, 1, 2])


def test_enforce_does_nothing_when_nothing_holds() -> None:
    hold, consumer, _ = make()
    hold.enforce()
    assert consumer.calls == [] and hold.paused == frozenset()


def test_a_revoked_partition_is_forgotten_and_never_resumed_by_us() -> None:
    hold, consumer, _ = make()
    hold.hold("run")
    hold.revoke({1})
    assert hold.assigned == {0, 2} and hold.paused == {0, 2}
    hold.release("run")
    assert consumer.calls[-1] == ("resume", [0, 2]), "resuming a partition we no longer own"
    # it comes back (unpaused, as librdkafka assigns it) while held again: the next enforce pauses it
    hold.hold("backoff", for_s=1.0)
    hold.assign({1})
    hold.enforce()
    assert hold.paused == {0, 1, 2} and consumer.calls[-1] == ("pause", [1])


def test_a_pause_without_a_reason_blocks_nothing_and_ends_with_the_next_resume() -> None:
    """The batch being read is full: reading stops, but no reason holds (the run may start)."""
    hold, consumer, _ = make()
    hold.pause_all()
    assert not hold.held and hold.paused == {0, 1, 2}
    hold.hold("run")  # the run starts: already paused, no second call
    assert consumer.calls == [("pause", [0, 1, 2])]
    hold.release("run")
    assert hold.paused == frozenset() and consumer.calls[-1] == ("resume", [0, 1, 2])
    hold.pause_all()
    hold.resume_all()  # a train-now request that finds nothing new resumes reading
    assert hold.paused == frozenset() and consumer.calls[-1] == ("resume", [0, 1, 2])
