"""The trigger, without Kafka: a fake clock, counts and offsets in, the trigger's name out."""

from __future__ import annotations

from trainer.trigger import Drain, Trigger, backoff_s


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def trigger(min_traces: int = 10, interval_s: float = 60.0) -> tuple[Trigger, Clock]:
    clock = Clock()
    return Trigger(min_traces, interval_s, clock=clock, wall_ms=lambda: int(clock.t * 1000)), clock


def test_min_traces_fires_on_distinct_new_ids_only() -> None:
    t, _ = trigger(min_traces=10)
    assert t.due(n_new=9, requests=False) is None
    assert t.due(n_new=10, requests=False) == "min_traces"


def test_interval_fires_with_something_new_and_an_empty_check_restarts_it() -> None:
    t, clock = trigger(min_traces=1000, interval_s=60.0)
    assert t.next_check_in_s() == 60.0
    clock.t += 59.0
    assert t.due(n_new=3, requests=False) is None and t.next_check_in_s() == 1.0
    clock.t += 1.0
    assert t.due(n_new=3, requests=False) == "interval"
    # nothing new when the interval is due: that was the check; the next one is a whole interval later
    assert t.due(n_new=0, requests=False) is None
    assert t.next_check_in_s() == 60.0 and t.last_check_ms == int(clock.t * 1000)
    clock.t += 30.0
    assert t.due(n_new=3, requests=False) is None


def test_a_request_fires_even_with_nothing_new() -> None:
    t, _ = trigger(min_traces=1000)
    assert t.due(n_new=0, requests=True) == "train_now"  # read up to the end, then train or decline
    assert t.due(n_new=2, requests=True) == "train_now"
    assert t.due(n_new=2, requests=False) is None


def test_a_failed_batch_is_retried_once_it_is_back_in_full_and_before_anything_else() -> None:
    t, _ = trigger(min_traces=5)
    t.started()
    t.failed({0: 10, 1: 4})
    held = {0: 10, 1: 3}
    assert t.due(n_new=8, requests=True, assigned={0, 1}, held_ends=held) is None  # partition 1 not back yet
    assert t.due(n_new=8, requests=False, assigned={0, 1}, held_ends={0: 10, 1: 4}) == "retry"
    # a partition revoked meanwhile is not waited for (its new owner reads it)
    assert t.due(n_new=8, requests=False, assigned={0}, held_ends={0: 12}) == "retry"
    # a request waits while a failed batch waits, when nothing new is held
    assert t.due(n_new=0, requests=True, assigned={0, 1}, held_ends={}) is None
    t.started()
    assert t.retry_target is None and t.due(n_new=8, requests=False) == "min_traces"


def test_a_manifest_that_covers_the_failed_batch_drops_the_retry() -> None:
    t, _ = trigger()
    assert not t.retry_covered_by({0: 10})  # nothing to retry
    t.failed({0: 10, 1: 4})
    assert not t.retry_covered_by({0: 10})  # partition 1 is not covered
    assert t.retry_target == {0: 10, 1: 4}
    assert t.retry_covered_by({0: 10, 1: 5})
    assert t.retry_target is None


def test_after_an_empty_dataset_only_more_traces_than_before_count() -> None:
    t, clock = trigger(min_traces=3, interval_s=60.0)
    t.empty(4)  # four new traces gave no example
    assert t.nothing_new(4) and not t.nothing_new(5)
    clock.t += 61.0
    assert t.due(n_new=4, requests=False) is None
    assert t.due(n_new=5, requests=False) == "min_traces"
    t.started()
    assert t.need_more_than == 0


def test_drain_targets_and_when_it_is_done() -> None:
    # partition 0: read up to 5 of [0, 9); 1: nothing read, low watermark 7 = high (empty); 2: unknown position
    targets = Drain.targets_from({0: 5, 1: -1, 2: -1}, {0: (0, 9), 1: (7, 7), 2: (3, 6)})
    assert targets == {0: 9, 2: 6}
    d = Drain("min_traces", targets, deadline=100.0)
    assert not d.reached({0: 8, 2: 6}) and d.reached({0: 9, 2: 6}) and d.reached({2: 6})
    assert d.full(50, 50) and not d.full(49, 50)
    assert not d.expired(100.0) and d.expired(100.5)


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert [backoff_s(n, 2.0, 30.0) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 16.0, 30.0]
