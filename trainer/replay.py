"""Replay (``tier3 replay``): rebuild a dataset (and, with ``--train``, a model) from the log, without touching the
live group.

The event-sourcing promise: ``enriched-traces`` is kept forever, so any model can be rebuilt from it. A replay
reads a slice of the topic with ``assign()`` (no group membership, no rebalance) under a throw-away group id
and never commits, so the trainer group's committed offsets are untouched. Three ways to choose the slice:

- from the beginning (every partition from its low watermark to its current high watermark);
- from a timestamp (``offsets_for_times``: the first record at or after it) to the high watermark;
- up to a past run's offsets: exactly the ``dataset_offsets`` in its manifest, which rebuilds its sha256.

The slice is read and projected by :mod:`trainer.projection`, the live trainer's own log-to-dataset step, so both
paths run the same code.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_END, KafkaException, TopicPartition

from schemas.kafka import reading as kio
from schemas.runtime.files import move_into_place, write_atomic
from schemas.settings import KafkaSettings
from trainer.dataset import BuiltDataset
from trainer.manifest import OffsetRange, RunManifest
from trainer.projection import LogReadError, bulk_decode, project_dataset, read_ranges, slice_reader
from trainer.sft_config import SFTConfig


def watermarks(settings: KafkaSettings, topic: str, timeout_s: float = 30.0) -> dict[int, tuple[int, int]]:
    """``{partition: (low, high)}`` of ``topic`` now (transient leader changes are asked again)."""
    c = slice_reader(settings)
    try:
        return kio.watermarks(c, topic, timeout_s=timeout_s)
    except kio.TopicMissing:
        raise LogReadError(f"topic {topic} not found: run `tier3 topics create`") from None
    except KafkaException as exc:
        raise LogReadError(f"cannot read the watermarks of {topic}: {exc}") from None
    finally:
        c.close()


def ranges_from_beginning(settings: KafkaSettings, topic: str) -> dict[int, OffsetRange]:
    return {p: OffsetRange(start=lo, end=hi) for p, (lo, hi) in watermarks(settings, topic).items() if hi > lo}


def ranges_from_time(settings: KafkaSettings, topic: str, since_ms: int, timeout_s: float = 30.0
                     ) -> dict[int, OffsetRange]:
    """From the first record with timestamp >= ``since_ms`` to each partition's high watermark."""
    marks = watermarks(settings, topic)
    c = slice_reader(settings)
    try:
        ask = kio.transient_retry(timeout_s)(c.offsets_for_times)  # a leader moving is asked again
        found = ask([TopicPartition(topic, p, since_ms) for p in marks], timeout=timeout_s)
    except KafkaException as exc:
        raise LogReadError(f"cannot find offsets by time in {topic}: {exc}") from None
    finally:
        c.close()
    out: dict[int, OffsetRange] = {}
    for tp in found:
        lo, hi = marks[tp.partition]
        start = hi if tp.offset in (-1, OFFSET_END) else max(lo, tp.offset)  # -1: nothing that recent
        if hi > start:
            out[tp.partition] = OffsetRange(start=start, end=hi)
    return out


@dataclass
class ReplayResult:
    out_dir: Path
    ranges: dict[int, OffsetRange]
    dataset: BuiltDataset
    n_messages: int
    n_bad: int
    expected_sha256: str | None = None
    train: dict[str, Any] | None = None

    @property
    def matches(self) -> bool | None:
        return None if self.expected_sha256 is None else self.expected_sha256 == self.dataset.sha256

    def summary(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "ranges": {str(p): [r.start, r.end] for p, r in sorted(self.ranges.items())},
            "n_messages": self.n_messages, "n_bad": self.n_bad,
            "sha256": self.dataset.sha256, "n_train": self.dataset.n_train, "n_holdout": self.dataset.n_holdout,
            "expected_sha256": self.expected_sha256, "matches": self.matches,
            "train": self.train,
        }


def replay(settings: KafkaSettings, cfg: SFTConfig, ranges: dict[int, OffsetRange], out_dir: Path, *,
           topic: str | None = None, manifest: RunManifest | None = None, train: bool = False) -> ReplayResult:
    """Read ``ranges``, rebuild the dataset in ``out_dir/dataset`` and, with ``train``, train a new adapter into
    ``out_dir/adapter``. With a ``manifest``, its sha256 is the expected one (``result.matches``)."""
    topic = topic or settings.traces_topic
    with bulk_decode():
        read = read_ranges(settings, topic, ranges)
        built = project_dataset(read.records, cfg, out_dir / "dataset")
    result = ReplayResult(out_dir=out_dir, ranges=ranges, dataset=built, n_messages=read.n_messages,
                          n_bad=read.n_bad, expected_sha256=manifest.dataset.sha256 if manifest else None)
    if train:
        from trainer.sft_trainer import train as sft_train  # torch & co. only when a model is trained

        tmp = out_dir / f".adapter-tmp-{uuid.uuid4().hex[:8]}"
        try:
            res = sft_train(built, cfg, tmp)
            adapter = move_into_place(Path(res.adapter_dir), out_dir / "adapter")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result.train = {"adapter_dir": str(adapter), "backend": res.backend, "steps": res.steps,
                        "train_loss": res.train_loss, "tokens": res.tokens, "wall_s": res.wall_s}
    write_atomic(out_dir / "replay.json", _json(result.summary()))
    return result


def _json(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
