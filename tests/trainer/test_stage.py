"""trainer/stage.py: the stage holder the heartbeat reads, the hook the close loop reports through, and the training
callback's loss on its way there."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from trainer import stage as stage_mod
from trainer.stage import STAGES, StageHolder, bound, current, record_loss, set_stage


def test_stages_step_rate_eta_and_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(stage_mod.time, "monotonic", lambda: clock[0])
    h = StageHolder()
    assert h.snapshot()["stage"] == "idle" and h.snapshot()["eta_s"] is None
    h.begin_run()
    snap = h.snapshot()
    assert (snap["stage"], snap["step"], snap["total_steps"], snap["loss"], snap["eta_s"]) == ("training", 0, 0,
                                                                                              None, None)
    h.step(1, 10)  # the first step (after loading the model): the rate counts from here
    assert h.snapshot()["eta_s"] is None
    clock[0] = 104.0
    h.step(3, 10)  # 2 s a step, 7 steps left
    h.loss(0.41234)
    h.loss(float("nan"))  # ignored
    assert h.snapshot() | {"stage_since_ms": 0} == {"stage": "training", "stage_since_ms": 0, "step": 3,
                                                    "total_steps": 10, "loss": 0.4123, "eta_s": 14.0}
    clock[0] = 105.0  # a second since that step
    assert h.snapshot()["eta_s"] == 13.0
    changes, since = h.changes, h.snapshot()["stage_since_ms"]
    h.set("training")  # the same stage again: no change, same start
    assert h.changes == changes and h.snapshot()["stage_since_ms"] == since
    h.set("evaluating")
    assert h.changes == changes + 1 and h.snapshot()["eta_s"] is None and h.snapshot()["loss"] == 0.4123
    with pytest.raises(ValueError, match="unknown trainer stage"):
        h.set("exportng")
    h.begin_run()  # the next run starts clean
    assert h.snapshot()["loss"] is None and h.snapshot()["step"] == 0
    assert STAGES[0] == "idle" and {"exporting", "evaluating_served", "gating", "registering"} <= set(STAGES)


def test_set_stage_and_record_loss_report_to_the_holder_bound_to_this_thread_only() -> None:
    mine, other = StageHolder(), StageHolder()
    default = current()
    seen: dict[str, Any] = {}

    def worker() -> None:  # a consumer's worker thread: its holder is bound there
        with bound(mine):
            set_stage("gating")
            record_loss(0.5)
            seen["current"] = current()
        seen["after"] = current()

    def stranger() -> None:  # another thread (another consumer's, or none): never sees `mine`
        with bound(other):
            set_stage("exporting")
        seen["stranger"] = current()

    for target in (worker, stranger):
        t = threading.Thread(target=target)
        t.start()
        t.join()
    assert seen["current"] is mine and seen["after"] is default and seen["stranger"] is default
    assert mine.stage == "gating" and mine.snapshot()["loss"] == 0.5 and other.stage == "exporting"
    set_stage("registering")  # unbound (tier3 close-loop, tests): the process-wide holder, harmless
    assert mine.stage == "gating" and default.stage == "registering"
    default.set("idle")


def test_the_training_callback_passes_each_logged_loss_on() -> None:
    from trainer.sft_trainer import _Progress

    steps: list[tuple[int, int]] = []
    cb = _Progress.make(lambda step, total: steps.append((step, total)), 4, 10)
    h = StageHolder()
    with bound(h):
        h.begin_run()
        cb.on_step_end(None, type("State", (), {"global_step": 2})(), None)
        cb.on_log(None, None, None, logs={"loss": 0.75, "learning_rate": 1e-3})
        cb.on_log(None, None, None, logs={"train_runtime": 1.0})  # the end-of-training summary: no loss
    assert steps == [(6, 10)]
    assert h.snapshot()["loss"] == 0.75  # (the step goes through on_step: the consumer's _on_step records it)
