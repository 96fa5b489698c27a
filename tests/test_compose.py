"""docker-compose.yml, checked without a Docker engine: its services, that every variable it sets is one a tier3
settings class reads, that every volume sits where its service keeps its data, and the Kafka version.

Debian's docker.io runs containers on our machines, but they reach no image registry, so the stack itself (which
pulls ``apache/kafka`` and ``python``) is never started here (README, "Docker").
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
OURS = ("topics", "worker", "trainer", "watch")  # the services that run tier3 itself (the tier3 image)
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+]([^}]*))?\}")


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _settings_classes() -> list[type[BaseSettings]]:
    """Every pydantic settings class in schemas, streams and trainer (each module imported, subclasses walked)."""
    for package in ("schemas", "streams", "trainer"):
        pkg = importlib.import_module(package)
        for mod in pkgutil.walk_packages(pkg.__path__, f"{package}."):
            importlib.import_module(mod.name)
    out: list[type[BaseSettings]] = []
    todo = list(BaseSettings.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] in ("schemas", "streams", "trainer") and cls not in out:
            out.append(cls)
    return out


def _env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix") or "")
    names = set()
    for field, info in cls.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
        names.add((alias or f"{prefix}{field}").upper())
    return names


def _resolved(value: Any) -> str | None:
    """A compose value with ``${NAME:-default}`` replaced by its default (None: passed through from the shell)."""
    if value is None:
        return None
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", str(value))


def test_compose_file_parses_and_names_services() -> None:
    services = _compose()["services"]
    assert {"kafka", "topics", "worker", "trainer", "ollama"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "healthcheck" in services["kafka"]
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    # only `tier3 topics create` makes topics: the broker's default (true) would let a request create one
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    gpu = services["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["worker"]["command"] == ["worker"] and services["trainer"]["command"] == ["trainer"]
    assert services["topics"]["command"] == ["topics", "create"]
    assert services["watch"]["command"] == ["watch"] and "deploy" not in services["watch"]


def test_every_variable_in_the_compose_file_is_a_setting() -> None:
    """A misspelt name (``OLLAMA_HOST`` for ``TIER3_OLLAMA_HOST``) is silently ignored by the code: catch it here."""
    known: dict[str, str] = {}
    for cls in _settings_classes():
        for name in _env_names(cls):
            known.setdefault(name, cls.__name__)
    assert {"KafkaSettings", "StreamsSettings", "TrainerSettings", "CloseLoopSettings"} <= set(known.values())
    services = _compose()["services"]
    unknown: list[str] = []
    for svc in OURS:
        env = services[svc]["environment"]
        assert isinstance(env, dict), f"{svc}: environment as a mapping, please"
        for key, value in env.items():
            if key not in known:
                unknown.append(f"{svc}: {key}")
            # ${NAME:-default} must interpolate the variable of the same name (not, say, ${OLLAMA_HOST})
            for m in _INTERPOLATION.finditer(str(value or "")):
                if m.group(1) != key:
                    unknown.append(f"{svc}: {key} takes ${{{m.group(1)}}}")
    assert unknown == []
    # the worker gets its teacher's settings; the trainer reaches Ollama by the name the code reads
    worker = services["worker"]["environment"]
    for name in ("TIER3_TEACHER", "TIER3_TEACHER_MODEL", "TIER3_TEACHER_BASE_URL", "ANTHROPIC_API_KEY",
                 "OPENAI_API_KEY", "TIER3_WEB_HOST"):
        assert name in worker, name
    assert _resolved(worker["TIER3_WEB_HOST"]) == "0.0.0.0"  # else the published port reaches nothing
    trainer = services["trainer"]["environment"]
    assert _resolved(trainer["TIER3_OLLAMA_HOST"]) == "http://ollama:11434"
    for svc in OURS:
        assert _resolved(services[svc]["environment"]["KAFKA_BOOTSTRAP_SERVERS"]) == "kafka:9092"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> named volume."""
    out = {}
    for v in service.get("volumes") or []:
        source, target = (v.split(":")[:2] if isinstance(v, str) else (v["source"], v["target"]))
        out[target] = source
    return out


def _under(path: Path | str, folder: str) -> bool:
    return PurePosixPath(str(path)).is_relative_to(PurePosixPath(folder))


def test_every_volume_is_where_its_service_keeps_its_data() -> None:
    from trainer.close_loop.settings import CloseLoopSettings

    doc = _compose()
    services = doc["services"]
    declared = set(doc["volumes"])
    for name, svc in services.items():
        for target, source in _mounts(svc).items():
            assert source in declared, f"{name}: {source} is not a named volume"
            assert target.startswith("/"), f"{name}: {target}"

    # Kafka: the topics' logs (the traces topic is kept forever) live in log.dirs, which must be the volume
    kafka = services["kafka"]
    log_dirs = kafka["environment"].get("KAFKA_LOG_DIRS")
    assert log_dirs, "KAFKA_LOG_DIRS unset: apache/kafka keeps the logs in /tmp/kraft-combined-logs, off the volume"
    assert all(any(_under(d, t) for t in _mounts(kafka)) for d in str(log_dirs).split(",")), (log_dirs, kafka)

    # the trainer: its runs (how a restarted trainer recognises a trained run), reports and exports
    trainer = services["trainer"]
    env = {k: v for k, v in ((k, _resolved(v)) for k, v in trainer["environment"].items()) if v is not None}
    s = CloseLoopSettings(**{k.lower(): v for k, v in env.items()})
    mounts = _mounts(trainer)
    for what, path in (("data dir", s.tier3_data_dir), ("runs", s.runs_dir), ("reports", s.reports_dir),
                       ("exports", s.exports_dir)):
        assert path.is_absolute() and any(_under(path, t) for t in mounts), f"trainer {what} {path} not on {mounts}"

    # Ollama keeps its models in ~/.ollama of its user (root in the ollama/ollama image)
    assert "/root/.ollama" in _mounts(services["ollama"])


def test_kafka_image_is_the_local_brokers_version() -> None:
    from tier3.devbroker.server import DEFAULT_KAFKA_VERSION, BrokerSettings

    image = _compose()["services"]["kafka"]["image"]
    assert image == f"apache/kafka:{DEFAULT_KAFKA_VERSION}"
    assert BrokerSettings.model_fields["tier3_kafka_version"].default == DEFAULT_KAFKA_VERSION


def test_the_gpu_profile_installs_the_gpu_extra() -> None:
    services = _compose()["services"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    trainer = services["trainer"]
    assert "gpu" in trainer["profiles"]
    build = trainer["build"]
    assert build["args"]["EXTRAS"] == "[gpu]" and any(d.startswith("unsloth") for d in extras["gpu"])
    # the Dockerfile installs the extras it is given (compose turns $$ into $)
    assert 'pip install --no-cache-dir -e ".$${EXTRAS}"' in build["dockerfile_inline"]
    # the CPU image (worker, topics) is built without them, under another tag
    assert services["worker"]["build"]["args"]["EXTRAS"] == ""
    assert trainer["image"] != services["worker"]["image"]


@pytest.mark.parametrize("path", [".venv", ".tier3", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache",
                                  "streams/__pycache__", "tier3.egg-info"])
def test_dockerignore_keeps_local_state_out_of_the_image(path: str) -> None:
    import fnmatch

    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [ln.rstrip("/") for ln in lines if ln and not ln.startswith("#")]

    def ignored(p: str) -> bool:  # Docker's rule: a pattern matches the path or one of its parent folders
        parts = p.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(pre, pat.removeprefix("**/")) or fnmatch.fnmatch(pre, pat)
                   for pat in patterns for pre in prefixes)

    assert ignored(path)
    for kept in ("streams/app.py", "pyproject.toml", "schemas/json", "README.md"):
        assert not ignored(kept), kept
