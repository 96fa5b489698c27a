"""Secrets out of error text: every configured secret value, and anything shaped like an API key, becomes
``[REDACTED]``.

Teachers build their error messages from what the server answered; some gateways echo the API key in a 401 / 403
body ("Incorrect API key provided: sk-..."). Those messages go into exceptions, log lines, tracebacks, dead letters
and /status, so they are redacted where they are made (``streams.teachers``), before anything can copy them.

Configured secrets are registered by :func:`register_secrets` (``make_teacher`` registers the settings'
``SecretStr`` values); key-shaped strings are caught by pattern even when they are not ours (a gateway may echo a
neighbouring credential).
"""

from __future__ import annotations

import re
import threading

from pydantic import BaseModel, SecretStr

REDACTED = "[REDACTED]"
#: shorter configured values are not redacted by value (they would blank common words); patterns still apply
MIN_SECRET_LEN = 6

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

_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | SecretStr | None) -> None:
    """Redact ``value`` from every later :func:`redact` call (values shorter than MIN_SECRET_LEN are ignored)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value and len(value) >= MIN_SECRET_LEN:
        with _lock:
            _secrets.add(value)


def register_secrets(settings: BaseModel) -> None:
    """Register every ``SecretStr`` field of ``settings`` (API keys, the SASL password)."""
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if isinstance(value, SecretStr):
            register_secret(value)


def redact(text: str, extra: tuple[str, ...] = ()) -> str:
    """``text`` with every registered secret, every value in ``extra`` and every key-shaped string replaced."""
    with _lock:
        values = sorted(_secrets.union(v for v in extra if v and len(v) >= MIN_SECRET_LEN), key=len, reverse=True)
    for value in values:  # longest first: a secret that contains another is replaced whole
        if value in text:
            text = text.replace(value, REDACTED)
    return _KEY_PATTERNS.sub(_replace, text)


def _replace(m: re.Match[str]) -> str:
    label = _LABELLED.match(m.group(0))  # keep "api_key=" so the message still says what was there
    return (label.group(1) if label else "") + REDACTED


__all__ = ["REDACTED", "redact", "register_secret", "register_secrets"]
