"""A local single-node Apache Kafka (KRaft combined mode) for development, tests and the demo. No Docker.

``tier3 broker up`` resolves the broker's jars from Maven Central once (``mvn dependency:copy-dependencies``
on a small pom), caches them per version under ``~/.cache/tier3/kafka-<version>``, formats the storage once,
starts ``java kafka.Kafka server.properties`` in the background (pid and log kept in the data folder) and
waits until the broker answers a metadata request: the TCP port opens before the broker can serve.

``KAFKA_BOOTSTRAP_SERVERS`` pointing anywhere else means "use that cluster"; nothing is started then.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.settings import DEFAULT_MAX_RECORD_BYTES, RECORD_BATCH_SLACK_BYTES
from streams.errors import BrokerError

# Kafka 4.4 is the newest 4.x, and faust-streaming (aiokafka 0.14) passes our end-to-end tests on it.
DEFAULT_KAFKA_VERSION = "4.4.0"

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>tier3.local</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""

# log4j2 in .properties form (the YAML form needs another jar). Broker log to a file, quiet client noise.
LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class BrokerSettings(BaseSettings):
    """Settings of the local broker. Field name == environment variable name."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    tier3_kafka_version: str = Field(DEFAULT_KAFKA_VERSION, description="Apache Kafka version of the local broker")
    tier3_broker_port: int = Field(9092, ge=1, le=65535, description="client port of the local broker")
    tier3_broker_controller_port: int = Field(9093, ge=1, le=65535, description="KRaft controller port")
    tier3_broker_dir: Path = Field(Path(".tier3/broker"), description="broker data, pid and log folder")
    tier3_cache_dir: Path = Field(Path.home() / ".cache" / "tier3", description="cache of resolved jars")
    tier3_broker_heap: str = Field("-Xms256m -Xmx768m", description="JVM heap options of the local broker")
    tier3_broker_start_timeout_s: float = Field(120.0, description="how long `up` waits for the broker")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.tier3_broker_port}"


@dataclass(frozen=True)
class BrokerStatus:
    bootstrap: str
    running: bool
    pid: int | None
    version: str | None
    topics: list[str]
    managed: bool  # started by us (pid file) vs some other process answering on the port


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        hint = {"java": "install a Java 17+ runtime (e.g. `apt-get install openjdk-17-jre-headless`)",
                "mvn": "install Maven (e.g. `apt-get install maven`)"}[name]
        raise BrokerError(f"`{name}` was not found on PATH: {hint}, or set KAFKA_BOOTSTRAP_SERVERS to an "
                          "existing cluster")
    return path


def resolve_jars(s: BrokerSettings) -> Path:
    """Resolve the broker's runtime jars from Maven Central once; return the folder that holds them."""
    libs = s.tier3_cache_dir / f"kafka-{s.tier3_kafka_version}" / "libs"
    if (libs / ".complete").exists():
        return libs
    mvn = _tool("mvn")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=libs.parent) as tmp:
        work = Path(tmp)
        (work / "pom.xml").write_text(POM.format(version=s.tier3_kafka_version))
        out = work / "libs"
        _mvn(mvn, work, "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={out}")
        # Kafka 4.x logs through SLF4J 1.7 to log4j2: add the binding at the log4j-api version it brought.
        api = sorted(out.glob("log4j-api-*.jar"))
        if api:
            log4j_version = api[0].name.removeprefix("log4j-api-").removesuffix(".jar")
            extra = [f"org.apache.logging.log4j:log4j-slf4j-impl:{log4j_version}"]
        else:  # 3.9.x uses reload4j
            extra = ["org.slf4j:slf4j-reload4j:1.7.36"]
        for artifact in extra:
            _mvn(mvn, work, "dependency:copy", f"-Dartifact={artifact}", f"-DoutputDirectory={out}")
        (out / ".complete").write_text(s.tier3_kafka_version)
        if libs.exists():
            shutil.rmtree(libs)
        os.replace(out, libs)
    return libs


def _mvn(mvn: str, cwd: Path, *args: str) -> None:
    proc = subprocess.run([mvn, "-B", "-q", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BrokerError(f"Maven could not resolve the Kafka jars ({' '.join(args[:1])}):\n"
                          f"{(proc.stdout + proc.stderr)[-3000:]}")


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _server_properties(s: BrokerSettings, data: Path) -> str:
    port, ctrl = s.tier3_broker_port, s.tier3_broker_controller_port
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{ctrl}",
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctrl}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",  # 127.0.0.1, not localhost (IPv6 surprises)
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={data / 'logs'}",
        "num.partitions=1",
        # one node: every internal topic has one replica
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=10",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",  # tests and the demo join groups often
        # tier3's topics carry their own max.message.bytes (schemas.settings); this default is the same limit
        f"message.max.bytes={DEFAULT_MAX_RECORD_BYTES + RECORD_BATCH_SLACK_BYTES}",
        "",
    ])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still "exists": look at its state
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _our_pid(s: BrokerSettings) -> int | None:
    """The pid of the broker we started, if it is still that process (pids get reused)."""
    pid_file = s.tier3_broker_dir / "broker.pid"
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        return None
    if not _pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return pid if "kafka.Kafka" in cmdline and str(s.tier3_broker_dir.resolve()) in cmdline else None


def list_topics(bootstrap: str, timeout_s: float = 3.0) -> list[str] | None:
    """Topic names if a broker answers a metadata request at ``bootstrap``, else None."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 1000,
                         "log_level": 0, "logger": _silent_logger()})
    try:
        md = admin.list_topics(timeout=timeout_s)
    except Exception:
        return None
    if not md.brokers:
        return None
    return sorted(t for t in md.topics if not t.startswith("__"))


def _silent_logger() -> Any:
    import logging

    log = logging.getLogger("tier3.broker.librdkafka")
    log.setLevel(logging.CRITICAL)
    return log


def up(s: BrokerSettings | None = None) -> BrokerStatus:
    """Start the local broker unless it is already running; return when it answers metadata requests."""
    s = s or BrokerSettings()
    data = s.tier3_broker_dir.resolve()
    if _our_pid(s) is not None and list_topics(s.bootstrap) is not None:
        return status(s)
    if _port_in_use(s.tier3_broker_port) or _port_in_use(s.tier3_broker_controller_port):
        if list_topics(s.bootstrap) is not None and _our_pid(s) is None:
            raise BrokerError(f"another Kafka broker already answers on {s.bootstrap} (not started by tier3 "
                              f"from {data}): use it with KAFKA_BOOTSTRAP_SERVERS={s.bootstrap}, or stop it")
        if _our_pid(s) is None:
            raise BrokerError(f"port {s.tier3_broker_port} or {s.tier3_broker_controller_port} on 127.0.0.1 is in "
                              "use by another program: stop it, or choose free ports with TIER3_BROKER_PORT and "
                              "TIER3_BROKER_CONTROLLER_PORT")
    java = _tool("java")
    libs = resolve_jars(s)
    data.mkdir(parents=True, exist_ok=True)
    props = data / "server.properties"
    props.write_text(_server_properties(s, data))
    log4j = data / "log4j2.properties"
    log4j.write_text(LOG4J2.format(log=data / "server.log"))
    cp = f"{libs}/*"
    jvm = [java, *s.tier3_broker_heap.split(), "-XX:+UseG1GC", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={data}", "-cp", cp]
    if not (data / "logs" / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        fmt = subprocess.run([*jvm, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props),
                              "--ignore-formatted"], capture_output=True, text=True)
        if fmt.returncode != 0:
            raise BrokerError(f"formatting the broker storage failed:\n{(fmt.stdout + fmt.stderr)[-3000:]}")
    out = open(data / "stdout.log", "ab")  # handed to the child, closed below
    proc = subprocess.Popen([*jvm, "kafka.Kafka", str(props)], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=data)
    out.close()
    (data / "broker.pid").write_text(str(proc.pid))
    (data / "version").write_text(s.tier3_kafka_version)
    deadline = time.monotonic() + s.tier3_broker_start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"the broker exited with code {proc.returncode} while starting; last log lines:\n"
                              f"{_tail(data)}")
        if list_topics(s.bootstrap, timeout_s=2.0) is not None:
            return status(s)
        time.sleep(0.5)
    raise BrokerError(f"the broker did not answer on {s.bootstrap} within {s.tier3_broker_start_timeout_s:.0f} s; "
                      f"last log lines:\n{_tail(data)}")


def _tail(data: Path, n: int = 30) -> str:
    lines: list[str] = []
    for name in ("stdout.log", "server.log"):
        p = data / name
        if p.exists():
            lines += p.read_text(errors="replace").splitlines()[-n:]
    return "\n".join(lines[-n:])


def down(s: BrokerSettings | None = None, timeout_s: float = 30.0) -> bool:
    """Stop the broker this checkout started (and only that process). Return whether one was stopped."""
    s = s or BrokerSettings()
    pid = _our_pid(s)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)  # controlled shutdown: flushes logs, leaves no recovery work
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.2)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        while _pid_alive(pid):
            time.sleep(0.1)
    (s.tier3_broker_dir / "broker.pid").unlink(missing_ok=True)
    return True


def status(s: BrokerSettings | None = None, bootstrap: str | None = None) -> BrokerStatus:
    s = s or BrokerSettings()
    addr = bootstrap or s.bootstrap
    topics = list_topics(addr)
    pid = _our_pid(s)
    version_file = s.tier3_broker_dir / "version"
    version = version_file.read_text().strip() if version_file.exists() and pid else None
    return BrokerStatus(bootstrap=addr, running=topics is not None, pid=pid, version=version,
                        topics=topics or [], managed=pid is not None)
