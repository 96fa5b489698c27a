"""Every client against a secured broker: SASL_SSL with SCRAM-SHA-512, a CA made at start, ACLs enforced.

One private broker for the module (its own ports and folder; the session broker is left alone): capture, the
Faust worker (aiokafka), the trainer, admin (`tier3 topics create`) and replay all work over SASL_SSL; a wrong
password stops each command at once with one line and exit code 2; the application's principal may write
experiences and nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas import Experience, decode
from schemas.settings import KafkaSettings
from streams import broker
from streams.client.capture import Capture, CaptureSettings
from tests.conftest import ROOT
from tests.streams.helpers import WorkerProcess, free_port
from tests.trainer.test_consumer import fake_train
from tests.trainer.trainer_kafka import FAST_GROUP, sft_config
from trainer.consumer import TrainerConsumer
from trainer.dataset import BuiltDataset
from trainer.replay import ranges_from_beginning, replay
from trainer.settings import TrainerSettings
from trainer.tiny_model import cached_tiny_model

# starts and stops a broker of its own; its start (a JVM) counts in the first test's time on a loaded machine
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1800)]

EXAMPLES = ROOT / "examples" / "widget_selector"
N_EXPERIENCES = 30
WRONG_PASSWORD = "wrong-Canary-5e1f0c"  # must never be printed


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"sec{uuid.uuid4().hex[:8]}."


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory, prefix: str) -> Iterator[broker.BrokerSettings]:
    """`tier3 broker up --secure` on free ports and a folder of its own; stopped at the end of the module."""
    port = free_port()
    ctrl = free_port()
    while ctrl == port:
        ctrl = free_port()
    s = broker.BrokerSettings(tier3_broker_secure=True, tier3_broker_port=port, tier3_broker_controller_port=ctrl,
                              tier3_broker_dir=tmp_path_factory.mktemp("secure-broker"))
    env = {"TIER3_BROKER_PORT": str(port), "TIER3_BROKER_CONTROLLER_PORT": str(ctrl),
           "TIER3_BROKER_DIR": str(s.tier3_broker_dir), "TIER3_BROKER_START_TIMEOUT_S": "600",
           "TIER3_TOPIC_PREFIX": prefix}
    try:
        up = _tier3(["broker", "up", "--secure"], env, timeout_s=900)  # a JVM start on a loaded 2-core box
        assert up.returncode == 0, up.stdout + up.stderr
        output = " ".join((up.stdout + up.stderr).split())  # rich wraps long lines
        assert "client.env" in output and "app.env" in output and f"write {prefix}experiences" in output
        for secret in (s.tier3_broker_dir / "secrets").iterdir():
            assert secret.read_text().strip() not in up.stdout + up.stderr
        yield s
    finally:
        broker.down(s)


@pytest.fixture(scope="module")
def admin_env(secure_broker: broker.BrokerSettings, prefix: str, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, str]:
    """The super user's client settings (as `tier3 broker up --secure` writes them to client.env) + test topics."""
    env = _read_env(secure_broker.tier3_broker_dir / "client.env")
    assert env == secure_broker.client_env()
    return {**env, "TIER3_TOPIC_PREFIX": prefix, "TIER3_PARTITIONS": "3",
            "TIER3_DATA_DIR": str(tmp_path_factory.mktemp("tier3"))}


@pytest.fixture(scope="module")
def topics(admin_env: dict[str, str]) -> dict[str, str]:
    """`tier3 topics create` over SASL_SSL (the admin client)."""
    proc = _tier3(["topics", "create"], admin_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = KafkaSettings(**_fields(admin_env))
    md = AdminClient(s.client_config()).list_topics(timeout=30)
    for spec in s.topic_specs():
        assert len(md.topics[spec.name].partitions) == spec.partitions
    return {"experiences": s.experiences_topic, "traces": s.traces_topic}


@pytest.fixture(scope="module")
def app_env(secure_broker: broker.BrokerSettings, admin_env: dict[str, str], topics: dict[str, str]
            ) -> dict[str, str]:
    """The application's principal: write access to experiences only (made by `up --secure`; idempotent)."""
    made_by_up = _read_env(secure_broker.tier3_broker_dir / "app.env")
    env = broker.ensure_app_principal(secure_broker, topics["experiences"])
    assert env == made_by_up
    assert env["KAFKA_SASL_USERNAME"] == "app" and env["KAFKA_SASL_PASSWORD"] != admin_env["KAFKA_SASL_PASSWORD"]
    return {**admin_env, **env}


def _read_env(path: Path) -> dict[str, str]:
    assert path.stat().st_mode & 0o077 == 0, f"{path} holds a password: only its owner may read it"
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line)


def _fields(env: dict[str, str]) -> dict[str, Any]:
    return {k.lower(): v for k, v in env.items()}


def _tier3(args: list[str], env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tier3", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


def _examples(n: int) -> list[Experience]:
    lines = (EXAMPLES / "experiences.jsonl").read_bytes().splitlines()[:n]
    return [decode(line, Experience) for line in lines]


def _publish(env: dict[str, str], exps: list[Experience]) -> dict[str, int]:
    capture = Capture(CaptureSettings(**_fields(env)))
    try:
        assert all(capture.publish(e) for e in exps)
        assert capture.flush(120) == 0
        return capture.stats().as_dict()
    finally:
        capture.close()


def _worker_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "TIER3_TEACHER": "recorded", "TIER3_TEACHER_RECORDED_PATH": str(EXAMPLES / "recorded_teacher.jsonl"),
            "TIER3_SAMPLE_RATE": "1.0", "TIER3_COMMIT_INTERVAL_S": "0.5", "TIER3_SESSION_TIMEOUT_S": "6"}


def _trainer_fields(env: dict[str, str]) -> dict[str, Any]:
    return {**_fields(env), **FAST_GROUP, "tier3_trainer_group": f"trainer-{uuid.uuid4().hex[:8]}",
            "tier3_min_traces": N_EXPERIENCES}


def test_every_client_works_over_sasl_ssl(admin_env: dict[str, str], app_env: dict[str, str],
                                          topics: dict[str, str], tmp_path: Path) -> None:
    exps = _examples(N_EXPERIENCES)
    # capture, as the application's principal
    stats = _publish(app_env, exps)
    assert stats["delivered"] == N_EXPERIENCES and stats["failed"] == 0, stats

    # the Faust worker (aiokafka consumer, librdkafka producer) as the admin
    # PYTHONPATH: the `tier3` script would import the installed checkout, not this one
    worker = WorkerProcess({**os.environ, **_worker_env(admin_env), "TIER3_WORKER_ID": "secure-w1",
                            "PYTHONPATH": str(ROOT)},
                           tmp_path / "worker.log")
    try:
        worker.wait_ready(timeout_s=240)
        st = worker.wait_for(lambda st: st["counts"]["enriched"] == N_EXPERIENCES, timeout_s=180)
        assert st["counts"]["consumed"] == N_EXPERIENCES and st["counts"]["dead_lettered"] == 0

        # the trainer's consumer (group, commit) and its events producer
        settings = TrainerSettings(**_trainer_fields(admin_env))
        cfg = sft_config(cached_tiny_model())
        calls: list[BuiltDataset] = []
        run = TrainerConsumer(settings, cfg, train=fake_train(calls)).run(max_runs=1, timeout_s=180)
        assert run.runs_succeeded == 1 and len(calls) == 1
        assert calls[0].n_train + calls[0].n_holdout == N_EXPERIENCES
        reader = Consumer({**settings.client_config(), "group.id": settings.tier3_trainer_group})
        try:
            committed = reader.committed([TopicPartition(settings.traces_topic, p) for p in range(3)], timeout=30)
        finally:
            reader.close()
        assert sum(tp.offset for tp in committed) == N_EXPERIENCES

        # the worker's training-runs reader (a second aiokafka client) sees the trainer's events
        st = worker.wait_for(lambda st: any("succeeded" in r["stages"] and r["run_id"] == run.last_run_id
                                            for r in st["trainer"]["runs"]), timeout_s=60)
    finally:
        worker.stop()
    assert "Authentication failed" not in worker.log_text()

    # replay reads enriched-traces with assign(), outside any group
    ranges = ranges_from_beginning(settings, settings.traces_topic)
    rebuilt = replay(settings, cfg, ranges, tmp_path / "replay")
    assert rebuilt.n_messages == N_EXPERIENCES
    assert rebuilt.dataset.sha256 == calls[0].sha256


def test_a_wrong_password_stops_every_command_with_one_line_and_exit_2(admin_env: dict[str, str],
                                                                     topics: dict[str, str]) -> None:
    env = {**os.environ, **_worker_env(admin_env), "KAFKA_SASL_PASSWORD": WRONG_PASSWORD,
           "TIER3_BASE_MODEL": str(cached_tiny_model()), "TIER3_WEB_PORT": str(free_port())}
    commands = {"worker": ["worker"], "trainer": ["trainer"], "topics create": ["topics", "create"],
                "replay": ["replay"]}
    started = time.monotonic()
    procs = {name: subprocess.Popen([sys.executable, "-m", "tier3", *args], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
             for name, args in commands.items()}
    results: dict[str, tuple[int, str, str]] = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=240)  # a hang or a retry loop fails here
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    elapsed = time.monotonic() - started
    for name, (rc, out, err) in results.items():
        lines = [line for line in (out + err).splitlines() if line.strip()]
        assert rc == 2, (name, rc, out, err)
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith(f"error: Kafka at {admin_env['KAFKA_BOOTSTRAP_SERVERS']} refused the "
                                   "credentials of user 'admin' (SCRAM-SHA-512)"), (name, lines[0])
        assert "KAFKA_SASL_PASSWORD" in lines[0]
        assert WRONG_PASSWORD not in out + err and admin_env["KAFKA_SASL_PASSWORD"] not in out + err
    print(f"4 commands refused in {elapsed:.1f} s (in parallel)")


def test_the_app_principal_may_write_experiences_and_nothing_else(app_env: dict[str, str],
                                                                  topics: dict[str, str]) -> None:
    app = KafkaSettings(**_fields(app_env))
    # it writes experiences (idempotent producer, as the capture library)
    assert _publish(app_env, _examples(3))["delivered"] == 3

    # it may not write traces
    errors: list[KafkaError | None] = []
    producer = Producer({**app.client_config(), "enable.idempotence": True, "acks": "all"})
    producer.produce(topics["traces"], b"forged", on_delivery=lambda err, _msg: errors.append(err))
    assert producer.flush(60) == 0
    assert [e.code() if e is not None else None for e in errors] == [KafkaError.TOPIC_AUTHORIZATION_FAILED]

    # nor read them: the broker says so to a plain consumer ...
    admin = AdminClient(app.client_config())
    denied = admin.list_topics(topic=topics["traces"], timeout=30).topics[topics["traces"]].error
    assert denied is not None and denied.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    consumer = Consumer({**app.client_config(), "group.id": f"app-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topics["traces"], 0, 0)])
        deadline = time.monotonic() + 60
        refused: KafkaError | None = None
        while refused is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            assert msg is None or msg.error() is not None, "the app principal read a trace"
            refused = msg.error() if msg is not None else None
        assert refused is not None and refused.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                                          KafkaError.GROUP_AUTHORIZATION_FAILED), refused
    finally:
        consumer.close()

    # capture with a refused password: publish() never raises, the experiences count as failed after the timeout
    capture = Capture(CaptureSettings(**{**_fields(app_env), "kafka_sasl_password": WRONG_PASSWORD,
                                         "tier3_capture_delivery_timeout_ms": 3000}))
    try:
        assert all(capture.publish(e) for e in _examples(2))
        capture.flush(60)
        assert capture.stats().failed == 2 and capture.stats().delivered == 0, capture.stats()
    finally:
        capture.close()

    # ... and the commands that read traces stop with one line, naming the topic and the principal
    for args in (["replay"], ["trainer"]):
        proc = _tier3(args, {**app_env, "TIER3_BASE_MODEL": str(cached_tiny_model())}, timeout_s=240)
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, (args, proc.returncode, lines)
        assert f"does not let user 'app' use topic {topics['traces']}" in lines[0], lines[0]


def test_the_broker_folder_is_secured_for_good(secure_broker: broker.BrokerSettings,
                                               admin_env: dict[str, str]) -> None:
    """A secured broker's folder cannot be started plain (its listeners and users would not match), and `up`
    on the running secured broker is idempotent (it finds it over SASL_SSL)."""
    again = broker.up(secure_broker)
    assert again.running and again.pid == broker.status(secure_broker).pid
    # `tier3 broker status` with the client settings of client.env
    st = _tier3(["broker", "status"], {**admin_env, "TIER3_BROKER_DIR": str(secure_broker.tier3_broker_dir)})
    assert st.returncode == 0 and f"pid: {again.pid}" in st.stdout, st.stdout + st.stderr
    plain = secure_broker.model_copy(update={"tier3_broker_secure": False})
    with pytest.raises(broker.BrokerError, match="was set up sasl_ssl, not plaintext"):
        broker.up(plain)
    # the CA is ours and is the only thing a client needs: the broker's certificate is signed by it
    ca = (secure_broker.tier3_broker_dir / "tls" / "ca.pem").read_text()
    assert ca.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE KEY" not in ca
    assert not list(secure_broker.tier3_broker_dir.rglob("ca.key"))
