"""The ``tier3 broker`` commands: ``up``, ``down``, ``status`` and ``principal`` of the development broker
(:mod:`tier3.devbroker`). ``tier3/cli.py`` adds them to the root command."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from schemas.runtime.preflight import UserError, load_settings
from schemas.settings import KafkaSettings
from tier3.devbroker import acls, server

app = typer.Typer(help="A local single-node Kafka broker (KRaft), no Docker.", no_args_is_help=True)
console = Console()


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(1)


def _principal_names(trainer_group: str) -> acls.PrincipalNames:
    """The names the ACLs use, from this environment: TIER3_TOPIC_PREFIX, TIER3_APP_ID, TIER3_TRAINER_GROUP."""
    from streams.settings import StreamsSettings

    streams = load_settings(StreamsSettings)
    return acls.PrincipalNames(streams, streams.faust_app_id, trainer_group)


TrainerGroupOption = Annotated[str, typer.Option(envvar="TIER3_TRAINER_GROUP", show_envvar=True,
                                                 help="the trainer's consumer group (its ACLs name it)")]


@app.command("up")
def broker_up(
    secure: Annotated[bool, typer.Option("--secure", help="SASL_SSL (SCRAM-SHA-512) with a CA made at the first "
                                         "start, and ACLs (TIER3_BROKER_SECURE); needs its own TIER3_BROKER_DIR "
                                         "if a plain broker was started there")] = False,
    trainer_group: TrainerGroupOption = acls.DEFAULT_TRAINER_GROUP,
) -> None:
    """Start the local broker (idempotent); wait until it answers. Secured, it also makes one principal per
    service (app, worker, trainer, watcher) with only the ACLs it needs (`tier3 broker principal`)."""
    s = server.BrokerSettings()
    if secure:
        s = s.model_copy(update={"tier3_broker_secure": True})
    names = _principal_names(trainer_group) if s.tier3_broker_secure else None
    try:
        st = server.up(s)
        if names is not None:
            acls.ensure_principals(s, names)
    except server.BrokerError as exc:
        raise _fail(exc) from None
    console.print(f"Kafka {st.version} is up at [bold]{st.bootstrap}[/] (pid {st.pid})")
    if names is not None:
        folder = s.tier3_broker_dir.resolve()
        # the files hold passwords (mode 0600); their contents are never printed
        console.print(f"secured: SASL_SSL, SCRAM-SHA-512, ACLs. Client settings of the super user `admin` "
                      f"(`tier3 topics create`, operators): {folder / 'client.env'}; of each service's principal "
                      f"(`tier3 broker principal SERVICE` shows its ACLs): "
                      + "; ".join(f"{svc}: {folder / (svc + '.env')}" for svc in acls.SERVICES)
                      + f". The application's principal `app` may only write {names.topics.experiences_topic} "
                      f"and read {names.topics.training_runs_topic}. Load one with: set -a; . "
                      f"{folder / 'worker.env'}; set +a")


@app.command("principal")
def broker_principal(
    service: Annotated[str, typer.Argument(help=f"one of {', '.join(acls.SERVICES)}")],
    user: Annotated[str | None, typer.Option(help="the SCRAM user's name (default: the service's)")] = None,
    trainer_group: TrainerGroupOption = acls.DEFAULT_TRAINER_GROUP,
) -> None:
    """On the secured local broker: (re)make a service's principal with only the ACLs it needs, for this
    TIER3_TOPIC_PREFIX, TIER3_APP_ID and trainer group (idempotent; ACLs are added, never removed). Its client
    settings, password included, go to <broker dir>/<user>.env (mode 0600), never to the terminal."""
    if service not in acls.SERVICES:
        raise UserError(f"no such service: {service!r} (one of {', '.join(acls.SERVICES)})")
    s = server.BrokerSettings()
    s = s.model_copy(update={"tier3_broker_secure": True})
    try:
        names = _principal_names(trainer_group)
        acls.ensure_principal(s, service, names, user=user)
        grants = acls.acl_table(names)[service]
    except server.BrokerError as exc:
        raise _fail(exc) from None
    table = Table("allowed", "on", "why", title=f"ACLs of User:{user or service} (*: every name with this prefix)")
    for g in grants:
        table.add_row("+".join(g.operations), g.target, g.why)
    console.print(table)
    console.print(f"client settings: {s.tier3_broker_dir.resolve() / ((user or service) + '.env')}")


@app.command("down")
def broker_down() -> None:
    """Stop the local broker started from this folder (only that process)."""
    stopped = server.down()
    console.print("broker stopped" if stopped else "no broker started by tier3 is running here")


@app.command("status")
def broker_status() -> None:
    """Bootstrap address, version and topics; exit code 1 when no broker answers."""
    kafka = load_settings(KafkaSettings)
    st = server.status(bootstrap=kafka.kafka_bootstrap_servers, conf=kafka.client_config())
    if not st.running:
        console.print(f"no broker answers at {st.bootstrap} (start one with `tier3 broker up`)")
        raise typer.Exit(1)
    console.print(f"bootstrap: {st.bootstrap}\nversion: {st.version or 'unknown (not started by tier3)'}\n"
                  f"pid: {st.pid or '-'}\ntopics: {', '.join(st.topics) or '(none)'}")


def register(root: typer.Typer) -> None:
    """Add ``tier3 broker`` to a ``tier3`` command line (``tier3/cli.py``)."""
    root.add_typer(app, name="broker")
