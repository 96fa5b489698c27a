"""The paired verdict (trainer/close_loop/verdict.py): better / no worse / worse / not enough evidence from a paired
bootstrap interval of the mean difference, deterministic, with inclusive and strict bounds where documented."""

from __future__ import annotations

import json
import math
import random

import pytest

from trainer.close_loop.verdict import VERDICTS, PairedComparison, paired_comparison, sign_test_p


def _scores(n: int, p: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.random() < p) for _ in range(n)]


def test_a_clearly_better_candidate_is_better() -> None:
    ref = _scores(60, 0.5, 1)
    cand = [1.0] * 60  # right wherever the reference was right, and everywhere else too
    r = paired_comparison(cand, ref, margin=0.05)
    assert r.verdict == "better", r
    assert r.ci_low is not None and r.ci_high is not None and 0 < r.ci_low <= r.mean_diff <= r.ci_high  # type: ignore[operator]
    assert r.wins == ref.count(0.0) and r.losses == 0 and r.ties == ref.count(1.0)
    assert r.sign_test_p is not None and r.sign_test_p < 1e-6
    assert r.n == 60 and r.mean_candidate == 1.0 and r.mean_reference == pytest.approx(sum(ref) / 60)


def test_identical_systems_are_no_worse_even_with_a_zero_margin() -> None:
    ref = _scores(24, 0.6, 2)
    for margin in (0.0, 0.05):
        r = paired_comparison(ref, list(ref), margin=margin)
        assert r.verdict == "no_worse", r
        assert (r.ci_low, r.ci_high, r.mean_diff) == (0.0, 0.0, 0.0)  # [0, 0]: inclusive at -0.0 too
        assert r.sign_test_p == 1.0 and r.ties == 24


def test_a_clearly_worse_candidate_is_worse() -> None:
    ref = [1.0] * 40
    cand = _scores(40, 0.3, 3)
    r = paired_comparison(cand, ref, margin=0.05)
    assert r.verdict == "worse", r
    assert r.ci_high is not None and r.ci_high < -0.05


def test_small_or_noisy_samples_are_not_enough_evidence() -> None:
    # 6 items: below min_n, whatever they say
    r = paired_comparison([1.0] * 6, [0.0] * 6, margin=0.05)
    assert r.verdict == "not_enough_evidence" and "fewer than the 10" in r.reason
    assert r.mean_diff == 1.0  # the figures are still reported
    # 24 items, a tiny mixed difference: 3 wins, 4 losses, the rest tied -> the interval straddles -margin
    cand = [1.0] * 3 + [0.0] * 4 + [1.0] * 10 + [0.0] * 7
    ref = [0.0] * 3 + [1.0] * 4 + [1.0] * 10 + [0.0] * 7
    r = paired_comparison(cand, ref, margin=0.05)
    assert r.verdict == "not_enough_evidence", r
    assert r.ci_low is not None and r.ci_high is not None and r.ci_low < -0.05 < r.ci_high
    assert (r.wins, r.losses, r.ties) == (3, 4, 17) and r.sign_test_p == 1.0
    assert "straddles" in r.reason
    # no items at all
    empty = paired_comparison([], [], margin=0.05)
    assert empty.verdict == "not_enough_evidence" and empty.ci_low is None and empty.mean_diff is None


def test_same_input_same_interval_and_seed_matters() -> None:
    rng = random.Random(5)
    cand = [rng.random() for _ in range(50)]
    ref = [rng.random() for _ in range(50)]
    a = paired_comparison(cand, ref, margin=0.05)
    b = paired_comparison(cand, ref, margin=0.05)
    assert a == b and a.as_dict() == b.as_dict()
    c = paired_comparison(cand, ref, margin=0.05, seed=1)
    assert (c.ci_low, c.ci_high) != (a.ci_low, a.ci_high)
    assert c.ci_low == pytest.approx(a.ci_low, abs=0.05)  # type: ignore[arg-type]
    d = a.as_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-ready (event details)
    assert set(d) >= {"n", "mean_candidate", "mean_reference", "mean_diff", "ci_low", "ci_high", "confidence",
                      "margin", "verdict", "method", "sign_test_p"}
    assert a.verdict in VERDICTS and isinstance(a, PairedComparison)


def test_bounds_no_worse_is_inclusive_worse_and_better_are_strict() -> None:
    # every pair differs by exactly -0.25 (exact in binary): the interval is [-0.25, -0.25]
    cand, ref = [0.5] * 20, [0.75] * 20
    at = paired_comparison(cand, ref, margin=0.25)
    assert (at.ci_low, at.ci_high) == (-0.25, -0.25)
    assert at.verdict == "no_worse"  # ci_low == -margin: inclusive
    assert paired_comparison(cand, ref, margin=0.125).verdict == "worse"  # ci_high < -margin
    # float noise does not move a bound: 0.45 - 0.5 is -0.05 after rounding, so at margin 0.05 it is no worse
    assert paired_comparison([0.45] * 20, [0.5] * 20, margin=0.05).verdict == "no_worse"
    # better needs ci_low strictly above 0: an interval starting at exactly 0 is only no worse
    cand = [1.0] * 19 + [0.0]
    ref = [0.0] * 19 + [0.0]
    assert paired_comparison(cand, ref, margin=0.0).verdict == "better"
    assert paired_comparison([0.0] * 20, [0.0] * 20, margin=0.0).verdict == "no_worse"
    # min_n is inclusive: exactly min_n items decide
    assert paired_comparison([1.0] * 10, [0.0] * 10, margin=0.0).verdict == "better"
    assert paired_comparison([1.0] * 9, [0.0] * 9, margin=0.0).verdict == "not_enough_evidence"


def test_confidence_widens_the_interval() -> None:
    rng = random.Random(9)
    cand = [rng.random() for _ in range(40)]
    ref = [rng.random() for _ in range(40)]
    narrow = paired_comparison(cand, ref, margin=0.05, confidence=0.8)
    wide = paired_comparison(cand, ref, margin=0.05, confidence=0.99)
    assert wide.ci_low < narrow.ci_low and wide.ci_high > narrow.ci_high  # type: ignore[operator]


def test_sign_test_and_bad_input() -> None:
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 5) == 1.0
    assert sign_test_p(10, 0) == pytest.approx(2 / 2**10)
    assert sign_test_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sign_test_p(2, 8) == sign_test_p(8, 2)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1.0], [1.0, 0.0], margin=0.0)
    with pytest.raises(ValueError, match="margin"):
        paired_comparison([1.0], [1.0], margin=-0.1)
    with pytest.raises(ValueError, match="confidence"):
        paired_comparison([1.0], [1.0], margin=0.0, confidence=1.0)
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([math.nan], [1.0], margin=0.0)
