"""The tumbling count of enriched traces per task per window, kept in a Faust table (display only).

Keys are ``"<task>@<partition>@<window start s>"``: the partition is the trace's (= its experience's), so each
key is written to the changelog partition of the source partition it counts, and one partition's count never
overwrites another's. Windows are computed here from the trace's timestamp (tumbling, ``size_s``), not by
Faust's windowed tables, whose expiry and ``on_window_close`` are unreliable across restarts
(docs/design.md, "Display-only state").

Every table write is a changelog message; one per trace cost a quarter of the worker's time in our
measurements. So counts accumulate in memory and a key is written at most once per ``flush_every_s``
(absolute totals, so a write is idempotent). A crash loses at most that much counting, and redelivered traces
count twice: it is for display, never for decisions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any


def count_key(task: str, partition: int, window_start_s: int) -> str:
    return f"{task}@{partition}@{window_start_s}"


def parse_key(key: str) -> tuple[str, int, int] | None:
    try:
        task, partition, start = key.rsplit("@", 2)
        return task, int(partition), int(start)
    except ValueError:
        return None


class WindowCounts:
    def __init__(self, size_s: int, keep_windows: int, flush_every_s: float = 1.0) -> None:
        self.size_s = size_s
        self.keep_windows = keep_windows
        self.flush_every_s = flush_every_s
        self.local: dict[str, int] = {}
        self._flushed_at: dict[str, float] = {}

    def window_start(self, ts_s: float) -> int:
        return int(ts_s // self.size_s) * self.size_s

    def add(self, task: str, partition: int, ts_s: float, now_s: float, table: Mapping[str, int]
            ) -> tuple[str, int] | None:
        """Count one trace; return (key, total) when the key is due to be written to the table."""
        key = count_key(task, partition, self.window_start(ts_s))
        n = self.local.get(key)
        if n is None:
            n = int(table.get(key, 0))  # restored from the changelog after a restart or rebalance
        self.local[key] = n + 1
        if now_s - self._flushed_at.get(key, 0.0) >= self.flush_every_s:
            self._flushed_at[key] = now_s
            return key, n + 1
        return None

    def expired(self, partition: int, now_s: float, keys: Iterable[str]) -> list[str]:
        """Keys of ``partition`` older than the kept windows (to delete from the table and from memory)."""
        cutoff = self.window_start(now_s) - self.keep_windows * self.size_s
        out = []
        for key in keys:
            parsed = parse_key(key)
            if parsed is not None and parsed[1] == partition and parsed[2] < cutoff:
                out.append(key)
        for key in out:
            self.local.pop(key, None)
            self._flushed_at.pop(key, None)
        return out

    def view(self, table: Mapping[str, int], partitions: set[int] | None, now_s: float, recent: int
             ) -> dict[str, Any]:
        """The /status block: current and ``recent`` closed windows, summed over ``partitions`` by task."""
        merged: dict[str, int] = {k: int(v) for k, v in list(table.items())}
        merged.update(self.local)  # memory is never behind the table
        by_window: dict[int, Counter[str]] = {}
        for key, n in merged.items():
            parsed = parse_key(key)
            if parsed is None or (partitions is not None and parsed[1] not in partitions):
                continue
            by_window.setdefault(parsed[2], Counter())[parsed[0]] += n
        cur = self.window_start(now_s)

        def window(start: int) -> dict[str, Any]:
            return {"start_ms": start * 1000, "end_ms": (start + self.size_s) * 1000,
                    "by_task": dict(by_window.get(start, {}))}

        return {"size_s": self.size_s, "current": window(cur),
                "recent": [window(cur - i * self.size_s) for i in range(1, recent + 1)]}
