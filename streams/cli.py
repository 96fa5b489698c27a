"""The streams side's commands: ``broker``, ``topics``, ``publish``, ``worker``, ``dlq``.

:func:`register` adds them to the root ``tier3`` command (``tier3/cli.py``, the composition root, which adds the
trainer's too), so ``streams`` never imports ``trainer``. ``python -m streams.cli`` runs them alone.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from schemas.preflight import UserError, check_topics, load_settings, run_cli
from schemas.settings import KafkaSettings
from streams import broker as broker_mod
from streams.errors import StreamsError
from streams.redaction import install_excepthook, install_log_redaction, redact

app = typer.Typer(help="tier3's streams commands (the broker, topics, capture, the worker, dead letters); "
                  "`tier3` has these and the trainer's.", no_args_is_help=True, pretty_exceptions_enable=False)
broker_app = typer.Typer(help="A local single-node Kafka broker (KRaft), no Docker.", no_args_is_help=True)
topics_app = typer.Typer(help="tier3's topics.", no_args_is_help=True)
console = Console()


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(1)


def _principal_names(trainer_group: str) -> broker_mod.PrincipalNames:
    """The names the ACLs use, from this environment: TIER3_TOPIC_PREFIX, TIER3_APP_ID, TIER3_TRAINER_GROUP."""
    from streams.settings import StreamsSettings

    streams = load_settings(StreamsSettings)
    return broker_mod.PrincipalNames(streams, streams.faust_app_id, trainer_group)


TrainerGroupOption = Annotated[str, typer.Option(envvar="TIER3_TRAINER_GROUP", show_envvar=True,
                                                 help="the trainer's consumer group (its ACLs name it)")]


@broker_app.command("up")
def broker_up(
    secure: Annotated[bool, typer.Option("--secure", help="SASL_SSL (SCRAM-SHA-512) with a CA made at the first "
                                         "start, and ACLs (TIER3_BROKER_SECURE); needs its own TIER3_BROKER_DIR "
                                         "if a plain broker was started there")] = False,
    trainer_group: TrainerGroupOption = broker_mod.DEFAULT_TRAINER_GROUP,
) -> None:
    """Start the local broker (idempotent); wait until it answers. Secured, it also makes one principal per
    service (app, worker, trainer, watcher) with only the ACLs it needs (`tier3 broker principal`)."""
    s = broker_mod.BrokerSettings()
    if secure:
        s = s.model_copy(update={"tier3_broker_secure": True})
    names = _principal_names(trainer_group) if s.tier3_broker_secure else None
    try:
        st = broker_mod.up(s)
        if names is not None:
            broker_mod.ensure_principals(s, names)
    except StreamsError as exc:
        raise _fail(exc) from None
    console.print(f"Kafka {st.version} is up at [bold]{st.bootstrap}[/] (pid {st.pid})")
    if names is not None:
        folder = s.tier3_broker_dir.resolve()
        # the files hold passwords (mode 0600); their contents are never printed
        console.print(f"secured: SASL_SSL, SCRAM-SHA-512, ACLs. Client settings of the super user `admin` "
                      f"(`tier3 topics create`, operators): {folder / 'client.env'}; of each service's principal "
                      f"(`tier3 broker principal SERVICE` shows its ACLs): "
                      + "; ".join(f"{svc}: {folder / (svc + '.env')}" for svc in broker_mod.SERVICES)
                      + f". The application's principal `app` may only write {names.topics.experiences_topic} "
                      f"and read {names.topics.training_runs_topic}. Load one with: set -a; . "
                      f"{folder / 'worker.env'}; set +a")


@broker_app.command("principal")
def broker_principal(
    service: Annotated[str, typer.Argument(help=f"one of {', '.join(broker_mod.SERVICES)}")],
    user: Annotated[str | None, typer.Option(help="the SCRAM user's name (default: the service's)")] = None,
    trainer_group: TrainerGroupOption = broker_mod.DEFAULT_TRAINER_GROUP,
) -> None:
    """On the secured local broker: (re)make a service's principal with only the ACLs it needs, for this
    TIER3_TOPIC_PREFIX, TIER3_APP_ID and trainer group (idempotent; ACLs are added, never removed). Its client
    settings, password included, go to <broker dir>/<user>.env (mode 0600), never to the terminal."""
    if service not in broker_mod.SERVICES:
        raise UserError(f"no such service: {service!r} (one of {', '.join(broker_mod.SERVICES)})")
    s = broker_mod.BrokerSettings()
    s = s.model_copy(update={"tier3_broker_secure": True})
    try:
        names = _principal_names(trainer_group)
        broker_mod.ensure_principal(s, service, names, user=user)
        grants = broker_mod.acl_table(names)[service]
    except StreamsError as exc:
        raise _fail(exc) from None
    table = Table("allowed", "on", "why", title=f"ACLs of User:{user or service} (*: every name with this prefix)")
    for g in grants:
        table.add_row("+".join(g.operations), g.target, g.why)
    console.print(table)
    console.print(f"client settings: {s.tier3_broker_dir.resolve() / ((user or service) + '.env')}")


@broker_app.command("down")
def broker_down() -> None:
    """Stop the local broker started from this folder (only that process)."""
    stopped = broker_mod.down()
    console.print("broker stopped" if stopped else "no broker started by tier3 is running here")


@broker_app.command("status")
def broker_status() -> None:
    """Bootstrap address, version and topics; exit code 1 when no broker answers."""
    kafka = load_settings(KafkaSettings)
    st = broker_mod.status(bootstrap=kafka.kafka_bootstrap_servers, conf=kafka.client_config())
    if not st.running:
        console.print(f"no broker answers at {st.bootstrap} (start one with `tier3 broker up`)")
        raise typer.Exit(1)
    console.print(f"bootstrap: {st.bootstrap}\nversion: {st.version or 'unknown (not started by tier3)'}\n"
                  f"pid: {st.pid or '-'}\ntopics: {', '.join(st.topics) or '(none)'}")


@topics_app.command("create")
def topics_create() -> None:
    """Create every topic (docs/design.md, "Topics"), idempotently, with partitions, retention and cleanup
    policy from settings. Every other command only checks them."""
    from schemas.kafka_access import KafkaAccessError, check_kafka_access
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


def _register_optional(app: typer.Typer, module: str, name: str, attr: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return
    app.command(name)(getattr(mod, attr))


def register(app: typer.Typer) -> None:
    """Add the streams side's commands to a ``tier3`` command line (``tier3/cli.py``)."""
    app.add_typer(broker_app, name="broker")
    app.add_typer(topics_app, name="topics")
    app.command("publish")(publish_file)
    _register_optional(app, "streams.worker_cli", "worker", "worker")
    _register_optional(app, "streams.dlq", "dlq", "dlq")


register(app)


def main() -> None:
    install_log_redaction()  # no secret in any log record, whatever logger or handler
    install_excepthook()
    try:
        run_cli(app)  # a user's mistake (settings, arguments, no broker, missing topics): one line, exit 2
    except StreamsError as exc:
        console.print(f"[bold red]error:[/] {redact(str(exc))}")
        sys.exit(1)


if __name__ == "__main__":
    main()
