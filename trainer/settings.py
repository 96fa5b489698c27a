"""Settings of the trainer process (``tier3 trainer``, ``tier3 train-now``, ``tier3 replay``).

Field name == environment variable name (``tier3_min_traces`` reads ``TIER3_MIN_TRACES``). The hyper-parameters
of a run live in :class:`trainer.sft_config.SFTConfig`; this object says *when* to train and how the consumer
behaves in its group. Kafka mixes milliseconds and seconds: every name carries its unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from schemas.settings import RELIABLE_CONSUMER, KafkaSettings

#: crash_*: the process exits (os._exit) at that step of the commit protocol; kill_*: it SIGKILLs itself inside
#: the close loop: during the evaluation (before the manifest), after the `evaluated` event, in the gate (verdict
#: decided, not published), after the verdict, in the export (merged, not converted)
FaultPoint = Literal["", "crash_after_manifest", "crash_after_commit", "kill_in_evaluation", "kill_after_evaluated",
                     "kill_in_gate", "kill_after_verdict", "kill_in_export", "kill_after_export"]


class TrainerSettings(KafkaSettings):
    # --- when to train -----------------------------------------------------------------------------------
    tier3_min_traces: int = Field(100, ge=1, description="start a run once this many new distinct traces "
                                  "(by experience_id) are waiting (the original system's TIER3_MIN_TRACES)")
    tier3_check_interval_s: float = Field(1800.0, gt=0.0, description="start a run when this many seconds "
                                          "passed since the last check and at least one new trace waits")
    tier3_max_traces_per_run: int = Field(10_000, ge=1, description="when a trigger fires, the run takes every "
                                          "trace available up to the end offsets of that moment (all assigned "
                                          "partitions), but reading stops once the batch holds this many messages")
    tier3_trainer_drain_timeout_s: float = Field(30.0, gt=0.0, description="longest wait, after a trigger, to "
                                                 "read up to the end offsets of that moment; then the run takes "
                                                 "what was read")
    tier3_train_now_max_age_s: float = Field(3600.0, gt=0.0, description="a train_now request on trainer-control "
                                             "older than this when the trainer reads it is declined (expired)")

    # --- the consumer group ------------------------------------------------------------------------------
    tier3_trainer_group: str = Field("tier3-trainer", min_length=1, description="consumer group of the "
                                     "trainer: its committed offsets say which traces are inside a trained model")
    tier3_trainer_max_poll_interval_ms: int = Field(300_000, ge=1000, description="max.poll.interval.ms; the "
                                                    "trainer keeps polling (partitions paused) while it trains, "
                                                    "so a run may last longer than this")
    tier3_trainer_session_timeout_ms: int = Field(45_000, ge=1000, description="session.timeout.ms: how long "
                                                  "the group waits for a crashed trainer before rebalancing")
    tier3_trainer_heartbeat_interval_ms: int = Field(3_000, ge=100, description="heartbeat.interval.ms of the "
                                                     "group protocol (keep <= session timeout / 3)")
    tier3_trainer_poll_timeout_s: float = Field(0.5, gt=0.0, le=10.0, description="longest single poll() wait")

    # --- failures ----------------------------------------------------------------------------------------
    tier3_trainer_backoff_initial_s: float = Field(5.0, ge=0.0, description="wait before the first retry of "
                                                   "a failed run; doubles per failure")
    tier3_trainer_backoff_max_s: float = Field(600.0, ge=0.0, description="cap of the retry back-off")
    tier3_trainer_commit_timeout_s: float = Field(30.0, gt=0.0, description="wait for the broker's answer to "
                                                  "the offset commit and for event deliveries")

    # --- state and events --------------------------------------------------------------------------------
    tier3_runs_dir: Path | None = Field(None, description="run folders (dataset, adapter, manifest); default "
                                        "<TIER3_DATA_DIR>/runs. Keep it on a volume: it is how a restarted "
                                        "trainer recognises a run that was trained but not committed")
    tier3_student_name: str = Field("cc-widget-selector", description="model name written in run events")
    tier3_trainer_status_interval_s: float = Field(30.0, gt=0.0, description="seconds between `heartbeat` "
                                                   "events on the compacted trainer-status topic (the /status "
                                                   "trainer block)")

    tier3_trainer_close_loop: bool = Field(True, description="close the loop in the trainer: evaluate each run "
                                           "on its holdout before the manifest (the metrics are part of the "
                                           "record), and after the commit run the promotion gate and export "
                                           "(trainer.close_loop.gate.after_run); settings in "
                                           "trainer/close_loop/settings.py")

    tier3_trainer_stop_grace_s: float = Field(30.0, ge=0.0, description="on SIGTERM/SIGINT, how long the work "
                                              "in progress (training stops at its next step) may take to end "
                                              "before the process exits without it")
    tier3_trainer_close_attempts: int = Field(5, ge=1, description="attempts, per process, at a committed run's "
                                              "close loop (evaluated, verdict, export) before it waits for the next "
                                              "start")

    # --- testing only ------------------------------------------------------------------------------------
    tier3_trainer_fault: FaultPoint = Field("", description="testing only: exit the process abruptly at this "
                                            "point (crash_after_manifest, crash_after_commit: os._exit; "
                                            "kill_in_evaluation, kill_after_evaluated, kill_in_gate, "
                                            "kill_after_verdict, kill_in_export, kill_after_export: SIGKILL)")
    tier3_trainer_step_delay_s: float = Field(0.0, ge=0.0, description="testing only: sleep this long after "
                                              "every optimiser step, to make a run outlast a timeout")

    @model_validator(mode="after")
    def _check_timeouts(self) -> TrainerSettings:
        if self.tier3_trainer_max_poll_interval_ms < self.tier3_trainer_session_timeout_ms:
            raise ValueError("TIER3_TRAINER_MAX_POLL_INTERVAL_MS must be >= TIER3_TRAINER_SESSION_TIMEOUT_MS "
                             "(librdkafka refuses the combination)")
        if self.tier3_max_traces_per_run < self.tier3_min_traces:
            raise ValueError("TIER3_MAX_TRACES_PER_RUN must be >= TIER3_MIN_TRACES")
        if self.tier3_trainer_heartbeat_interval_ms >= self.tier3_trainer_session_timeout_ms:
            raise ValueError("TIER3_TRAINER_HEARTBEAT_INTERVAL_MS must be < TIER3_TRAINER_SESSION_TIMEOUT_MS")
        return self

    @property
    def runs_dir(self) -> Path:
        return self.tier3_runs_dir if self.tier3_runs_dir is not None else self.tier3_data_dir / "runs"

    def consumer_config(self) -> dict[str, Any]:
        """The trainer group's consumer: RELIABLE_CONSUMER (no auto-commit, no auto offset store, cooperative
        sticky) plus the group timeouts of this object."""
        return {
            **self.client_config(),
            **RELIABLE_CONSUMER,
            "group.id": self.tier3_trainer_group,
            "max.poll.interval.ms": self.tier3_trainer_max_poll_interval_ms,
            "session.timeout.ms": self.tier3_trainer_session_timeout_ms,
            "heartbeat.interval.ms": self.tier3_trainer_heartbeat_interval_ms,
            "client.id": f"tier3-trainer-{self.tier3_trainer_group}",
        }
