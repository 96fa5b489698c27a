"""Settings of the streams worker (``tier3 worker``): sampling, teacher, enrichment, windows, web server.

One frozen object per process, built at start from the environment. Every field is named after its environment
variable (``tier3_sample_rate`` reads ``TIER3_SAMPLE_RATE``); API keys keep their vendors' names
(``ANTHROPIC_API_KEY``, ``OPENAI_API_KEY``) and are ``SecretStr``, so they never print.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from schemas.settings import KafkaSettings

TeacherKind = Literal["anthropic", "claude_cli", "openai", "recorded"]


class StreamsSettings(KafkaSettings):
    """Everything the Faust worker reads. Field name == environment variable name (case-insensitive)."""

    # --- identity and web server -------------------------------------------------------------------------
    tier3_worker_id: str = Field("", description="this worker's name in /status and logs "
                                 "(default: host name and process id)")
    tier3_app_id: str = Field("worker", description="Faust app id; the consumer group is <prefix><app id>, "
                              "so workers with the same prefix and app id share the partitions")
    tier3_web_host: str = Field("127.0.0.1", description="address the web server (/status, /metrics, /) binds "
                                "to; 127.0.0.1 keeps it off the network")
    tier3_web_port: int = Field(6066, ge=1, le=65535, description="web server port; give each worker on one "
                                "host its own")
    tier3_log_level: str = Field("info", description="worker log level (debug, info, warning, error)")

    # --- sampling (the original system's 15 % + confidence > 0.8) ----------------------------------------
    tier3_sample_rate: float = Field(0.15, ge=0.0, le=1.0, description="fraction of experiences sampled by a "
                                     "hash of experience_id (stable across processes and replays)")
    tier3_confidence_threshold: float = Field(0.8, ge=0.0, le=1.0, description="experiences with confidence "
                                              "strictly above this are always sampled")
    tier3_shadow_rate: float = Field(0.2, ge=0.0, le=1.0, description="fraction of the experiences a promoted "
                                     "student served that are enriched as shadow samples for online evaluation "
                                     "(same hash as TIER3_SAMPLE_RATE; the extra teacher calls are at most this "
                                     "share of student traffic, and share TIER3_TEACHER_CONCURRENCY)")

    # --- teacher -------------------------------------------------------------------------------------------
    tier3_teacher: TeacherKind = Field("anthropic", description="teacher backend: anthropic | claude_cli | "
                                       "openai (any OpenAI-compatible endpoint) | recorded (JSONL file)")
    tier3_teacher_model: str = Field("claude-sonnet-4-5", description="teacher model name")
    tier3_teacher_base_url: str | None = Field(None, description="API base URL (OpenAI-compatible servers such "
                                               "as vLLM, Ollama `http://127.0.0.1:11434/v1`, llama.cpp; or an "
                                               "Anthropic-compatible gateway)")
    anthropic_api_key: SecretStr | None = Field(None, description="Anthropic API key (never logged)")
    openai_api_key: SecretStr | None = Field(None, description="OpenAI-compatible API key (never logged; local "
                                             "servers accept any value)")
    tier3_claude_cli_path: str = Field("claude", description="Claude CLI executable for tier3_teacher=claude_cli")
    tier3_teacher_recorded_path: Path | None = Field(None, description="JSONL of recorded teacher outputs keyed "
                                                     "by prompt hash (tier3_teacher=recorded)")
    tier3_teacher_record_to: Path | None = Field(None, description="append every live teacher output to this "
                                                 "JSONL file, for later recorded runs")
    tier3_teacher_max_tokens: int = Field(2048, ge=16, description="max output tokens per teacher call")
    tier3_teacher_temperature: float = Field(0.0, ge=0.0, le=2.0, description="teacher sampling temperature "
                                             "(OpenAI-compatible teachers)")
    tier3_teacher_concurrency: int = Field(32, ge=1, le=4096, description="teacher calls in flight per worker")
    tier3_teacher_timeout_s: float = Field(120.0, gt=0, description="timeout of one teacher call (s); the "
                                           "Claude CLI process is killed when it passes")
    tier3_teacher_max_attempts: int = Field(3, ge=1, description="attempts for one experience whose teacher "
                                            "output is invalid (bad JSON, off-schema) before it is dead-lettered")
    tier3_teacher_retry_max_s: float = Field(900.0, gt=0, description="how long (s) one experience keeps "
                                             "retrying 429 / 5xx / timeouts before it is dead-lettered; while it "
                                             "retries, consumption slows (back-pressure), nothing is dropped")
    tier3_teacher_backoff_initial_s: float = Field(0.5, gt=0, description="first retry delay (s), doubled each "
                                                   "attempt, with jitter")
    tier3_teacher_backoff_max_s: float = Field(10.0, gt=0, description="largest retry delay (s)")

    # --- processing ---------------------------------------------------------------------------------------
    tier3_max_pending: int = Field(0, ge=0, description="experiences read but not yet finished, per worker; "
                                   "bounds memory while the teacher is slow (0 = 8 x tier3_teacher_concurrency)")
    tier3_session_timeout_s: float = Field(30.0, ge=3, description="consumer group session timeout (s): how "
                                           "soon the group gives a dead worker's partitions to the others")
    tier3_commit_interval_s: float = Field(1.0, gt=0, description="how often Faust commits acknowledged offsets")
    tier3_stall_s: float = Field(30.0, gt=0, description="an assigned partition with records waiting and nothing "
                                 "delivered for this long is resumed and sought back in place (streams/stall.py)")
    tier3_window_s: int = Field(1800, ge=1, description="tumbling window of the trace count table (s); default "
                                "is the original trainer's 30 min check interval")
    tier3_recent_windows: int = Field(5, ge=1, le=100, description="closed windows shown on /status")
    tier3_online_grace_s: float = Field(10.0, ge=0.0, description="online evaluation: a window is published on "
                                        "online-eval this long (s) after it ends (traces of slow teacher calls "
                                        "still land in it; a later one republishes it)")
    tier3_online_keep_windows: int = Field(48, ge=2, le=10_000, description="online evaluation: windows kept in "
                                           "the table (and in /status's history) per task, arm and version")

    @model_validator(mode="after")
    def _check(self) -> StreamsSettings:
        if self.tier3_teacher == "recorded" and self.tier3_teacher_recorded_path is None:
            raise ValueError("TIER3_TEACHER=recorded needs TIER3_TEACHER_RECORDED_PATH (a JSONL file)")
        if self.tier3_teacher_backoff_max_s < self.tier3_teacher_backoff_initial_s:
            raise ValueError("TIER3_TEACHER_BACKOFF_MAX_S must be >= TIER3_TEACHER_BACKOFF_INITIAL_S")
        return self

    @property
    def worker_id(self) -> str:
        return self.tier3_worker_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def max_pending(self) -> int:
        return self.tier3_max_pending or 8 * self.tier3_teacher_concurrency

    @property
    def faust_app_id(self) -> str:
        return f"{self.tier3_topic_prefix}{self.tier3_app_id}"

    def faust_broker_url(self) -> str:
        return ";".join(f"kafka://{hp.strip()}" for hp in self.kafka_bootstrap_servers.split(",") if hp.strip())

    def faust_credentials(self) -> Any:
        """Faust's broker credentials for SASL / SSL, or None for PLAINTEXT."""
        import ssl

        import faust

        proto = self.kafka_security_protocol
        if proto == "PLAINTEXT":
            return None
        ctx: ssl.SSLContext | None = None
        if proto in ("SSL", "SASL_SSL"):
            ctx = ssl.create_default_context(cafile=self.kafka_ssl_ca_location)
            if self.kafka_ssl_certificate_location:
                ctx.load_cert_chain(self.kafka_ssl_certificate_location, self.kafka_ssl_key_location,
                                    password=(self.kafka_ssl_key_password.get_secret_value()
                                              if self.kafka_ssl_key_password else None))
        if proto == "SSL":
            return faust.SSLCredentials(ctx)
        return faust.SASLCredentials(
            username=self.kafka_sasl_username or "",
            password=self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else "",
            ssl_context=ctx,
            mechanism=self.kafka_sasl_mechanism or "PLAIN",
        )
