"""The worker's /status router block: per-arm comparison from a Faust table, promoted version from training-runs.

Runs a real ``tier3 worker`` process (``streams.app.create_app`` builds the per-arm table, explicitly).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from schemas import Experience, ServedBy, TrainingRun, encode
from streams.client.router import RouterSettings
from streams.router_stats import ARM_TABLE, ARM_WRITE_INTERVAL_S
from tests.conftest import ROOT, settings_env
from tests.fakes.teacher_server import FakeTeacherServer
from tests.kafka_utils import consume_values, inject_run_events, produce_values
from tests.streams.helpers import free_port
from trainer.events import now_ms


def _exp(i: int, arm: str, version: str | None, confidence: float, reward: float, latency_ms: float) -> Experience:
    return Experience(experience_id=f"x{i}", task="widget_selector", created_at_ms=now_ms(),
                      messages=[{"role": "user", "content": f"question {i}"}], response="{}",  # type: ignore[list-item]
                      confidence=confidence, reward=reward, latency_ms=latency_ms,
                      served_by=ServedBy(arm=arm, model="m", model_version=version))  # type: ignore[arg-type]


def test_status_router_block_compares_arms(make_settings: Callable[..., RouterSettings], tmp_path: Path) -> None:
    with FakeTeacherServer() as srv:
        # the worker's own TIER3_SERVE / share say nothing about what the application runs: the block must not
        # report them (the application below routes half of its requests to the student)
        s = make_settings(cls=RouterSettings, tier3_serve="teacher", tier3_ab_student_share=0.25,
                          tier3_teacher="openai", tier3_teacher_model="fake-teacher",
                          tier3_teacher_base_url=f"{srv.url}/v1", openai_api_key="k",
                          tier3_sample_rate=0.0, tier3_confidence_threshold=1.0,  # enrich nothing: stats only
                          tier3_session_timeout_s=6.0, tier3_commit_interval_s=0.5)
        port = free_port()
        env = {**settings_env(s), "TIER3_WEB_PORT": str(port), "TIER3_WORKER_ID": "router-w", "PYTHONUNBUFFERED": "1"}
        log = (tmp_path / "worker.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "tier3", "worker"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            # teacher: conf 0.9/0.7 -> 0.8, reward 1/0 -> 0.5, latency 100/300 -> 200; student v3: 0.6, 1.0, 20
            exps = [_exp(0, "teacher", None, 0.9, 1.0, 100), _exp(1, "teacher", None, 0.7, 0.0, 300),
                    _exp(2, "student", "3", 0.6, 1.0, 10), _exp(3, "student", "3", 0.6, 1.0, 30)]
            produce_values(s, s.experiences_topic, [(e.experience_id.encode(), encode(e)) for e in exps])
            inject_run_events(s, [TrainingRun(run_id="run-3", event="promoted", at_ms=now_ms(), model_version=3)])

            def ready(st: dict[str, Any]) -> bool:
                r = st.get("router", {})
                return (r.get("promoted_version") == 3 and r.get("arms", {}).get("teacher", {}).get("count") == 2
                        and r.get("arms", {}).get("student", {}).get("count") == 2)

            st: dict[str, Any] = {}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not ready(st):
                assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-4000:]
                try:
                    st = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            assert ready(st), (st.get("router"), (tmp_path / "worker.log").read_text()[-4000:])
            r = st["router"]
            assert r["mode"] == "ab" and r["ab_student_share"] == 0.5 and r["promoted_run_id"] == "run-3"
            assert "4 routed experiences" in r["observed_over"]
            assert r["arms"]["teacher"] == {"count": 2, "confidence_mean": 0.8, "reward_mean": 0.5,
                                            "latency_ms_mean": 200.0}
            assert r["arms"]["student"] == {"count": 2, "confidence_mean": 0.6, "reward_mean": 1.0,
                                            "latency_ms_mean": 20.0}
            assert r["arms_by_version"]["student:v3"]["count"] == 2

            # a burst: the table (and its changelog) gets at most one write per key and second, not one per
            # experience (issue 10: that cost more than the rest of the worker's work), and /status counts all
            more = [_exp(i, "teacher", None, 0.5, 1.0, 100) for i in range(10, 610)]
            produce_values(s, s.experiences_topic, [(e.experience_id.encode(), encode(e)) for e in more])
            t0 = time.monotonic()
            while time.monotonic() < deadline:
                st = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
                if st["router"]["arms"]["teacher"]["count"] == 602:
                    break
                time.sleep(0.3)
            assert st["router"]["arms"]["teacher"]["count"] == 602, st["router"]
            burst_s = time.monotonic() - t0
            changelog = consume_values(s, f"{s.faust_app_id}-{ARM_TABLE}-changelog", None, 30, idle_s=2.0)
            keys = {m.key() for m in changelog}
            assert len(changelog) <= 4 + len(keys) * (burst_s / ARM_WRITE_INTERVAL_S + 2), (len(changelog), burst_s)
            assert len(changelog) < 300
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the worker's own process group (start_new_session)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            log.close()
