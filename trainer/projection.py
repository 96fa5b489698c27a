"""The log-to-dataset step: read a slice of ``enriched-traces`` and project it into a dataset.

The live trainer (``trainer/protocol.py``, ``trainer/intake.py``) and ``tier3 replay`` (``trainer/replay.py``) both
read and project through this module, so a dataset rebuilt from the log has the sha256 of the one the trainer
built:

- :func:`read_ranges`: exactly ``[start, end)`` of each partition (assign(), no group membership, never
  committed), each record decoded and validated (:func:`decode_trace`), undecodable ones counted and skipped;
- :func:`read_ids`: the experience ids of a slice (record keys), cheap enough for every assignment;
- :func:`project_dataset`: the one projection from log records to a dataset (log order, then
  :func:`trainer.dataset.build_dataset`).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Message

from schemas import SchemaError, fastcodec
from schemas.kafka import reading as kio
from schemas.settings import KafkaSettings
from trainer.dataset import BuiltDataset, build_dataset
from trainer.errors import TrainerError
from trainer.manifest import OffsetRange
from trainer.sft_config import SFTConfig


class LogReadError(TrainerError):
    """A slice of the log could not be read (broker unreachable, topic missing, offsets gone)."""

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


def slice_reader(settings: KafkaSettings) -> Consumer:
    """A consumer for assign()-based reads (schemas.kafka.reading.reader): never commits, read_committed like the
    trainer, and says when a partition has nothing more to give. Its throw-away group id is ``tier3-replay-...``
    (the name the trainer principal's ACLs grant, tier3/devbroker/acls.py), for the live trainer's reads too."""
    return kio.reader(settings, "replay", **{"enable.partition.eof": True})


def iter_slice(settings: KafkaSettings, topic: str, ranges: dict[int, OffsetRange], *, timeout_s: float = 300.0
               ) -> Iterator[Message]:
    """Yield the records of exactly ``[start, end)`` of each partition (:func:`schemas.kafka.reading.iter_slice`)."""
    for batch in iter_slice_batches(settings, topic, ranges, timeout_s=timeout_s):
        yield from batch


def iter_slice_batches(settings: KafkaSettings, topic: str, ranges: dict[int, OffsetRange], *,
                       timeout_s: float = 300.0) -> Iterator[list[Message]]:
    """:func:`iter_slice` in lists of records (:func:`schemas.kafka.reading.iter_slice_batches`)."""
    c = slice_reader(settings)
    try:
        yield from kio.iter_slice_batches(c, topic, ranges, timeout_s=timeout_s)
    except kio.ReadTimeout as exc:
        raise LogReadError(str(exc)) from None
    except KafkaException as exc:
        raise LogReadError(f"reading {topic}: {exc}") from None
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
