"""The streams side's commands: ``topics``, ``publish``, ``worker``, ``dlq``.

:func:`register` adds them to the one command line, ``tier3`` (``tier3/cli.py``, the composition root, which adds
the trainer's too), so ``streams`` never imports ``trainer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from schemas.runtime.preflight import UserError, check_topics, load_settings
from schemas.settings import KafkaSettings
from streams.dlq import dlq
from streams.errors import StreamsError
from streams.worker_cli import worker

topics_app = typer.Typer(help="tier3's topics.", no_args_is_help=True)
console = Console()


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(1)


@topics_app.command("create")
def topics_create() -> None:
    """Create every topic (docs/design.md, "Topics"), idempotently, with partitions, retention and cleanup
    policy from settings. Every other command only checks them."""
    from schemas.kafka.access import KafkaAccessError, check_kafka_access
    from streams.topics import ensure_topics

    settings = load_settings(KafkaSettings)
    try:
        check_kafka_access(settings, timeout_s=settings.tier3_kafka_timeout_s)
    except KafkaAccessError as exc:
        raise UserError(str(exc)) from None
    try:
        result = ensure_topics(settings)
    except StreamsError as exc:
        raise _fail(exc) from None
    table = Table("topic", "partitions", "state")
    for spec in settings.topic_specs():
        table.add_row(spec.name, str(spec.partitions), result[spec.name])
    console.print(table)


def publish_file(
    path: Annotated[Path, typer.Argument(help="JSONL file of Experience records")],
    rate_per_s: Annotated[float, typer.Option(help="publish rate; 0 = as fast as possible")] = 0.0,
) -> None:
    """Publish experiences from a JSONL file through the capture library, as an application would.

    A line is published if ``publish()`` would accept it (``schema_version`` may be left out); the others are
    skipped, each with a warning naming its line, and counted as ``invalid``."""
    from streams.client.capture import Capture, CaptureSettings, publish_jsonl

    if rate_per_s < 0:
        raise UserError(f"--rate-per-s must be >= 0, not {rate_per_s:g}")
    if not path.is_file():
        raise UserError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    settings = load_settings(CaptureSettings)
    check_topics(settings, settings.specs_of(settings.experiences_topic))
    capture = Capture(settings)
    try:
        stats = publish_jsonl(path, rate_per_s=rate_per_s, capture=capture)
    finally:
        capture.close()
    console.print(stats)
    if stats["lines"] and stats["invalid"] == stats["lines"]:
        raise UserError(f"no line of {path} is an Experience (see the warnings above)")


def register(app: typer.Typer) -> None:
    """Add the streams side's commands to a ``tier3`` command line (``tier3/cli.py``)."""
    app.add_typer(topics_app, name="topics")
    app.command("publish")(publish_file)
    app.command("worker")(worker)
    app.command("dlq")(dlq)

