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
    from schemas.runtime.preflight import UserError, check_topics, load_settings
    from streams.settings import StreamsSettings

    overrides: dict[str, object] = {}
    if web_port is not None:
        overrides["tier3_web_port"] = web_port
    if worker_id is not None:
        overrides["tier3_worker_id"] = worker_id
    if loglevel is not None:
        overrides["tier3_log_level"] = loglevel
    settings = load_settings(StreamsSettings, **overrides)  # an invalid setting: one line each, exit 2
    # the four topics are `tier3 topics create`'s (checked, never created here: a broker would give them its
    # default partition count); the worker's own changelog topics it creates, with the source's partition
    # count. Every topic exists before Faust starts: it will not consume a topic that did not exist at start.
    # refused credentials / TLS / ACLs or missing topics: one line and exit 2, before Faust (which would retry
    # forever); before importing Faust (seconds): a mistake is reported at once
    check_topics(settings)

    import faust

    from streams.app import changelog_spec, create_app
    from streams.errors import StreamsError
    from streams.topics import ensure_topics

    try:
        ensure_topics(settings, [changelog_spec(settings)])
        app, _state = create_app(settings)
    except StreamsError as exc:  # a teacher that cannot be set up (no key, no recorded file, ...)
        raise UserError(str(exc)) from None
    from streams.redaction import install_log_redaction, register_secrets

    register_secrets(settings)
    install_log_redaction()  # the record factory keeps filtering after Faust sets up its own handlers
    faust.Worker(app, loglevel=settings.tier3_log_level.upper()).execute_from_commandline()
