"""In-order acknowledgement: nothing is acknowledged before the work of every earlier message of its partition."""

from __future__ import annotations

import asyncio
import random

import pytest

from streams.inflight import InOrderAcker


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_acks_in_offset_order_per_partition_despite_random_completion() -> None:
    async def main() -> dict[int, list[int]]:
        acked: dict[int, list[int]] = {0: [], 1: []}
        done: set[tuple[int, int]] = set()

        async def ack(ev: tuple[int, int]) -> None:
            p, off = ev
            # the invariant: everything earlier in this partition is finished
            assert all((p, o) in done for o in range(off) if o % 3 != 0), (p, off)
            acked[p].append(off)

        async def fatal(exc: BaseException) -> None:
            raise AssertionError(exc)

        acker: InOrderAcker[tuple[int, int]] = InOrderAcker(ack, max_pending=16, on_fatal=fatal)
        task = asyncio.ensure_future(acker.run())
        rng = random.Random(1)

        async def work(p: int, off: int) -> None:
            await asyncio.sleep(rng.random() * 0.01)
            done.add((p, off))

        for off in range(200):
            for p in (0, 1):
                # every third message needs no work (not sampled)
                await acker.add(p, (p, off), None if off % 3 == 0 else work(p, off))
                assert acker.pending <= 16
        while acker.pending:
            await asyncio.sleep(0.01)
        task.cancel()
        return acked

    acked = run(main())
    assert acked[0] == list(range(200)) and acked[1] == list(range(200))


def test_failed_work_is_never_acknowledged_nor_anything_after_it() -> None:
    async def main() -> tuple[list[int], BaseException | None]:
        acked: list[int] = []
        fatal_seen: list[BaseException] = []

        async def ack(ev: int) -> None:
            acked.append(ev)

        async def fatal(exc: BaseException) -> None:
            fatal_seen.append(exc)

        acker: InOrderAcker[int] = InOrderAcker(ack, max_pending=100, on_fatal=fatal)
        task = asyncio.ensure_future(acker.run())

        async def ok() -> None:
            await asyncio.sleep(0.001)

        async def boom() -> None:
            await asyncio.sleep(0.005)
            raise RuntimeError("wrong API key")

        for i in range(10):
            await acker.add(0, i, boom() if i == 4 else ok())
        await asyncio.sleep(0.1)
        task.cancel()
        return acked, fatal_seen[0] if fatal_seen else None

    acked, exc = run(main())
    assert acked == [0, 1, 2, 3]
    assert isinstance(exc, RuntimeError)


def test_add_blocks_when_full_back_pressure() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def ack(ev: int) -> None:
            return None

        async def fatal(exc: BaseException) -> None:
            raise AssertionError(exc)

        acker: InOrderAcker[int] = InOrderAcker(ack, max_pending=3, on_fatal=fatal)
        task = asyncio.ensure_future(acker.run())

        async def slow() -> None:
            await release.wait()

        for i in range(2):
            await acker.add(0, i, slow())
        third = asyncio.ensure_future(acker.add(0, 2, slow()))
        await asyncio.sleep(0.05)
        assert not third.done()  # the reader stops: the teacher is slow
        release.set()
        await asyncio.wait_for(third, 1)
        task.cancel()

    run(main())


@pytest.mark.parametrize("n", [1, 50])
def test_cancel_all_acknowledges_nothing(n: int) -> None:
    async def main() -> list[int]:
        acked: list[int] = []

        async def ack(ev: int) -> None:
            acked.append(ev)

        async def fatal(exc: BaseException) -> None:
            return None

        acker: InOrderAcker[int] = InOrderAcker(ack, max_pending=1000, on_fatal=fatal)
        task = asyncio.ensure_future(acker.run())
        for i in range(n):
            await acker.add(0, i, asyncio.sleep(10))
        acker.cancel_all()
        await asyncio.sleep(0.05)
        task.cancel()
        return acked

    assert run(main()) == []


# ------------------------------------------------------------------------------------------------ OffsetGuard

def test_offset_guard_reports_a_jump_and_nothing_else() -> None:
    from streams.inflight import OffsetGuard

    g = OffsetGuard()
    committed: dict[int, int | None] = {0: 100, 1: None, 2: 0}
    base = committed.get
    assert g.check(0, 100, base) is None  # the first record of the assignment, at the committed offset
    assert g.check(0, 101, base) is None
    # one offset skipped: a transaction marker, or one record the consumer skipped: reported, the caller reads it
    assert g.check(0, 103, base) == 102
    g.accept(0, 103)  # the caller read the range: only a marker
    assert g.check(0, 110, base) == 104  # 104..109 never delivered: reported, nothing recorded
    assert g.check(0, 110, base) == 104  # still reported until the caller decides
    g.accept(0, 110)  # the caller read the range: only markers, or deleted
    assert g.check(0, 111, base) is None
    assert g.check(0, 50, base) is None  # a re-delivery after a seek back is fine
    assert g.check(0, 51, base) is None
    assert g.check(1, 7, base) is None  # nothing known yet: taken as it comes (the stall watch covers a silent start)
    assert g.check(1, 8, base) is None
    assert g.check(2, 5, base) == 0  # the first record of a partition is already past a hole


def test_offset_guard_across_rebalances() -> None:
    from streams.inflight import OffsetGuard

    g = OffsetGuard()
    committed = {3: 0}
    for off in range(0, 30):  # delivered here; committed only up to 0 so far (the work is in flight)
        assert g.check(3, off, committed.get) is None
    # a rebalance keeps the partition here and the position continues: records 0..29 are still being worked on
    assert g.check(3, 30, committed.get) is None
    # it moves to another worker, which commits up to 500, and comes back: the group's offset is the baseline
    committed[3] = 500
    assert g.check(3, 500, committed.get) is None
    assert g.check(3, 520, committed.get) == 501
    assert g.check(3, 502, committed.get) == 501  # even a jump of one is reported


def test_offset_guard_rewind_drops_what_was_fetched_before_the_seek_back() -> None:
    from streams.inflight import OffsetGuard

    g = OffsetGuard()
    base: dict[int, int | None] = {0: 0}
    for off in range(0, 5):
        assert not g.stale(0, off) and g.check(0, off, base.get) is None
    assert g.check(0, 9, base.get) == 5  # 5..8 never delivered
    g.rewind(0, 5)  # the worker sought back to the first missing record
    assert g.rewinding(0) == 5 and g.rewinds == 1
    assert g.stale(0, 10) and g.stale(0, 11)  # fetched before the seek: dropped, delivered again later
    assert g.dropped == 2
    assert not g.stale(0, 5) and g.rewinding(0) is None  # the hole's first record ends the rewind
    for off in range(5, 12):  # then everything in order, the dropped ones included
        assert not g.stale(0, off) and g.check(0, off, base.get) is None
    g.rewind(0, 20)
    assert not g.stale(0, 12) and g.rewinding(0) is None  # a seek to an earlier offset (rebalance) ends it too


# ------------------------------------------------------------------------------------------------ StallWatch

def test_stall_watch_names_a_partition_with_records_waiting_and_no_delivery() -> None:
    from streams.stall import StallWatch

    w = StallWatch(stall_s=30)
    w.assigned(frozenset({0, 1, 2}), now=0)
    kw = {"next_expected": {0: 10, 1: 50, 2: None}, "high": {0: 20, 1: 50, 2: 99}, "pending": {}, "blocked": False}
    assert w.stalled(20, **kw) == []  # too soon after the assignment
    w.delivered(0, now=25)
    assert w.stalled(40, **kw) == []  # partition 0 delivered 15 s ago; 1 has nothing waiting; 2 unknown
    assert w.stalled(56, **kw) == [0]
    assert w.stalled(56, **{**kw, "pending": {0: 3}}) == []  # work in flight on it: waiting for the teacher
    assert w.stalled(56, **{**kw, "blocked": True}) == []  # the agent waits for room: nobody is delivered
    w.recovering(0, now=56)
    assert w.recovered == 1 and w.stalled(60, **kw) == []  # its clock restarts
    w.assigned(frozenset({0, 1}), now=100)  # a rebalance restarts every clock
    assert w.stalled(120, **kw) == [] and w.stalled(131, **kw) == [0]
