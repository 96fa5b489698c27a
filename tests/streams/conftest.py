"""Fixtures for the streams tests: the fake teacher, worker subprocesses that are always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.settings import KafkaSettings
from streams.app import changelog_spec
from streams.settings import StreamsSettings
from streams.topics import ensure_topics
from tests.conftest import settings_env
from tests.fakes.teacher_server import FakeTeacherServer
from tests.streams.helpers import WorkerProcess

API_KEY = "sk-tier3-test-SECRET-7f3a9c"


@pytest.fixture
def teacher_server() -> Iterator[FakeTeacherServer]:
    with FakeTeacherServer() as srv:
        yield srv


@pytest.fixture
def streams_settings(make_settings: Callable[..., KafkaSettings], teacher_server: FakeTeacherServer
                     ) -> Callable[..., StreamsSettings]:
    """Factory: StreamsSettings on a fresh prefix with topics (and the table changelog) created."""

    def factory(**overrides: object) -> StreamsSettings:
        fields: dict[str, object] = {
            "tier3_teacher": "openai", "tier3_teacher_model": "fake-teacher",
            "tier3_teacher_base_url": f"{teacher_server.url}/v1", "openai_api_key": API_KEY,
            "tier3_teacher_backoff_initial_s": 0.05, "tier3_teacher_backoff_max_s": 0.5,
            "tier3_session_timeout_s": 6.0, "tier3_commit_interval_s": 0.5,
        }
        fields.update(overrides)
        s = make_settings(StreamsSettings, **fields)
        assert isinstance(s, StreamsSettings)
        ensure_topics(s, [changelog_spec(s)])
        return s

    return factory


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(settings: StreamsSettings, name: str = "w1", **env: str) -> WorkerProcess:
        e = settings_env(settings)
        e.update(env)
        e["TIER3_WORKER_ID"] = name
        w = WorkerProcess(e, tmp_path / f"{name}-{len(workers)}.log")
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()
