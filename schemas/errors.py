"""One exception root for the message contracts.

Every decode/validation failure names the field and the reason, so a dead letter can say exactly what was
wrong with the bytes it carries.
"""

from __future__ import annotations


class SchemaError(Exception):
    """Root of every error raised by ``schemas``."""

    #: a short stable word used in dead letters and metrics
    kind = "schema"

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)


class NotJSON(SchemaError):
    """The bytes are not UTF-8 JSON."""

    kind = "not_json"


class InvalidMessage(SchemaError):
    """The JSON does not match the schema (wrong type, missing field, out of range)."""

    kind = "invalid"


class UnknownSchemaVersion(SchemaError):
    """``schema_version`` is missing or not one this code understands."""

    kind = "unknown_version"


class MessageTooLarge(SchemaError):
    """The encoded message is over the configured size limit."""

    kind = "oversize"


class InvalidAnswer(SchemaError):
    """A model's output could not be parsed, or its answer does not match the task's answer schema."""

    kind = "invalid_answer"


class UnsafeText(SchemaError):
    """Model output that contains the output format's tags where they do not belong, or a chat template's special
    tokens: it must never become training text (``schemas.tasks.check_markup``)."""

    kind = "unsafe_text"


class MarkupLookalike(UnsafeText):
    """Model output with something that looks like a format tag or a special token but is not one as written
    (spaces or attributes in a tag, another case, fullwidth or zero-width characters, HTML entities): the output
    grammar of ``schemas.tasks`` does not accept it."""

    kind = "tag_lookalike"


class UnknownTask(SchemaError):
    """No task definition with that name is registered."""

    kind = "unknown_task"
