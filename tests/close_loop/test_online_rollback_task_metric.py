"""The watcher judges on the task's primary metric, end to end: router -> experiences -> real `tier3 worker`
(shadow rate 1.0, online-eval windows) -> the watch loop -> rollback on training-runs -> the router follows.

The promoted student answers every question with the teacher's time range and wrong widgets (schema-valid JSON):
field F1 0.5 per answer, exactly the default TIER3_ONLINE_MIN_F1, which a strict ``<`` never rolled back.
Judged on the widget selector's ``task_f1`` (widgets 0.8, time range 0.2) it scores 0.2, and with the default
bounds (TIER3_ONLINE_MIN_F1 0.5, TIER3_ONLINE_MIN_FRACTION 0.8, TIER3_ONLINE_WINDOWS 3) it is rolled back.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from schemas import TrainingRun, get_task
from schemas.tasks import field_f1, task_f1
from streams.client.router import Router, RouterSettings
from tests.conftest import settings_env
from tests.fakes.teacher_server import FakeTeacherServer, expected_answer, question_of
from tests.kafka_utils import inject_run_events
from tests.streams.helpers import WorkerProcess
from trainer.close_loop.online_watch import Watcher
from trainer.close_loop.settings import CloseLoopSettings
from trainer.events import now_ms, read_run_events

WINDOW_S = 4
MIN_N = 10  # the windows: 10 answers each
TASK = get_task("widget_selector")


def wrong_widgets_answer(question: str) -> dict[str, Any]:
    """The teacher's time range, and widgets the teacher did not pick (valid for the answer schema)."""
    ref = expected_answer(question)
    return {"widgets": [w for w in sorted(TASK.catalog) if w not in ref["widgets"]][:2],
            "time_range": ref["time_range"]}


class WrongWidgetsStudent(FakeTeacherServer):
    """An OpenAI-compatible student that always gets the time range right and the widgets wrong."""

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        q = question_of(body.get("messages", []))
        text = (f"<reasoning>\nThe question is about: {q[:60]}.\n</reasoning>\n<answer>\n"
                f"{orjson.dumps(wrong_widgets_answer(q)).decode()}\n</answer>")
        self.counters["answered"] += 1
        return web.json_response({
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}})


def test_wrong_widgets_right_time_range_is_rolled_back_with_default_bounds(
        make_settings: Callable[..., RouterSettings], tmp_path: Path) -> None:
    # the answer itself: schema-valid, field F1 0.5 (the old blind spot), task F1 0.2
    q = "which hosts are short of memory?"
    assert TASK.validate_answer(wrong_widgets_answer(q))
    assert field_f1(TASK, wrong_widgets_answer(q), expected_answer(q)) == 0.5
    assert abs(task_f1(TASK, wrong_widgets_answer(q), expected_answer(q)) - 0.2) < 1e-9

    with FakeTeacherServer() as teacher, WrongWidgetsStudent() as student:
        s = make_settings(cls=RouterSettings, tier3_serve="student", tier3_teacher="openai",
                          tier3_teacher_model="fake-teacher", tier3_teacher_base_url=f"{teacher.url}/v1",
                          openai_api_key="k", tier3_student_base_url=f"{student.url}/v1",
                          tier3_student_model="ws:v{version}", tier3_student_fallback=False,
                          tier3_sample_rate=0.0, tier3_confidence_threshold=1.0, tier3_shadow_rate=1.0,
                          tier3_window_s=WINDOW_S, tier3_online_grace_s=1.0, tier3_session_timeout_s=6.0,
                          tier3_commit_interval_s=0.5)
        defaults = CloseLoopSettings.model_fields
        gs = CloseLoopSettings(**{**{k: v for k, v in s.model_dump().items() if k in defaults},
                                  "tier3_online_min_n": MIN_N})
        # the bounds under test are the defaults
        assert (gs.tier3_online_min_f1, gs.tier3_online_min_fraction, gs.tier3_online_windows) == (0.5, 0.8, 3)
        worker = WorkerProcess({**settings_env(s), "TIER3_WORKER_ID": "online-task-w"}, tmp_path / "worker.log")
        watcher = Watcher(gs)
        judgements: list[tuple[str, str, dict[str, Any]]] = []
        stop = threading.Event()

        def watch_loop() -> None:
            while not stop.is_set():
                watcher.step()
                if watcher.last is not None:
                    judgements.append((watcher.last.action, watcher.last.why, watcher.last.numbers))
                stop.wait(0.5)

        thread = threading.Thread(target=watch_loop, daemon=True)
        router = Router(s)
        try:
            worker.wait_ready(timeout_s=180)
            thread.start()
            router.start()

            async def scenario() -> None:
                # promoted as an evaluation of this student would have it: offline f1 0.5, task_f1 0.2
                inject_run_events(s, [
                    TrainingRun(run_id="run-1", event="evaluated", at_ms=now_ms(), model_version=1,
                                details={"metrics": {"f1": 0.5, "task_f1": 0.2, "n_examples": 24}}),
                    TrainingRun(run_id="run-1", event="promoted", at_ms=now_ms(), model_version=1)])
                deadline = time.monotonic() + 60
                while (router.view.current is None or router.view.current.model_version != 1) \
                        and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert router.view.current is not None and router.view.current.model_version == 1
                i = 0
                deadline = time.monotonic() + 240
                while router.view.current is not None and time.monotonic() < deadline:  # until rolled back
                    async def one(k: int) -> None:
                        msgs = [{"role": "system", "content": TASK.system_prompt},
                                {"role": "user", "content": f"wrong {k}: which hosts are short of memory?"}]
                        r = await router.complete(msgs, user_id=f"u{k}", experience_id=f"ww-{k}", confidence=0.5)
                        assert r.published
                    await asyncio.gather(*(one(i + k) for k in range(4)))
                    i += 4
                    await asyncio.sleep(0.05)
                await router.aclose()

            asyncio.run(scenario())
        finally:
            stop.set()
            if thread.is_alive():
                thread.join(30)
            watcher.close()
            worker.stop()

        rollbacks = [e for e in read_run_events(s) if e.event == "rollback"]
        assert len(rollbacks) == 1, (rollbacks, judgements[-3:])
        rb = rollbacks[0]
        assert rb.run_id == "run-1" and rb.model_version is None and rb.details["reason"] == "online_eval"
        assert "task_f1" in rb.details["why"] and "at or below 0.500" in rb.details["why"], rb.details["why"]
        nums = rb.details["online_eval"]
        print("rollback numbers:", {k: v for k, v in nums.items() if k != "windows"}, nums["windows"])
        assert nums["metric"] == "task_f1" and nums["fails_when"] == "value <= bound"
        assert abs(nums["value"] - 0.2) < 1e-6 and nums["f1"] == 0.5  # field F1 alone sat exactly on the bound
        assert nums["bound"] == 0.5 and nums["offline_metric"] == "task_f1" and nums["offline"] == 0.2
        assert len(nums["windows"]) == 3 and all(w["n"] >= MIN_N and w["metric"] == "task_f1"
                                                 and abs(w["value"] - 0.2) < 1e-6 for w in nums["windows"])
        # before it had three full windows the watcher waited; it never kept this student
        assert not any(a == "keep" for a, _, n in judgements if n.get("model_version") == 1), judgements
