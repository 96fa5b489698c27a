"""``tier3 dlq``: look at dead letters, and re-drive the ones a retry can fix.

A dead letter carries the original bytes exactly as read, the stage that failed and the reason. Re-driving
publishes those bytes again, with their original key, to the topic they came from (an experience whose teacher
was down for too long goes back to ``experiences`` and is sampled and enriched again: sampling is deterministic,
and the trainer deduplicates by experience_id). Re-driving does not delete anything: the dead-letter log is
kept for its retention, and each re-drive is itself visible in the source topic.

A dead letter whose original did not fit (``original_truncated``: larger than the record limit allows in base64)
carries a prefix, the sha256 and the size; it is re-driven from the source record itself
(``source_topic/source_partition/source_offset``), checked against that sha256, while the source topic retains
it. One that can no longer be found is reported, never re-driven from its prefix.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Annotated

import typer
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from rich.console import Console
from rich.table import Table

from schemas.codec import decode
from schemas.errors import SchemaError
from schemas.kafka import reading as kio
from schemas.messages import DeadLetter
from schemas.runtime.preflight import KafkaUnreachable, UserError, check_topics, load_settings
from schemas.settings import RELIABLE_PRODUCER, KafkaSettings

console = Console()


@dataclass(frozen=True)
class Letter:
    partition: int
    offset: int
    letter: DeadLetter | None  # None: the dead letter itself is unreadable (shown, never re-driven)
    raw: bytes


def read_dead_letters(settings: KafkaSettings, timeout_s: float = 10.0) -> list[Letter]:
    """Every dead letter currently in the topic (:func:`schemas.kafka.reading.read_until_now`: no group, no commits)."""
    out: list[Letter] = []
    try:
        for msg in kio.read_until_now(settings, settings.dead_letters_topic, "dlq", timeout_s=timeout_s):
            raw = msg.value() or b""
            try:
                letter: DeadLetter | None = decode(raw, DeadLetter, max_bytes=settings.max_record_bytes)
            except SchemaError:
                letter = None
            out.append(Letter(msg.partition() or 0, msg.offset() or 0, letter, raw))
    except kio.TopicMissing:
        return []
    except (kio.ReadTimeout, KafkaException) as exc:
        raise KafkaUnreachable(f"could not read {settings.dead_letters_topic} to its end: {exc}") from None
    return out


def read_source(settings: KafkaSettings, dl: DeadLetter, timeout_s: float = 10.0) -> tuple[bytes | None, bytes] | None:
    """(key, value) of the record a dead letter came from, if the source topic still has it and its sha256 (when
    recorded) matches; else None."""
    if dl.source_topic is None or dl.source_partition is None or dl.source_offset is None:
        return None
    consumer = Consumer({**settings.client_config(), "group.id": f"tier3-dlq-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "error"})
    try:
        consumer.assign([TopicPartition(dl.source_topic, dl.source_partition, dl.source_offset)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                return None  # e.g. the offset is out of range: deleted by retention
            value = msg.value() or b""
            if msg.offset() != dl.source_offset or (
                    dl.original_sha256 is not None and hashlib.sha256(value).hexdigest() != dl.original_sha256):
                return None
            return msg.key(), value
        return None
    finally:
        consumer.close()


def redrive(settings: KafkaSettings, letters: list[Letter]) -> int:
    """Publish the original bytes of ``letters`` back to their source topics; return how many.

    A letter with only a prefix of its original is re-driven from its source record (:func:`read_source`); if that
    is gone, it is skipped and reported.
    """
    producer = Producer({**settings.client_config(), **RELIABLE_PRODUCER, "partitioner": "murmur2_random"})
    n = 0
    for item in letters:
        dl = item.letter
        if dl is None or not dl.source_topic:
            continue
        key: bytes | None
        if dl.original_truncated:
            found = read_source(settings, dl)
            if found is None:
                console.print(f"[yellow]{item.partition}/{item.offset}: the original ({dl.original_size} bytes) is "
                              f"not in this dead letter and no longer at {dl.source_topic}/{dl.source_partition}/"
                              f"{dl.source_offset}: not re-driven[/yellow]")
                continue
            key, value = found
        else:
            key = base64.b64decode(dl.key_b64) if dl.key_b64 else None
            value = base64.b64decode(dl.original_b64)
        headers: dict[str, str | bytes | None] = {
            "tier3-redriven-from": f"{settings.dead_letters_topic}/{item.partition}/{item.offset}"}
        while True:
            try:
                producer.produce(dl.source_topic, value=value, key=key, headers=headers)
                n += 1
                break
            except BufferError:  # local queue full: let deliveries drain, then go on
                producer.poll(0.1)
            except KafkaException as exc:  # e.g. a record written by a client with a larger limit than ours
                console.print(f"[yellow]{item.partition}/{item.offset}: not re-driven ({len(value)} bytes with its "
                              f"key and header): {exc.args[0].str() if exc.args else exc}[/yellow]")
                break
        producer.poll(0)
    left = producer.flush(60)
    if left:
        raise RuntimeError(f"{left} re-driven messages were not acknowledged")
    return n


def dlq(
    stage: Annotated[list[str] | None, typer.Option(help="only dead letters of this stage (repeatable)")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="only this error kind, e.g. rate_limited (repeatable)")]
    = None,
    limit: Annotated[int, typer.Option(help="rows to show")] = 20,
    do_redrive: Annotated[bool, typer.Option("--redrive", help="publish the selected originals back to their "
                                             "source topic")] = False,
) -> None:
    """Dead letters: counts by stage and reason, the latest ones, and re-drive."""
    if limit < 0:
        raise UserError(f"--limit must be >= 0, not {limit}")
    settings = load_settings(KafkaSettings)
    # re-driving writes to the source topics too: all four must be there, as `tier3 topics create` made them
    check_topics(settings, None if do_redrive else settings.specs_of(settings.dead_letters_topic))
    letters = read_dead_letters(settings)
    selected = [item for item in letters if item.letter is not None
                and (not stage or item.letter.stage in stage) and (not kind or item.letter.error_kind in kind)]
    counts = Counter((i.letter.stage, i.letter.error_kind) for i in letters if i.letter is not None)
    table = Table("stage", "kind", "count", title=f"{settings.dead_letters_topic}: {len(letters)} dead letters")
    for (st, kd), c in counts.most_common():
        table.add_row(st, kd, str(c))
    console.print(table)
    latest = Table("partition/offset", "stage", "kind", "source", "reason", title="latest selected")
    for item in (selected[-limit:] if limit else []):
        dl = item.letter
        assert dl is not None
        latest.add_row(f"{item.partition}/{item.offset}", dl.stage, dl.error_kind,
                       f"{dl.source_topic}/{dl.source_partition}/{dl.source_offset}", dl.reason[:80])
    console.print(latest)
    if do_redrive:
        n = redrive(settings, selected)
        console.print(f"re-drove {n} dead letters to their source topics")
