"""Fixtures: one real Kafka broker per test session, fresh topic names per test.

The broker is the project's own (``tier3 broker up``), unless ``KAFKA_BOOTSTRAP_SERVERS`` names another
cluster. A broker that does not start is a test failure, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.settings import KafkaSettings
from streams.topics import ensure_topics
from tier3.devbroker import server as broker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def broker_settings() -> broker.BrokerSettings:
    return broker.BrokerSettings(tier3_broker_dir=ROOT / ".tier3" / "broker")


@pytest.fixture(scope="session")
def kafka_bootstrap(broker_settings: broker.BrokerSettings) -> Iterator[str]:
    # another cluster named by KAFKA_BOOTSTRAP_SERVERS, or the local broker: one already answering (e.g. `tier3
    # broker up` by the developer) is used and left running, else it is started here (BrokerError: a failure)
    started_here = broker.ensure_running(broker_settings)  # subprocesses inherit KAFKA_BOOTSTRAP_SERVERS
    yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    if started_here and not os.environ.get("TIER3_KEEP_BROKER"):
        broker.down(broker_settings)


@pytest.fixture
def make_settings(kafka_bootstrap: str, tmp_path: Path) -> Callable[..., KafkaSettings]:
    """Factory: ``make_settings(tier3_partitions=3, ...)`` -> settings with a fresh prefix, topics created."""

    def factory(cls: type[KafkaSettings] = KafkaSettings, create_topics: bool = True, **overrides: object
                ) -> KafkaSettings:
        fields = {"kafka_bootstrap_servers": kafka_bootstrap,
                  "tier3_topic_prefix": f"t{uuid.uuid4().hex[:10]}.",
                  "tier3_data_dir": tmp_path / "tier3",
                  "tier3_partitions": 3}
        fields.update(overrides)
        settings = cls(**fields)  # type: ignore[arg-type]
        if create_topics:
            ensure_topics(settings)
        return settings

    return factory


def settings_env(settings: KafkaSettings) -> dict[str, str]:
    """The environment that makes a subprocess (`tier3 worker`, `tier3 trainer`) use ``settings``."""
    return {**os.environ, **settings.as_env()}
