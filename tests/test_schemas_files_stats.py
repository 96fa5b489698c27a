"""schemas.runtime.stats (the one percentile) and schemas.runtime.files (the one atomic write / move into place)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from schemas.runtime.files import move_into_place, write_atomic
from schemas.runtime.stats import percentile


def test_percentile_interpolates_linearly_between_order_statistics() -> None:
    assert percentile([], 95) is None
    assert percentile([7.0], 95) == 7.0
    xs = [40.0, 10.0, 30.0, 20.0]  # unsorted on purpose
    assert percentile(xs, 0) == 10.0 and percentile(xs, 100) == 40.0
    assert percentile(xs, 50) == 25.0  # the mean of the middle two (nearest rank would say 30)
    assert percentile(xs, 95) == pytest.approx(38.5)  # position 2.85: 30 + 0.85 * 10
    assert percentile(range(1, 101), 95) == pytest.approx(95.05)
    with pytest.raises(ValueError):
        percentile(xs, 0.95 * 1000)


def test_write_atomic_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "f.json"
    write_atomic(p, b"one")
    write_atomic(p, b"two")
    assert p.read_bytes() == b"two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.json"]
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600  # never readable by others (the broker's secrets use it)


def test_move_into_place_replaces_a_folder_as_a_whole(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "adapter"
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    (first / "old.bin").write_bytes(b"1")
    second.mkdir()
    (second / "new.bin").write_bytes(b"2")
    assert move_into_place(first, dest) == dest
    move_into_place(second, dest)
    assert sorted(x.name for x in dest.iterdir()) == ["new.bin"]  # nothing of the previous attempt is left
    assert sorted(x.name for x in dest.parent.iterdir()) == ["adapter"]  # the renamed-away copy is deleted
    assert not first.exists() and not second.exists()
