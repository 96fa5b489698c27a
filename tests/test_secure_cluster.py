"""Every client against a secured broker: SASL_SSL with SCRAM-SHA-512, a CA made at start, ACLs enforced.

One private broker for the module (its own ports and folder; the session broker is left alone): capture, the
Faust worker (aiokafka), the trainer, the watcher, admin (`tier3 topics create`) and replay all work over
SASL_SSL, each service as its own principal with only the ACLs of ``streams.acls.acl_table``; a wrong password
stops each command at once with one line and exit code 2; the broker refuses each principal what it must not do
(the application or the worker writing training-runs or trainer-control, the trainer writing experiences, the
worker committing in the trainer's group, ...).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from schemas import Experience, OnlineEval, TrainingRun, decode, encode
from schemas.kafka import reading as kio
from schemas.settings import KafkaSettings
from streams.client.capture import Capture, CaptureSettings
from tests.conftest import ROOT
from tests.kafka_utils import produce_and_wait
from tests.streams.helpers import WorkerProcess, free_port
from tests.trainer.test_consumer import fake_train
from tests.trainer.trainer_kafka import FAST_GROUP, sft_config
from tier3.devbroker import acls
from tier3.devbroker import server as broker
from trainer.close_loop.online_watch import Watcher
from trainer.close_loop.settings import CloseLoopSettings
from trainer.consumer import TrainerConsumer
from trainer.dataset import BuiltDataset
from trainer.events import TrainerEvents, read_run_events
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
def trainer_group(prefix: str) -> str:
    """The trainer group of this module's trainers: the trainer principal's ACLs name it."""
    return f"{prefix}trainer"


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory, prefix: str, trainer_group: str
                  ) -> Iterator[broker.BrokerSettings]:
    """`tier3 broker up --secure` on free ports and a folder of its own (it makes every service's principal);
    stopped at the end of the module."""
    port = free_port()
    ctrl = free_port()
    while ctrl == port:
        ctrl = free_port()
    s = broker.BrokerSettings(tier3_broker_secure=True, tier3_broker_port=port, tier3_broker_controller_port=ctrl,
                              tier3_broker_dir=tmp_path_factory.mktemp("secure-broker"))
    env = {"TIER3_BROKER_PORT": str(port), "TIER3_BROKER_CONTROLLER_PORT": str(ctrl),
           "TIER3_BROKER_DIR": str(s.tier3_broker_dir), "TIER3_BROKER_START_TIMEOUT_S": "600",
           "TIER3_TOPIC_PREFIX": prefix, "TIER3_TRAINER_GROUP": trainer_group}
    try:
        up = _tier3(["broker", "up", "--secure"], env, timeout_s=900)  # a JVM start on a loaded 2-core box
        assert up.returncode == 0, up.stdout + up.stderr
        output = " ".join((up.stdout + up.stderr).split())  # rich wraps long lines
        assert "client.env" in output and f"may only write {prefix}experiences and read {prefix}training-runs" \
            in output
        for svc in acls.SERVICES:
            assert f"{svc}: {s.tier3_broker_dir.resolve() / (svc + '.env')}" in output
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
def principals(secure_broker: broker.BrokerSettings, admin_env: dict[str, str], topics: dict[str, str],
               prefix: str, trainer_group: str) -> dict[str, dict[str, str]]:
    """Each service's client settings (`up --secure` made its principal and ACLs; again here: idempotent), with
    the module's topic prefix, partitions and data folder."""
    names = acls.PrincipalNames(KafkaSettings(tier3_topic_prefix=prefix), f"{prefix}worker", trainer_group)
    made = acls.ensure_principals(secure_broker, names)
    out = {}
    for svc in acls.SERVICES:
        env = made[svc]
        assert env == _read_env(secure_broker.tier3_broker_dir / f"{svc}.env")  # what `up --secure` wrote
        assert env["KAFKA_SASL_USERNAME"] == svc
        assert env["KAFKA_SASL_PASSWORD"] != admin_env["KAFKA_SASL_PASSWORD"]
        out[svc] = {**admin_env, **env}
    assert len({env["KAFKA_SASL_PASSWORD"] for env in out.values()}) == len(acls.SERVICES)
    return out


@pytest.fixture(scope="module")
def app_env(principals: dict[str, dict[str, str]]) -> dict[str, str]:
    """The application's principal: writes experiences, reads training-runs (the router), nothing else."""
    return principals["app"]


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


def _trainer_fields(env: dict[str, str], group: str) -> dict[str, Any]:
    return {**_fields(env), **FAST_GROUP, "tier3_trainer_group": group, "tier3_min_traces": N_EXPERIENCES}


def test_every_client_works_over_sasl_ssl(principals: dict[str, dict[str, str]], topics: dict[str, str],
                                          trainer_group: str, tmp_path: Path) -> None:
    """Every service as its own principal: capture as `app`, the worker as `worker`, the trainer and replay as
    `trainer`."""
    exps = _examples(N_EXPERIENCES)
    # capture, as the application's principal
    stats = _publish(principals["app"], exps)
    assert stats["delivered"] == N_EXPERIENCES and stats["failed"] == 0, stats

    # the Faust worker (aiokafka consumer, librdkafka producer) as the worker's principal: its group, its tables'
    # changelogs (which it creates), traces, training-runs and heartbeats
    # PYTHONPATH: the `tier3` script would import the installed checkout, not this one
    worker = WorkerProcess({**os.environ, **_worker_env(principals["worker"]), "TIER3_WORKER_ID": "secure-w1",
                            "PYTHONPATH": str(ROOT)},
                           tmp_path / "worker.log")
    try:
        worker.wait_ready(timeout_s=240)
        st = worker.wait_for(lambda st: st["counts"]["enriched"] == N_EXPERIENCES, timeout_s=180)
        assert st["counts"]["consumed"] == N_EXPERIENCES and st["counts"]["dead_lettered"] == 0

        # the trainer's consumer (group, commit) and its events producer, as the trainer's principal
        settings = TrainerSettings(**_trainer_fields(principals["trainer"], trainer_group))
        assert settings.kafka_sasl_username == "trainer"
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
    log_text = worker.log_text()
    assert "Authentication failed" not in log_text
    assert "AUTHORIZATION_FAILED" not in log_text.upper() and "AuthorizationFailed" not in log_text, \
        log_text[-3000:]

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


def _write_errors(env: dict[str, str], targets: list[str]) -> dict[str, int | None]:
    """One record to each topic of ``targets`` with an idempotent producer as the principal of ``env``: the
    broker's answer to each (a KafkaError code, None when it was written)."""
    s = KafkaSettings(**_fields(env))
    got: dict[str, int | None] = {}
    producer = Producer({**s.client_config(), "enable.idempotence": True, "acks": "all",
                         "message.timeout.ms": 60_000, "logger": _QUIET})

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        got[msg.topic()] = err.code() if err is not None else None

    for topic in targets:
        producer.produce(topic, b"forged", key=b"forged", on_delivery=on_delivery)
    assert producer.flush(90) == 0
    return got


def _read_error(env: dict[str, str], topic: str) -> int | None:
    """What the broker answers the principal of ``env`` reading ``topic`` from the start (assign(), a reader
    group it may describe): the error code, or None when it may read."""
    s = KafkaSettings(**_fields(env))
    meta = AdminClient({**s.client_config(), "logger": _QUIET}).list_topics(topic=topic, timeout=30).topics[topic]
    if meta.error is not None:
        return int(meta.error.code())
    # the throw-away group of one of this principal's own readers (the only reader groups its ACLs name)
    purpose = {"app": "router", "worker": "offset-guard", "trainer": "replay", "watcher": "watch"}[
        env["KAFKA_SASL_USERNAME"]]
    consumer = kio.reader(s, purpose, logger=_QUIET, **{"enable.partition.eof": True})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            return int(err.code()) if err is not None and err.code() != KafkaError._PARTITION_EOF else None
        raise AssertionError(f"no answer reading {topic} within 60 s")
    finally:
        consumer.close()


_QUIET = logging.getLogger("tier3.test.secure")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
DENIED = KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_the_app_principal_may_write_experiences_and_nothing_else(app_env: dict[str, str],
                                                                  topics: dict[str, str]) -> None:
    app = KafkaSettings(**_fields(app_env))
    # it writes experiences (idempotent producer, as the capture library)
    assert _publish(app_env, _examples(3))["delivered"] == 3

    # it may not write traces, nor what decides what is served (training-runs) or starts a run (trainer-control)
    forged = [topics["traces"], app.training_runs_topic, app.trainer_control_topic, app.dead_letters_topic,
              app.online_eval_topic, app.trainer_status_topic]
    assert _write_errors(app_env, forged) == dict.fromkeys(forged, DENIED)
    # it reads training-runs (the router follows promotions and rollbacks)
    assert _read_error(app_env, app.training_runs_topic) is None

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


def test_each_service_principal_is_refused_what_it_must_not_do(principals: dict[str, dict[str, str]],
                                                             topics: dict[str, str], trainer_group: str) -> None:
    """Each refusal is the broker's (an authorization error), for the topics, groups and creations outside the
    service's row of the ACL table; each service may write and read its own topics."""
    k = KafkaSettings(**_fields(principals["app"]))
    every = [spec.name for spec in k.topic_specs()]
    may_write = {"worker": {k.traces_topic, k.dead_letters_topic, k.online_eval_topic},
                 "trainer": {k.training_runs_topic, k.trainer_status_topic, k.trainer_control_topic,
                             k.dead_letters_topic},
                 "watcher": {k.training_runs_topic}}
    # the worker only writes traces: it counts them as it writes them, never reading them back
    may_read = {"worker": {k.experiences_topic, k.training_runs_topic, k.trainer_status_topic},
                "trainer": {k.traces_topic, k.training_runs_topic, k.trainer_control_topic},
                "watcher": {k.online_eval_topic, k.training_runs_topic}}
    for svc, allowed in may_write.items():
        # e.g. the worker writing training-runs (which decides what is served) or trainer-control (which starts
        # a run); the trainer or the watcher forging experiences or traces
        written = _write_errors(principals[svc], every)
        assert written == {t: None if t in allowed else DENIED for t in every}, (svc, written)
    for svc, allowed in may_read.items():
        for topic in every:
            code = _read_error(principals[svc], topic)
            assert code == (None if topic in allowed else DENIED), (svc, topic, code)

    # the worker may neither join the trainer's groups nor commit for them (the trainer group's offsets say which
    # traces are inside a model)
    worker = KafkaSettings(**_fields(principals["worker"]))
    admin = AdminClient({**worker.client_config(), "logger": _QUIET})
    for group in (trainer_group, f"{trainer_group}.control"):
        fut = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(
            group, [TopicPartition(topics["traces"], 0, 1)])])[group]
        with pytest.raises(KafkaException) as refused:
            fut.result(timeout=60)
        assert refused.value.args[0].code() == KafkaError.GROUP_AUTHORIZATION_FAILED, (group, refused.value)
        consumer = Consumer({**worker.client_config(), "group.id": group, "enable.auto.commit": False,
                             "logger": _QUIET})
        try:
            consumer.subscribe([topics["traces"]])
            deadline = time.monotonic() + 60
            msg = None
            while msg is None and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
            assert msg is not None and msg.error() is not None, "the worker joined the trainer's group"
            assert msg.error().code() == KafkaError.GROUP_AUTHORIZATION_FAILED, msg.error()
        finally:
            consumer.close()

    # only the worker creates topics, and only its tables' changelogs (<prefix><app id>-...)
    for svc, name in (("worker", k.topic("rogue")), ("trainer", k.topic("rogue")), ("watcher", k.topic("rogue")),
                      ("app", f"{k.topic('worker')}-rogue-changelog")):
        admin = AdminClient({**KafkaSettings(**_fields(principals[svc])).client_config(), "logger": _QUIET})
        fut = admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name]
        with pytest.raises(KafkaException) as refused:
            fut.result(timeout=60)
        assert refused.value.args[0].code() == DENIED, (svc, refused.value)


def test_the_watcher_rolls_back_as_its_own_principal(principals: dict[str, dict[str, str]],
                                                     topics: dict[str, str], trainer_group: str) -> None:
    """The trainer's principal promotes a run, the worker's publishes online-eval windows that fail the rule,
    and `tier3 watch` as the watcher's principal reads both and publishes the rollback on training-runs."""
    trainer = TrainerSettings(**_trainer_fields(principals["trainer"], trainer_group))
    run_id = f"sec-run-{uuid.uuid4().hex[:8]}"
    version = 900 + int(uuid.uuid4().hex[:4], 16) % 100
    with TrainerEvents(trainer) as events:  # the trainer's producer: evaluated + promoted
        events.record(TrainingRun(run_id=run_id, event="evaluated", at_ms=1000, model_version=version,
                                  details={"metrics": {"f1": 0.9}}),
                      TrainingRun(run_id=run_id, event="promoted", at_ms=1001, model_version=version))
    worker = KafkaSettings(**_fields(principals["worker"]))
    windows = [OnlineEval(task="widget_selector", arm="student", model_version=str(version),
                          window_start_ms=i * 10_000, window_end_ms=(i + 1) * 10_000, partition=0, n=40,
                          json_valid_n=40, schema_valid_n=40, exact_n=0, f1_sum=4.0, published_at_ms=1)
               for i in range(1, 4)]
    producer = Producer({**worker.client_config(), "enable.idempotence": True, "acks": "all", "logger": _QUIET})
    try:  # the worker's closed windows, f1 0.1 each: below the bound three times
        produce_and_wait(producer, worker.online_eval_topic,
                             [(f"w{w.window_start_ms}".encode(), encode(w)) for w in windows])
    finally:
        producer.flush(30)

    watch = CloseLoopSettings(**{**_fields(principals["watcher"]), "tier3_online_windows": 3,
                                 "tier3_online_min_n": 20, "tier3_online_min_f1": 0.5})
    assert watch.kafka_sasl_username == "watcher"
    watcher = Watcher(watch)
    try:
        ev = watcher.step()
    finally:
        watcher.close()
    assert ev is not None and ev.event == "rollback" and ev.run_id == run_id, (ev, watcher.last)
    # on the log, as the trainer's gate reads it
    logged = [e for e in read_run_events(trainer) if e.run_id == run_id]
    assert [e.event for e in logged] == ["evaluated", "promoted", "rollback"]


def test_the_principal_command_and_the_acl_table(secure_broker: broker.BrokerSettings, admin_env: dict[str, str],
                                                trainer_group: str, prefix: str) -> None:
    """`tier3 broker principal SERVICE` remakes one principal (idempotent) and prints its ACLs, never its
    password; the trainer group's default is the trainer's; no TIER3_APP_ID may widen the worker's grants."""
    env = {**admin_env, "TIER3_BROKER_DIR": str(secure_broker.tier3_broker_dir), "TIER3_TRAINER_GROUP": trainer_group,
           "TIER3_BROKER_PORT": str(secure_broker.tier3_broker_port)}
    before = (secure_broker.tier3_broker_dir / "watcher.env").read_text()
    proc = _tier3(["broker", "principal", "watcher"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (secure_broker.tier3_broker_dir / "watcher.env").read_text() == before
    output = " ".join((proc.stdout + proc.stderr).split())
    assert "User:watcher" in output and f"{prefix}training-runs" in output and "watcher.env" in output
    for secret in (secure_broker.tier3_broker_dir / "secrets").iterdir():
        assert secret.read_text().strip() not in proc.stdout + proc.stderr
    bad = _tier3(["broker", "principal", "admin"], env)
    assert bad.returncode == 2 and "no such service: 'admin'" in bad.stderr, bad.stdout + bad.stderr

    k = KafkaSettings(tier3_topic_prefix=prefix)
    with pytest.raises(broker.BrokerError, match="would also name"):
        acls.acl_table(acls.PrincipalNames(k, f"{prefix}trainer", trainer_group))
    table = acls.acl_table(acls.PrincipalNames(k, f"{prefix}worker", trainer_group))
    writers = {svc: {g.name for g in grants if "WRITE" in g.operations} for svc, grants in table.items()}
    assert {svc for svc, names in writers.items() if k.training_runs_topic in names} == {"trainer", "watcher"}
    assert {svc for svc, names in writers.items() if k.trainer_control_topic in names} == {"trainer"}
    assert {svc for svc, names in writers.items() if k.experiences_topic in names} == {"app"}
    # docs/guarantees.md shows the table for the default names, row for row
    defaults = acls.PrincipalNames(KafkaSettings(tier3_topic_prefix="tier3."), "tier3.worker")
    doc = (ROOT / "docs" / "guarantees.md").read_text()
    shown = [line for line in doc.splitlines()
             if re.match(r"\| `(app|worker|trainer|watcher)` \| [A-Z+]+ \| (topic|group) `", line)]
    assert shown == acls.acl_markdown(defaults)


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
