"""The trainer's events: lifecycle on ``training-runs``, heartbeats on ``trainer-status``, answers to requests on
``trainer-control``.

This module owns ``training-runs`` on the trainer's side: :class:`TrainerEvents` is its only writer (the training
loop's started / succeeded / failed, and the close loop's evaluated / promoted / rejected / exported / rollback
through :meth:`TrainerEvents.record`), and :func:`read_run_events` reads it back for the fold of
:mod:`schemas.runs`.

Lifecycle events are keyed by run_id and kept forever. Heartbeats are not part of any run's history: they go to
the compacted ``trainer-status`` topic, keyed (and with run id) ``trainer:<group>``, so the topic keeps about one
record per trainer group however long it runs. They carry the fields of the original system's
``trainer.tier3_sft`` status block (training_in_progress, last check time, check interval, next check), so the
streams worker's ``/status`` can show a live trainer without importing anything of ours.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from schemas import TrainerControl, TrainingRun, decode, encode
from schemas.errors import SchemaError
from schemas.kafka.dead_letters import LetterRecord, dead_letter_record, fallbacks, write_failure
from schemas.kafka.reading import ReadTimeout, TopicMissing, read_until_now
from schemas.settings import RELIABLE_PRODUCER, KafkaSettings
from trainer.errors import TrainerError
from trainer.settings import TrainerSettings

log = logging.getLogger("tier3.trainer.events")


#: writes of one dead letter that failed transiently before it is given up (each after librdkafka's own retries)
DEAD_LETTER_ATTEMPTS = 5


class EventLogError(TrainerError):
    """training-runs could not be read or written (broker down, delivery failed)."""

    retryable = True


def now_ms() -> int:
    return int(time.time() * 1000)


class TrainerEvents:
    """A reliable producer for training-runs (and dead-letters, for traces the trainer cannot read)."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.topic = settings.training_runs_topic
        self.heartbeat_run_id = f"trainer:{settings.tier3_trainer_group}"
        #: this process (several trainers may share a group): in heartbeats and answers to requests
        self.trainer_id = f"{settings.tier3_trainer_group}@{socket.gethostname()}:{os.getpid()}"
        self._producer = Producer({**settings.client_config(), **RELIABLE_PRODUCER, "linger.ms": 5,
                                   "client.id": f"tier3-trainer-events-{settings.tier3_trainer_group}"})
        self._errors: list[str] = []
        #: dead letters that could not be written at all (logged with their source coordinates)
        self.dead_letters_failed = 0
        #: dead-letter writes that failed, (record, fallback level, attempt, error), written again outside callbacks
        self._letters_failed: list[tuple[LetterRecord, int, int, KafkaError]] = []
        #: the trainer's check times, added to started/succeeded/failed too: a reader that keeps the latest event
        #: with ``training_in_progress`` as the trainer's status then always has them
        self.status: Callable[[], dict[str, Any]] | None = None

    # -- plumbing -----------------------------------------------------------------------------------------
    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._errors.append(str(err))
            log.error("event delivery failed: %s", err)

    def _send(self, topic: str, key: str, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, key=key.encode(), value=value, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain, then try again
                self._producer.poll(0.1)
        self._producer.poll(0)

    def publish(self, run: TrainingRun) -> None:
        self._send(self.topic, run.run_id, encode(run))

    def record(self, *runs: TrainingRun, timeout_s: float = 30.0) -> None:
        """Publish lifecycle events (key = run_id) and wait until the broker acknowledged each: the close loop's
        steps, each one acknowledged before the next. :class:`EventLogError` if one was not."""
        for run in runs:
            self.publish(run)
        left = self._producer.flush(timeout_s)
        errors, self._errors = self._errors, []
        if left or errors:
            raise EventLogError(f"training-runs event not delivered ({left} pending): {'; '.join(errors[:3])}")

    def _check_fields(self) -> dict[str, Any]:
        if self.status is None:
            return {}
        st = self.status()
        return {"last_check_time_ms": st["last_check_time_ms"],
                "check_interval_s": self.settings.tier3_check_interval_s,
                "next_check_in_s": round(max(0.0, st["next_check_in_s"]), 3)}

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for every event to be acknowledged; False if one failed or the wait timed out. Dead letters whose
        write failed are written again meanwhile (smaller, or the same after a transient error)."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None
                                       else self.settings.tier3_trainer_commit_timeout_s)
        while True:
            left = self._producer.flush(max(0.0, deadline - time.monotonic()))
            if not self._retry_letters() or time.monotonic() >= deadline:
                break
        ok = left == 0 and not self._errors
        self._errors.clear()
        return ok

    def poll(self) -> None:
        self._producer.poll(0)
        self._retry_letters()

    # -- the events ---------------------------------------------------------------------------------------
    def started(self, run_id: str, *, model_version: int, base_model: str, details: dict[str, Any]) -> None:
        self.publish(TrainingRun(run_id=run_id, event="started", at_ms=now_ms(),
                                 model_name=self.settings.tier3_student_name, model_version=model_version,
                                 base_model=base_model, training_in_progress=True, details=details,
                                 **self._check_fields()))

    def succeeded(self, run_id: str, *, model_version: int, base_model: str, details: dict[str, Any]) -> None:
        self.publish(TrainingRun(run_id=run_id, event="succeeded", at_ms=now_ms(),
                                 model_name=self.settings.tier3_student_name, model_version=model_version,
                                 base_model=base_model, training_in_progress=False, details=details,
                                 **self._check_fields()))

    def failed(self, run_id: str, *, model_version: int | None, base_model: str | None,
               details: dict[str, Any]) -> None:
        self.publish(TrainingRun(run_id=run_id, event="failed", at_ms=now_ms(),
                                 model_name=self.settings.tier3_student_name, model_version=model_version,
                                 base_model=base_model, training_in_progress=False, details=details,
                                 **self._check_fields()))

    def heartbeat(self, *, training_in_progress: bool, last_check_time_ms: int, next_check_in_s: float,
                  details: dict[str, Any]) -> None:
        """The live status, on the compacted trainer-status topic (never on training-runs). ``details`` carry what
        the trainer does: ``stage``, ``stage_since_ms``, ``step``, ``total_steps``, ``loss``, ``eta_s``
        (trainer/stage.py) and ``held_for`` (why its partitions are paused); ``training_in_progress`` is true while
        a run trains or is evaluated before its commit, not while its close loop runs (trainer/heartbeat.py)."""
        hb = TrainingRun(run_id=self.heartbeat_run_id, event="heartbeat", at_ms=now_ms(),
                         model_name=self.settings.tier3_student_name, training_in_progress=training_in_progress,
                         last_check_time_ms=last_check_time_ms, check_interval_s=self.settings.tier3_check_interval_s,
                         next_check_in_s=round(max(0.0, next_check_in_s), 3),
                         details={**details, "trainer_id": self.trainer_id})
        self._send(self.settings.trainer_status_topic, hb.run_id, encode(hb))

    def answer(self, request: TrainerControl, *, answer: str, run_id: str | None = None, reason: str | None = None,
               details: dict[str, Any] | None = None) -> TrainerControl:
        """Answer a request read from trainer-control, on the same topic and key."""
        out = TrainerControl(kind="answer", command=request.command, request_id=request.request_id, at_ms=now_ms(),
                             group=self.settings.tier3_trainer_group, answer=answer,  # type: ignore[arg-type]
                             trainer_id=self.trainer_id, run_id=run_id, reason=reason, details=details or {})
        self._send(self.settings.trainer_control_topic, request.request_id, encode(out))
        return out

    def dead_letter(self, *, topic: str, partition: int, offset: int, key: bytes | None, value: bytes,
                    reason: str, error_kind: str) -> None:
        """A trace the trainer cannot decode: kept with its bytes and the reason; its offset is still part of
        the batch, so it is committed (skipped) with the next successful run.

        Never raises, whatever the record's size, key or coordinates: the letter is built to fit
        (``schemas.kafka.dead_letters.dead_letter_record``); one refused anyway, at once or by the broker, is written
        again smaller (without the original, then the smallest letter); a transient failure is written again,
        up to :data:`DEAD_LETTER_ATTEMPTS` times; what still fails is logged with the source coordinates and
        counted in :attr:`dead_letters_failed` (the source record stays on enriched-traces, kept forever)."""
        try:
            rec = dead_letter_record(value, max_record_bytes=self.settings.max_record_bytes, stage="decode",
                                     reason=reason, error_kind=error_kind, failed_at_ms=now_ms(), source_topic=topic,
                                     source_partition=partition, source_offset=offset, key=key)
            self._write_letter(rec, level=0, attempt=1)
            self._retry_letters()  # a write refused at once is written smaller now
        except Exception:  # a bug here must not stop the trainer either
            self.dead_letters_failed += 1
            log.exception("dead letter for %s/%d/%d not written", topic, partition, offset)

    def _write_letter(self, rec: LetterRecord, *, level: int, attempt: int, note: str = "write refused") -> None:
        letter = fallbacks(rec.letter, note=note)[level]

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            # never produce from inside a delivery report (librdkafka aborts when that happens during flush()):
            # the next write is queued, and written by the next poll() / flush() / dead_letter()
            if err is not None:
                self._letters_failed.append((rec, level, attempt, err))

        while True:
            try:
                self._producer.produce(self.settings.dead_letters_topic, key=rec.key, value=encode(letter),
                                       on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain, then try again
                self._producer.poll(0.1)
            except KafkaException as exc:  # refused at once (e.g. MSG_SIZE_TOO_LARGE): never raised from here
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is None:
                    raise
                self._letters_failed.append((rec, level, attempt, err))
                break

    def _retry_letters(self) -> int:
        """Write again the dead letters whose write failed: smaller when refused, the same when the failure was
        transient (up to :data:`DEAD_LETTER_ATTEMPTS`); give up (logged, counted) otherwise. Returns how many
        were written again."""
        n = 0
        for _ in range(3 * DEAD_LETTER_ATTEMPTS):  # each round may fail at once again (bounded)
            todo, self._letters_failed = self._letters_failed, []
            if not todo:
                break
            for rec, level, attempt, err in todo:
                where = rec.key.decode(errors="replace")
                what = write_failure(err.code())
                try:
                    if what == "refused" and level < 2:
                        log.warning("dead letter for %s refused (%s); writing it again smaller", where, err.str())
                        self._write_letter(rec, level=level + 1, attempt=attempt,
                                           note=f"first write refused: {err.str()}")
                    elif what == "transient" and attempt < DEAD_LETTER_ATTEMPTS:
                        log.warning("dead letter for %s not written (%s, attempt %d); again", where, err.str(),
                                    attempt)
                        self._write_letter(rec, level=level, attempt=attempt + 1)
                    else:
                        self.dead_letters_failed += 1
                        log.error("dead letter for %s not written (%s, attempt %d); the source record is where "
                                  "its key says", where, err.str(), attempt)
                        continue
                    n += 1
                except Exception:
                    self.dead_letters_failed += 1
                    log.exception("dead letter for %s not written", where)
        return n

    def close(self, timeout_s: float = 10.0) -> None:
        self.flush(timeout_s)

    def __enter__(self) -> TrainerEvents:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def read_run_events(settings: KafkaSettings, timeout_s: float = 30.0) -> list[TrainingRun]:
    """Every event on training-runs from the beginning up to now (no consumer group, nothing committed).

    Undecodable records are skipped: the log is shared, one bad record must not block promotions.
    """
    topic = settings.training_runs_topic
    out: list[TrainingRun] = []
    try:
        for msg in read_until_now(settings, topic, "gate-reader", timeout_s=timeout_s):
            try:
                out.append(decode(msg.value() or b"", TrainingRun, max_bytes=settings.max_record_bytes))
            except SchemaError:
                continue
    except TopicMissing:
        raise EventLogError(f"topic {topic} does not exist (run `tier3 topics create`)") from None
    except ReadTimeout as exc:
        raise EventLogError(str(exc)) from None
    except KafkaException as exc:
        raise EventLogError(f"cannot reach the broker to read {topic}: {exc}") from None
    return out
