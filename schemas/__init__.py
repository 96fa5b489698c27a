"""tier3's message contracts: the types on each topic, their codec, task definitions, shared settings.

Besides the contracts, the shared core both sides run on, each in a package named for what it is:
:mod:`schemas.kafka` (Kafka I/O: slices and watermarks, the follower, the access check, dead letters that fit) and
:mod:`schemas.runtime` (what every command needs around its work: preflight and one-line errors, redaction of
secrets, atomic file moves, percentiles).

Imports nothing of tier3's and nothing of Faust or torch. The names below are loaded on first use (PEP 562): a
command that needs only :mod:`schemas.runtime.preflight` or :mod:`schemas.runtime.redaction` (``tier3 --help``)
does not pay for pydantic's models, pydantic-settings and jsonschema. ``from schemas import X`` works as before.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.codec import decode, encode
    from schemas.errors import (
        InvalidAnswer,
        InvalidMessage,
        MessageTooLarge,
        NotJSON,
        SchemaError,
        UnknownSchemaVersion,
        UnknownTask,
        UnsafeText,
    )
    from schemas.messages import (
        ChatMessage,
        DeadLetter,
        EnrichedTrace,
        Experience,
        OnlineEval,
        ServedBy,
        SourceOffset,
        TeacherInfo,
        TrainerControl,
        TrainingRun,
    )
    from schemas.settings import RELIABLE_CONSUMER, RELIABLE_PRODUCER, KafkaSettings, TopicSpec
    from schemas.tasks import TaskDefinition, get_task, load_tasks

#: name -> the submodule that defines it (imported by :func:`_module`)
_WHERE = {
    **dict.fromkeys(("decode", "encode"), "codec"),
    **dict.fromkeys(("InvalidAnswer", "InvalidMessage", "MessageTooLarge", "NotJSON", "SchemaError",
                     "UnknownSchemaVersion", "UnknownTask", "UnsafeText"), "errors"),
    **dict.fromkeys(("ChatMessage", "DeadLetter", "EnrichedTrace", "Experience", "OnlineEval", "ServedBy",
                     "SourceOffset", "TeacherInfo", "TrainerControl", "TrainingRun"), "messages"),
    **dict.fromkeys(("RELIABLE_CONSUMER", "RELIABLE_PRODUCER", "KafkaSettings", "TopicSpec"), "settings"),
    **dict.fromkeys(("TaskDefinition", "get_task", "load_tasks"), "tasks"),
}


def _module(where: str) -> ModuleType:
    """The submodule named ``where``, imported now (plain imports: the import graph shows them)."""
    if where == "codec":
        from schemas import codec

        return codec
    if where == "errors":
        from schemas import errors

        return errors
    if where == "messages":
        from schemas import messages

        return messages
    if where == "settings":
        from schemas import settings

        return settings
    from schemas import tasks

    return tasks


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    value = getattr(_module(where), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


__all__ = [
    "RELIABLE_CONSUMER", "RELIABLE_PRODUCER", "ChatMessage", "DeadLetter", "EnrichedTrace", "Experience",
    "InvalidAnswer", "InvalidMessage", "KafkaSettings", "MessageTooLarge", "NotJSON", "OnlineEval", "SchemaError",
    "ServedBy", "SourceOffset", "TaskDefinition", "TeacherInfo", "TopicSpec", "TrainerControl", "TrainingRun",
    "UnknownSchemaVersion", "UnknownTask", "UnsafeText", "decode", "encode", "get_task", "load_tasks",
]
