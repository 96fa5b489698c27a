"""Enrichment as plain functions: decode and sample one message, ask the teacher (with retries), and build the
EnrichedTrace or the DeadLetter. No Faust and no Kafka here; :mod:`streams.app` wires these into an agent.

Retry policy (tenacity), per experience:

- 429 / 5xx / timeouts / connection errors (``retryable``): exponential back-off with jitter, for up to
  ``tier3_teacher_retry_max_s`` seconds. While one experience waits, its slot stays taken, so a teacher outage
  slows consumption (back-pressure) instead of dropping anything; only after that long is it dead-lettered.
- an answer that does not parse or does not match the task's answer schema: up to ``tier3_teacher_max_attempts``
  attempts, then dead-lettered with the parser's reason.
- an output with the format's tags or a chat template's special tokens out of place (``schemas.tasks``, untrusted
  text): dead-lettered at once, stage ``enrich``, kind ``unsafe_text``.
- 400-class rejections of this prompt, or a prompt the recorded teacher lacks: dead-lettered at once.
- a wrong key / model / URL (401 / 403 / 404): raised, because every other experience would fail the same way;
  the worker stops without committing (see docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from schemas import DeadLetter, EnrichedTrace, Experience, SchemaError, SourceOffset, TeacherInfo, decode, get_task
from schemas.errors import UnsafeText
from schemas.kafka.dead_letters import letter_budget, letter_key, make_dead_letter
from schemas.messages import DeadLetterStage
from schemas.runtime.stats import percentile
from schemas.tasks import TaskDefinition, parse_json_answer
from streams.errors import InvalidTeacherOutput, TeacherConfigError, TeacherError, UnsafeTeacherOutput
from streams.redaction import redact
from streams.sampling import SampleReason, decide
from streams.settings import StreamsSettings
from streams.teachers import Teacher, TeacherReply

log = logging.getLogger("tier3.enrich")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Source:
    """Where a message was read: dead letters are keyed by it, traces record it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None = None

    def dead_letter_key(self) -> bytes:
        """``<topic>/<partition>/<offset>``, bounded (``schemas.kafka.dead_letters.letter_key``)."""
        return letter_key(self.topic, self.partition, self.offset)


@dataclass(frozen=True)
class ToEnrich:
    """A valid, sampled experience on its way to the teacher."""

    experience: Experience
    task: TaskDefinition
    reason: SampleReason
    shadow: bool = False  # in the student's shadow sample (online evaluation)


@dataclass
class TeacherStats:
    """Live numbers for /status and /metrics (one per worker process; single-threaded asyncio, no locks)."""

    calls: int = 0  # attempts, successful or not
    errors: int = 0  # attempts that failed, for any reason (transport or invalid output)
    in_flight: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    health: TeacherHealth = field(default_factory=lambda: TeacherHealth())

    def percentile_ms(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the recent latencies (:func:`schemas.runtime.stats.percentile`); None when
        empty."""
        value = percentile(self.latencies_ms, q * 100)
        return None if value is None else round(value, 3)

    @property
    def error_rate(self) -> float:
        return round(self.errors / self.calls, 6) if self.calls else 0.0


#: teacher errors that mean "the teacher is unreachable or unhealthy" (an outage), as opposed to a bad answer
OUTAGE_KINDS = frozenset({"timeout", "unavailable", "server_error", "rate_limited"})


class TeacherHealth:
    """Logs each change of the teacher's state (down since ..., recovered after N s, N calls failed), rate-limited.

    Down: a call failed with an outage kind (:data:`OUTAGE_KINDS`) while the teacher was up. Up again: a call
    succeeded. While down, a reminder at most every ``remind_s``. An outage that begins less than ``quiet_s`` after
    the previous one was logged is not logged (nor its recovery); it is counted and reported with the next line,
    so a flapping teacher cannot flood the log.
    """

    def __init__(self, quiet_s: float = 30.0, remind_s: float = 60.0) -> None:
        self.quiet_s = quiet_s
        self.remind_s = remind_s
        self.down_since: float | None = None  # time.time() of the first failure of the current outage
        self.failed_calls = 0  # in the current outage
        self.last_error = ""
        self._logged = False  # the current outage's "down" line was written
        self._last_line = -1e18  # time.monotonic() of the last "down" or reminder line
        self._unlogged_outages = 0

    def failed(self, exc: TeacherError) -> None:
        if exc.kind not in OUTAGE_KINDS:
            return
        now = time.monotonic()
        self.last_error = f"{exc.kind}: {exc}"
        if self.down_since is None:
            self.down_since, self.failed_calls = time.time(), 1
            self._logged = now - self._last_line >= self.quiet_s
            if self._logged:
                self._last_line = now
                extra = (f" ({self._unlogged_outages} short outages since the last report were not logged)"
                         if self._unlogged_outages else "")
                self._unlogged_outages = 0
                log.warning("teacher is down since %s: %s; experiences wait and are retried (back-pressure)%s",
                            _clock(self.down_since), self.last_error, extra)
            else:
                self._unlogged_outages += 1
            return
        self.failed_calls += 1
        if self._logged and now - self._last_line >= self.remind_s:
            self._last_line = now
            log.warning("teacher still down since %s (%.0f s), %d calls failed; last error: %s",
                        _clock(self.down_since), time.time() - self.down_since, self.failed_calls, self.last_error)

    def succeeded(self) -> None:
        if self.down_since is None:
            return
        if self._logged:
            log.warning("teacher recovered after %.1f s (down since %s); %d calls failed",
                        time.time() - self.down_since, _clock(self.down_since), self.failed_calls)
        self.down_since, self.failed_calls = None, 0


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def dead_letter(raw: bytes, source: Source, *, stage: DeadLetterStage, error_kind: str, reason: str,
                max_bytes: int, experience_id: str | None = None, attempts: int = 1) -> DeadLetter:
    """The dead letter of the message at ``source``: with its key (:meth:`Source.dead_letter_key`) a record that a
    producer whose ``message.max.bytes`` is ``max_bytes`` accepts (``schemas.kafka.dead_letters.letter_budget``)."""
    budget = letter_budget(max_bytes, source.dead_letter_key())
    return make_dead_letter(raw, stage=stage, error_kind=error_kind, reason=redact(reason), max_bytes=budget,
                            source_topic=source.topic, source_partition=source.partition,
                            source_offset=source.offset, key=source.key, experience_id=experience_id,
                            attempts=attempts, failed_at_ms=now_ms())


def triage(raw: bytes, source: Source, settings: StreamsSettings,
           observers: Sequence[Callable[[Experience, int], None]] = ()) -> ToEnrich | DeadLetter | None:
    """Decode, validate and sample one message: a ToEnrich, a DeadLetter (bad input), or None (not sampled).

    Never raises on bad bytes: every SchemaError becomes a dead letter with the original bytes. ``observers``
    see every valid experience, sampled or not (e.g. the router's per-arm statistics), with its partition.
    """
    try:
        exp = decode(raw, Experience, max_bytes=settings.tier3_max_message_bytes)
    except SchemaError as exc:
        return dead_letter(raw, source, stage="decode", error_kind=exc.kind, reason=str(exc),
                           max_bytes=settings.max_record_bytes)
    for observe in observers:
        try:
            observe(exp, source.partition)
        except Exception:  # statistics are display-only: never let them dead-letter a valid experience
            log.exception("experience observer %r failed", observe)
    try:
        task = get_task(exp.task)
    except SchemaError as exc:
        return dead_letter(raw, source, stage="validate", error_kind=exc.kind, reason=str(exc),
                           max_bytes=settings.max_record_bytes, experience_id=exp.experience_id)
    reason, shadow = decide(exp.experience_id, exp.confidence, exp.served_by.arm, exp.served_by.model_version,
                            rate=settings.tier3_sample_rate, threshold=settings.tier3_confidence_threshold,
                            shadow_rate=settings.tier3_shadow_rate)
    if reason is None:
        return None
    return ToEnrich(exp, task, reason, shadow)


@dataclass(frozen=True)
class TeacherAnswer:
    reply: TeacherReply
    reasoning: str
    answer: dict[str, Any]
    attempts: int
    latency_ms: float  # of the successful call


class TeacherGaveUp(Exception):
    """Retries are exhausted (or cannot help); carries the last error and the attempt count."""

    def __init__(self, last: TeacherError, attempts: int, elapsed_s: float) -> None:
        super().__init__(str(last))
        self.last = last
        self.attempts = attempts
        self.elapsed_s = elapsed_s


async def ask_teacher(teacher: Teacher, task: TaskDefinition, experience: Experience, settings: StreamsSettings,
                      stats: TeacherStats) -> TeacherAnswer:
    """One experience's teacher call with the retry policy above; raises TeacherGaveUp or TeacherConfigError."""
    # plain dicts straight from the fields (ChatMessage has exactly role and content): cheaper than model_dump()
    messages = task.messages_for_model([{"role": m.role, "content": m.content} for m in experience.messages],
                                       reasoning=True)
    invalid_outputs = 0
    attempts = 0
    started = time.monotonic()

    async def attempt() -> TeacherAnswer:
        nonlocal invalid_outputs, attempts
        attempts += 1
        stats.calls += 1
        stats.in_flight += 1
        t0 = time.perf_counter()
        try:
            reply = await teacher.complete(messages)
            stats.health.succeeded()  # it answered (whatever the answer is worth)
            try:
                reasoning, answer = task.parse_output(reply.text)
            except UnsafeText as exc:  # dead-lettered under the rule's own kind (unsafe_text, tag_lookalike)
                unsafe = UnsafeTeacherOutput(f"{exc.kind}: {exc}")
                unsafe.kind = exc.kind
                raise unsafe from None
            except SchemaError as exc:
                invalid_outputs += 1
                raise InvalidTeacherOutput(f"{exc.kind}: {exc}") from None
        except TeacherError as exc:
            stats.errors += 1
            stats.errors_by_kind[exc.kind] = stats.errors_by_kind.get(exc.kind, 0) + 1
            stats.health.failed(exc)
            raise
        finally:
            stats.in_flight -= 1
        latency_ms = (time.perf_counter() - t0) * 1000
        stats.latencies_ms.append(latency_ms)
        return TeacherAnswer(reply, reasoning, answer, attempts, latency_ms)

    def should_stop_after(exc: BaseException | None) -> bool:
        if isinstance(exc, InvalidTeacherOutput):
            return invalid_outputs >= settings.tier3_teacher_max_attempts
        return time.monotonic() - started >= settings.tier3_teacher_retry_max_s

    def should_stop(state: RetryCallState) -> bool:
        return should_stop_after(state.outcome.exception() if state.outcome else None)

    try:
        # fast path: most calls succeed at once; build the retry machinery (~40 µs) only when needed
        return await attempt()
    except TeacherConfigError:
        raise
    except TeacherError as exc:
        if not exc.retryable or should_stop_after(exc):
            raise TeacherGaveUp(exc, attempts, time.monotonic() - started) from None

    # the first attempt failed: wait as tenacity would before its second attempt
    await asyncio.sleep(settings.tier3_teacher_backoff_initial_s * (1 + random.random()))
    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda e: isinstance(e, TeacherError) and e.retryable),
        stop=should_stop,
        wait=wait_exponential_jitter(initial=settings.tier3_teacher_backoff_initial_s,
                                     max=settings.tier3_teacher_backoff_max_s,
                                     jitter=settings.tier3_teacher_backoff_initial_s),
        reraise=True,
    )
    try:
        return await retrying(attempt)
    except TeacherConfigError:
        raise
    except TeacherError as exc:
        raise TeacherGaveUp(exc, attempts, time.monotonic() - started) from None


async def enrich(item: ToEnrich, raw: bytes, source: Source, teacher: Teacher, settings: StreamsSettings,
                 stats: TeacherStats) -> EnrichedTrace | DeadLetter:
    """The trace for one sampled experience, or its dead letter. Raises only TeacherConfigError (fatal)."""
    exp = item.experience
    try:
        got = await ask_teacher(teacher, item.task, exp, settings, stats)
    except TeacherGaveUp as gave_up:
        last = gave_up.last
        stage: DeadLetterStage = ("enrich" if isinstance(last, (InvalidTeacherOutput, UnsafeTeacherOutput))
                                  else "teacher")
        return dead_letter(raw, source, stage=stage, error_kind=last.kind, experience_id=exp.experience_id,
                           attempts=gave_up.attempts, max_bytes=settings.max_record_bytes,
                           reason=f"gave up after {gave_up.attempts} attempt(s) in {gave_up.elapsed_s:.1f} s; "
                                  f"last error: {last}")
    try:
        return EnrichedTrace(
            experience_id=exp.experience_id, task=exp.task, enriched_at_ms=now_ms(), sample_reason=item.reason,
            experience=exp, reasoning=got.reasoning, answer=got.answer,
            teacher=TeacherInfo(kind=teacher.kind, model=got.reply.model or teacher.model,
                                latency_ms=round(got.latency_ms, 3), input_tokens=got.reply.input_tokens,
                                output_tokens=got.reply.output_tokens, attempts=got.attempts,
                                recorded=teacher.recorded),
            source=SourceOffset(topic=source.topic, partition=source.partition, offset=source.offset),
            shadow=item.shadow, student_answer=served_answer(exp.response) if item.shadow else None,
        )
    except ValidationError as exc:  # e.g. reasoning over the schema's length: a dead letter, never a crash
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        return dead_letter(raw, source, stage="enrich", error_kind="invalid_trace", experience_id=exp.experience_id,
                           attempts=got.attempts, max_bytes=settings.max_record_bytes,
                           reason=f"the trace cannot be built: {where}: {err['msg']}")


def served_answer(response: str) -> dict[str, Any] | None:
    """The answer a model served (reasoned or bare JSON text), when it is a JSON object; else None."""
    try:
        _, value = parse_json_answer(response)
    except SchemaError:
        return None
    return value if isinstance(value, dict) else None
