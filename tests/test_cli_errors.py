"""Every command's error paths, as a user meets them: subprocesses of the real CLI against the real broker.

- No secret in any output: every secret setting holds a canary while every command is walked through invalid
  settings of each kind, no broker, missing topics, topics with other partition counts, and crashes.
- A user's mistake gives one line and exit code 2: settings, arguments, files, run ids, no broker, topics.
- No command creates a topic on the side; librdkafka's log is rate-limited; the repository cites only docs/.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from schemas.runtime.preflight import KafkaUnreachable, kafka_metadata
from schemas.settings import KafkaSettings
from streams.topics import ensure_topics
from tests.kafka_utils import consume_values

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "widget_selector" / "experiences.jsonl"

#: one canary per secret setting; test_every_secret_setting_has_a_canary keeps this list complete
CANARIES = {
    "ANTHROPIC_API_KEY": "sk-ant-canary-Qx7Rk2Wm9Lp4",
    "OPENAI_API_KEY": "sk-canary-Hj3Nv8Tz1Yc6",
    "TIER3_STUDENT_API_KEY": "canary-student-Fb5Gd0Ks7Ue2",
    "KAFKA_SASL_PASSWORD": "canary-sasl-Wq4Mx9Pe3Ra8",
    "KAFKA_SSL_KEY_PASSWORD": "canary-sslkey-Zt6Bn1Vc5Jh0",
    "TIER3_BROKER_ADMIN_PASSWORD": "canary-broker-admin-Lm2Sd8Kq4",
}


def _all_settings_classes() -> list[type]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_settings", ROOT / "docs" / "gen_settings.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    import importlib

    return [getattr(importlib.import_module(module), name) for _t, module, name, _p in gen.SECTIONS]


def test_every_secret_setting_has_a_canary() -> None:
    """A setting that looks like a secret is a SecretStr, and each SecretStr setting is in CANARIES."""
    secret_fields: set[str] = set()
    for cls in _all_settings_classes():
        for name, info in cls.model_fields.items():
            is_secret = "SecretStr" in str(info.annotation)
            looks_secret = re.search(r"password|api_key|secret|token$", name) is not None
            assert is_secret or not looks_secret, f"{cls.__name__}.{name} holds a secret: make it SecretStr"
            if is_secret:
                secret_fields.add(name.upper())
    assert secret_fields == set(CANARIES), secret_fields ^ set(CANARIES)
    # and a secret never prints
    assert "canary" not in repr(KafkaSettings(kafka_sasl_password=SecretStr("canary")))


@dataclass
class Case:
    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    expect_rc: int | None = 2  # None: a crash (any code but 0 and 2, a traceback)
    must_say: tuple[str, ...] = ()
    one_line: bool = True
    timeout_s: float = 240.0


@dataclass
class Ran:
    case: Case
    rc: int
    out: str
    err: str
    wall_s: float


def _run(case: Case, base_env: dict[str, str], cwd: Path) -> Ran:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tier3", *case.args], cwd=ROOT,
                          env={**base_env, **case.env, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=case.timeout_s)
    return Ran(case, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def _run_all(cases: list[Case], base_env: dict[str, str], cwd: Path) -> list[Ran]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda c: _run(c, base_env, cwd), cases))


def _error_lines(ran: Ran) -> list[str]:
    return [line for line in ran.err.splitlines() if line.strip()]


def _check_user_error(ran: Ran) -> list[str]:
    """Problems with a run that should have ended in the one-line user error; [] when it did."""
    c = ran.case
    text = ran.out + ran.err
    problems = []
    if ran.rc != c.expect_rc:
        problems.append(f"exit code {ran.rc}, want {c.expect_rc}")
    if "Traceback" in text:
        problems.append("a traceback")
    lines = _error_lines(ran)
    if c.one_line and len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr, want 1")
    if not lines or not all(line.startswith("error: ") for line in lines[-1:]):
        problems.append("no 'error: ' line last on stderr")
    problems += [f"does not say {s!r}" for s in c.must_say if s not in ran.err]
    return problems


def _report(rans: list[Ran], problems: dict[str, list[str]]) -> str:
    by_name = {r.case.name: r for r in rans}
    return "\n\n".join(f"{name}: {'; '.join(p)}\n--- stderr ---\n{by_name[name].err[-1500:]}"
                       for name, p in problems.items())


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def env_base(kafka_bootstrap: str, tmp_path: Path) -> dict[str, str]:
    """A clean environment: no TIER3_/KAFKA_ setting of the caller's, every secret a canary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIER3_", "KAFKA_", "ANTHROPIC_", "OPENAI_"))}
    return {**env, **CANARIES, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "TIER3_DATA_DIR": str(tmp_path / "data"), "TIER3_PARTITIONS": "2", "TIER3_TRAINER_CLOSE_LOOP": "false",
            "TIER3_TEACHER_BASE_URL": "http://127.0.0.1:9/", "TIER3_KAFKA_TIMEOUT_S": "3"}


@pytest.fixture
def ready_prefix(kafka_bootstrap: str) -> str:
    """A prefix whose four topics exist, made as `tier3 topics create` makes them (2 partitions)."""
    prefix = f"clierr{uuid.uuid4().hex[:8]}."
    ensure_topics(KafkaSettings(kafka_bootstrap_servers=kafka_bootstrap, tier3_topic_prefix=prefix,
                                tier3_partitions=2))
    return prefix


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _topics_with_prefix(bootstrap: str, prefix: str) -> list[str]:
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30)
    return sorted(t for t in md.topics if t.startswith(prefix))


#: every command that needs Kafka, with arguments that get it past argument parsing
KAFKA_COMMANDS: dict[str, list[str]] = {
    "topics create": ["topics", "create"],
    "publish": ["publish", str(EXAMPLES)],
    "worker": ["worker"],
    "dlq": ["dlq"],
    "trainer": ["trainer", "--max-runs", "1"],
    "replay": ["replay"],
    "eval": ["eval", "run-x"],
    "promote": ["promote", "run-x"],
    "rollback": ["rollback"],
    "export": ["export", "run-x"],
    "close-loop": ["close-loop", "run-x"],
    "demo": ["demo", "--examples", "2", "--publish-seconds", "1", "--timeout-s", "30"],
}
COMMANDS = {**KAFKA_COMMANDS, "train-now": ["train-now"], "broker status": ["broker", "status"]}
TRAINER_SIDE = {"trainer", "replay", "eval", "promote", "rollback", "export", "close-loop", "train-now"}

#: invalid values of each kind at once (pydantic reports every field error): (variable, value), never echoed
FIELD_ERRORS = [("TIER3_PARTITIONS", "0"),  # out of range
                ("TIER3_KAFKA_TIMEOUT_S", "soonish-9x"),  # not a number
                ("KAFKA_SECURITY_PROTOCOL", "TLZ-7")]  # not one of the choices
EXTRA_FIELD_ERRORS = {"publish": [("ENABLE_TIER3_CAPTURE", "maybe-2q")],  # not a boolean
                      "worker": [("TIER3_SAMPLE_RATE", "1.5")],
                      "trainer": [("TIER3_MIN_TRACES", "-3")]}
#: invalid values distinctive enough to look for in the output (where they must not appear)
ECHO_CHECKED = {"soonish-9x", "TLZ-7", "maybe-2q"}
#: settings valid one by one, contradicting each other (a model validator)
CONTRADICTIONS = {"worker": {"TIER3_TEACHER": "recorded"},  # without TIER3_TEACHER_RECORDED_PATH
                  **{c: {"TIER3_TRAINER_HEARTBEAT_INTERVAL_MS": "60000"} for c in TRAINER_SIDE}}


def test_no_secret_in_any_output_of_any_command(env_base: dict[str, str], kafka_bootstrap: str, tmp_path: Path,
                                               ready_prefix: str, busy_port: int) -> None:
    cases: list[Case] = []
    # 1. invalid settings of each kind, in every command
    for name, args in COMMANDS.items():
        bad = FIELD_ERRORS + EXTRA_FIELD_ERRORS.get(name, [])
        cases.append(Case(f"{name}: invalid values", args, dict(bad), one_line=False,
                          must_say=tuple(f"invalid setting {var}:" for var, _ in bad)))
        if name in CONTRADICTIONS:
            cases.append(Case(f"{name}: contradicting settings", args, CONTRADICTIONS[name],
                              must_say=("invalid settings:",)))
    # 2. no broker at the bootstrap servers
    dead = f"127.0.0.1:{_free_port()}"
    for name, args in KAFKA_COMMANDS.items():
        cases.append(Case(f"{name}: no broker", args, {"KAFKA_BOOTSTRAP_SERVERS": dead},
                          must_say=(f"no Kafka broker answered at {dead}", "tier3 broker up",
                                    "KAFKA_BOOTSTRAP_SERVERS")))
    # 3. topics missing (a fresh prefix), and topics with other partition counts than the settings
    fresh = f"clierrmissing{uuid.uuid4().hex[:8]}."
    for name, args in KAFKA_COMMANDS.items():
        if name in ("topics create", "demo"):  # they create the topics (the demo under its own prefix)
            continue
        cases.append(Case(f"{name}: topics missing", args, {"TIER3_TOPIC_PREFIX": fresh},
                          must_say=("not exist", "tier3 topics create")))
    for name in ("worker", "trainer", "publish", "topics create"):
        cases.append(Case(f"{name}: other partition count", KAFKA_COMMANDS[name],
                          {"TIER3_TOPIC_PREFIX": ready_prefix, "TIER3_PARTITIONS": "3"},
                          must_say=("partitions",)))
    # 4. crashes (bugs or environments we do not anticipate): a traceback, still no secret
    ready = {"TIER3_TOPIC_PREFIX": ready_prefix}
    cases += [
        Case("replay: crash (output folder not creatable)", ["replay", "--out", "/dev/null/replay"], ready,
             expect_rc=None),
        Case("trainer: crash (runs dir not creatable)", ["trainer", "--max-runs", "1"],
             {**ready, "TIER3_RUNS_DIR": "/dev/null/runs"}, expect_rc=None),
        Case("worker: crash (web port taken)", ["worker"], {**ready, "TIER3_WEB_PORT": str(busy_port)},
             expect_rc=None),
    ]

    rans = _run_all(cases, env_base, tmp_path)

    leaks = {r.case.name: [f"canary of {var}" for var, value in CANARIES.items()
                           if value in r.out + r.err or value[:12] in r.out + r.err] for r in rans}
    leaks = {k: v for k, v in leaks.items() if v}
    assert not leaks, _report(rans, leaks)
    problems: dict[str, list[str]] = {}
    for r in rans:
        if r.case.expect_rc is None:
            p = [] if r.rc not in (0, 2) and "Traceback" in r.err else [f"not a crash: exit code {r.rc}"]
        else:
            p = _check_user_error(r)
            p += [f"echoes the invalid value {v!r}" for v in r.case.env.values()
                  if v in ECHO_CHECKED and v in r.out + r.err]
        if p:
            problems[r.case.name] = p
    assert not problems, _report(rans, problems)
    # a command stopped for missing topics created none of them (no auto-creation on the side)
    assert _topics_with_prefix(kafka_bootstrap, fresh) == []
    print(orjson.dumps({"commands_walked": len(cases), "max_no_broker_wall_s": round(max(
        r.wall_s for r in rans if r.case.name.endswith("no broker")), 1)}).decode())


def test_user_mistakes_give_one_line_and_exit_2(env_base: dict[str, str], kafka_bootstrap: str, tmp_path: Path,
                                               ready_prefix: str) -> None:
    bad_jsonl = tmp_path / "not-experiences.jsonl"
    bad_jsonl.write_text('{"hello": 1}\nnot json\n')
    ready = {"TIER3_TOPIC_PREFIX": ready_prefix}
    cases = [
        Case("replay --since yesterday", ["replay", "--since", "yesterday"], ready, must_say=("--since",)),
        Case("replay --run unknown", ["replay", "--run", "no-such-run"], ready, must_say=("no-such-run",)),
        Case("replay --manifest missing", ["replay", "--manifest", str(tmp_path / "nope.json")], ready,
             must_say=("nope.json",)),
        Case("replay two sources", ["replay", "--run", "a", "--since", "2026-01-01"], ready,
             must_say=("at most one",)),
        Case("publish missing file", ["publish", "missing.jsonl"], ready, must_say=("missing.jsonl",)),
        Case("publish a folder", ["publish", str(tmp_path)], ready, must_say=("not a file",)),
        Case("publish negative rate", ["publish", str(EXAMPLES), "--rate-per-s", "-1"], ready,
             must_say=("--rate-per-s",)),
        Case("publish no experience in file", ["publish", str(bad_jsonl)], ready, one_line=False,
             must_say=("no line of",)),
        *[Case(f"{cmd} unknown run", [cmd, "no-such-run"], ready, must_say=("no run 'no-such-run'",))
          for cmd in ("eval", "export", "close-loop")],
        Case("promote unknown run", ["promote", "no-such-run"], ready, must_say=("tier3 eval no-such-run",)),
        Case("dlq --limit -1", ["dlq", "--limit", "-1"], ready, must_say=("--limit",)),
        Case("worker --web-port 0", ["worker", "--web-port", "0"], ready, must_say=("TIER3_WEB_PORT",)),
        Case("trainer TIER3_MIN_TRACES=0", ["trainer"], {**ready, "TIER3_MIN_TRACES": "0"},
             must_say=("TIER3_MIN_TRACES",)),
        Case("topics create over other partition counts", ["topics", "create"],
             {**ready, "TIER3_PARTITIONS": "4"}, must_say=("partitions",)),
    ]
    rans = _run_all(cases, env_base, tmp_path)
    problems = {r.case.name: p for r in rans if (p := _check_user_error(r))}
    assert not problems, _report(rans, problems)


#: TLS / SASL mistakes (schemas/runtime/preflight.py: security_problems), each with what its one line must say
def _security_mistakes(tmp_path: Path) -> dict[str, tuple[dict[str, str], tuple[str, ...]]]:
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("this is not a certificate\n")
    pem = tmp_path / "client.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    return {
        "ssl CA file missing": ({"KAFKA_SECURITY_PROTOCOL": "SSL",
                                 "KAFKA_SSL_CA_LOCATION": str(tmp_path / "no-such-ca.pem")},
                                ("invalid setting KAFKA_SSL_CA_LOCATION:", "no such file")),
        "ssl CA file unreadable": ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN",
                                    "KAFKA_SASL_USERNAME": "u", "KAFKA_SSL_CA_LOCATION": str(not_pem)},
                                   ("invalid setting KAFKA_SSL_CA_LOCATION:", "not a PEM file")),
        "ssl certificate without key": ({"KAFKA_SECURITY_PROTOCOL": "SSL",
                                         "KAFKA_SSL_CERTIFICATE_LOCATION": str(pem)},
                                        ("KAFKA_SSL_KEY_LOCATION go together",)),
        "sasl mechanism wrong": ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "scram-sha-512",
                                  "KAFKA_SASL_USERNAME": "u"},
                                 ("invalid setting KAFKA_SASL_MECHANISM:", "SCRAM-SHA-512")),
        "sasl mechanism missing": ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "u"},
                                   ("invalid setting KAFKA_SASL_MECHANISM: required",)),
        "sasl username missing": ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN"},
                                  ("invalid setting KAFKA_SASL_USERNAME: required",)),
        "sasl password missing": ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                                   "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256", "KAFKA_SASL_USERNAME": "u",
                                   "KAFKA_SASL_PASSWORD": ""},
                                  ("invalid setting KAFKA_SASL_PASSWORD: required",)),
    }


def test_ssl_and_sasl_mistakes_give_one_line_and_exit_2_in_every_command(env_base: dict[str, str],
                                                                         tmp_path: Path, ready_prefix: str) -> None:
    """A missing CA file in every command (it gave a traceback: librdkafka refuses to create the client), and
    every other TLS / SASL mistake in a command of each side: one line naming the setting, exit code 2."""
    mistakes = _security_mistakes(tmp_path)
    ready = {"TIER3_TOPIC_PREFIX": ready_prefix}
    env, say = mistakes["ssl CA file missing"]
    cases = [Case(f"{name}: ssl CA file missing", args, {**ready, **env}, must_say=say, timeout_s=120)
             for name, args in COMMANDS.items()]
    for mistake, (env, say) in mistakes.items():
        for name in ("worker", "trainer", "dlq"):
            if mistake != "ssl CA file missing":
                cases.append(Case(f"{name}: {mistake}", COMMANDS[name], {**ready, **env}, must_say=say,
                                  timeout_s=120))
    rans = _run_all(cases, env_base, tmp_path)
    problems = {r.case.name: p for r in rans if (p := _check_user_error(r))}
    problems.update({r.case.name: ["a canary in the output"] for r in rans
                     if any(v in r.out + r.err for v in CANARIES.values())})
    assert not problems, _report(rans, problems)
    # a librdkafka refusal not anticipated by the checks is one line too (run_cli), never a traceback
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from schemas.runtime.preflight import client_refused

    with pytest.raises(KafkaException) as info:
        AdminClient({"bootstrap.servers": "127.0.0.1:9", "security.protocol": "SSL",
                     "ssl.ca.location": str(tmp_path / "no-such-ca.pem")})
    refused = client_refused(info.value)
    assert refused is not None and "\n" not in str(refused) and "KAFKA_SSL_" in str(refused)
    assert client_refused(RuntimeError("a bug")) is None


def test_publish_accepts_what_publish_accepts_and_counts_skipped_lines(env_base: dict[str, str],
                                                                       kafka_bootstrap: str, tmp_path: Path,
                                                                       ready_prefix: str) -> None:
    record = orjson.loads(EXAMPLES.read_bytes().splitlines()[0])
    record.pop("schema_version")  # publish() accepts it without: so must `tier3 publish`
    record["experience_id"] = f"noversion-{uuid.uuid4().hex[:8]}"
    bad = dict(record, experience_id="bad", confidence="high")
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(orjson.dumps(record) + b"\nnot json\n" + orjson.dumps(bad) + b"\n\n")
    ran = _run(Case("publish mixed", ["publish", str(path)], {"TIER3_TOPIC_PREFIX": ready_prefix}),
               env_base, tmp_path)
    assert ran.rc == 0, ran.out + ran.err
    stats = {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", ran.out)}
    assert stats["lines"] == 3 and stats["delivered"] == 1 and stats["invalid"] == 2, ran.out
    assert "line 2 skipped" in ran.err and "line 3 skipped" in ran.err and "confidence" in ran.err, ran.err
    settings = KafkaSettings(kafka_bootstrap_servers=kafka_bootstrap, tier3_topic_prefix=ready_prefix)
    msgs = consume_values(settings, settings.experiences_topic, expected=1, timeout_s=60)
    assert [m.key() for m in msgs] == [record["experience_id"].encode()]


def test_no_broker_is_one_line_within_10_s(tmp_path: Path) -> None:
    settings = KafkaSettings(kafka_bootstrap_servers=f"127.0.0.1:{_free_port()},nosuchhost.invalid:9092")
    t0 = time.monotonic()
    with pytest.raises(KafkaUnreachable) as info:
        kafka_metadata(settings)  # the default TIER3_KAFKA_TIMEOUT_S
    wall = time.monotonic() - t0
    assert wall < 10.0, wall
    msg = str(info.value)
    assert "\n" not in msg and settings.kafka_bootstrap_servers in msg and "tier3 broker up" in msg, msg
    assert re.search(r"Connection refused|Failed to resolve", msg), msg


def test_no_client_creates_a_topic_by_asking_for_it(kafka_bootstrap: str) -> None:
    """Even on a broker that allows auto-creation (the session broker may predate the setting), a producer or
    consumer built from client_config() never makes a missing topic appear."""
    from tier3.devbroker.server import BrokerSettings, _server_properties

    assert "auto.create.topics.enable=false" in _server_properties(BrokerSettings(), Path("/tmp/x")).splitlines()
    settings = KafkaSettings(kafka_bootstrap_servers=kafka_bootstrap)
    topic = f"clierr-auto-{uuid.uuid4().hex[:8]}"
    errors: list[object] = []
    producer = Producer({**settings.client_config(), "message.timeout.ms": 5000})
    producer.produce(topic, b"x", on_delivery=lambda err, _m: errors.append(err))
    producer.flush(15)
    consumer = Consumer({**settings.client_config(), "group.id": f"clierr-{uuid.uuid4().hex}"})
    consumer.subscribe([topic])
    consumer.poll(3)
    consumer.close()
    assert errors and errors[0] is not None  # not delivered: there is no such topic
    assert _topics_with_prefix(kafka_bootstrap, topic) == []


_FLOOD_SCRIPT = """
import logging, sys, time
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from confluent_kafka import Producer
from schemas.settings import KafkaSettings
from streams.client.capture import Capture, CaptureSettings
s = KafkaSettings(kafka_bootstrap_servers=sys.argv[1])
p = Producer({**s.client_config(), "message.timeout.ms": 600000})
cap = Capture(CaptureSettings(kafka_bootstrap_servers=sys.argv[1]))
from schemas import Experience, decode
exp = decode(open(sys.argv[3], "rb").readline(), Experience)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    p.produce("t", b"x"); p.poll(0.1); cap.publish(exp)
print("published", file=sys.stderr)
"""


def test_librdkafka_log_is_rate_limited_while_kafka_is_down() -> None:
    """About 20 connection-refused lines a second per client without the limit; here a few in total."""
    dead = f"127.0.0.1:{_free_port()}"
    proc = subprocess.run([sys.executable, "-c", _FLOOD_SCRIPT, dead, "6", str(EXAMPLES)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    kafka_lines = [line for line in lines if "Connection refused" in line or "brokers are down" in line]
    assert 1 <= len(kafka_lines) <= 6, "\n".join(lines[:50])  # one per kind, not one per retry


def test_rate_limit_reports_what_it_hid() -> None:
    from schemas.settings import _RateLimit

    log = logging.getLogger(f"clierr.{uuid.uuid4().hex}")
    flt = _RateLimit(0.2)
    log.addFilter(flt)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log.addHandler(Keep())
    log.propagate = False
    for i in range(50):
        log.error("Connect to 127.0.0.1:%d failed (after %dms)", 1, i)
    time.sleep(0.25)
    log.error("Connect to 127.0.0.1:%d failed (after %dms)", 1, 7)
    assert len(records) == 2 and "49 more like this" in records[1], records


def test_repository_cites_only_its_own_docs() -> None:
    design = "DESIGN" + ".md"
    folders = ("schemas", "streams", "trainer", "tier3", "bench", "examples", "docs")
    hits = [str(p.relative_to(ROOT)) for folder in folders
            for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md") and design in p.read_text()]
    hits += ["README.md"] if design in (ROOT / "README.md").read_text() else []
    assert hits == [], hits
    for cited in set(re.findall(r"docs/[\w.-]+\.md", "".join(
            p.read_text() for folder in folders[:4] for p in (ROOT / folder).rglob("*.py")))):
        assert (ROOT / cited).exists(), cited
    helptext = subprocess.run([sys.executable, "-m", "tier3", "topics", "create", "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120).stdout
    assert design not in helptext and "docs/design.md" in helptext


def test_converter_folder_is_documented_where_the_code_puts_it() -> None:
    from trainer.close_loop.gguf_converter import default_tools_dir

    doc = (ROOT / "docs" / "settings.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `TIER3_LLAMA_CPP_DIR`"))
    home_cache = Path.home() / ".cache" / "tier3" / "tools"
    assert os.environ.get("XDG_CACHE_HOME") or default_tools_dir() == home_cache
    assert "~/.cache/tier3/tools" in row and "<data_dir>/tools" not in row, row


def test_router_says_when_training_runs_is_missing(kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    from streams.client.router import PromotionFollower, PromotionView
    from streams.settings import StreamsSettings

    prefix = f"clierrrouter{uuid.uuid4().hex[:8]}."
    settings = StreamsSettings(kafka_bootstrap_servers=kafka_bootstrap, tier3_topic_prefix=prefix)
    caplog.set_level(logging.WARNING, logger="tier3.router")
    follower = PromotionFollower(settings, PromotionView())
    follower.start(wait_s=0.1)
    try:
        deadline = time.monotonic() + 60
        while "tier3 topics create" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        follower.stop()
    assert f"{prefix}training-runs does not exist" in caplog.text, caplog.text
    assert _topics_with_prefix(kafka_bootstrap, prefix) == []
