"""``tier3``: the one command-line entry point.

Commands that belong to ``trainer/`` are found through the ``tier3.commands`` entry-point group (each entry
point is ``register(app)``), so ``streams`` never imports ``trainer`` and the two stay independent.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from schemas.settings import KafkaSettings
from streams import broker as broker_mod
from streams.errors import StreamsError

app = typer.Typer(help="tier3: distil a teacher model into a local student from live traffic, on Kafka.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
broker_app = typer.Typer(help="A local single-node Kafka broker (KRaft), no Docker.", no_args_is_help=True)
topics_app = typer.Typer(help="tier3's topics.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
app.add_typer(topics_app, name="topics")
console = Console()


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(1)


@broker_app.command("up")
def broker_up() -> None:
    """Start the local broker (idempotent); wait until it answers."""
    try:
        st = broker_mod.up()
    except StreamsError as exc:
        raise _fail(exc) from None
    console.print(f"Kafka {st.version} is up at [bold]{st.bootstrap}[/] (pid {st.pid})")


@broker_app.command("down")
def broker_down() -> None:
    """Stop the local broker started from this folder (only that process)."""
    stopped = broker_mod.down()
    console.print("broker stopped" if stopped else "no broker started by tier3 is running here")


@broker_app.command("status")
def broker_status() -> None:
    """Bootstrap address, version and topics; exit code 1 when no broker answers."""
    kafka = KafkaSettings()
    st = broker_mod.status(bootstrap=kafka.kafka_bootstrap_servers)
    if not st.running:
        console.print(f"no broker answers at {st.bootstrap} (start one with `tier3 broker up`)")
        raise typer.Exit(1)
    console.print(f"bootstrap: {st.bootstrap}\nversion: {st.version or 'unknown (not started by tier3)'}\n"
                  f"pid: {st.pid or '-'}\ntopics: {', '.join(st.topics) or '(none)'}")


@topics_app.command("create")
def topics_create() -> None:
    """Create every topic (idempotent), with partitions, retention and cleanup policy from settings."""
    from streams.topics import ensure_topics

    settings = KafkaSettings()
    try:
        result = ensure_topics(settings)
    except (StreamsError, Exception) as exc:
        raise _fail(exc) from None
    table = Table("topic", "partitions", "state")
    for spec in settings.topic_specs():
        table.add_row(spec.name, str(spec.partitions), result[spec.name])
    console.print(table)


@app.command("publish")
def publish_file(
    path: Annotated[Path, typer.Argument(help="JSONL file of Experience records")],
    rate_per_s: Annotated[float, typer.Option(help="publish rate; 0 = as fast as possible")] = 0.0,
) -> None:
    """Publish experiences from a JSONL file through the capture library, as an application would."""
    from streams.producer import publish_jsonl

    stats = publish_jsonl(path, rate_per_s=rate_per_s)
    console.print(stats)


def _register_plugins() -> None:
    """Add the commands other packages declare in the ``tier3.commands`` entry-point group."""
    for ep in entry_points(group="tier3.commands"):
        try:
            register = ep.load()
        except Exception as exc:  # a broken plugin must not take the whole CLI down
            console.print(f"[yellow]warning:[/] could not load tier3 command plugin {ep.name}: {exc}")
            continue
        register(app)


def _register_optional(module: str, name: str, attr: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return
    app.command(name)(getattr(mod, attr))


_register_optional("streams.worker_cli", "worker", "worker")
_register_optional("streams.demo", "demo", "demo")
_register_optional("streams.dlq", "dlq", "dlq")
_register_plugins()


def main() -> None:
    try:
        app()
    except StreamsError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
