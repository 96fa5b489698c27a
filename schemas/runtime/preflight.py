"""What every command checks before it starts, and the one line a user's mistake gets (exit code 2).

- **Settings.** An invalid setting is reported as ``error: invalid setting NAME: what is wrong``, one line per
  setting, never with its value: pydantic's own message prints every value it read (``input_value=``), API keys
  and passwords included.
- **Security.** The TLS / SASL settings are checked before any client is made (librdkafka refuses to create one
  with a CA file it cannot load, an unknown SASL mechanism or SASL without user name and password, and that
  would end in a traceback): one line per mistake, naming the setting (:func:`security_problems`). A client
  that librdkafka refuses to create for a reason not anticipated here gets one line too (:func:`run_cli`).
- **Kafka.** A broker answers within ``TIER3_KAFKA_TIMEOUT_S`` (else one line: the bootstrap servers tried, why,
  and what to do), and the command's topics exist with the partition counts of the settings. A missing topic is
  never created on the side: one auto-created by a client's request gets the broker's default partition count
  and silently breaks the co-partitioning of experiences and traces (docs/design.md, "Topics").
- **Mistakes.** :class:`UserError` is what a command raises for anything the user can fix (an argument, a file,
  a setting, no broker, missing topics); :func:`run_cli` prints it as one line and exits with code 2, without a
  traceback. A crash (a bug) still ends in a traceback, exit code 1.

Used by ``streams/`` and ``trainer/`` alike; like the rest of ``schemas/`` it imports nothing of theirs.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from confluent_kafka.admin import ClusterMetadata
    from pydantic import ValidationError

    from schemas.settings import KafkaSettings, TopicSpec

#: exit code of a command stopped by a user's mistake (click's own usage errors use it too)
EXIT_USAGE = 2

S = TypeVar("S")

# the probe's own client: its errors are collected and summarised in one line, its log is not shown
_QUIET = logging.getLogger("tier3.kafka.probe")
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())


class UserError(Exception):
    """A mistake the user can fix. ``str(exc)`` is the whole message: one line per problem, no traceback."""

    exit_code = EXIT_USAGE


class KafkaUnreachable(UserError):
    """No broker answered at the bootstrap servers (down, wrong address, or refused the credentials)."""


class TopicsNotReady(UserError):
    """A topic the command needs is missing, or has another partition count than the settings say."""


# ----------------------------------------------------------------------------------------------- settings


def _setting_name(loc: tuple[int | str, ...]) -> str:
    """A settings field is named after its environment variable: ``tier3_sample_rate`` -> TIER3_SAMPLE_RATE."""
    if not loc:
        return ""
    head, *rest = (str(p) for p in loc)
    return ".".join([head.upper(), *rest])


def validation_problems(exc: ValidationError) -> list[str]:
    """One line per invalid field: its name and what is wrong. Never the value (it may be a secret)."""
    lines: list[str] = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        name = _setting_name(tuple(err["loc"]))
        lines.append(f"invalid setting {name}: {msg}" if name else f"invalid settings: {msg}")
    return lines or ["invalid settings"]


def _settings_exceptions() -> tuple[type[Exception], ...]:
    """pydantic's ValidationError and pydantic-settings' SettingsError, of those already imported: nothing else can
    raise them. This module is imported by every command, ``tier3 --help`` included: it imports neither."""
    out: list[type[Exception]] = []
    core = sys.modules.get("pydantic_core")
    if core is not None:
        out.append(core.ValidationError)  # pydantic.ValidationError is this class
    ps = sys.modules.get("pydantic_settings")
    if ps is not None:
        out.append(ps.SettingsError)
    return tuple(out)


def settings_error(exc: Exception) -> UserError:
    """The :class:`UserError` for a settings class that refused the environment (no value in the message)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return UserError("\n".join(validation_problems(exc)))
    # pydantic-settings' SettingsError names the field and the source, not the value
    return UserError(f"invalid settings: {exc}")


def load_settings(cls: Callable[..., S], **overrides: Any) -> S:
    """``cls(**overrides)`` (the rest from the environment), or a :class:`UserError` naming each bad setting
    (for Kafka settings, the TLS / SASL ones too: :func:`check_security`)."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from schemas.settings import KafkaSettings

    try:
        settings = cls(**overrides)
    except (ValidationError, SettingsError) as exc:
        raise settings_error(exc) from None
    if isinstance(settings, KafkaSettings):
        check_security(settings)
    return settings


# ----------------------------------------------------------------------------------------------- TLS / SASL

#: the SASL mechanisms librdkafka knows (case matters: it refuses ``scram-sha-512``)
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")
#: mechanisms that sign in with KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD
_USER_PASSWORD = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_TLS_FILES = (("kafka_ssl_ca_location", "CA certificate"), ("kafka_ssl_certificate_location", "client certificate"),
              ("kafka_ssl_key_location", "client key"))


def _file_problem(path: str) -> str | None:
    """Why librdkafka could not read the file (or folder of certificates) at ``path``; None when it can."""
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return None if os.access(path, os.R_OK | os.X_OK) else "the folder cannot be read (permissions)"
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        return f"the file cannot be read ({exc.strerror or 'permissions'})"
    if b"-----BEGIN " not in head:  # librdkafka loads PEM files only
        return "not a PEM file (no -----BEGIN line)"
    return None


def security_problems(settings: KafkaSettings) -> list[str]:
    """One line per TLS / SASL setting mistake (never a value: a path is shown, a secret never): files that do
    not exist or cannot be read, a certificate without its key, an unknown SASL mechanism, SASL without one or
    without user name / password. The settings librdkafka ignores for the protocol in use are not checked."""
    protocol = settings.kafka_security_protocol
    lines: list[str] = []
    if protocol in ("SSL", "SASL_SSL"):
        for field, what in _TLS_FILES:
            path = getattr(settings, field)
            if path is None or (field == "kafka_ssl_ca_location" and path == "probe"):
                continue
            problem = _file_problem(path)
            if problem:
                lines.append(f"invalid setting {field.upper()}: {problem} at {path} (the {what} for "
                             f"KAFKA_SECURITY_PROTOCOL={protocol})")
        if (settings.kafka_ssl_certificate_location is None) != (settings.kafka_ssl_key_location is None):
            lines.append("invalid settings: KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION go together "
                         "(mutual TLS): set both or neither")
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        mechanism = settings.kafka_sasl_mechanism
        if not mechanism:
            lines.append(f"invalid setting KAFKA_SASL_MECHANISM: required with KAFKA_SECURITY_PROTOCOL={protocol}; "
                         f"one of {', '.join(SASL_MECHANISMS)}")
        elif mechanism not in SASL_MECHANISMS:
            hint = next((m for m in SASL_MECHANISMS if m == mechanism.strip().upper()), None)
            lines.append("invalid setting KAFKA_SASL_MECHANISM: not a SASL mechanism librdkafka knows; "
                         + (f"did you mean {hint}? (case matters)" if hint else
                            f"one of {', '.join(SASL_MECHANISMS)}"))
        elif mechanism in _USER_PASSWORD:
            for field in ("kafka_sasl_username", "kafka_sasl_password"):
                value = getattr(settings, field)
                if value is None or not (value.get_secret_value() if hasattr(value, "get_secret_value") else value):
                    lines.append(f"invalid setting {field.upper()}: required with KAFKA_SASL_MECHANISM={mechanism}")
    return lines


def check_security(settings: KafkaSettings) -> None:
    """:class:`UserError` listing :func:`security_problems`, if any: before any Kafka client is made."""
    lines = security_problems(settings)
    if lines:
        raise UserError("\n".join(lines))


def client_refused(exc: BaseException) -> UserError | None:
    """The one line for a Kafka client librdkafka refused to create (its configuration), else None."""
    from confluent_kafka import KafkaError, KafkaException

    if not isinstance(exc, KafkaException) or not exc.args or not isinstance(exc.args[0], KafkaError):
        return None
    err = exc.args[0]
    text = err.str()
    if err.code() != KafkaError._INVALID_ARG or not text.startswith("Failed to create"):
        return None
    reason = re.sub(r"^Failed to create [\w ]+?: ", "", text)
    return UserError(f"invalid Kafka client settings: {reason} (check KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_* and "
                     "KAFKA_SSL_*)")


# ----------------------------------------------------------------------------------------------- Kafka


def _reason(errors: list[Any]) -> str:
    """The most telling client error, without librdkafka's prefix and timing: "Connection refused", ..."""
    for err in errors:
        if err.name() != "_ALL_BROKERS_DOWN":
            text = re.sub(r"\s*\(after \d+ms in state \w+\)", "", err.str())
            return re.sub(r"^\S+/bootstrap: ", "", text)
    return "no answer"


def kafka_metadata(settings: KafkaSettings, timeout_s: float | None = None, *, waited_s: float | None = None
                   ) -> ClusterMetadata:
    """The cluster's metadata, or :class:`KafkaUnreachable` within ``timeout_s`` (default TIER3_KAFKA_TIMEOUT_S).

    The message names the bootstrap servers it tried, librdkafka's reason (connection refused, name not
    resolved, authentication failed) and what to do. Nothing else is printed: the probe's client log is muted.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    check_security(settings)
    timeout = settings.tier3_kafka_timeout_s if timeout_s is None else timeout_s
    errors: list[Any] = []
    conf: dict[str, Any] = {**settings.client_config(), "logger": _QUIET, "error_cb": errors.append}
    admin = AdminClient(conf)
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException:
        admin.poll(0)  # serves error_cb: why the brokers did not answer
        reason = _reason(errors)
        if any(e.name() in ("_AUTHENTICATION", "_SSL") for e in errors):
            hint = "check KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_* and KAFKA_SSL_* (the credentials or certificates)"
        else:
            hint = ("start the local broker with `tier3 broker up`, or set KAFKA_BOOTSTRAP_SERVERS to your "
                    "cluster's host:port")
        waited = timeout if waited_s is None else waited_s  # a caller that already waited says how long
        raise KafkaUnreachable(f"no Kafka broker answered at {settings.kafka_bootstrap_servers} within "
                               f"{waited:g} s ({reason}): {hint}") from None


def check_topics(settings: KafkaSettings, specs: Iterable[TopicSpec] | None = None, *,
                 timeout_s: float | None = None) -> ClusterMetadata:
    """A broker answers and every topic of ``specs`` (default: all four) exists with its partition count.

    Raises :class:`KafkaUnreachable` or :class:`TopicsNotReady` (saying to run ``tier3 topics create``); creates
    nothing. Returns the metadata it read.
    """
    from schemas.kafka.access import KafkaAccessError, check_kafka_access

    check_security(settings)
    wanted = list(specs if specs is not None else settings.topic_specs())
    timeout = settings.tier3_kafka_timeout_s if timeout_s is None else timeout_s
    # refused credentials, TLS or ACLs first: one line naming the user or topic (a topic the principal may not
    # see would otherwise read as missing), instead of librdkafka's endless reconnects
    try:
        answered = check_kafka_access(settings, [s.name for s in wanted], timeout_s=timeout)
    except KafkaAccessError as exc:
        raise UserError(str(exc)) from None
    md = kafka_metadata(settings, timeout if answered else 1.0, waited_s=None if answered else timeout)
    missing = [s.name for s in wanted if s.name not in md.topics or md.topics[s.name].error is not None]
    if missing:
        raise TopicsNotReady(f"topic{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                             f"{'do' if len(missing) > 1 else 'does'} not exist on "
                             f"{settings.kafka_bootstrap_servers}: run `tier3 topics create` (with the same "
                             "TIER3_TOPIC_PREFIX and partition settings as this command)")
    wrong = [(s, len(md.topics[s.name].partitions)) for s in wanted if len(md.topics[s.name].partitions)
             != s.partitions]
    if wrong:
        desc = ", ".join(f"{s.name} has {have} partitions, the settings say {s.partitions}" for s, have in wrong)
        raise TopicsNotReady(f"{desc}: experiences and traces must be co-partitioned as configured. Use another "
                             "TIER3_TOPIC_PREFIX and `tier3 topics create`, or fix TIER3_PARTITIONS / "
                             "TIER3_DEAD_LETTER_PARTITIONS")
    return md


# ----------------------------------------------------------------------------------------------- the CLI


def print_error(message: str) -> None:
    """``error: <line>`` on stderr for each line of ``message``."""
    for line in message.splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr, flush=True)


def run_cli(app: Callable[[], Any]) -> None:
    """Run a Typer/Click app; a :class:`UserError` (or a settings class refusing the environment) anywhere in
    a command becomes its one line on stderr and exit code 2, not a traceback."""
    try:
        app()
    except UserError as exc:
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except Exception as exc:
        if isinstance(exc, _settings_exceptions()):
            print_error(str(settings_error(exc)))
            sys.exit(EXIT_USAGE)
        refused = client_refused(exc)  # a client librdkafka would not create: its settings, not a bug
        if refused is None:
            raise
        print_error(str(refused))
        sys.exit(EXIT_USAGE)


__all__ = ["EXIT_USAGE", "SASL_MECHANISMS", "KafkaUnreachable", "TopicsNotReady", "UserError", "check_security",
           "check_topics", "client_refused", "kafka_metadata", "load_settings", "print_error", "run_cli",
           "security_problems", "settings_error", "validation_problems"]
