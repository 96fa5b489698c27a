"""Secrets out of every text a tier3 process shows: error messages, log records, tracebacks.

Shared by ``streams/`` (re-exported by :mod:`streams.redaction`) and ``trainer/``, so one registry and one log
filter serve a whole process, whichever side's commands run in it.

What is a secret:

- the value of every setting whose *name* says so (:func:`is_secret_name`: ``..._PASSWORD``, ``..._API_KEY``,
  ``..._TOKEN``, ``..._SECRET``...; the settings classes make each of them a ``SecretStr``), read from the
  environment by :func:`register_environ_secrets` and from a settings object by :func:`register_secrets`;
- anything given to :func:`register_secret`.

The registry is bounded: a named secret is kept under its setting's name (registering the name again replaces the
value, ``None`` removes it), unnamed ones in a small LRU (:data:`MAX_UNNAMED`).

What is redacted (:func:`redact`), for each registered value:

- the value itself, and its URL-encoded form;
- its base64 forms, standard and URL-safe, with or without padding, also inside a longer base64 text (an HTTP
  Basic ``Authorization`` header): the whole base64 word around it goes;
- masked forms that keep a prefix and a suffix, as dashboards and SDKs print keys: a word that starts with at
  least the value's first 4 characters, then ``…`` / ``...`` / ``*``, then ends with the value's last
  characters (``sk-CANAR…7890``, ``sk-CA...90``, ``sk-C****7890``);

and, registered or not, anything shaped like an API key (``sk-...``, ``Bearer ...``, ``api_key=...``): a gateway
may echo a neighbouring credential.

Log records: :func:`install_log_redaction` puts one :class:`RedactingFilter` on the root logger. A filter on a
logger sees only the records logged *on* it, not the ones propagated from ``httpx``, ``openai``, ``aiokafka``...,
so the same filter is also put on every root handler and run by the log record factory: every record of every
logger (third-party ones included), whatever handler a command adds later, has its message (args rendered in),
exception text / traceback and stack redacted before any handler sees it.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import sys
import threading
import traceback
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydantic is not imported here: every command installs the redaction, `tier3 --help` too
    from pydantic import BaseModel, SecretStr

REDACTED = "[REDACTED]"
#: shorter configured values are not redacted by value (they would blank common words); patterns still apply
MIN_SECRET_LEN = 6
#: unnamed registrations kept (the oldest is forgotten first); named ones are one per setting name
MAX_UNNAMED = 64

_KEY_PATTERNS = re.compile(
    r"(?<![A-Za-z0-9_\-])(?:"
    r"sk-ant-[A-Za-z0-9_\-]{6,}"  # Anthropic
    r"|sk-[A-Za-z0-9_\-]{12,}"  # OpenAI (sk-, sk-proj-, sk-svcacct-) and OpenAI-compatible gateways
    r"|(?:gsk|xai|hf|ghp|gho|ghs|github_pat|glpat|pk|rk)[_\-][A-Za-z0-9_\-]{16,}"  # Groq, xAI, HF, GitHub...
    r"|AIza[0-9A-Za-z_\-]{30,}"  # Google
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"  # an Authorization header's value
    r"|(?i:(?:api[_-]?key|x-api-key|authorization|access[_-]?token|password|secret)[\"']?\s*[:=]\s*[\"']?)"
    r"(?:(?i:bearer|basic)\s+)?[^\s\"',;}{]{6,}"  # key=value / "key": "value"
    r")"
)
_LABELLED = re.compile(r"(?i)^((?:api[_-]?key|x-api-key|authorization|access[_-]?token|password|secret)[\"']?\s*"
                       r"[:=]\s*[\"']?)")
#: a setting (environment variable) whose name says it holds a secret
_SECRET_NAME = re.compile(r"(?i)(?:^|_)(?:password|passwd|passphrase|api_?key|secret|token|credentials?)(?:_|$)")
#: a masked key: a head, an ellipsis / dots / stars, a tail (checked against each secret in :func:`_masked`)
_MASKED = re.compile(r"(?<![A-Za-z0-9_\-])([A-Za-z0-9_\-+/]{4,})(?:\u2026|\.{2,}|\*+)([A-Za-z0-9_\-+/=]{2,})"
                     r"(?![A-Za-z0-9_\-])")
_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_")

_named: dict[str, str] = {}
_unnamed: OrderedDict[str, None] = OrderedDict()
_lock = threading.Lock()
_version = 0
_cache: tuple[int, _Matcher] | None = None


def is_secret_name(name: str) -> bool:
    """Whether a setting named ``name`` holds a secret (``KAFKA_SASL_PASSWORD``, ``TIER3_STUDENT_API_KEY``,
    ``HF_TOKEN``; not ``TIER3_TEACHER_MAX_TOKENS``)."""
    return _SECRET_NAME.search(name) is not None


def register_secret(value: str | SecretStr | None, name: str | None = None) -> None:
    """Redact ``value`` from every later :func:`redact` call (values shorter than MIN_SECRET_LEN are ignored).

    With ``name`` (a setting's name), the value replaces whatever that name held (``None`` forgets it); without,
    it joins the bounded set of unnamed secrets."""
    global _version
    if _is_secret_str(value):
        value = value.get_secret_value()  # type: ignore[union-attr]
    if value is not None and not isinstance(value, str):
        value = str(value)
    usable = bool(value) and len(value or "") >= MIN_SECRET_LEN
    with _lock:
        if name is not None:
            key = name.upper()
            if not usable:
                if _named.pop(key, None) is not None:
                    _version += 1
                return
            assert value is not None
            if _named.get(key) != value:
                _named[key] = value
                _version += 1
        elif usable:
            assert value is not None
            if value in _unnamed:
                _unnamed.move_to_end(value)
                return
            _unnamed[value] = None
            while len(_unnamed) > MAX_UNNAMED:
                _unnamed.popitem(last=False)
            _version += 1


def _is_secret_str(value: Any) -> bool:
    """A pydantic ``SecretStr`` (there is none unless pydantic's types are imported already)."""
    types = sys.modules.get("pydantic.types")
    return types is not None and isinstance(value, types.SecretStr)


def register_secrets(settings: BaseModel) -> None:
    """Register every secret field of ``settings`` (``SecretStr`` ones, and any whose name says it is secret)
    under its setting's name, replacing the value that name held."""
    from pydantic import SecretStr

    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if isinstance(value, SecretStr) or (is_secret_name(name) and isinstance(value, str)):
            register_secret(value, name=name)  # an unset one (None) leaves what the name held


def register_environ_secrets(environ: Mapping[str, str] | None = None) -> None:
    """Register the value of every environment variable whose name says it is secret, under that name."""
    env = os.environ if environ is None else environ
    for name, value in list(env.items()):
        if is_secret_name(name):
            register_secret(value, name=name)


def registered_count() -> int:
    """How many secrets are registered (named and unnamed)."""
    with _lock:
        return len(_named) + len(_unnamed)


def forget_secrets() -> None:
    """Empty the registry (tests)."""
    global _version
    with _lock:
        _named.clear()
        _unnamed.clear()
        _version += 1


# ----------------------------------------------------------------------------------------------- matching


def _b64_cores(value: bytes) -> list[str]:
    """The part of any base64 text that encodes ``value`` which depends only on ``value``, for each of the three
    alignments ``value`` can have in a longer text (alignment 0: the value encoded alone)."""
    cores = []
    for shift in range(3):
        if shift and len(value) < 12:  # a short core of an unaligned value could match an unrelated word
            continue
        enc = base64.b64encode(b"\0" * shift + value).decode().rstrip("=")
        skip = (0, 2, 3)[shift]  # characters that depend on the bytes before the value
        total = shift + len(value)
        end = len(enc) - (1 if total % 3 else 0)  # the last character depends on the bytes after it
        core = enc[skip:end]
        if len(core) >= 6:
            cores.append(core)
    return cores


class _Matcher:
    def __init__(self, values: Iterable[str]) -> None:
        self.values = sorted(set(values), key=len, reverse=True)
        literal: set[str] = set()
        self.b64: set[str] = set()
        for v in self.values:
            literal.add(v)
            quoted = urllib.parse.quote(v, safe="")
            if quoted != v:
                literal.add(quoted)
            for core in _b64_cores(v.encode()):
                for form in (core, core.replace("+", "-").replace("/", "_")):
                    if form not in literal:
                        self.b64.add(form)
        alts = sorted(literal | self.b64, key=len, reverse=True)  # longest first: a form that contains another
        self.pattern = re.compile("|".join(re.escape(a) for a in alts)) if alts else None

    def sub(self, text: str) -> str:
        if self.pattern is None:
            return text
        spans: list[tuple[int, int]] = []
        for m in self.pattern.finditer(text):
            start, end = m.span()
            if m.group(0) in self.b64:  # the whole base64 word that holds it, padding included
                while start > 0 and text[start - 1] in _B64_CHARS:
                    start -= 1
                while end < len(text) and text[end] in _B64_CHARS:
                    end += 1
                while end < len(text) and text[end] == "=":
                    end += 1
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
            else:
                spans.append((start, end))
        if not spans:
            text_out = text
        else:
            parts, last = [], 0
            for start, end in spans:
                parts += [text[last:start], REDACTED]
                last = end
            parts.append(text[last:])
            text_out = "".join(parts)
        return _MASKED.sub(self._masked, text_out) if self.values else text_out

    def _masked(self, m: re.Match[str]) -> str:
        head, tail = m.group(1), m.group(2)
        for v in self.values:
            if (v.startswith(head) and v.endswith(tail) and len(head) < len(v) and len(tail) < len(v)
                    and (len(tail) >= 4 or len(head) + len(tail) >= 7)):
                return REDACTED
        return m.group(0)


def _matcher(extra: tuple[str, ...]) -> _Matcher:
    global _cache
    with _lock:
        version, values = _version, [*_named.values(), *_unnamed]
        cached = _cache
    extra_values = [v for v in extra if v and len(v) >= MIN_SECRET_LEN]
    if not extra_values and cached is not None and cached[0] == version:
        return cached[1]
    matcher = _Matcher([*values, *extra_values])
    if not extra_values:
        with _lock:
            _cache = (version, matcher)
    return matcher


def redact(text: str, extra: tuple[str, ...] = ()) -> str:
    """``text`` with every registered secret (and its encoded and masked forms), every value in ``extra`` and
    every key-shaped string replaced by ``[REDACTED]``."""
    return _KEY_PATTERNS.sub(_replace, _matcher(extra).sub(text))


def _replace(m: re.Match[str]) -> str:
    label = _LABELLED.match(m.group(0))  # keep "api_key=" so the message still says what was there
    return (label.group(1) if label else "") + REDACTED


# ----------------------------------------------------------------------------------------------- logging


class RedactingFilter(logging.Filter):
    """Redacts a record in place and lets it through: its message with the args rendered in (args dropped), its
    exception text (the traceback, rendered here; ``exc_info`` dropped so that no handler renders it again from
    the exception) and its stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_FORMATTER = logging.Formatter()


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    if getattr(record, "tier3_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # the handler would print the args to say so: never the args
        message = f"{record.msg!s} (unformattable log arguments dropped)"
    record.msg, record.args = redact(message), ()  # () as a call without args has (mode wraps None in a tuple)
    if record.exc_info:
        if not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        record.exc_info = None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record.tier3_redacted = True
    return record


#: the one filter of the process (on the root logger, its handlers and the record factory)
LOG_FILTER = RedactingFilter("tier3.redaction")
_factory_lock = threading.Lock()


class _RedactingFactory:
    def __init__(self, inner: Callable[..., logging.LogRecord]) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(self.inner(*args, **kwargs))


def install_log_redaction(environ: bool = True) -> RedactingFilter:
    """Put :data:`LOG_FILTER` on the root logger, on each of its handlers and in the log record factory
    (idempotent; call it again after adding handlers). ``environ``: register the secret environment variables
    first (again: a changed value replaces the old one)."""
    if environ:
        register_environ_secrets()
    root = logging.getLogger()
    if LOG_FILTER not in root.filters:
        root.addFilter(LOG_FILTER)
    for handler in list(root.handlers):
        if LOG_FILTER not in handler.filters:
            handler.addFilter(LOG_FILTER)
    with _factory_lock:
        current = logging.getLogRecordFactory()
        if not isinstance(current, _RedactingFactory):
            logging.setLogRecordFactory(_RedactingFactory(current))
    return LOG_FILTER


def install_excepthook() -> None:
    """Uncaught exceptions (a command's crash, a thread's) print their traceback redacted."""

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))
        sys.stderr.flush()

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        name = args.thread.name if args.thread is not None else "?"
        sys.stderr.write(f"Exception in thread {name}:\n")
        hook(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = hook
    threading.excepthook = thread_hook


__all__ = ["LOG_FILTER", "MAX_UNNAMED", "MIN_SECRET_LEN", "REDACTED", "RedactingFilter", "forget_secrets",
           "install_excepthook", "install_log_redaction", "is_secret_name", "redact", "redact_record",
           "register_environ_secrets", "register_secret", "register_secrets", "registered_count"]
