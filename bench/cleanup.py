"""Topics a benchmark made, deleted when it ends: every run makes fresh topics (a unique prefix), and a local
broker that keeps them all slows down (a dev broker here had 5,154 topics, 12,118 partitions and 956 MB after
a few weeks of benchmarks and tests: every metadata request and every Faust worker start pays for them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from confluent_kafka.admin import AdminClient

_prefixes: set[str] = set()


def track(prefix: str) -> str:
    """Remember a topic prefix (a topic prefix or a Faust app id) of this run; returns it."""
    _prefixes.add(prefix)
    return prefix


def drop(client_config: dict[str, Any], timeout_s: float = 30.0) -> int:
    """Delete the topics whose names start with a tracked prefix; returns how many were deleted."""
    if not _prefixes:
        return 0
    admin = AdminClient(client_config)
    names = [t for t in admin.list_topics(timeout=timeout_s).topics if t.startswith(tuple(_prefixes))]
    if not names:
        return 0
    done = 0
    for fut in admin.delete_topics(names, operation_timeout=timeout_s).values():
        with contextlib.suppress(Exception):  # already gone, or the broker is going away: nothing to keep
            fut.result()
            done += 1
    _prefixes.clear()
    return done


@contextlib.contextmanager
def dropped_at_exit(client_config: dict[str, Any]) -> Iterator[None]:
    """Run the benchmark, then delete its topics (even when it failed)."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            drop(client_config)
