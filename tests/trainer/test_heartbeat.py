"""The heartbeat (trainer/heartbeat.py) and the close-loop queue (trainer/close_loop_queue.py) without a broker:
while the gate and the export run the heartbeat says so (not ``training``), and the partitions stay held."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tests.trainer.test_hold import FakeConsumer
from tests.trainer.test_recovery import manifest
from trainer.close_loop_queue import CloseLoopQueue
from trainer.heartbeat import Heartbeat, TrainerStats
from trainer.hold import PartitionHold
from trainer.settings import TrainerSettings
from trainer.stage import StageHolder, set_stage
from trainer.trigger import Trigger
from trainer.worker import Background


class FakeEvents:
    def __init__(self) -> None:
        self.beats: list[dict[str, Any]] = []
        self.status: Any = None

    def heartbeat(self, **kw: Any) -> None:
        self.beats.append(kw)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Trainer:
    """The pieces of the consumer that the close loop touches, wired as trainer/consumer.py wires them."""

    def __init__(self, tmp_path: Path, after: Any, **settings: Any) -> None:
        self.s = TrainerSettings(tier3_runs_dir=tmp_path, tier3_trainer_backoff_initial_s=1.0, **settings)
        self.events, self.stage, self.stats = FakeEvents(), StageHolder(), TrainerStats()
        self.consumer = FakeConsumer()
        self.hold = PartitionHold(self.consumer, "traces")
        self.hold.assign({0, 1})
        self.clock = Clock()
        self.stop = threading.Event()
        self.heartbeat = Heartbeat(self.events, self.stage, Trigger(5, 60.0), interval_s=3600.0,  # type: ignore
                                   details=lambda: {"run_id": self.background.run_id, "held_for": self.hold.reasons})
        self.background = Background(lambda _t: self.heartbeat.maybe_send(), self.stop, self.stage, poll_s=0.01,
                                     grace_s=1.0)
        self.queue = CloseLoopQueue(self.s, "traces", after_success=after, after_pending=None, hold=self.hold,
                                    stage=self.stage, background=self.background, stats=self.stats,
                                    stop_event=self.stop, clock=self.clock)

    def stages(self) -> list[tuple[str, bool, list[str]]]:
        out = [(b["details"]["stage"], b["training_in_progress"], b["details"]["held_for"]) for b in self.events.beats]
        return [x for i, x in enumerate(out) if i == 0 or out[i - 1] != x]


def wait_for_beat(t: Trainer, stage: str) -> None:
    """In the worker thread: wait until the loop thread's poll sent a heartbeat of ``stage``."""
    import time

    deadline = time.monotonic() + 10
    while not any(b["details"]["stage"] == stage for b in t.events.beats):
        assert time.monotonic() < deadline, f"no heartbeat in stage {stage}"
        time.sleep(0.01)


def test_heartbeat_says_training_only_while_a_run_trains_or_is_evaluated() -> None:
    events, stage, clock = FakeEvents(), StageHolder(), Clock()
    hb = Heartbeat(events, stage, Trigger(5, 60.0), interval_s=30.0,  # type: ignore  (a fake producer)
                   details=lambda: {"run_id": "r", "x": 1}, clock=clock)
    assert events.status is not None and set(events.status()) == {"last_check_time_ms", "next_check_in_s"}
    assert hb.maybe_send() is True and hb.maybe_send() is False  # the first one at once, then per interval
    for name in ("training", "evaluating", "close_loop", "exporting", "evaluating_served", "gating",
                 "registering", "idle"):
        stage.set(name)
        assert hb.maybe_send() is True, f"a stage change ({name}) is sent at once"
    clock.t += 30.0
    assert hb.maybe_send() is True  # the interval
    got = [(b["details"]["stage"], b["training_in_progress"]) for b in events.beats]
    assert got == [("idle", False), ("training", True), ("evaluating", True), ("close_loop", False),
                   ("exporting", False), ("evaluating_served", False), ("gating", False), ("registering", False),
                   ("idle", False), ("idle", False)]
    d = events.beats[0]["details"]
    assert list(d)[:2] == ["run_id", "stage"] and d["x"] == 1 and "stage_since_ms" in d and "eta_s" in d


def test_while_the_gate_and_export_run_the_heartbeat_says_so_and_the_partitions_stay_held(tmp_path: Path) -> None:
    def after_run(m: Any) -> None:  # stands for trainer.close_loop.gate.after_run, in the worker thread
        assert t.hold.holds("close_loop") and t.hold.paused == {0, 1}, "the next batch must wait for the gate"
        wait_for_beat(t, "close_loop")
        for name in ("exporting", "gating"):
            set_stage(name)  # the stage hook: reaches the consumer's holder bound to this thread
            wait_for_beat(t, name)

    t = Trainer(tmp_path, after_run)
    t.queue.add(manifest("run-1", {0: (0, 3)}, state="committed"))
    assert t.queue.due()
    t.queue.run_due()
    assert t.stats.closed == 1 and t.queue.todo == [] and not t.queue.due()
    assert not t.hold.held and t.hold.paused == frozenset() and t.consumer.calls[-1] == ("resume", [0, 1])
    assert t.stage.stage == "idle" and t.background.run_id is None
    assert t.stages() == [("close_loop", False, ["close_loop"]), ("exporting", False, ["close_loop"]),
                          ("gating", False, ["close_loop"])], "the heartbeat said training during the close loop"
    assert all(b["details"]["run_id"] == "run-1" for b in t.events.beats)


def test_a_failed_close_loop_is_retried_after_a_back_off_then_given_up(tmp_path: Path) -> None:
    calls: list[str] = []

    def after_run(m: Any) -> None:
        calls.append(m.run_id)
        set_stage("exporting")
        raise RuntimeError("export failed")

    t = Trainer(tmp_path, after_run, tier3_trainer_close_attempts=2)
    t.queue.add(manifest("run-1", {0: (0, 3)}, state="committed"))
    t.queue.run_due()
    assert calls == ["run-1"] and not t.queue.due() and len(t.queue.todo) == 1, "retried before its back-off"
    assert not t.hold.held and t.stage.stage == "idle"
    t.clock.t += 1.0  # backoff_s(1, 1.0, ...) = 1 s
    assert t.queue.due()
    t.queue.run_due()
    assert calls == ["run-1", "run-1"] and t.queue.todo == [] and t.stats.closed == 0  # given up (2 attempts)


def test_nothing_is_queued_without_after_success_and_nothing_runs_while_held(tmp_path: Path) -> None:
    t = Trainer(tmp_path, None)
    t.queue.add(manifest("run-1", {0: (0, 3)}, state="committed"))
    assert t.queue.todo == [] and not t.queue.due()
    calls: list[str] = []
    t2 = Trainer(tmp_path, lambda m: calls.append(m.run_id))
    t2.queue.add(manifest("run-2", {0: (0, 3)}, state="committed"))
    t2.hold.hold("backoff", for_s=5.0)
    t2.queue.run_due()
    assert calls == [] and t2.queue.due()
    t2.hold.release("backoff")
    t2.queue.run_due()
    assert calls == ["run-2"]


def test_a_stopping_trainer_starts_no_close_loop(tmp_path: Path) -> None:
    calls: list[str] = []
    t = Trainer(tmp_path, lambda m: calls.append(m.run_id))
    t.queue.add(manifest("run-1", {0: (0, 3)}, state="committed"))
    t.stop.set()
    t.queue.run_due()
    assert calls == [] and len(t.queue.todo) == 1
