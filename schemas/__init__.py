"""tier3's message contracts: the types on each topic, their codec, task definitions, shared settings.

Imports nothing of tier3's and nothing of Faust or torch.
"""

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

__all__ = [
    "RELIABLE_CONSUMER", "RELIABLE_PRODUCER", "ChatMessage", "DeadLetter", "EnrichedTrace", "Experience",
    "InvalidAnswer", "InvalidMessage", "KafkaSettings", "MessageTooLarge", "NotJSON", "OnlineEval", "SchemaError",
    "ServedBy", "SourceOffset", "TaskDefinition", "TeacherInfo", "TopicSpec", "TrainerControl", "TrainingRun",
    "UnknownSchemaVersion", "UnknownTask", "UnsafeText", "decode", "encode", "get_task", "load_tasks",
]
