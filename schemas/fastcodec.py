"""A fast decoder for enriched traces: parse and validate in one pass (msgspec), for the bulk readers.

Replay and the trainer read every trace of a slice of ``enriched-traces``. :func:`schemas.codec.decode` (orjson,
then pydantic's strict validation) costs ~3× the parse alone; msgspec decodes *and* validates a trace into typed
read-only structs in less time than orjson takes only to parse it (``bench/replay_bench.py``).

The contract (checked by ``tests/test_fastcodec.py``, including a differential fuzz against the pydantic
path):

- the structs below mirror :class:`schemas.messages.EnrichedTrace` field for field (names, defaults, bounds,
  literals, no unknown fields), and are at least as strict;
- whatever msgspec refuses, or what the two parsers could read differently (an integer beyond 64 bits in the
  answer: orjson reads it as a float, msgspec as an int), goes through :func:`schemas.codec.decode` unchanged: the same
  errors, the same result. A document is therefore never accepted here that the canonical path refuses, and an
  accepted one has the same values (the dataset built from either is byte-identical).

The structs are read-only views with the pydantic models' attribute names, so code that only reads traces takes
either (:data:`TraceLike`). Writers build the pydantic models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias

import msgspec
from msgspec import Meta, Struct

from schemas.codec import DEFAULT_MAX_MESSAGE_BYTES, check_size, decode
from schemas.messages import MAX_ID_LEN, MAX_TEXT_LEN, EnrichedTrace, Experience

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN)]
ShortText = Annotated[str, Meta(max_length=MAX_ID_LEN)]
Text = Annotated[str, Meta(max_length=MAX_TEXT_LEN)]
# orjson (the canonical path) reads an integer beyond 64 bits as a float, which a strict int field refuses; msgspec
# bounds only fit int64, so up to 2**63 - 1 here (stricter: the rest goes the canonical way)
U64 = 2**64 - 1
I64_MAX = 2**63 - 1
NonNegInt = Annotated[int, Meta(ge=0, le=I64_MAX)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]


class ChatMessageView(Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: Text


class ServedByView(Struct, frozen=True, forbid_unknown_fields=True):
    arm: Literal["teacher", "student", "baseline"] = "baseline"
    model: ShortText = "unknown"
    model_version: ShortText | None = None


class ExperienceView(Struct, frozen=True, forbid_unknown_fields=True):
    experience_id: Id
    task: Id
    created_at_ms: NonNegInt
    messages: Annotated[list[ChatMessageView], Meta(min_length=1, max_length=256)]
    response: Text
    confidence: Annotated[float, Meta(ge=0.0, le=1.0)]
    schema_version: Literal[1] = 1
    served_by: ServedByView = ServedByView()
    reward: float | None = None
    latency_ms: NonNegFloat | None = None
    user_id: ShortText | None = None
    session_id: ShortText | None = None
    metadata: dict[str, str] = {}


class TeacherInfoView(Struct, frozen=True, forbid_unknown_fields=True):
    kind: ShortText
    model: ShortText
    latency_ms: NonNegFloat
    attempts: Annotated[int, Meta(ge=1, le=I64_MAX)]
    input_tokens: NonNegInt | None = None
    output_tokens: NonNegInt | None = None
    recorded: bool = False


class SourceOffsetView(Struct, frozen=True, forbid_unknown_fields=True):
    topic: str
    partition: NonNegInt
    offset: NonNegInt


class EnrichedTraceView(Struct, frozen=True, forbid_unknown_fields=True):
    schema_version: Literal[1]  # required at the top level, as schemas.codec.decode requires it
    experience_id: Id
    task: Id
    enriched_at_ms: NonNegInt
    sample_reason: Literal["random", "high_confidence", "shadow"]
    experience: ExperienceView
    teacher: TeacherInfoView
    reasoning: Text
    answer: dict[str, Any]
    source: SourceOffsetView | None = None
    shadow: bool = False
    student_answer: dict[str, Any] | None = None


#: a trace as the readers get it: the fast view, or the pydantic model (the canonical path's result)
TraceLike: TypeAlias = EnrichedTrace | EnrichedTraceView
ExperienceLike: TypeAlias = Experience | ExperienceView

_TRACE_DECODER = msgspec.json.Decoder(EnrichedTraceView)
_I64_MIN = -(2**63)


def _beyond_64_bits(value: Any) -> bool:
    """An integer anywhere in a JSON value that orjson would have read as a float (msgspec keeps it exact)."""
    t = type(value)
    if t is int:
        return not _I64_MIN <= value <= U64
    if t is dict:
        items: Any = value.values()
    elif t is list:
        items = value
    else:
        return False
    for v in items:
        tv = type(v)
        if tv is not str and tv is not float and tv is not bool and v is not None and _beyond_64_bits(v):
            return True
    return False


def decode_trace(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> TraceLike:
    """``data`` as an enriched trace: the fast view when msgspec accepts it, else :func:`schemas.codec.decode`'s
    result or error (a :class:`schemas.errors.SchemaError`: the canonical reason, dead-letter ready)."""
    if len(data) > max_bytes:
        check_size(data, max_bytes)  # raises
    try:
        view = _TRACE_DECODER.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass  # the canonical path says why (or accepts what only msgspec refused)
    else:
        student = view.student_answer
        if not (_beyond_64_bits(view.answer) or (student is not None and _beyond_64_bits(student))):
            return view
    return decode(data, EnrichedTrace, max_bytes=max_bytes)


def served_by_json(experience: ExperienceLike) -> dict[str, Any]:
    """``experience.served_by`` as JSON values (the same for either type)."""
    sb = experience.served_by
    return {"arm": sb.arm, "model": sb.model, "model_version": sb.model_version}


__all__ = ["ChatMessageView", "EnrichedTraceView", "ExperienceLike", "ExperienceView", "ServedByView",
           "SourceOffsetView", "TeacherInfoView", "TraceLike", "decode_trace", "served_by_json"]
