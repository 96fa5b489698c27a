"""Secrets out of error text and log records: every configured secret value (and its base64 and masked forms), and
anything shaped like an API key, becomes ``[REDACTED]``.

Teachers build their error messages from what the server answered; some gateways echo the API key in a 401 / 403
body ("Incorrect API key provided: sk-..."). Those messages go into exceptions, log lines, tracebacks, dead letters
and /status, so they are redacted where they are made (``streams.teachers``), before anything can copy them. Log
records of every logger (httpx's and httpcore's response headers at DEBUG included) are redacted by the one filter
:func:`install_log_redaction` puts on the root logger: every command's logging setup installs it, and so does the
client library when it builds its settings.

The registry and the filter live in :mod:`schemas.runtime.redaction` (the trainer's commands use them too: one
registry per process); this module is the streams side's name for them. Configured secrets are registered by name
(:func:`register_secrets`: ``make_teacher`` and the client library's settings register their secret fields;
:func:`install_log_redaction` the secret environment variables), so registering a setting again replaces its old
value; key-shaped strings are caught by pattern even when they are not ours (a gateway may echo a neighbouring
credential).
"""

from __future__ import annotations

from schemas.runtime.redaction import (
    LOG_FILTER,
    MAX_UNNAMED,
    MIN_SECRET_LEN,
    REDACTED,
    RedactingFilter,
    forget_secrets,
    install_excepthook,
    install_log_redaction,
    is_secret_name,
    redact,
    redact_record,
    register_environ_secrets,
    register_secret,
    register_secrets,
    registered_count,
)

__all__ = ["LOG_FILTER", "MAX_UNNAMED", "MIN_SECRET_LEN", "REDACTED", "RedactingFilter", "forget_secrets",
           "install_excepthook", "install_log_redaction", "is_secret_name", "redact", "redact_record",
           "register_environ_secrets", "register_secret", "register_secrets", "registered_count"]
