"""Helpers for the trainer's real-broker tests: settings, producing traces, reading events and committed offsets."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from schemas import EnrichedTrace, TrainerControl, TrainingRun, decode, encode
from schemas.kafka import reading as kio
from tests.conftest import ROOT, settings_env
from tests.kafka_utils import consume_values, produce_values
from trainer.settings import TrainerSettings
from trainer.sft_config import SFTConfig

#: group timeouts small enough that a killed trainer is evicted in seconds (the broker's minimum session is 6 s)
FAST_GROUP: dict[str, Any] = {
    "tier3_trainer_session_timeout_ms": 6000,
    "tier3_trainer_max_poll_interval_ms": 6000,
    "tier3_trainer_heartbeat_interval_ms": 1000,
    "tier3_trainer_backoff_initial_s": 0.5,
    "tier3_trainer_backoff_max_s": 5.0,
    "tier3_trainer_status_interval_s": 1.0,
    "tier3_trainer_poll_timeout_s": 0.2,
}


def trainer_settings(make_settings: Callable[..., Any], **overrides: Any) -> TrainerSettings:
    fields = {**FAST_GROUP, "tier3_trainer_group": f"trainer-{uuid.uuid4().hex[:8]}", **overrides}
    s = make_settings(TrainerSettings, **fields)
    assert isinstance(s, TrainerSettings)
    return s


def sft_config(base_model: Path | str, **overrides: Any) -> SFTConfig:
    """Small and fast: two short phases, big batches, short sequences."""
    fields: dict[str, Any] = {"tier3_base_model": str(base_model), "tier3_backend": "trl",
                              "tier3_phases": "answer:1,reasoning:1", "tier3_batch_size": 8,
                              "tier3_lora_r": 4, "tier3_lora_alpha": 8,
                              "tier3_learning_rate": 1e-3, "tier3_scope": "all", **overrides}
    return SFTConfig(**fields)


def produce_traces(settings: TrainerSettings, traces: Iterable[EnrichedTrace]) -> int:
    return produce_values(settings, settings.traces_topic, [(t.experience_id, encode(t)) for t in traces])


def committed(settings: TrainerSettings, group: str | None = None) -> dict[int, int]:
    """The broker's committed offsets of the trainer group, {partition: offset}; -1001 (invalid) when none."""
    c = Consumer({**settings.client_config(), "group.id": group or settings.tier3_trainer_group,
                  "enable.auto.commit": False})
    try:
        parts = range(settings.tier3_partitions)
        return {tp.partition: tp.offset for tp in
                c.committed([TopicPartition(settings.traces_topic, p) for p in parts], timeout=20)}
    finally:
        c.close()


def end_offsets(settings: TrainerSettings) -> dict[int, int]:
    """High watermarks of enriched-traces, {partition: offset} (only partitions with data)."""
    c = Consumer({**settings.client_config(), "group.id": f"wm-{uuid.uuid4().hex}"})
    try:
        out = {}
        for p in range(settings.tier3_partitions):
            _lo, hi = kio.watermarks(c, settings.traces_topic, [p], 20)[p]
            if hi > 0:
                out[p] = hi
        return out
    finally:
        c.close()


def events(settings: TrainerSettings, idle_s: float = 1.5) -> list[TrainingRun]:
    msgs = consume_values(settings, settings.training_runs_topic, idle_s=idle_s)
    return [decode(m.value(), TrainingRun) for m in msgs]


def heartbeats(settings: TrainerSettings, idle_s: float = 1.5) -> list[TrainingRun]:
    """The trainer's heartbeats, on the trainer-status topic."""
    msgs = consume_values(settings, settings.trainer_status_topic, idle_s=idle_s)
    return [decode(m.value(), TrainingRun) for m in msgs]


def control_log(settings: TrainerSettings, idle_s: float = 1.5) -> list[TrainerControl]:
    """Every request and answer on trainer-control, in order."""
    return [decode(m.value(), TrainerControl)
            for m in consume_values(settings, settings.trainer_control_topic, idle_s=idle_s)]


def lifecycle(settings: TrainerSettings) -> list[tuple[str, str]]:
    """(event, run_id) of everything but heartbeats, in order."""
    return [(e.event, e.run_id) for e in events(settings) if e.event != "heartbeat"]


def wait_for_event(settings: TrainerSettings, event: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
                   where: Callable[[TrainingRun], bool] | None = None) -> TrainingRun:
    """Poll training-runs (trainer-status for heartbeats) from the beginning until an ``event`` (for which
    ``where`` holds) shows up."""
    c = Consumer({**settings.client_config(), "group.id": f"ev-{uuid.uuid4().hex}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    # heartbeats are on the compacted trainer-status topic, everything else on training-runs
    topic = settings.trainer_status_topic if event == "heartbeat" else settings.training_runs_topic
    c.assign([TopicPartition(topic, 0, 0)])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"trainer exited with {proc.returncode} before {event!r}")
            msg = c.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            run = decode(msg.value(), TrainingRun)
            if run.event == event and (where is None or where(run)):
                return run
    finally:
        c.close()
    raise AssertionError(f"no {event!r} event within {timeout_s} s")


def start_trainer(settings: TrainerSettings, cfg: SFTConfig, log_path: Path, max_runs: int | None = None,
                  **env_overrides: Any) -> subprocess.Popen[bytes]:
    """``python -m tier3 trainer`` in a subprocess with ``settings`` and ``cfg`` as its environment."""
    env = settings_env(settings)
    env["TIER3_TRAINER_CLOSE_LOOP"] = "false"  # these tests are about the commit protocol, not the evaluation
    for name, value in {**cfg.model_dump(mode="json"), **env_overrides}.items():
        env[name.upper()] = str(value)
    log = log_path.open("ab")
    args = [sys.executable, "-m", "tier3", "trainer", "--log-level", "INFO"]
    if max_runs is not None:
        args += ["--max-runs", str(max_runs)]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode
