"""The capture library: what the RL / LLM application calls to put an experience into the log.

Contract (docs/design.md, "Capture never hurts the caller"):

- ``publish()`` returns in microseconds and never raises into the caller (unless strict mode is on);
- it never blocks when the broker is down: librdkafka keeps the messages in its bounded in-memory queue and
  delivers them when the broker is back; only when that queue is full is an experience dropped, and counted;
- idempotent producer, ``acks=all``, compression (``schemas.settings.RELIABLE_PRODUCER``);
- a bad experience gets a clear error, logged once per kind of error, counted, and optionally raised;
- ``ENABLE_TIER3_CAPTURE=false`` turns it into a no-op; buffered experiences are flushed on ``close()`` and
  at interpreter exit.

Usage::

    from streams.client import publish
    publish(experience)          # an Experience, or a dict with the same fields
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer
from pydantic import Field, ValidationError

from schemas.codec import encode
from schemas.errors import MessageTooLarge, SchemaError
from schemas.messages import Experience
from schemas.settings import RELIABLE_PRODUCER, KafkaSettings
from streams.client._settings import build_settings
from streams.errors import CaptureError

log = logging.getLogger("tier3.capture")
_LIBRDKAFKA_LOG = logging.getLogger("tier3.capture.librdkafka")
_LIBRDKAFKA_LOG.setLevel(logging.CRITICAL)  # lower it to debug the client itself


class CaptureSettings(KafkaSettings):
    enable_tier3_capture: bool = Field(True, description="false makes publish() a no-op (the seed's name)")
    tier3_capture_buffer_messages: int = Field(100_000, ge=1, description="bounded in-memory buffer: "
                                               "experiences beyond it are dropped (and counted)")
    tier3_capture_buffer_kbytes: int = Field(256 * 1024, ge=1, description="buffer bound in KiB")
    tier3_capture_delivery_timeout_ms: int = Field(30 * 60 * 1000, ge=0, description="how long an experience "
                                                   "is retried while the broker is down before it counts as "
                                                   "failed (0 = forever)")
    tier3_capture_linger_ms: float = Field(5.0, ge=0, description="batching delay before a send")
    tier3_capture_strict: bool = Field(False, description="raise CaptureError on an invalid experience")
    tier3_capture_flush_timeout_s: float = Field(10.0, ge=0, description="flush wait on close / exit")

    def __init__(self, **values: Any) -> None:
        # the secrets registered and the log filter installed first; a refusal is InvalidSettings naming the
        # settings, never pydantic's ValidationError (whose text holds the input, secrets included)
        build_settings(super().__init__, self, values)


@dataclass
class CaptureStats:
    sent: int = 0  # accepted into the buffer
    delivered: int = 0  # acknowledged by the broker (acks=all)
    failed: int = 0  # the broker refused it or delivery timed out
    dropped: int = 0  # buffer full
    invalid: int = 0  # not a valid Experience (including one over TIER3_MAX_MESSAGE_BYTES)
    lost: int = 0  # still unacknowledged when close() stopped waiting (TIER3_CAPTURE_FLUSH_TIMEOUT_S): given up
    queue_depth: int = 0  # in the buffer, not yet acknowledged

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Capture:
    """A capture client. One per process is plenty (see :func:`get_capture`)."""

    def __init__(self, settings: CaptureSettings | None = None) -> None:
        self.settings = settings or CaptureSettings()
        self.enabled = self.settings.enable_tier3_capture
        self.topic = self.settings.experiences_topic
        self._max_bytes = self.settings.tier3_max_message_bytes
        self._stats = CaptureStats()
        self._seen_errors: set[str] = set()
        self._lock = threading.Lock()  # guards the counters updated from librdkafka's callback thread
        self._closed = False
        self._producer: Producer | None = None
        if self.enabled:
            self._producer = Producer({
                **self.settings.client_config(),
                **RELIABLE_PRODUCER,
                "linger.ms": self.settings.tier3_capture_linger_ms,
                "queue.buffering.max.messages": self.settings.tier3_capture_buffer_messages,
                "queue.buffering.max.kbytes": self.settings.tier3_capture_buffer_kbytes,
                "message.timeout.ms": self.settings.tier3_capture_delivery_timeout_ms,
                # the Java client's (and aiokafka's, so Faust's) partitioner: a key lands on one partition
                # whichever client wrote it
                "partitioner": "murmur2_random",
                # librdkafka repeats connection errors many times a second while the broker is away; they
                # reach the application's log once per kind through error_cb
                "logger": _LIBRDKAFKA_LOG,
                "error_cb": self._on_error,
            })
            atexit.register(self.close)

    # -- the hot path ------------------------------------------------------------------------------------------
    def publish(self, experience: Experience | Mapping[str, Any]) -> bool:
        """Buffer one experience for delivery. Returns True if accepted; never raises (unless strict)."""
        producer = self._producer
        if producer is None or self._closed:
            return False
        try:
            if isinstance(experience, Experience):
                value = encode(experience)
                key = experience.experience_id
            else:
                exp = Experience.model_validate(experience, strict=True)
                value, key = encode(exp), exp.experience_id
            if len(value) > self._max_bytes:  # the worker would dead-letter it: refuse it here, where it is cheap
                raise MessageTooLarge(f"the experience is {len(value)} bytes, over TIER3_MAX_MESSAGE_BYTES="
                                      f"{self._max_bytes}", field="experience")
        except (ValidationError, SchemaError, TypeError, ValueError) as exc:
            self._bad_input(exc)
            return False
        try:
            producer.produce(self.topic, value=value, key=key, on_delivery=self._on_delivery)
        except BufferError:
            self._stats.dropped += 1  # buffer full: the broker has been away for a long time
            self._note_once("buffer_full", "capture buffer is full; experiences are being dropped (counted in "
                            "stats().dropped). Is the broker reachable?")
            producer.poll(0)
            return False
        except Exception as exc:  # e.g. message too large: never into the RL loop
            self._stats.failed += 1
            self._note_once(type(exc).__name__, f"capture could not buffer an experience: {exc}")
            return False
        self._stats.sent += 1
        producer.poll(0)  # serve delivery callbacks; does not block
        return True

    # -- callbacks and bookkeeping -----------------------------------------------------------------------------
    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        purged = err is not None and err.code() in _PURGED
        with self._lock:
            if err is None:
                self._stats.delivered += 1
            elif purged:
                self._stats.lost += 1  # given up by close(): counted there, not as a delivery failure
            else:
                self._stats.failed += 1
        if err is not None and not purged:
            self._note_once(f"delivery:{err.name()}", f"an experience could not be delivered: {err.str()}")

    def _on_error(self, err: KafkaError) -> None:
        where = self.settings.kafka_bootstrap_servers
        buffered = (f"experiences are kept in memory (up to {self.settings.tier3_capture_buffer_messages}) and "
                    "sent when it is back")
        code = err.code()
        if code in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            text = f"capture cannot reach Kafka at {where} (no broker answers); {buffered}"
        elif code == KafkaError._RESOLVE:
            text = f"capture cannot resolve the Kafka address {where} (check KAFKA_BOOTSTRAP_SERVERS); {buffered}"
        elif code in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            text = (f"Kafka at {where} refused capture's credentials (check KAFKA_SASL_USERNAME / "
                    f"KAFKA_SASL_PASSWORD); {buffered}")
        elif code == KafkaError._SSL:
            text = f"capture's TLS connection to Kafka at {where} failed (check KAFKA_SSL_CA_LOCATION); {buffered}"
        else:
            text = f"capture: Kafka at {where} reported a problem: {err.str()}; {buffered}"
        self._note_once(f"client:{err.name()}", text)

    def _bad_input(self, exc: Exception) -> None:
        self._stats.invalid += 1
        if isinstance(exc, ValidationError):
            e = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in e["loc"])
            reason, kind = f"{where}: {e['msg']}", f"invalid:{where}:{e['type']}"
        else:
            reason, kind = str(exc), f"invalid:{type(exc).__name__}"
        self._note_once(kind, f"an invalid experience was not captured ({reason})")
        if self.settings.tier3_capture_strict:
            raise CaptureError(f"invalid experience: {reason}") from exc

    def _note_once(self, kind: str, message: str) -> None:
        if kind not in self._seen_errors:  # log once per kind of error: a hot loop must not flood the logs
            self._seen_errors.add(kind)
            log.warning("%s (further errors of this kind are only counted)", message)

    def stats(self) -> CaptureStats:
        s = CaptureStats(**asdict(self._stats))
        s.queue_depth = len(self._producer) if self._producer is not None else 0
        return s

    def flush(self, timeout_s: float | None = None) -> int:
        """Wait until buffered experiences are acknowledged; return how many are still buffered."""
        if self._producer is None:
            return 0
        t = self.settings.tier3_capture_flush_timeout_s if timeout_s is None else timeout_s
        return int(self._producer.flush(t))

    def close(self) -> None:
        if self._closed:
            return
        left = self.flush()
        self._closed = True
        if left and self._producer is not None:
            # give the rest up explicitly: their delivery reports (purged) count them in stats().lost
            self._producer.purge()
            self._producer.flush(1.0)
        self._producer = None  # release librdkafka's threads and sockets now, not at interpreter exit
        atexit.unregister(self.close)
        if left:
            log.warning("capture closed with %d experiences not delivered within %.0f s: they are lost (counted in "
                        "stats().lost)", left, self.settings.tier3_capture_flush_timeout_s)


_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})

_default: Capture | None = None
_default_lock = threading.Lock()


def get_capture() -> Capture:
    """The process-wide capture client, created on first use from the environment."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Capture()
    return _default


def publish(experience: Experience | Mapping[str, Any]) -> bool:
    """Capture one experience with the process-wide client (what the RL loop calls)."""
    return get_capture().publish(experience)


def publish_jsonl(path: Path, rate_per_s: float = 0.0, capture: Capture | None = None) -> dict[str, int]:
    """Publish every Experience in a JSONL file (e.g. the shipped examples), optionally at a steady rate.

    A line is accepted exactly when :func:`publish` would accept the record (``schema_version`` may be left
    out). Other lines (not JSON, not an object, not a valid Experience) are skipped with a warning naming the
    line and the field, and counted in ``invalid``; ``lines`` counts the non-empty lines read.
    """
    cap = capture or get_capture()
    start = time.monotonic()
    lines = skipped = 0
    with path.open("rb") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            lines += 1
            try:
                obj = orjson.loads(line)
                if not isinstance(obj, dict):
                    raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
                exp = Experience.model_validate(obj, strict=True)  # what publish() does with a mapping
            except (orjson.JSONDecodeError, TypeError, ValidationError) as exc:
                skipped += 1
                if isinstance(exc, ValidationError):
                    e = exc.errors(include_url=False, include_input=False)[0]
                    reason = f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}"
                else:
                    reason = str(exc) if isinstance(exc, TypeError) else f"not JSON ({exc})"
                log.warning("%s line %d skipped: %s", path, i + 1, reason)
                continue
            cap.publish(exp)
            if rate_per_s > 0:
                delay = start + (i + 1) / rate_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    cap.flush(60.0)
    stats = cap.stats().as_dict()
    stats["invalid"] += skipped
    stats["lines"] = lines
    return stats


__all__ = ["Capture", "CaptureSettings", "CaptureStats", "get_capture", "publish", "publish_jsonl"]
