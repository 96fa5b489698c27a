"""The count table's logic without Faust: windows, throttled writes of absolute totals, expiry, the view."""

from __future__ import annotations

from streams.counts import WindowCounts, count_key, parse_key


def test_counts_tumble_and_writes_are_throttled_totals() -> None:
    wc = WindowCounts(size_s=60, keep_windows=2, flush_every_s=1.0)
    table: dict[str, int] = {}
    writes = []
    for i in range(100):
        due = wc.add("widget_selector", 1, ts_s=120 + i * 0.1, now_s=1000 + i * 0.1, table=table)
        if due is not None:
            table[due[0]] = due[1]
            writes.append(due)
    assert len(writes) == 10  # one write per second of traces, not one per trace
    assert writes[-1] == (count_key("widget_selector", 1, 120), 91)
    view = wc.view(table, {1}, now_s=130, recent=3)
    assert view["current"] == {"start_ms": 120_000, "end_ms": 180_000, "by_task": {"widget_selector": 100}}
    assert [w["start_ms"] for w in view["recent"]] == [60_000, 0, -60_000]
    assert wc.view(table, {0}, now_s=130, recent=1)["current"]["by_task"] == {}  # not our partition


def test_restart_resumes_from_the_table_and_expiry_is_per_partition() -> None:
    table = {count_key("t", 0, 0): 7, count_key("t", 1, 0): 5, count_key("t", 0, 600): 1}
    wc = WindowCounts(size_s=60, keep_windows=2)
    assert wc.add("t", 0, ts_s=610, now_s=610, table=table) == (count_key("t", 0, 600), 2)
    old = wc.expired(0, now_s=610, keys=list(table))
    assert old == [count_key("t", 0, 0)]  # partition 1's old key is left to its own partition's writer
    assert parse_key("a@b") is None and parse_key("x@3@60") == ("x", 3, 60)
