"""The router: split share, stickiness, promotions and rollbacks followed live, arms recorded in the log."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable

from schemas import Experience, ServedBy, TrainingRun, decode, get_task
from streams.client.router import PromotionView, Router, RouterSettings, ab_bucket, choose_arm
from streams.router_stats import add_experience, arm_key, empty_arm, summarize_arms
from tests.fakes.teacher_server import FakeTeacherServer, expected_answer
from tests.kafka_utils import consume_values, inject_run_events
from trainer.close_loop.gate import rollback
from trainer.close_loop.settings import CloseLoopSettings
from trainer.events import now_ms

TASK = get_task("widget_selector")


def test_split_share_holds_over_10000_ids() -> None:
    for share in (0.1, 0.25, 0.5):
        arms = Counter(choose_arm("ab", f"user-{i}", share, True)[0] for i in range(10_000))
        # binomial sd at 10k draws is <= 0.005: 0.02 is 4 sd, and the hash is deterministic anyway
        assert abs(arms["student"] / 10_000 - share) < 0.02, (share, arms)


def test_stickiness_and_modes() -> None:
    ids = [f"user-{i}" for i in range(2000)]
    first = [choose_arm("ab", u, 0.3, True)[0] for u in ids]
    assert first == [choose_arm("ab", u, 0.3, True)[0] for u in ids]  # same id, same arm, every time
    # raising the share only moves users from teacher to student (no one flips back)
    wider = [choose_arm("ab", u, 0.6, True)[0] for u in ids]
    assert all(w == "student" for f, w in zip(first, wider, strict=True) if f == "student")
    assert ab_bucket("user-1") == ab_bucket("user-1") != ab_bucket("user-1", salt="other")
    assert choose_arm("teacher", "u", 1.0, True) == ("teacher", "mode")
    assert choose_arm("student", "u", 0.0, True) == ("student", "mode")
    assert choose_arm("student", "u", 1.0, False) == ("teacher", "no_promoted_student")
    assert choose_arm("ab", "u", 1.0, False) == ("teacher", "no_promoted_student")


def test_promotion_view_rollback_restores_previous_version() -> None:
    def ev(run: str, kind: str, v: int) -> TrainingRun:
        return TrainingRun(run_id=run, event=kind, at_ms=1, model_version=v)  # type: ignore[arg-type]

    view = PromotionView()
    view.apply_all([ev("r1", "promoted", 1), ev("r2", "rejected", 2), ev("r3", "promoted", 3)])
    assert view.current is not None and view.current.model_version == 3
    view.apply(ev("r3", "rollback", 1))
    assert view.current is not None and view.current.model_version == 1
    view.apply(ev("r1", "rollback", 0))
    assert view.current is None


def test_arm_stats_summary() -> None:
    def exp(arm: str, version: str | None, conf: float, reward: float | None, lat: float) -> Experience:
        return Experience(experience_id="e", task="t", created_at_ms=0, messages=[{"role": "user", "content": "q"}],
                          response="r", confidence=conf, reward=reward, latency_ms=lat,
                          served_by=ServedBy(arm=arm, model="m", model_version=version))  # type: ignore[arg-type]

    table: dict[str, dict[str, float]] = {}
    for e, p in [(exp("teacher", None, 0.9, 1.0, 100), 0), (exp("teacher", None, 0.5, None, 300), 1),
                 (exp("student", "2", 0.8, 0.0, 10), 0), (exp("student", "3", 0.6, 1.0, 30), 2)]:
        k = arm_key(e, p)
        table[k] = add_experience(table.get(k, empty_arm()), e)
    arms, by_version = summarize_arms(table.items())
    assert arms["teacher"] == {"count": 2, "confidence_mean": 0.7, "reward_mean": 1.0, "latency_ms_mean": 200.0}
    assert arms["student"] == {"count": 2, "confidence_mean": 0.7, "reward_mean": 0.5, "latency_ms_mean": 20.0}
    assert by_version["student:v3"]["count"] == 1 and by_version["teacher"]["count"] == 2


def _wait_version(router: Router, version: int | None, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cur = router.view.current
        if (cur.model_version if cur else None) == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"router did not reach version {version}: {router.view.current}")


def test_router_follows_promotions_live_and_arms_reach_the_log(
        make_settings: Callable[..., RouterSettings]) -> None:
    with FakeTeacherServer() as srv:
        s = make_settings(cls=RouterSettings, tier3_serve="ab", tier3_ab_student_share=0.5,
                          tier3_teacher="openai", tier3_teacher_model="teacher-model",
                          tier3_teacher_base_url=f"{srv.url}/v1", tier3_student_base_url=f"{srv.url}/v1",
                          tier3_student_model="cc-ws:v{version}", openai_api_key="k")
        gate_settings = CloseLoopSettings(**{k: v for k, v in s.model_dump().items()
                                             if k in CloseLoopSettings.model_fields})
        router = Router(s).start()
        users = [f"user-{i}" for i in range(30)]
        messages = [{"role": "system", "content": TASK.system_prompt}]

        async def serve(tag: str) -> list[tuple[str, str, str | None, str]]:
            out: list[tuple[str, str, str | None, str]] = []
            for u in users:
                q = [*messages, {"role": "user", "content": f"{tag}: how is {u}'s checkout latency?"}]
                r = await router.complete(q, user_id=u, experience_id=f"{tag}-{u}", confidence=0.5, reward=1.0)
                assert r.published
                # both arms answer the application with the answer JSON (the student's reasoning is dropped)
                assert json.loads(r.text) == expected_answer(q[-1]["content"])
                out.append((r.experience.experience_id if r.experience else "", r.decision.arm,
                            r.decision.model_version, r.decision.model))
            return out

        async def scenario() -> dict[str, list[tuple[str, str, str | None, str]]]:
            phases = {}
            phases["before"] = await serve("before")  # nothing promoted: the teacher serves everyone
            inject_run_events(s, [TrainingRun(run_id="run-1", event="promoted", at_ms=now_ms(), model_version=1),
                                   TrainingRun(run_id="run-2", event="promoted", at_ms=now_ms(), model_version=2)])
            _wait_version(router, 2)
            phases["v2"] = await serve("v2")
            rollback(gate_settings)  # withdraws run-2: version 1 serves again
            _wait_version(router, 1)
            phases["v1"] = await serve("v1")
            rollback(gate_settings)
            _wait_version(router, None)
            phases["after"] = await serve("after")
            await router.aclose()
            return phases

        phases = asyncio.run(scenario())

    assert {arm for _, arm, _, _ in phases["before"] + phases["after"]} == {"teacher"}
    expected_students = {u for u in users if ab_bucket(u) < 0.5}
    assert 5 < len(expected_students) < 25
    for phase, want in (("v2", "2"), ("v1", "1")):
        students = {eid.split("-", 1)[1] for eid, arm, _, _ in phases[phase] if arm == "student"}
        assert students == expected_students, phase  # sticky: the same users, whichever version serves
        assert {(v, m) for _, arm, v, m in phases[phase] if arm == "student"} == {(want, f"cc-ws:v{want}")}

    # every served request reached the log with its arm and model version
    served = {eid: (arm, v) for p in phases.values() for eid, arm, v, _ in p}
    msgs = consume_values(s, s.experiences_topic, expected=len(served), timeout_s=60)
    logged = {e.experience_id: e for e in (decode(m.value() or b"", Experience) for m in msgs)}
    assert set(logged) == set(served)
    for eid, (arm, version) in served.items():
        e = logged[eid]
        assert (e.served_by.arm, e.served_by.model_version) == (arm, version)
        assert e.latency_ms is not None and e.confidence == 0.5 and e.reward == 1.0
        assert e.metadata["route_reason"] in ("ab", "no_promoted_student")
        if arm == "teacher":
            assert e.served_by.model == "teacher-model"


def test_student_down_falls_back_to_the_teacher() -> None:
    from streams.client.capture import Capture, CaptureSettings

    with FakeTeacherServer() as srv:
        s = RouterSettings(tier3_serve="student", tier3_teacher="openai", tier3_teacher_model="teacher-model",
                           tier3_teacher_base_url=f"{srv.url}/v1", openai_api_key="k",
                           tier3_student_base_url="http://127.0.0.1:9/v1", tier3_student_timeout_s=2.0,
                           tier3_router_follow=False)
        view = PromotionView()
        view.apply(TrainingRun(run_id="r1", event="promoted", at_ms=1, model_version=1))
        router = Router(s, view=view, capture=Capture(CaptureSettings(enable_tier3_capture=False)))
        q = [{"role": "system", "content": TASK.system_prompt}, {"role": "user", "content": "cpu of checkout?"}]

        async def go() -> None:
            r = await router.complete(q, user_id="u1")
            assert r.decision.arm == "teacher" and r.decision.reason == "fallback"
            assert r.experience is not None and r.experience.metadata["fallback"].startswith("student failed")
            assert json.loads(r.text) == expected_answer("cpu of checkout?")
            await router.aclose()

        asyncio.run(go())


def test_student_is_prompted_in_the_format_it_learnt() -> None:
    """An answer-only student (``prompt_format`` in its promoted event's metrics) gets the answer-only instruction;
    a run that does not record one (older runs) is prompted for reasoning, as before."""
    from schemas.tasks import ANSWER_ONLY_INSTRUCTION, REASONED_INSTRUCTION
    from streams.client.capture import Capture, CaptureSettings
    from streams.client.router import StudentClient

    prompts: list[list[dict[str, str]]] = []

    class RecordingStudent(StudentClient):
        async def complete(self, model: str, messages: list[dict[str, str]]) -> str:
            prompts.append(messages)
            return '<answer>\n{"widgets": ["cpu_usage"], "time_range": "1h"}\n</answer>'

    s = RouterSettings(tier3_serve="student", tier3_teacher="openai", tier3_teacher_model="teacher-model",
                       tier3_teacher_base_url="http://127.0.0.1:9/v1", openai_api_key="k",
                       tier3_student_base_url="http://127.0.0.1:9/v1", tier3_router_follow=False)
    student = RecordingStudent(s)
    view = PromotionView()
    router = Router(s, view=view, student=student, capture=Capture(CaptureSettings(enable_tier3_capture=False)))
    q = [{"role": "system", "content": TASK.system_prompt}, {"role": "user", "content": "cpu of checkout?"}]
    view.apply(TrainingRun(run_id="r1", event="promoted", at_ms=1, model_version=1))
    view.apply(TrainingRun(run_id="r2", event="promoted", at_ms=2, model_version=2,
                           details={"metrics": {"prompt_format": "answer", "f1": 0.9}}))

    async def go() -> list[str]:
        texts = [(await router.complete(q, user_id="u1")).text]
        view.apply(TrainingRun(run_id="r2", event="rollback", at_ms=3, model_version=1))
        texts.append((await router.complete(q, user_id="u1")).text)
        await router.aclose()
        return texts

    texts = asyncio.run(go())
    assert [json.loads(t) for t in texts] == [{"widgets": ["cpu_usage"], "time_range": "1h"}] * 2
    assert [p[-1]["content"] for p in prompts] == [ANSWER_ONLY_INSTRUCTION, REASONED_INSTRUCTION]
    assert [p[:-1] for p in prompts] == [q, q]


def test_student_through_the_teachers_client_checks_models_retries_once_and_redacts() -> None:
    """The student speaks through the teacher's OpenAI-protocol client (streams/openai_client.py) against a real
    HTTP server: GET /models decides whether a version is served, one retryable failure is retried, a second
    falls back to the teacher, and an error body that echoes the student's key never reaches the experience."""
    from streams.client.capture import Capture, CaptureSettings

    key = "sk-student-secret-0123456789"
    with FakeTeacherServer() as srv:
        srv.models = ["cc-ws:v1"]
        s = RouterSettings(tier3_serve="student", tier3_teacher="openai", tier3_teacher_model="teacher-model",
                           tier3_teacher_base_url=f"{srv.url}/v1", openai_api_key="k",
                           tier3_student_base_url=f"{srv.url}/v1", tier3_student_model="cc-ws:v{version}",
                           tier3_student_api_key=key, tier3_router_follow=False)
        view = PromotionView()
        view.apply(TrainingRun(run_id="r1", event="promoted", at_ms=1, model_version=1))
        router = Router(s, view=view, capture=Capture(CaptureSettings(enable_tier3_capture=False)))
        q = [{"role": "system", "content": TASK.system_prompt}, {"role": "user", "content": "cpu of checkout?"}]

        async def go() -> None:
            r = await router.complete(q, user_id="u1")
            assert (r.decision.arm, r.decision.model_version) == ("student", "1")
            assert json.loads(r.text) == expected_answer("cpu of checkout?")
            # a version the endpoint does not list: a student failure, the teacher answers and says why
            view.apply(TrainingRun(run_id="r2", event="promoted", at_ms=2, model_version=2))
            r = await router.complete(q, user_id="u1")
            assert r.decision.reason == "fallback" and r.experience is not None
            assert "cc-ws:v2 is not served" in r.experience.metadata["fallback"]
            srv.models = ["cc-ws:v1", "cc-ws:v2"]  # exported a moment ago: re-read on the miss
            srv.set_mode("500", count=1)  # one retryable failure: retried once, the student answers
            r = await router.complete(q, user_id="u1")
            assert (r.decision.arm, r.decision.model_version) == ("student", "2")
            assert srv.counters["openai:500"] == 1
            srv.set_mode("500", count=2)  # two: the teacher answers
            r = await router.complete(q, user_id="u1")
            assert r.decision.reason == "fallback" and r.experience is not None
            assert "HTTP 500" in r.experience.metadata["fallback"]
            srv.set_mode("401_echo", count=1)  # not retryable; the body echoes the key
            r = await router.complete(q, user_id="u1")
            assert r.decision.reason == "fallback" and r.experience is not None
            assert "HTTP 401" in r.experience.metadata["fallback"]
            assert key not in r.experience.metadata["fallback"] and key in srv.keys_seen
            await router.aclose()

        asyncio.run(go())
