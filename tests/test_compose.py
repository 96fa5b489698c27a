"""No Docker engine runs here: check that docker-compose.yml parses and names the services users expect."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_parses_and_names_services() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"kafka", "worker", "trainer", "ollama"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "healthcheck" in services["kafka"]
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    gpu = services["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["trainer"]["environment"]["UNSLOTH_AUTO_INSTALL"] == "0"
    # the same environment names as the CLI settings
    from schemas.settings import KafkaSettings

    env = services["worker"]["environment"]
    assert "KAFKA_BOOTSTRAP_SERVERS" in env
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "TIER3_TOPIC_PREFIX", "TIER3_PARTITIONS", "TIER3_DATA_DIR"):
        assert name in env and name.lower() in KafkaSettings.model_fields
    assert services["worker"]["command"] == ["worker"] and services["trainer"]["command"] == ["trainer"]
