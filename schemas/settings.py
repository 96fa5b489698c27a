"""Settings shared by every tier3 process: how to reach Kafka, and the topics (the contract between parts).

Every field is named after its environment variable (``kafka_bootstrap_servers`` reads
``KAFKA_BOOTSTRAP_SERVERS``), so there is one name for a setting everywhere: code, docs, compose file.
Each process builds one frozen settings object at start; invalid values stop it with a message that names the
variable.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# Reliability settings pinned in code, never left to client defaults (librdkafka has idempotence off).
RELIABLE_PRODUCER: dict[str, Any] = {
    "enable.idempotence": True,  # no duplicates or reordering from internal retries
    "acks": "all",  # a write is acknowledged only when every in-sync replica has it
    "max.in.flight.requests.per.connection": 5,  # the most idempotence allows while keeping order
    "compression.type": "zstd",
}
#: the record size limit of every tier3 topic and producer when ``TIER3_MAX_MESSAGE_BYTES`` is at most half of it
DEFAULT_MAX_RECORD_BYTES = 2 * 1024 * 1024
#: what a record batch may add to one record on the wire (batch header, record framing, compression framing):
#: a topic's ``max.message.bytes`` is the producers' ``message.max.bytes`` plus this, so whatever a tier3 producer
#: accepts, the broker accepts too
RECORD_BATCH_SLACK_BYTES = 64 * 1024

RELIABLE_CONSUMER: dict[str, Any] = {
    "enable.auto.commit": False,  # offsets are committed by our code, after the work is durable
    "enable.auto.offset.store": False,  # and only the offsets we store explicitly
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "isolation.level": "read_committed",
}


class _RateLimit(logging.Filter):
    """Let one line of each kind through per interval; count the rest and say so with the next one shown.

    librdkafka repeats a connection error many times a second while a broker is away (about 20 lines/s per
    client); an application's log must not be flooded by that. A "kind" is the message with its numbers blanked
    (so "after 0ms" and "after 3ms" are the same kind).
    """

    _DIGITS = re.compile(r"\d+")

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self._DIGITS.sub("#", record.getMessage())
        now = time.monotonic()
        with self._lock:
            last, hidden = self._seen.get(kind, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._seen[kind] = (last, hidden + 1)
                return False
            if len(self._seen) > 1000:  # bounded: kinds are few, but host names can vary
                self._seen.clear()
            self._seen[kind] = (now, 0)
        if hidden:
            record.msg = f"{record.msg} ({hidden} more like this in the last {self.interval_s:.0f} s not shown)"
        return True


#: every librdkafka client's log goes here (``client_config()["logger"]``), at most one line of a kind a minute
KAFKA_CLIENT_LOG = logging.getLogger("tier3.kafka")
KAFKA_CLIENT_LOG.addFilter(_RateLimit(60.0))


class KafkaSettings(BaseSettings):
    """Connection and topic settings. Field name == environment variable name (case-insensitive)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False, env_prefix="")

    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers (host:port,...). "
                                         "Default: the local broker started by `tier3 broker up`.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security.protocol")
    kafka_sasl_mechanism: str | None = Field(None, description="SASL mechanism, e.g. PLAIN, SCRAM-SHA-512")
    kafka_sasl_username: str | None = Field(None, description="SASL user name")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    kafka_ssl_ca_location: str | None = Field(None, description="CA certificate file for SSL")
    kafka_ssl_certificate_location: str | None = Field(None, description="client certificate for mutual TLS")
    kafka_ssl_key_location: str | None = Field(None, description="client key for mutual TLS")
    kafka_ssl_key_password: SecretStr | None = Field(None, description="password of an encrypted client key "
                                                     "(never logged)")
    tier3_kafka_timeout_s: float = Field(6.0, gt=0, le=300, description="how long a command waits at start for "
                                         "a Kafka broker to answer before it says none does and exits (s)")

    tier3_topic_prefix: str = Field("tier3.", description="prefix of every topic name (tenants, tests)")
    tier3_partitions: int = Field(6, ge=1, le=1000, description="partitions of experiences, enriched-traces "
                                  "(and so of the count table's changelog)")
    tier3_dead_letter_partitions: int = Field(3, ge=1, le=1000, description="partitions of dead-letters")
    tier3_replication_factor: int = Field(1, ge=1, description="replication factor of created topics")
    tier3_experiences_retention_ms: int = Field(28 * 24 * 3600 * 1000, description="retention of experiences "
                                                "(default: as long as dead letters are kept, so a dead letter "
                                                "holding only a prefix of its original can be re-driven from "
                                                "the source record)")
    tier3_dead_letters_retention_ms: int = Field(28 * 24 * 3600 * 1000, description="retention of dead-letters")
    tier3_max_message_bytes: int = Field(1_000_000, ge=1024, description="largest accepted experience (bytes): "
                                         "capture refuses larger ones, the worker dead-letters them; every "
                                         "other size limit is derived from it (docs/guarantees.md, \"Size "
                                         "limits\")")
    tier3_data_dir: Path = Field(Path(".tier3"), description="local state: broker, runs, models, reports")

    @property
    def max_record_bytes(self) -> int:
        """The largest record a tier3 producer writes (librdkafka ``message.max.bytes``) and a tier3 reader decodes.

        Room for a trace that embeds the largest accepted experience plus the teacher's reasoning and answer, and
        for any dead letter (their original bytes are cut to fit it, see ``schemas.kafka.dead_letters``).
        """
        return max(DEFAULT_MAX_RECORD_BYTES, 2 * self.tier3_max_message_bytes)

    @property
    def topic_max_message_bytes(self) -> int:
        """``max.message.bytes`` of every tier3 topic, and the consumers' fetch size per partition."""
        return self.max_record_bytes + RECORD_BATCH_SLACK_BYTES

    def topic(self, name: str) -> str:
        return f"{self.tier3_topic_prefix}{name}"

    @property
    def experiences_topic(self) -> str:
        return self.topic("experiences")

    @property
    def traces_topic(self) -> str:
        return self.topic("enriched-traces")

    @property
    def dead_letters_topic(self) -> str:
        return self.topic("dead-letters")

    @property
    def training_runs_topic(self) -> str:
        return self.topic("training-runs")

    @property
    def online_eval_topic(self) -> str:
        return self.topic("online-eval")

    @property
    def trainer_status_topic(self) -> str:
        """The trainers' heartbeats (TrainingRun, event ``heartbeat``), compacted: one live record per trainer."""
        return self.topic("trainer-status")

    @property
    def trainer_control_topic(self) -> str:
        """Requests to the trainer (``tier3 train-now``) and its answers (TrainerControl)."""
        return self.topic("trainer-control")

    def client_config(self) -> dict[str, Any]:
        """The librdkafka connection settings (bootstrap + security) and the record size limit, for any client.

        Also: the client's log goes to :data:`KAFKA_CLIENT_LOG` (rate-limited, instead of ~20 lines a second on
        stderr while a broker is away), and no client ever makes the broker create a topic by asking for it: a
        topic auto-created that way would get the broker's default partition count, not ours.
        """
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "security.protocol": self.kafka_security_protocol,
            "allow.auto.create.topics": False,
            "logger": KAFKA_CLIENT_LOG,
            "message.max.bytes": self.max_record_bytes,  # what a producer writes, and what the topics accept
        }
        optional = {
            "sasl.mechanism": self.kafka_sasl_mechanism,
            "sasl.username": self.kafka_sasl_username,
            "sasl.password": self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None,
            "ssl.ca.location": self.kafka_ssl_ca_location,
            "ssl.certificate.location": self.kafka_ssl_certificate_location,
            "ssl.key.location": self.kafka_ssl_key_location,
            "ssl.key.password": (self.kafka_ssl_key_password.get_secret_value() if self.kafka_ssl_key_password
                                 else None),
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        return conf

    def as_env(self) -> dict[str, str]:
        """These settings as environment variables (field name == variable name), for a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[name.upper()] = str(value)
        return env

    def topic_specs(self) -> list[TopicSpec]:
        """Every topic of tier3 with partitions, retention and cleanup policy (docs/design.md, "Topics")."""
        forever = "-1"
        size = {"max.message.bytes": str(self.topic_max_message_bytes)}  # one limit for every topic
        return [
            TopicSpec(self.experiences_topic, self.tier3_partitions,
                      {"retention.ms": str(self.tier3_experiences_retention_ms), **size}),
            # the dataset's source: kept forever, so any model can be rebuilt by replay
            TopicSpec(self.traces_topic, self.tier3_partitions, {"retention.ms": forever, **size}),
            TopicSpec(self.dead_letters_topic, self.tier3_dead_letter_partitions,
                      {"retention.ms": str(self.tier3_dead_letters_retention_ms), **size}),
            # one partition: lifecycle events (promoted, rollback) must be read in the order they happened
            TopicSpec(self.training_runs_topic, 1, {"retention.ms": forever, **size}),
            # closed windows of online agreement (streams/online_eval.py): latest per key, a week of windows
            TopicSpec(self.online_eval_topic, 1, {"cleanup.policy": "compact,delete",
                                                  "retention.ms": str(7 * 24 * 3600 * 1000), **size}),
            # heartbeats: compacted, keyed by trainer, so the topic holds about one record per trainer however long
            # it runs (small segments: the active segment is never compacted)
            TopicSpec(self.trainer_status_topic, 1, {
                "cleanup.policy": "compact", "segment.ms": "600000",
                "min.cleanable.dirty.ratio": "0.1", "delete.retention.ms": "3600000", **size}),
            # train-now requests and the trainer's answers: few, and kept (who asked for which run)
            TopicSpec(self.trainer_control_topic, 1, {"retention.ms": forever, **size}),
        ]

    def specs_of(self, *topics: str) -> list[TopicSpec]:
        """The specs of these topics, by full name (``settings.specs_of(settings.traces_topic)``)."""
        by_name = {spec.name: spec for spec in self.topic_specs()}
        return [by_name[t] for t in topics]


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]
