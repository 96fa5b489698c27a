"""``tier3 worker``: run the Faust worker (sampling, enrichment, count table, /status, /metrics)."""

from __future__ import annotations

from typing import Annotated

import typer


def worker(
    web_port: Annotated[int | None, typer.Option(help="web port (overrides TIER3_WEB_PORT); one per worker "
                                                     "on a host")] = None,
    worker_id: Annotated[str | None, typer.Option(help="name in /status and logs (TIER3_WORKER_ID)")] = None,
    loglevel: Annotated[str | None, typer.Option(help="log level (TIER3_LOG_LEVEL)")] = None,
) -> None:
    """Run the streams worker: sample experiences, enrich them with the teacher, write traces / dead letters."""
    import faust
    from pydantic import ValidationError

    from schemas.kafka_access import ACCESS_EXIT_CODE, KafkaAccessError, check_kafka_access
    from streams import router
    from streams.app import APP_HOOKS, changelog_spec, create_app
    from streams.errors import StreamsError
    from streams.settings import StreamsSettings
    from streams.topics import ensure_topics

    overrides: dict[str, object] = {}
    if web_port is not None:
        overrides["tier3_web_port"] = web_port
    if worker_id is not None:
        overrides["tier3_worker_id"] = worker_id
    if loglevel is not None:
        overrides["tier3_log_level"] = loglevel
    try:
        settings = StreamsSettings(**overrides)  # type: ignore[arg-type]
        # refused credentials / TLS / ACLs: one line and exit 2, before Faust (which would retry forever)
        check_kafka_access(settings, [s.name for s in settings.topic_specs()])
        # every topic, the table's changelog included, exists before Faust starts (it will not consume a
        # topic that did not exist at start, and a changelog must have the source's partition count)
        ensure_topics(settings, [*settings.topic_specs(), changelog_spec(settings)])
        if router.install_router_stats not in APP_HOOKS:
            APP_HOOKS.append(router.install_router_stats)  # per-arm table and the /status router block
        app, _state = create_app(settings)
    except ValidationError as exc:
        typer.echo(f"error: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    except KafkaAccessError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ACCESS_EXIT_CODE) from None
    except StreamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    faust.Worker(app, loglevel=settings.tier3_log_level.upper()).execute_from_commandline()
