"""The only place that touches Faust's private internals, and why each touch is needed.

Faust (faust-streaming 0.15) offers no public way to do these two things; each function says what it reads or
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


__all__ = ["committed_offsets", "drop_production_index"]
