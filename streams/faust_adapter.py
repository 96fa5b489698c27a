"""The only place that touches Faust's private internals, and why each touch is needed.

Faust (faust-streaming 0.15) offers no public way to do these five things; each function says what it reads or
changes, and what to replace it with once Faust has an API for it. Everything else in ``streams/`` uses Faust's
public API only.
"""

from __future__ import annotations

from typing import Any

import faust


def drop_production_index(app: faust.App) -> None:
    """Remove Faust's placeholder index (``{"status": "OK"}`` at ``/``) so that the dashboard can be served there.

    Faust mounts that blueprint whenever its statistics pages are off (``web_stats_enabled=False``), and there is
    no setting to switch it off; aiohttp refuses two GET handlers for one path. The blueprint manager keeps its
    list in ``_enabled`` (no public remove), so it is filtered here, before the web server starts.
    """
    bps = app.web.blueprints
    bps._enabled = [(p, bp) for p, bp in bps._enabled if "production_index" not in str(bp)]


def committed_offsets(app: faust.App) -> dict[Any, int | None]:
    """The consumer group's committed offset per assigned partition, as Faust's consumer knows it.

    Faust loads them on assignment and updates them on every commit, but keeps them in ``_committed_offset``
    (no public accessor; the public alternative, asking the broker, is a round-trip per /status request). Empty
    when the consumer has not started yet.
    """
    return dict(getattr(app.consumer, "_committed_offset", {}))


async def seek_back(app: faust.App, topic: str, partition: int, offset: int) -> None:
    """Seek one assigned partition back to ``offset`` and forget the gap Faust recorded across it.

    ``Consumer.seek`` is public; the gap is not. When the fetcher sees offsets jump it records the range as a gap
    (``_gap``, an interval tree per partition) and ``_new_offset`` later counts every gapped offset below the
    highest acknowledged one as acknowledged. After a seek back into that range its records are processed again,
    so the gap must go: else acknowledging the second record of the range would commit past all of it before it
    was processed. Raises what the consumer raises for a partition no longer assigned.
    """
    from faust.types import TP

    tp = TP(topic, partition)
    await app.consumer.seek(tp, offset)
    gaps = getattr(app.consumer, "_gap", {}).get(tp)
    if gaps:
        gaps.chop(offset, max(offset + 1, gaps.end()))


async def keep_rewinding(app: faust.App, topic: str, partition: int, target: int) -> bool:
    """Seek back to ``target`` again when Faust's fetcher has moved its read offset past it; True if it did.

    After a seek back, records fetched before the seek still pass the fetcher and each sets its read offset
    (``_read_offset``) to its own offset; the fetcher then drops every re-fetched record below that offset
    ("DROPPED MESSAGE ROFF"), so the records sought back to would never arrive (seen in a full-suite run: a
    partition sought back to 0 stalled with the read offset at 381). Called for every record dropped while
    rewinding."""
    from faust.types import TP

    read = getattr(app.consumer, "_read_offset", {}).get(TP(topic, partition))
    if read is None or read <= target:
        return False
    await seek_back(app, topic, partition, target)
    return True


def fetch_state(app: faust.App, topic: str, partition: int) -> dict[str, Any]:
    """What Faust's fetcher knows of one partition, for the stall watch's log line: whether it is in the set of
    partitions the fetcher asks for (``_active_partitions``), paused by Faust (``_paused_partitions``, e.g. during
    table recovery), held back because its stream buffer was full (``_buffered_partitions``), and the offset the
    fetcher last handed on (``_read_offset``). All private; read only."""
    from faust.types import TP

    tp = TP(topic, partition)
    c = app.consumer
    active = getattr(c, "_active_partitions", None)
    return {"active": None if active is None else tp in active,
            "paused": tp in getattr(c, "_paused_partitions", set()),
            "buffer_full": tp in getattr(c, "_buffered_partitions", set()),
            "read_offset": getattr(c, "_read_offset", {}).get(tp),
            "flow_active": getattr(c, "flow_active", None), "in_recovery": getattr(app, "in_recovery", None)}


async def unstick(app: faust.App, topic: str, partition: int, offset: int) -> None:
    """Make Faust's fetcher ask for the partition again (``resume_partitions``, public: it puts the partition back
    in the active set, whatever took it out) and seek it back to ``offset`` (:func:`seek_back`)."""
    from faust.types import TP

    app.consumer.resume_partitions([TP(topic, partition)])
    await seek_back(app, topic, partition, offset)


__all__ = ["committed_offsets", "drop_production_index", "fetch_state", "keep_rewinding", "seek_back", "unstick"]
