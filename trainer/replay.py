"""Replay: rebuild a dataset (and, with ``--train``, a model) from the log, without touching the live group.

The event-sourcing promise: ``enriched-traces`` is kept forever, so any model can be rebuilt from it. A replay
reads a slice of the topic with ``assign()`` (no group membership, no rebalance) under a throw-away group id
and never commits, so the trainer group's committed offsets are untouched. Three ways to choose the slice:

- from the beginning (every partition from its low watermark to its current high watermark);
- from a timestamp (``offsets_for_times``: the first record at or after it) to the high watermark;
- up to a past run's offsets: exactly the ``dataset_offsets`` in its manifest, which rebuilds its sha256.

The live trainer builds its datasets through :func:`project_dataset` too, so both paths run the same code.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaException, Message, TopicPartition

from schemas import SchemaError, fastcodec
from schemas import kafka_io as kio
from schemas.files import move_into_place, write_atomic
from schemas.settings import KafkaSettings
from trainer.dataset import BuiltDataset, build_dataset
from trainer.errors import TrainerError
from trainer.manifest import OffsetRange, RunManifest
from trainer.sft_config import SFTConfig

log = logging.getLogger("tier3.trainer.replay")


class ReplayError(TrainerError):
    """The slice could not be read (broker unreachable, offsets gone)."""

    retryable = True


@dataclass(frozen=True, order=True)
class TraceRecord:
    """One decoded trace with its position in ``enriched-traces`` (the log order used everywhere)."""

    partition: int
    offset: int
    trace: fastcodec.TraceLike = field(compare=False)


@dataclass
class SliceRead:
    records: list[TraceRecord]
    n_messages: int
    n_bad: int


def decode_trace(value: bytes | None, max_bytes: int) -> fastcodec.TraceLike:
    """One record's trace, decoded and validated (:func:`schemas.fastcodec.decode_trace`: a read-only view, or
    the pydantic model where only the canonical path decides), or a SchemaError that says why not."""
    if value is None:
        raise SchemaError("empty value (tombstone)")
    return fastcodec.decode_trace(value, max_bytes=max_bytes)


def _reader(settings: KafkaSettings) -> Consumer:
    """A consumer for assign()-based reads (schemas.kafka_io.reader): never commits, read_committed like the
    trainer, and says when a partition has nothing more to give."""
    return kio.reader(settings, "replay", **{"enable.partition.eof": True})


def watermarks(settings: KafkaSettings, topic: str, timeout_s: float = 30.0) -> dict[int, tuple[int, int]]:
    """``{partition: (low, high)}`` of ``topic`` now (transient leader changes are asked again)."""
    c = _reader(settings)
    try:
        return kio.watermarks(c, topic, timeout_s=timeout_s)
    except kio.TopicMissing:
        raise ReplayError(f"topic {topic} not found: run `tier3 topics create`") from None
    except KafkaException as exc:
        raise ReplayError(f"cannot read the watermarks of {topic}: {exc}") from None
    finally:
        c.close()


def ranges_from_beginning(settings: KafkaSettings, topic: str) -> dict[int, OffsetRange]:
    return {p: OffsetRange(start=lo, end=hi) for p, (lo, hi) in watermarks(settings, topic).items() if hi > lo}


def ranges_from_time(settings: KafkaSettings, topic: str, since_ms: int, timeout_s: float = 30.0
                     ) -> dict[int, OffsetRange]:
    """From the first record with timestamp >= ``since_ms`` to each partition's high watermark."""
    marks = watermarks(settings, topic)
    c = _reader(settings)
    try:
        ask = kio.transient_retry(timeout_s)(c.offsets_for_times)  # a leader moving is asked again
        found = ask([TopicPartition(topic, p, since_ms) for p in marks], timeout=timeout_s)
    except KafkaException as exc:
        raise ReplayError(f"cannot find offsets by time in {topic}: {exc}") from None
    finally:
        c.close()
    out: dict[int, OffsetRange] = {}
    for tp in found:
        lo, hi = marks[tp.partition]
        start = hi if tp.offset in (-1, OFFSET_END) else max(lo, tp.offset)  # -1: nothing that recent
        if hi > start:
            out[tp.partition] = OffsetRange(start=start, end=hi)
    return out


def iter_slice(settings: KafkaSettings, topic: str, ranges: dict[int, OffsetRange], *, timeout_s: float = 300.0
               ) -> Iterator[Message]:
    """Yield the records of exactly ``[start, end)`` of each partition (:func:`schemas.kafka_io.iter_slice`)."""
    for batch in iter_slice_batches(settings, topic, ranges, timeout_s=timeout_s):
        yield from batch


def iter_slice_batches(settings: KafkaSettings, topic: str, ranges: dict[int, OffsetRange], *,
                       timeout_s: float = 300.0) -> Iterator[list[Message]]:
    """:func:`iter_slice` in lists of records (:func:`schemas.kafka_io.iter_slice_batches`)."""
    c = _reader(settings)
    try:
        yield from kio.iter_slice_batches(c, topic, ranges, timeout_s=timeout_s)
    except kio.ReadTimeout as exc:
        raise ReplayError(str(exc)) from None
    except KafkaException as exc:
        raise ReplayError(f"reading {topic}: {exc}") from None
    finally:
        c.close()


@contextlib.contextmanager
def bulk_decode() -> Iterator[None]:
    """Pause the cyclic garbage collector while many traces are decoded and projected.

    Decoded traces are acyclic (reference counting frees them), and they stay alive until the dataset is written:
    every collection during a bulk read walks the whole growing heap of them again, for nothing (about a third of
    a replay's time). The collector's previous state is restored on exit; collection then resumes on its normal
    schedule (cycles made meanwhile, if any, are found then).

    On exit the objects made meanwhile are moved to the oldest generation as they are (``freeze()`` then
    ``unfreeze()``: two list splices, no scan; skipped if something else froze objects), instead of all being
    walked at once by the first young collection after ``enable()``; the next full collection sees them.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def _log_order(r: TraceRecord) -> tuple[int, int]:
    return (r.partition, r.offset)


def read_ranges(settings: KafkaSettings, topic: str, ranges: dict[int, OffsetRange], *, timeout_s: float = 300.0,
                on_bad: Callable[[int, int, bytes | None, bytes | None, SchemaError], None] | None = None
                ) -> SliceRead:
    """Read ``ranges`` and decode the traces; skip (and count) what cannot be decoded."""
    records: list[TraceRecord] = []
    append = records.append
    n_messages = n_bad = 0
    max_bytes = settings.max_record_bytes  # a trace embeds an experience of up to tier3_max_message_bytes
    with bulk_decode():
        for batch in iter_slice_batches(settings, topic, ranges, timeout_s=timeout_s):
            n_messages += len(batch)
            for msg in batch:
                value = msg.value()
                try:
                    append(TraceRecord(msg.partition(), msg.offset(), decode_trace(value, max_bytes)))  # type: ignore[arg-type]
                except SchemaError as exc:
                    n_bad += 1
                    if on_bad is not None:
                        p, off = msg.partition(), msg.offset()
                        assert p is not None and off is not None
                        on_bad(p, off, msg.key(), value, exc)
    records.sort(key=_log_order)
    return SliceRead(records, n_messages, n_bad)


def read_ids(settings: KafkaSettings, topic: str, ranges: dict[int, OffsetRange], *, timeout_s: float = 300.0
             ) -> set[str]:
    """The experience ids in ``ranges``: the record keys (docs/design.md, "Topics": key = experience_id),
    decoding only records without a key. Cheap enough to run at every assignment."""
    ids: set[str] = set()
    for msg in iter_slice(settings, topic, ranges, timeout_s=timeout_s):
        key = msg.key()
        if key:
            ids.add(key.decode("utf-8", "replace"))
            continue
        try:
            ids.add(decode_trace(msg.value(), settings.max_record_bytes).experience_id)
        except SchemaError:
            continue
    return ids


def project_dataset(records: Iterable[TraceRecord], cfg: SFTConfig, out_dir: Path) -> BuiltDataset:
    """The one projection from log records to a dataset: log order ((partition, offset)), then
    :func:`trainer.dataset.build_dataset` (dedup by experience_id, holdout split, phases, sha256)."""
    with bulk_decode():
        return build_dataset([r.trace for r in sorted(records, key=_log_order)], cfg, out_dir)


def install_dir(src: Path, dest: Path) -> Path:
    """Move a finished folder into place with one rename: ``dest`` either does not exist or is complete."""
    return move_into_place(src, dest)


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
            adapter = install_dir(Path(res.adapter_dir), out_dir / "adapter")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result.train = {"adapter_dir": str(adapter), "backend": res.backend, "steps": res.steps,
                        "train_loss": res.train_loss, "tokens": res.tokens, "wall_s": res.wall_s}
    write_atomic(out_dir / "replay.json", _json(result.summary()))
    return result


def _json(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
