"""Settings shared by every tier3 process: how to reach Kafka, and the topics (the contract between parts).

Every field is named after its environment variable (``kafka_bootstrap_servers`` reads
``KAFKA_BOOTSTRAP_SERVERS``), so there is one name for a setting everywhere: code, docs, compose file.
Each process builds one frozen settings object at start; invalid values stop it with a message that names the
variable.
"""

from __future__ import annotations

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
RELIABLE_CONSUMER: dict[str, Any] = {
    "enable.auto.commit": False,  # offsets are committed by our code, after the work is durable
    "enable.auto.offset.store": False,  # and only the offsets we store explicitly
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "isolation.level": "read_committed",
}


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

    tier3_topic_prefix: str = Field("tier3.", description="prefix of every topic name (tenants, tests)")
    tier3_partitions: int = Field(6, ge=1, le=1000, description="partitions of experiences, enriched-traces "
                                  "(and so of the count table's changelog)")
    tier3_dead_letter_partitions: int = Field(3, ge=1, le=1000, description="partitions of dead-letters")
    tier3_replication_factor: int = Field(1, ge=1, description="replication factor of created topics")
    tier3_experiences_retention_ms: int = Field(7 * 24 * 3600 * 1000, description="retention of experiences")
    tier3_dead_letters_retention_ms: int = Field(28 * 24 * 3600 * 1000, description="retention of dead-letters")
    tier3_max_message_bytes: int = Field(1_000_000, ge=1024, description="largest accepted message")
    tier3_data_dir: Path = Field(Path(".tier3"), description="local state: broker, runs, models, reports")

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
    def trainer_status_topic(self) -> str:
        """The trainers' heartbeats (TrainingRun, event ``heartbeat``), compacted: one live record per trainer."""
        return self.topic("trainer-status")

    @property
    def trainer_control_topic(self) -> str:
        """Requests to the trainer (``tier3 train-now``) and its answers (TrainerControl)."""
        return self.topic("trainer-control")

    def client_config(self) -> dict[str, Any]:
        """The librdkafka connection settings (bootstrap + security) for any client."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "security.protocol": self.kafka_security_protocol,
        }
        optional = {
            "sasl.mechanism": self.kafka_sasl_mechanism,
            "sasl.username": self.kafka_sasl_username,
            "sasl.password": self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None,
            "ssl.ca.location": self.kafka_ssl_ca_location,
            "ssl.certificate.location": self.kafka_ssl_certificate_location,
            "ssl.key.location": self.kafka_ssl_key_location,
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
        """Every topic of tier3 with partitions, retention and cleanup policy (docs/guarantees.md, "Topics")."""
        forever = "-1"
        return [
            TopicSpec(self.experiences_topic, self.tier3_partitions,
                      {"retention.ms": str(self.tier3_experiences_retention_ms)}),
            # the dataset's source: kept forever, so any model can be rebuilt by replay
            TopicSpec(self.traces_topic, self.tier3_partitions, {"retention.ms": forever}),
            TopicSpec(self.dead_letters_topic, self.tier3_dead_letter_partitions,
                      {"retention.ms": str(self.tier3_dead_letters_retention_ms)}),
            # one partition: lifecycle events (promoted, rollback) must be read in the order they happened
            TopicSpec(self.training_runs_topic, 1, {"retention.ms": forever}),
            # heartbeats: compacted, keyed by trainer, so the topic holds about one record per trainer however long
            # it runs (small segments: the active segment is never compacted)
            TopicSpec(self.trainer_status_topic, 1, {
                "cleanup.policy": "compact", "segment.ms": "600000",
                "min.cleanable.dirty.ratio": "0.1", "delete.retention.ms": "3600000"}),
            # train-now requests and the trainer's answers: few, and kept (who asked for which run)
            TopicSpec(self.trainer_control_topic, 1, {"retention.ms": forever}),
        ]


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]
