"""Helpers for the streams tests: experiences with known ids, a worker subprocess, HTTP polling."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from schemas import ChatMessage, Experience, encode, get_task
from streams.sampling import sample_reason

QUESTIONS = [
    "Why is checkout slow today?", "How much revenue did we make this quarter by region?",
    "Which hosts are running out of memory?", "Are we meeting our uptime SLA this month?",
    "Show me the support backlog and resolution times", "What did the last deploy break?",
    "How are sign-ups converting to purchases this week?", "Which customers churned in the last 90 days?",
]


def make_experience(i: int, confidence: float, *, prefix: str = "exp") -> Experience:
    task = get_task("widget_selector")
    q = f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"
    return Experience(
        experience_id=f"{prefix}-{i:06d}", task="widget_selector", created_at_ms=int(time.time() * 1000),
        messages=[ChatMessage(role="system", content=task.system_prompt), ChatMessage(role="user", content=q)],
        response='{"widgets": ["kpi_summary"], "time_range": "24h"}', confidence=confidence)


def confidence_for(i: int) -> float:
    """A deterministic spread of confidences: about 20 % above 0.8."""
    return round((i * 37 % 100) / 100, 2)


def experiences(n: int, prefix: str = "exp") -> list[Experience]:
    return [make_experience(i, confidence_for(i), prefix=prefix) for i in range(n)]


def expected_sampled(exps: list[Experience], rate: float = 0.15, threshold: float = 0.8) -> set[str]:
    return {e.experience_id for e in exps
            if sample_reason(e.experience_id, e.confidence, rate=rate, threshold=threshold) is not None}


def as_records(exps: list[Experience]) -> list[tuple[bytes, bytes]]:
    return [(e.experience_id.encode(), encode(e)) for e in exps]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    """``tier3 worker`` as a real subprocess, its output in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, web_port: int | None = None) -> None:
        self.web_port = web_port or free_port()
        self.log_path = log_path
        env = {**env, "TIER3_WEB_PORT": str(self.web_port), "PYTHONUNBUFFERED": "1"}
        exe = Path(sys.executable).with_name("tier3")
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen([str(exe), "worker"], env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def status(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/status", timeout=5)
        r.raise_for_status()
        return dict(r.json())

    def wait_ready(self, timeout_s: float = 90) -> dict[str, Any]:
        """Wait until /status answers and the worker has partitions assigned."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                st = self.status()
                if st["lag"]["experiences"]:
                    return st
            except (httpx.HTTPError, KeyError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"worker not ready in {timeout_s} s:\n{self.log_tail()}")

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                st = self.status()
                if pred(st):
                    return st
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"condition not met in {timeout_s} s; last status: {st}\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return int(self.proc.returncode)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly these labels in a Prometheus text exposition (None: absent),
    parsed with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None
