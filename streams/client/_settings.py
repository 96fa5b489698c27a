"""How the client library builds its settings (``CaptureSettings``, ``RouterSettings``): secrets registered and
the log filter installed first, and a refusal that names the settings, never their values.

pydantic's ``ValidationError`` prints the input of a model-level check (the whole environment the settings read,
API keys included) and so does its ``repr``; an application that logs or shows it would leak them. The client
library raises :class:`streams.errors.InvalidSettings` instead, with one line per bad setting (its name and what
is wrong) and nothing chained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from streams.errors import InvalidSettings
from streams.redaction import install_log_redaction, is_secret_name, redact, register_secret, register_secrets


def build_settings(init: Callable[..., None], settings: BaseModel, values: dict[str, Any]) -> None:
    """Run the settings class's ``__init__`` (``init``, bound) on ``values``, the client library's way."""
    from pydantic_settings import SettingsError

    from schemas.runtime.preflight import settings_error

    install_log_redaction()  # the secret environment variables registered, every log record filtered
    for name, value in values.items():
        if not name.startswith("_") and isinstance(value, str | SecretStr) and (
                isinstance(value, SecretStr) or is_secret_name(name)):
            register_secret(value, name=name)
    problem: str | None = None
    try:
        init(**values)
    except (ValidationError, SettingsError) as exc:
        problem = redact(str(settings_error(exc)))  # names and reasons only (no input, no url, no context)
    if problem is not None:  # raised outside the handler: no __context__ holding the pydantic error
        raise InvalidSettings(f"{type(settings).__name__}: {problem}") from None
    register_secrets(settings)
