"""orjson encode / decode for the message types, with errors that name the field and the reason."""

from __future__ import annotations

import functools
from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.errors import InvalidMessage, MessageTooLarge, NotJSON, UnknownSchemaVersion

M = TypeVar("M", bound=BaseModel)

#: default limit on one encoded message; Kafka's own default max.message.bytes is ~1 MiB
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000


def encode(message: BaseModel) -> bytes:
    """Serialise a message to compact JSON bytes (orjson)."""
    return orjson.dumps(message.model_dump(mode="json"))


@functools.cache
def _expected_version(model: type[BaseModel]) -> object:
    """The ``schema_version`` a model's messages carry (None: the model has none); asked once per model."""
    field = model.model_fields.get("schema_version")
    return None if field is None else field.default


def check_size(raw: bytes, max_bytes: int) -> None:
    """Raise :class:`MessageTooLarge` when ``raw`` is over ``max_bytes`` (before any parsing: costs nothing)."""
    if len(raw) > max_bytes:
        raise MessageTooLarge(f"{len(raw)} bytes is over the limit of {max_bytes}")


def decode(data: bytes | bytearray | memoryview | str, model: type[M], *,
           max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> M:
    """Parse and validate ``data`` as ``model``.

    Raises a :class:`schemas.errors.SchemaError` subclass: ``MessageTooLarge`` (checked before parsing, so an
    oversize message costs nothing), ``NotJSON`` (bad UTF-8 or JSON syntax, or not an object),
    ``UnknownSchemaVersion`` and ``InvalidMessage`` (with the dotted field path and pydantic's reason).
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    check_size(raw, max_bytes)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise NotJSON(f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise NotJSON(f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    expected = _expected_version(model)
    if expected is not None and (type(version) is not int or version != expected):
        raise UnknownSchemaVersion(f"schema_version {version!r} is not supported (expected {expected})",
                                   field="schema_version")
    try:
        return model.model_validate(obj, strict=True)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InvalidMessage(f"{err['msg']}{more}", field=field) from None
