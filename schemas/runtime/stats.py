"""One definition of a percentile (p50, p95) for every latency tier3 reports.

Linear interpolation between the order statistics (numpy's default, "type 7"): the q-th percentile of ``xs``
(sorted, n values) is at position ``(n - 1) * q / 100``, interpolated between its two neighbours. So the p50 of
an even count is the mean of the middle two, p0 is the minimum and p100 the maximum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (``q`` in 0..100) by linear interpolation; None when there are no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is not within 0..100")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
