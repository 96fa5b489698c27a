"""The message types on tier3's topics (docs/design.md, "Topics"), plus the worker's ``online-eval`` summaries.

They are frozen pydantic models: typed, validated on construction, and the source of the JSON Schema files in
``schemas/json/`` (``python -m schemas.write_json_schemas`` writes them; a test checks they are up to date).

Times are Unix epoch milliseconds (``*_ms``); durations carry their unit in the name.

Versioning: a field added as optional (with a default) keeps ``schema_version`` 1, since every message written
before still decodes; a field removed, renamed or made stricter is a new version (new JSON Schema file).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[1] = 1

# Bounds that keep one bad producer from filling the log with garbage.
MAX_ID_LEN = 200
MAX_TEXT_LEN = 200_000


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, populate_by_name=True)


class ChatMessage(_Frozen):
    """One chat message exactly as it was sent to (or returned by) a model."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT_LEN)


class ServedBy(_Frozen):
    """Which arm and model produced the production response (the router fills this)."""

    arm: Literal["teacher", "student", "baseline"] = "baseline"
    model: str = Field(default="unknown", max_length=MAX_ID_LEN)
    model_version: str | None = Field(default=None, max_length=MAX_ID_LEN)


class Experience(_Frozen):
    """What the RL / LLM application saw and did for one request."""

    schema_version: Literal[1] = SCHEMA_VERSION
    experience_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    task: str = Field(min_length=1, max_length=MAX_ID_LEN)
    created_at_ms: int = Field(ge=0)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    response: str = Field(max_length=MAX_TEXT_LEN)
    served_by: ServedBy = ServedBy()
    confidence: float = Field(ge=0.0, le=1.0)
    reward: float | None = None
    latency_ms: float | None = Field(default=None, ge=0.0)
    user_id: str | None = Field(default=None, max_length=MAX_ID_LEN)
    session_id: str | None = Field(default=None, max_length=MAX_ID_LEN)
    metadata: dict[str, str] = Field(default_factory=dict)


class TeacherInfo(_Frozen):
    """Who answered and what it cost."""

    kind: str = Field(max_length=MAX_ID_LEN)  # anthropic | claude_cli | openai | recorded
    model: str = Field(max_length=MAX_ID_LEN)
    latency_ms: float = Field(ge=0.0)
    input_tokens: int | None = Field(default=None, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)
    attempts: int = Field(ge=1)
    recorded: bool = False


class SourceOffset(_Frozen):
    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class EnrichedTrace(_Frozen):
    """An experience plus the teacher's reasoning and validated answer: one SFT example's source.

    ``shadow`` marks a trace in the shadow sample of the student arm (``TIER3_SHADOW_RATE`` of the experiences a
    promoted student served, by hash): the worker scores ``student_answer`` (what the student served, parsed;
    None when it was not a JSON object) against ``answer`` for online evaluation. ``sample_reason`` is
    ``shadow`` when only the shadow rule picked the experience (the extra teacher calls online evaluation costs).
    Both fields are optional: traces written before them decode unchanged.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    experience_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    task: str = Field(min_length=1, max_length=MAX_ID_LEN)
    enriched_at_ms: int = Field(ge=0)
    sample_reason: Literal["random", "high_confidence", "shadow"]
    experience: Experience
    teacher: TeacherInfo
    reasoning: str = Field(max_length=MAX_TEXT_LEN)
    answer: dict[str, Any]
    source: SourceOffset | None = None
    shadow: bool = False
    student_answer: dict[str, Any] | None = None


DeadLetterStage = Literal["decode", "validate", "sample", "enrich", "teacher", "publish", "train", "redrive"]


class DeadLetter(_Frozen):
    """A message that could not be processed, with its original bytes and why.

    The original is kept whole when the dead letter fits the record limit with it; otherwise ``original_b64``
    holds only a prefix (``original_truncated``) and ``original_sha256`` / ``original_size`` identify the record at
    ``source_topic/source_partition/source_offset``, from which it is re-driven while that topic retains it.
    Built by :func:`schemas.kafka.dead_letters.make_dead_letter`, which guarantees the size.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    stage: DeadLetterStage
    reason: str = Field(max_length=10_000)
    error_kind: str = Field(max_length=MAX_ID_LEN)
    failed_at_ms: int = Field(ge=0)
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    key_b64: str | None = None
    original_b64: str  # base64 of the original bytes, exactly as read (a prefix when original_truncated)
    experience_id: str | None = None
    attempts: int = 1
    original_size: int | None = Field(default=None, ge=0)  # bytes of the original value
    original_sha256: str | None = Field(default=None, max_length=64)  # hex sha256 of the original value
    original_truncated: bool = False  # original_b64 (or key_b64) is only a prefix: re-drive from the source


TrainingEvent = Literal[
    "started",
    "heartbeat",
    "succeeded",
    "failed",
    "evaluated",
    "promoted",
    "rejected",
    "exported",
    "rollback",
]


class TrainingRun(_Frozen):
    """One lifecycle event of a training run on ``training-runs`` (kept forever). The trainer's ``heartbeat``
    (its live status) has the same shape but goes to the compacted ``trainer-status`` topic, keyed by trainer,
    so the lifecycle log stays small."""

    schema_version: Literal[1] = SCHEMA_VERSION
    run_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    event: TrainingEvent
    at_ms: int = Field(ge=0)
    model_name: str | None = None
    model_version: int | None = None
    base_model: str | None = None
    # heartbeat / status fields (the original system's trainer.tier3_sft block)
    training_in_progress: bool | None = None
    last_check_time_ms: int | None = None
    check_interval_s: float | None = None
    next_check_in_s: float | None = None
    # everything else: metrics, offsets, errors, reasons, export paths
    details: dict[str, Any] = Field(default_factory=dict)


class OnlineEval(_Frozen):
    """One closed window of online agreement with the teacher, for one arm (and model version) and one partition.

    The worker publishes it on ``online-eval`` (compacted; key ``task|arm|version|window start s@partition``)
    when the window closes, and again if a late trace changes it. Sums, not means, so that readers add the
    partitions of a window up; ``latency_hist`` maps a log bucket (``streams/online_eval.py``) to a count.
    ``task_f1_sum`` is the sum of the task's weighted field score (``schemas.tasks.task_f1``); None in a record
    written before it existed (readers then fall back to ``f1_sum``).

    The window (``window_start_ms`` .. ``window_end_ms``) is one of the traces' **enrichment** time (when the
    teacher answered), not of when the answers were served. ``first_served_ms`` and ``last_served_ms`` bound
    when the answers it sums were **served** (their experiences' ``created_at_ms``, stamped by the router). The
    rule readers apply (``tier3 watch``, docs/close_loop.md): a version is judged after a promotion only on
    windows whose answers were all served at or after it (``first_served_ms >= promoted at_ms``); a record
    without the bounds (written before them, or by a worker that restored a window begun before them) counts
    only if ``window_start_ms`` is at or after the promotion.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    task: str = Field(min_length=1, max_length=MAX_ID_LEN)
    arm: Literal["student", "baseline"]
    model_version: str | None = Field(default=None, max_length=MAX_ID_LEN)
    window_start_ms: int = Field(ge=0)
    window_end_ms: int = Field(ge=0)
    partition: int = Field(ge=0)
    n: int = Field(ge=0)
    json_valid_n: int = Field(ge=0)
    schema_valid_n: int = Field(ge=0)
    exact_n: int = Field(ge=0)
    f1_sum: float = Field(ge=0.0)
    set_f1_sums: dict[str, float] = Field(default_factory=dict)
    task_f1_sum: float | None = Field(default=None, ge=0.0)
    extra_teacher_calls: int = Field(default=0, ge=0)
    latency_hist: dict[str, int] = Field(default_factory=dict)
    published_at_ms: int = Field(ge=0)
    worker_id: str | None = Field(default=None, max_length=MAX_ID_LEN)
    first_served_ms: int | None = Field(default=None, ge=0, description=(
        "the earliest served time (experience created_at_ms) of the answers in this window; a version is judged "
        "after a promotion only on windows with first_served_ms >= the promotion's at_ms (None: unknown, then "
        "window_start_ms >= at_ms)"))
    last_served_ms: int | None = Field(default=None, ge=0, description=(
        "the latest served time (experience created_at_ms) of the answers in this window (None: unknown)"))


TrainerCommandKind = Literal["train_now"]
TrainerAnswer = Literal["accepted", "declined"]


class TrainerControl(_Frozen):
    """A request to the trainer and the trainer's answer, both on the ``trainer-control`` topic (key: the
    request id), so any machine that reaches the bootstrap servers can ask, and the log records who asked what
    and what the trainer did about it.

    - a request: ``kind="request"``, ``command`` (``train_now``: start a run now), ``request_id``, ``group`` (the
      trainer group asked; None: any), ``requested_by`` (free text, e.g. user@host);
    - an answer: ``kind="answer"``, the same ``request_id`` and ``command``, ``answer`` (``accepted``: ``run_id``
      is the run it started or joined; ``declined``: ``reason`` says why), ``trainer_id`` (which trainer).
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["request", "answer"]
    command: TrainerCommandKind
    request_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    at_ms: int = Field(ge=0)
    group: str | None = Field(default=None, max_length=MAX_ID_LEN)
    requested_by: str | None = Field(default=None, max_length=MAX_ID_LEN)
    answer: TrainerAnswer | None = None
    trainer_id: str | None = Field(default=None, max_length=MAX_ID_LEN)
    run_id: str | None = Field(default=None, max_length=MAX_ID_LEN)
    reason: str | None = Field(default=None, max_length=10_000)
    details: dict[str, Any] = Field(default_factory=dict)


MESSAGE_TYPES: dict[str, type[_Frozen]] = {
    "experience": Experience,
    "enriched_trace": EnrichedTrace,
    "dead_letter": DeadLetter,
    "training_run": TrainingRun,
    "online_eval": OnlineEval,
    "trainer_control": TrainerControl,
}
