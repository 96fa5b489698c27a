"""Crashes of the trainer process at the protocol's failure points (real broker, real subprocesses).

- SIGKILL while training: nothing was committed, the restarted trainer trains the same traces again;
- exit right after the manifest, before the commit: the restarted trainer commits the recorded run, no retraining;
- exit right after the commit, before `succeeded`: the restarted trainer announces it, no retraining.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.synthetic import synthetic_traces
from tests.trainer.trainer_kafka import (
    committed,
    end_offsets,
    events,
    lifecycle,
    produce_traces,
    sft_config,
    start_trainer,
    stop,
    trainer_settings,
    wait_for_event,
)
from trainer.consumer import FAULT_EXIT_CODE
from trainer.manifest import list_manifests
from trainer.tiny_model import cached_tiny_model

INVALID = -1001

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return cached_tiny_model()


def _wait_exit(proc: Any, timeout_s: float, log: Path) -> int:
    try:
        return int(proc.wait(timeout_s))
    except Exception:
        stop(proc)
        raise AssertionError(f"trainer did not exit in {timeout_s} s; log:\n{log.read_text()[-3000:]}") from None


@pytest.mark.slow
def test_sigkill_during_training_the_restarted_trainer_redoes_the_run(
        make_settings: Callable[..., Any], tiny_model: Path, tmp_path: Path) -> None:
    s = trainer_settings(make_settings, tier3_min_traces=20)
    produce_traces(s, synthetic_traces(20, seed=11))
    ends = end_offsets(s)
    cfg = sft_config(tiny_model)
    log = tmp_path / "trainer.log"

    # first life: training slowed to 1 s per step, killed a moment after it started
    proc = start_trainer(s, cfg, log, tier3_trainer_step_delay_s=1.0)
    try:
        started = wait_for_event(s, "started", timeout_s=90, proc=proc)
        # the heartbeat says the optimiser is stepping: the kill lands in the middle of training
        wait_for_event(s, "heartbeat", timeout_s=90, proc=proc, where=lambda e: e.details.get("step", 0) >= 2)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        stop(proc)
    assert set(committed(s).values()) == {INVALID}, "a killed run committed offsets"
    assert list_manifests(s.runs_dir) == []

    # second life: same group, same runs dir; it must get the same traces back and train them
    proc = start_trainer(s, cfg, log, max_runs=1)
    assert _wait_exit(proc, 150, log) == 0, log.read_text()[-3000:]
    assert committed(s) == {p: ends.get(p, INVALID) for p in range(s.tier3_partitions)}, log.read_text()[-3000:]
    (m,) = list_manifests(s.runs_dir)
    assert m.run_id != started.run_id and m.n_unique == 20 and m.state == "published"
    assert [e for e, _ in lifecycle(s)] == ["started", "started", "succeeded"]


def test_crash_after_the_manifest_before_the_commit_is_not_trained_twice(
        make_settings: Callable[..., Any], tiny_model: Path, tmp_path: Path) -> None:
    s = trainer_settings(make_settings, tier3_min_traces=12)
    produce_traces(s, synthetic_traces(12, seed=12))
    ends = end_offsets(s)
    cfg = sft_config(tiny_model, tier3_phases="answer:1")
    log = tmp_path / "trainer.log"

    proc = start_trainer(s, cfg, log, tier3_trainer_fault="crash_after_manifest")
    assert _wait_exit(proc, 150, log) == FAULT_EXIT_CODE, log.read_text()[-3000:]
    (m,) = list_manifests(s.runs_dir)
    assert m.state == "trained"
    assert set(committed(s).values()) == {INVALID}

    proc = start_trainer(s, cfg, log)
    try:
        ok = wait_for_event(s, "succeeded", timeout_s=90, proc=proc)
    finally:
        stop(proc)
    assert ok.run_id == m.run_id, "the restarted trainer trained a new model instead of committing the recorded one"
    assert committed(s) == {p: ends.get(p, INVALID) for p in range(s.tier3_partitions)} == m.commit_offsets() | {
        p: INVALID for p in range(s.tier3_partitions) if p not in m.offsets}
    (m2,) = list_manifests(s.runs_dir)
    assert m2.run_id == m.run_id and m2.state == "published"
    assert [e for e, _ in lifecycle(s)] == ["started", "succeeded"]  # one training, ever
    assert len([d for d in s.runs_dir.iterdir() if d.is_dir()]) == 1


def test_crash_after_the_commit_before_the_event_announces_on_restart(
        make_settings: Callable[..., Any], tiny_model: Path, tmp_path: Path) -> None:
    s = trainer_settings(make_settings, tier3_min_traces=8)
    produce_traces(s, synthetic_traces(8, seed=13))
    cfg = sft_config(tiny_model, tier3_phases="answer:1")
    log = tmp_path / "trainer.log"

    proc = start_trainer(s, cfg, log, tier3_trainer_fault="crash_after_commit")
    assert _wait_exit(proc, 150, log) == FAULT_EXIT_CODE, log.read_text()[-3000:]
    (m,) = list_manifests(s.runs_dir)
    assert m.state == "committed"
    assert committed(s) == m.commit_offsets() | {p: INVALID for p in range(s.tier3_partitions) if p not in m.offsets}
    assert [e for e, _ in lifecycle(s)] == ["started"]

    proc = start_trainer(s, cfg, log)
    try:
        ok = wait_for_event(s, "succeeded", timeout_s=60, proc=proc)
    finally:
        stop(proc)
    assert ok.run_id == m.run_id
    assert [e for e, _ in lifecycle(s)] == ["started", "succeeded"]
    (m2,) = list_manifests(s.runs_dir)
    assert m2.state == "published"
    out = [line for line in log.read_text().splitlines() if line.startswith("{")]
    assert out and orjson.loads(out[-1])["runs_succeeded"] == 0  # nothing was trained by the second life


def test_partitions_revoked_during_a_run_are_never_committed_by_the_old_owner(
        make_settings: Callable[..., Any], tiny_model: Path) -> None:
    import threading

    from tests.trainer.test_consumer import fake_train
    from trainer.consumer import TrainerConsumer
    from trainer.dataset import BuiltDataset

    # trainer A takes all three partitions and starts a slow run; trainer B joins the group meanwhile, the
    # cooperative rebalance moves a partition to B; A's commit must refuse it, and in the end every trace is
    # committed by the trainer that owns it
    s = trainer_settings(make_settings, tier3_min_traces=1000, tier3_check_interval_s=2.0)
    produce_traces(s, synthetic_traces(18, seed=14))
    ends = end_offsets(s)
    cfg = sft_config(tiny_model)
    calls_a: list[BuiltDataset] = []
    calls_b: list[BuiltDataset] = []
    a = TrainerConsumer(s, cfg, train=fake_train(calls_a, sleep_s=8.0))
    b = TrainerConsumer(s, cfg, train=fake_train(calls_b))
    results: dict[str, Any] = {}
    ta = threading.Thread(target=lambda: results.setdefault("a", a.run(max_runs=1, timeout_s=90)))
    ta.start()
    wait_for_event(s, "started", timeout_s=30)
    tb = threading.Thread(target=lambda: results.setdefault("b", b.run(max_runs=1, timeout_s=90)))
    tb.start()
    ta.join(100)
    tb.join(100)
    sa, sb = results["a"], results["b"]
    assert sa.revoked >= 1, "B's arrival revoked nothing from A"
    assert sa.runs_failed >= 1 and sa.runs_succeeded == 1 and sb.runs_succeeded == 1
    failed = [e for e in events(s) if e.event == "failed"]
    assert failed and "revoked" in failed[0].details["error"]
    assert committed(s) == {p: ends.get(p, INVALID) for p in range(s.tier3_partitions)}
    ma = list_manifests(s.runs_dir)
    committed_by = {p: m.run_id for m in ma if m.state == "published" for p in m.offsets}
    assert set(committed_by) == set(ends)  # each partition committed by exactly one published run


@pytest.mark.slow
def test_sigterm_during_a_run_abandons_it_and_commits_nothing(
        make_settings: Callable[..., Any], tiny_model: Path, tmp_path: Path) -> None:
    s = trainer_settings(make_settings, tier3_min_traces=10)
    produce_traces(s, synthetic_traces(10, seed=16))
    log = tmp_path / "trainer.log"
    proc = start_trainer(s, sft_config(tiny_model), log, tier3_trainer_step_delay_s=1.0)
    try:
        wait_for_event(s, "heartbeat", timeout_s=90, proc=proc, where=lambda e: e.details.get("step", 0) >= 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        stop(proc)
    assert set(committed(s).values()) == {INVALID}
    failed = [e for e in events(s) if e.event == "failed"]
    assert len(failed) == 1 and "stopping" in failed[0].details["error"]
    # the process ends cleanly: no native thread dies under it (torch's "terminate called without an active
    # exception" came from the abandoned training thread still inside torch at interpreter exit)
    text = log.read_text()
    assert "terminate called" not in text and "Traceback" not in text, text[-3000:]


@pytest.mark.slow
def test_sigterm_while_torch_trains_stops_cleanly(make_settings: Callable[..., Any], tiny_model: Path,
                                                  tmp_path: Path) -> None:
    # no step delay: the training thread is inside torch's native code when the signal lands. Before, the loop
    # left that thread running and the interpreter's exit under it aborted the process ("terminate called without
    # an active exception", exit -6); now training ends at its next step and the process exits 0
    s = trainer_settings(make_settings, tier3_min_traces=80)
    produce_traces(s, synthetic_traces(80, seed=22))
    log = tmp_path / "trainer.log"
    proc = start_trainer(s, sft_config(tiny_model, tier3_phases="answer:3,reasoning:3", tier3_batch_size=2), log)
    try:
        wait_for_event(s, "heartbeat", timeout_s=240, proc=proc, where=lambda e: e.details.get("step", 0) >= 2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(90)
    finally:
        stop(proc)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "terminate called" not in text and "Traceback" not in text, text[-3000:]
    assert set(committed(s).values()) == {INVALID}
    failed = [e for e in events(s) if e.event == "failed"]
    assert len(failed) == 1 and "stopping" in failed[0].details["error"]


@pytest.mark.slow
def test_the_close_loop_survives_sigkill_during_evaluation_gate_and_export(
        make_settings: Callable[..., Any], tiny_model: Path, tmp_path: Path) -> None:
    """Every committed run gets exactly one candidate export, one `evaluated` (of the served GGUF), one verdict and
    (promoted) one registration, however often the trainer is SIGKILLed: during the PyTorch evaluation (before the
    manifest), in the export (merged, not converted), in the gate (verdict decided, not published) and after the
    verdict (not registered). Each restart resumes from the log and the manifest."""
    # a killed member is evicted within 6 s; max.poll.interval is generous: on a loaded CPU, importing torch in the
    # training thread can starve the polling thread past 6 s (partitions lost, the run refused and retried)
    s = trainer_settings(make_settings, tier3_min_traces=16, tier3_trainer_max_poll_interval_ms=120_000)
    produce_traces(s, synthetic_traces(16, seed=23))
    ends = end_offsets(s)
    cfg = sft_config(tiny_model, tier3_phases="answer:1", tier3_holdout_fraction=0.3)
    log = tmp_path / "trainer.log"
    # a gate every evaluation passes (the tiny model answers nonsense), so the registration runs too; no Ollama
    loop = {"tier3_trainer_close_loop": "true", "tier3_eval_max_new_tokens": 8, "tier3_gate_min_examples": 0,
            "tier3_gate_min_json_valid": 0.0, "tier3_gate_min_schema_valid": 0.0, "tier3_gate_baseline_margin": 1.0,
            "tier3_gate_min_paired": 2, "tier3_student_max_tokens": 8, "tier3_eval_f16": "false",
            "tier3_ollama_host": "http://127.0.0.1:9", "tier3_auto_export": "true",
            "tier3_gguf_quant": "f16"}  # one conversion, not two: the export is the slow part on a loaded CPU

    def life(fault: str) -> None:
        proc = start_trainer(s, cfg, log, tier3_trainer_fault=fault, **loop)
        try:
            rc = proc.wait(600)
        finally:
            stop(proc)
        assert rc == -signal.SIGKILL, f"{fault}: exit {rc}\n{log.read_text()[-3000:]}"

    life("kill_in_evaluation")  # trained and evaluated (PyTorch), killed before the manifest: nothing is committed
    assert set(committed(s).values()) == {INVALID} and list_manifests(s.runs_dir) == []
    (first,) = [r for e, r in lifecycle(s) if e == "started"]

    life("kill_in_export")  # trained again, committed, killed while exporting the candidate (merged, not converted)
    (m,) = list_manifests(s.runs_dir)
    assert m.run_id != first and m.state == "published"
    assert [e for e, r in lifecycle(s) if r == m.run_id] == ["started", "succeeded"]
    assert (s.tier3_data_dir / "exports" / m.run_id / "merged").is_dir()

    life("kill_in_gate")  # the restart exports, evaluates the served GGUF, decides, and is killed before publishing
    assert [e for e, r in lifecycle(s) if r == m.run_id] == ["started", "succeeded", "exported", "evaluated"]

    life("kill_after_verdict")  # the restart publishes the verdict (not a second `evaluated`), then is killed
    assert [e for e, r in lifecycle(s) if r == m.run_id] == ["started", "succeeded", "exported", "evaluated",
                                                             "promoted"]

    proc = start_trainer(s, cfg, log, **loop)  # the last restart registers the promoted version
    try:
        exported = wait_for_event(s, "exported", timeout_s=600, proc=proc,
                                  where=lambda r: r.details.get("candidate") is False)
    finally:
        stop(proc)
    assert exported.run_id == m.run_id and exported.model_version == m.model_version
    assert exported.details.get("candidate") is False
    runs = lifecycle(s)
    assert [e for e, r in runs if r == m.run_id] == ["started", "succeeded", "exported", "evaluated", "promoted",
                                                     "exported"]
    assert [e for e, r in runs if r == first] == ["started"]  # the killed attempt never got a verdict
    assert committed(s) == {p: ends.get(p, INVALID) for p in range(s.tier3_partitions)}
    assert [x.run_id for x in list_manifests(s.runs_dir)] == [m.run_id]  # trained twice, committed once
    assert log.read_text().count("already on the log; not deciding again") == 1  # the export restart
