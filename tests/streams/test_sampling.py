"""Sampling is a pure, deterministic function of (experience_id, confidence)."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.sampling import hash_fraction, sample_reason


@given(st.text(min_size=1, max_size=200), st.floats(0, 1))
@settings(max_examples=300)
def test_same_input_same_decision(eid: str, conf: float) -> None:
    assert sample_reason(eid, conf) == sample_reason(eid, conf)
    assert 0.0 <= hash_fraction(eid) < 1.0


def test_rate_is_about_fifteen_percent() -> None:
    n = 20_000
    hits = sum(sample_reason(f"e-{i}", 0.5) == "random" for i in range(n))
    assert 0.14 * n < hits < 0.16 * n


def test_high_confidence_always_sampled_and_threshold_is_strict() -> None:
    assert all(sample_reason(f"x{i}", 0.81) == "high_confidence" for i in range(500))
    unsampled = [f"x{i}" for i in range(500) if hash_fraction(f"x{i}") >= 0.15]
    assert all(sample_reason(e, 0.8) is None for e in unsampled)  # 0.8 is not > 0.8


def test_rate_bounds_and_configurable() -> None:
    ids = [f"id-{i}" for i in range(1000)]
    assert all(sample_reason(e, 0.1, rate=0.0) is None for e in ids)
    assert all(sample_reason(e, 0.1, rate=1.0) == "random" for e in ids)
    assert all(sample_reason(e, 0.95, threshold=0.99) != "high_confidence" for e in ids)


def test_stable_across_processes() -> None:
    """Python's hash() is salted per process; ours must not be (a replay in another process samples alike)."""
    ids = [f"exp-{i}" for i in range(300)]
    here = [sample_reason(e, 0.3) for e in ids]
    code = ("import sys, json; from streams.sampling import sample_reason; "
            "print(json.dumps([sample_reason(f'exp-{i}', 0.3) for i in range(300)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}, cwd=".")
    import json
    assert json.loads(out.stdout) == here
