"""A paired verdict that knows its uncertainty: is a candidate better than, no worse than, or worse than a reference
on the same items? Pure (numpy, no Kafka, no model), deterministic.

**The data.** ``candidate[i]`` and ``reference[i]`` are per-item scores (e.g. :func:`schemas.tasks.task_f1` of each
holdout example) of two systems **on the same item i**: items are paired by position, so item difficulty cancels
out and only the difference ``d_i = candidate[i] - reference[i]`` matters.

**The statistic.** The mean difference ``mean(d)`` (= mean candidate - mean reference). Its uncertainty is a
two-sided percentile **paired bootstrap** interval at ``confidence`` (default 0.95): ``n_boot`` resamples of the n
indices drawn with replacement (the same index for both systems, which keeps the pairing), the mean of ``d`` over
each resample, and the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those means (numpy's
default linear interpolation) as ``[ci_low, ci_high]``. The resamples come from ``numpy.random.default_rng(seed)``,
so the same input and seed give the same interval, bit for bit. The interval's ends are rounded to 12 decimals
before they are compared (float noise: ``0.45 - 0.5`` must count as ``-0.05``).

**The verdict**, with ``margin >= 0`` the difference the caller accepts as "no worse" (a non-inferiority margin),
checked in this order:

======================= ======================================================================================
``not_enough_evidence`` ``n < min_n`` (default 10: a bootstrap of a handful of items understates its own
                        uncertainty), with ``reason`` saying so
``better``              ``ci_low > 0`` (strict: the whole interval is above zero)
``no_worse``            ``ci_low >= -margin`` (**inclusive**: an interval that reaches exactly ``-margin`` is
                        still no worse), and not better
``worse``               ``ci_high < -margin`` (strict: the whole interval is below ``-margin``)
``not_enough_evidence`` otherwise: the interval straddles ``-margin`` (it holds both "within the margin" and
                        "worse than the margin"); more items would decide
======================= ======================================================================================

So with ``margin = 0`` identical systems are ``no_worse`` (their interval is ``[0, 0]``), and a candidate is
``better`` only when the data exclude a zero difference at that confidence.

**The sign test** (reported beside it, not part of the verdict): wins (``d > 0``), losses (``d < 0``) and ties
(``d == 0``, dropped); the exact two-sided binomial p-value of ``min(wins, losses)`` under p = 1/2,
``min(1, 2 * P[X <= min(wins, losses)])`` with ``X ~ Binomial(wins + losses, 1/2)`` (``math.comb``, no scipy);
1.0 when every pair ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Verdict = Literal["better", "no_worse", "worse", "not_enough_evidence"]
VERDICTS: tuple[Verdict, ...] = ("better", "no_worse", "worse", "not_enough_evidence")
_DECIMALS = 12  # the interval's ends are rounded to this many decimals before the comparisons
_CHUNK_CELLS = 1 << 20  # bootstrap indices drawn per block (memory bound: about 8 MiB of int64)


@dataclass(frozen=True)
class PairedComparison:
    """The outcome of :func:`paired_comparison` (module docstring: the statistic, the bounds, the verdict)."""

    n: int
    mean_candidate: float | None
    mean_reference: float | None
    mean_diff: float | None  # mean(candidate - reference)
    ci_low: float | None  # the percentile bootstrap interval of mean_diff (None when n == 0)
    ci_high: float | None
    confidence: float
    margin: float
    verdict: Verdict
    method: str
    reason: str
    wins: int = 0  # pairs with candidate > reference
    losses: int = 0  # pairs with candidate < reference
    ties: int = 0
    sign_test_p: float | None = None  # exact two-sided sign test (None when n == 0)
    n_boot: int = 0
    seed: int = 0
    min_n: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (event details, reports)."""
        return asdict(self)


def paired_comparison(candidate: Sequence[float], reference: Sequence[float], *, margin: float,
                      confidence: float = 0.95, n_boot: int = 4000, seed: int = 0,
                      min_n: int = 10) -> PairedComparison:
    """Compare two systems' per-item scores on the same items (paired by position); see the module docstring.

    Raises ValueError for sequences of different lengths, a non-finite score, ``margin < 0``, ``confidence``
    outside (0, 1), ``n_boot < 1`` or ``min_n < 1``.
    """
    if len(candidate) != len(reference):
        raise ValueError(f"paired scores need equal lengths: {len(candidate)} candidate vs {len(reference)} "
                         "reference")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, not {margin!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), not {confidence!r}")
    if n_boot < 1 or min_n < 1:
        raise ValueError(f"n_boot and min_n must be >= 1 (got {n_boot}, {min_n})")
    c = np.asarray(candidate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(r))):
        raise ValueError("scores must be finite numbers")
    n = int(c.size)
    method = (f"paired percentile bootstrap of mean(candidate - reference): {n_boot} resamples, seed {seed}, "
              f"{confidence:g} two-sided interval; exact sign test beside it")
    common: dict[str, Any] = {"confidence": confidence, "margin": margin, "method": method, "n_boot": n_boot,
                              "seed": seed, "min_n": min_n}
    if n == 0:
        return PairedComparison(n=0, mean_candidate=None, mean_reference=None, mean_diff=None, ci_low=None,
                                ci_high=None, verdict="not_enough_evidence", reason=f"no items (need >= {min_n})",
                                **common)
    d = c - r
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    lo, hi = _bootstrap_interval(d, confidence, n_boot, seed)
    verdict, reason = _decide(n, lo, hi, margin, min_n, confidence)
    return PairedComparison(
        n=n, mean_candidate=float(c.mean()), mean_reference=float(r.mean()), mean_diff=float(d.mean()),
        ci_low=lo, ci_high=hi, verdict=verdict, reason=reason, wins=wins, losses=losses, ties=n - wins - losses,
        sign_test_p=sign_test_p(wins, losses), **common)


def _bootstrap_interval(d: np.ndarray, confidence: float, n_boot: int, seed: int) -> tuple[float, float]:
    """The percentile interval of the resampled means of ``d`` (ends rounded to :data:`_DECIMALS`)."""
    n = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    rows = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_boot, rows):  # blocks of resamples (their size depends on n only: deterministic)
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    return round(float(lo), _DECIMALS) + 0.0, round(float(hi), _DECIMALS) + 0.0  # + 0.0: no -0.0


def _decide(n: int, lo: float, hi: float, margin: float, min_n: int, confidence: float) -> tuple[Verdict, str]:
    ci = f"{confidence:g} interval of the mean difference [{lo:.4f}, {hi:.4f}]"
    if n < min_n:
        return "not_enough_evidence", f"{n} paired items, fewer than the {min_n} a verdict needs ({ci})"
    if lo > 0:
        return "better", f"{ci} lies above 0"
    if lo >= -margin:
        return "no_worse", f"{ci} starts at or above -{margin:g} (the margin)"
    if hi < -margin:
        return "worse", f"{ci} lies below -{margin:g} (the margin)"
    return "not_enough_evidence", f"{ci} straddles -{margin:g} (the margin): more items would decide"


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: ``min(1, 2 * P[X <= min(wins, losses)])``, ``X ~ Binomial(wins + losses, 1/2)``;
    1.0 when there are no untied pairs."""
    m = wins + losses
    if m == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**m)


__all__ = ["VERDICTS", "PairedComparison", "Verdict", "paired_comparison", "sign_test_p"]
