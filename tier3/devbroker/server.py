"""A local single-node Apache Kafka (KRaft combined mode) for development, tests and the demo. No Docker.

``tier3 broker up`` resolves the broker's jars from Maven Central once (``mvn dependency:copy-dependencies``
on a small pom), caches them per version under ``~/.cache/tier3/kafka-<version>``, formats the storage once,
starts ``java kafka.Kafka server.properties`` in the background (pid and log kept in the data folder) and
waits until the broker answers a metadata request: the TCP port opens before the broker can serve.

``KAFKA_BOOTSTRAP_SERVERS`` pointing anywhere else means "use that cluster"; nothing is started then.

``tier3 broker up --secure`` (``TIER3_BROKER_SECURE=true``) starts it secured instead: the client port speaks
SASL_SSL with SCRAM-SHA-512 only, its certificate is signed by a CA made at the first start (``tls/ca.pem`` in the
broker folder; the CA's key is not kept), ACLs are enforced (KRaft's StandardAuthorizer, super user ``admin``,
nothing allowed to anyone else unless an ACL says so) and the controller port (loopback) needs SASL/PLAIN. The
admin's SCRAM credential is written into the metadata when the storage is formatted. ``client.env`` in the broker
folder (mode 0600) holds the admin's client settings; :func:`tier3.devbroker.acls.ensure_principals` adds one
principal per service (``app``, ``worker``, ``trainer``, ``watcher``) with only the ACLs of
:func:`tier3.devbroker.acls.acl_table`, its settings in ``<user>.env``.
"""

from __future__ import annotations

import base64
import datetime
import os
import secrets
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
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.runtime.files import move_into_place, write_atomic
from schemas.settings import DEFAULT_MAX_RECORD_BYTES, RECORD_BATCH_SLACK_BYTES


class BrokerError(Exception):
    """The local broker could not be resolved, started or stopped (the message says what to do)."""


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
    tier3_broker_secure: bool = Field(False, description="start the local broker secured (`tier3 broker up "
                                      "--secure`): SASL_SSL with SCRAM-SHA-512, a self-signed CA made at the "
                                      "first start, ACLs enforced; client settings in <broker dir>/client.env")
    tier3_broker_admin_password: SecretStr | None = Field(None, description="password of the secured broker's "
                                                          "super user `admin`, fixed when its storage is "
                                                          "formatted (default: generated, kept in <broker "
                                                          "dir>/secrets/admin.password)")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.tier3_broker_port}"

    def client_env(self) -> dict[str, str]:
        """The client settings (environment variables of KafkaSettings) of the broker's super user."""
        env = {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap}
        if self.tier3_broker_secure:
            data = self.tier3_broker_dir.resolve()
            env.update(secure_client_env(data / "tls" / "ca.pem", ADMIN_USER, _read_secret(data, ADMIN_USER)))
        return env

    def client_config(self) -> dict[str, Any]:
        """The librdkafka settings that reach this broker as its super user."""
        env = self.client_env()
        conf = {"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"]}
        if self.tier3_broker_secure:
            conf.update({"security.protocol": env["KAFKA_SECURITY_PROTOCOL"],
                         "sasl.mechanism": env["KAFKA_SASL_MECHANISM"], "sasl.username": env["KAFKA_SASL_USERNAME"],
                         "sasl.password": env["KAFKA_SASL_PASSWORD"], "ssl.ca.location": env["KAFKA_SSL_CA_LOCATION"]})
        return conf


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
        move_into_place(out, libs)
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
        # a topic exists only when `tier3 topics create` made it, with our partition counts: a request for a
        # missing topic must fail, not create it with num.partitions (issue: a trainer started first made
        # 1-partition topics and broke the co-partitioning of experiences and traces)
        "auto.create.topics.enable=false",
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


ADMIN_USER = "admin"
SCRAM = "SCRAM-SHA-512"


def secure_client_env(ca: Path, user: str, password: str) -> dict[str, str]:
    return {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": SCRAM, "KAFKA_SASL_USERNAME": user,
            "KAFKA_SASL_PASSWORD": password, "KAFKA_SSL_CA_LOCATION": str(ca)}


def write_private(path: Path, text: str | bytes) -> None:
    """Write a file only its owner can read (created 0600, never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, text.encode() if isinstance(text, str) else text)  # its temp file is created 0600


def _java_argfile(args: list[str]) -> str:
    """``args`` as a java launcher argument file (``java @file``): one double-quoted argument a line."""
    return "".join('"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"\n' for a in args)


def _read_secret(data: Path, user: str) -> str:
    path = data / "secrets" / f"{user}.password"
    if not path.exists():
        raise BrokerError(f"no password for `{user}` in {path.parent}: start the broker with `tier3 broker up "
                          "--secure` first")
    return path.read_text().strip()


def user_password(data: Path, user: str, given: SecretStr | None) -> str:
    """The user's password: the one kept in the broker folder, else the given one, else a new random one."""
    path = data / "secrets" / f"{user}.password"
    if path.exists():
        kept = path.read_text().strip()
        if given is not None and given.get_secret_value() != kept:
            raise BrokerError(f"the secured broker in {data} was formatted with another `{user}` password: unset "
                              "TIER3_BROKER_ADMIN_PASSWORD, or use a new TIER3_BROKER_DIR")
        return kept
    password = given.get_secret_value() if given is not None else secrets.token_hex(24)
    if not password or any(c in password for c in ',[]="\\\n\r '):
        raise BrokerError("TIER3_BROKER_ADMIN_PASSWORD must be non-empty, without spaces, commas, brackets, "
                          "quotes or backslashes")
    write_private(path, password + "\n")
    return password


def _make_tls(tls: Path, validity_days: int = 825) -> str:
    """A CA and the broker's certificate (for 127.0.0.1 and localhost), signed by it; return the keystore
    password. ``ca.pem`` is what clients trust; ``broker.p12`` holds the broker's key. The CA's key is dropped."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=validity_days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tier3 local CA {uuid.uuid4().hex[:8]}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(_ip("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    store_password = secrets.token_hex(16)
    p12 = pkcs12.serialize_key_and_certificates(b"broker", key, cert, [ca], serialization.BestAvailableEncryption(
        store_password.encode()))
    write_private(tls / "broker.p12", p12)
    write_private(tls / "broker.p12.password", store_password + "\n")
    (tls / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))  # public: every client reads it
    return store_password


def _ip(addr: str) -> Any:
    import ipaddress

    return ipaddress.ip_address(addr)


def _secure_properties(s: BrokerSettings, data: Path, admin_password: str) -> dict[str, str]:
    """What a secured broker changes in the plain configuration (see the module's docstring)."""
    tls = data / "tls"
    if not (tls / "broker.p12").exists() or not (tls / "ca.pem").exists():
        store_password = _make_tls(tls)
    else:
        store_password = (tls / "broker.p12.password").read_text().strip()
    port, ctrl = s.tier3_broker_port, s.tier3_broker_controller_port
    scram = f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{ADMIN_USER}" ' \
            f'password="{admin_password}";'
    plain = f'org.apache.kafka.common.security.plain.PlainLoginModule required username="{ADMIN_USER}" ' \
            f'password="{admin_password}" user_{ADMIN_USER}="{admin_password}";'
    return {
        "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctrl}",
        "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
        "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT",
        "inter.broker.listener.name": "SASL_SSL",
        # clients and the broker itself: SCRAM over TLS
        "sasl.enabled.mechanisms": SCRAM,
        "sasl.mechanism.inter.broker.protocol": SCRAM,
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
        # the controller (loopback): PLAIN with a static user, so the broker reaches it as the super user
        # (SCRAM cannot serve the controller: its credentials live in the metadata the controller serves)
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": plain,
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(tls / "broker.p12"),
        "ssl.keystore.password": store_password,
        "ssl.key.password": store_password,
        "ssl.truststore.type": "PEM",  # the broker as a client of itself (inter-broker) trusts our CA
        "ssl.truststore.location": str(tls / "ca.pem"),
        "ssl.client.auth": "none",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{ADMIN_USER}",
        "allow.everyone.if.no.acl.found": "false",
    }


def _override(props: str, overrides: dict[str, str]) -> str:
    """``props`` (key=value lines) with ``overrides`` replacing or adding keys; other lines kept as they are."""
    lines = []
    for line in props.splitlines():
        key = line.split("=", 1)[0].strip()
        if key not in overrides:
            lines.append(line)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join([*lines, *(f"{k}={v}" for k, v in overrides.items()), ""])


def _mode(s: BrokerSettings) -> str:
    return "sasl_ssl" if s.tier3_broker_secure else "plaintext"


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


def list_topics(bootstrap: str, timeout_s: float = 3.0, conf: dict[str, Any] | None = None) -> list[str] | None:
    """Topic names if a broker answers a metadata request at ``bootstrap``, else None. ``conf``: more client
    settings (security)."""
    admin = AdminClient({**(conf or {}), "bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 1000,
                         "log_level": 0, "logger": silent_logger()})
    try:
        md = admin.list_topics(timeout=timeout_s)
    except Exception:
        return None
    if not md.brokers:
        return None
    return sorted(t for t in md.topics if not t.startswith("__"))


def silent_logger() -> Any:
    import logging

    log = logging.getLogger("tier3.broker.librdkafka")
    log.setLevel(logging.CRITICAL)
    return log


def up(s: BrokerSettings | None = None) -> BrokerStatus:
    """Start the local broker unless it is already running; return when it answers metadata requests."""
    s = s or BrokerSettings()
    data = s.tier3_broker_dir.resolve()
    mode_file = data / "security"  # how the storage was formatted: a broker folder is plain or secured for good
    if (data / "logs" / "meta.properties").exists():
        formatted = mode_file.read_text().strip() if mode_file.exists() else "plaintext"
        if formatted != _mode(s):
            raise BrokerError(f"the broker in {data} was set up {formatted}, not {_mode(s)}: use another "
                              f"TIER3_BROKER_DIR for a {'secured' if s.tier3_broker_secure else 'plain'} broker")
    conf = _probe_conf(s, data)
    if _our_pid(s) is not None and list_topics(s.bootstrap, conf=conf) is not None:
        return status(s)
    if _port_in_use(s.tier3_broker_port) or _port_in_use(s.tier3_broker_controller_port):
        if _our_pid(s) is None and (list_topics(s.bootstrap) is not None
                                    or list_topics(s.bootstrap, conf=conf) is not None):
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
    extra_format: list[str] = []
    if s.tier3_broker_secure:
        admin_password = user_password(data, ADMIN_USER, s.tier3_broker_admin_password)
        # holds passwords: written 0600
        write_private(props, _override(_server_properties(s, data), _secure_properties(s, data, admin_password)))
        # SCRAM credentials live in the metadata log: the admin's is written when the storage is formatted
        extra_format = ["--add-scram", f"{SCRAM}=[name={ADMIN_USER},password={admin_password}]"]
        write_private(data / "client.env", "".join(f"{k}={v}\n" for k, v in s.client_env().items()))
        conf = _probe_conf(s, data)
    else:
        props.write_text(_server_properties(s, data))
    log4j = data / "log4j2.properties"
    log4j.write_text(LOG4J2.format(log=data / "server.log"))
    cp = f"{libs}/*"
    jvm = [java, *s.tier3_broker_heap.split(), "-XX:+UseG1GC", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={data}", "-cp", cp]
    if not (data / "logs" / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # the tool's arguments (the admin's SCRAM password among them) go in a java @argfile, written 0600 and
        # removed after: never on a command line, which every user of the host can read (ps, /proc/<pid>/cmdline)
        argfile = data / "secrets" / "format.args"
        write_private(argfile, _java_argfile(["kafka.tools.StorageTool", "format", "-t", cluster_id,
                                               "-c", str(props), "--ignore-formatted", *extra_format]))
        try:
            fmt = subprocess.run([*jvm, f"@{argfile}"], capture_output=True, text=True)
        finally:
            argfile.unlink(missing_ok=True)
        if fmt.returncode != 0:
            output = fmt.stdout + fmt.stderr
            for secret in extra_format[1:]:  # the tool may quote its arguments: never echo the password
                output = output.replace(secret.split("password=", 1)[-1].rstrip("]"), "***")
            raise BrokerError(f"formatting the broker storage failed:\n{output[-3000:]}")
        mode_file.write_text(_mode(s) + "\n")
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
        if list_topics(s.bootstrap, timeout_s=2.0, conf=conf) is not None:
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


def _probe_conf(s: BrokerSettings, data: Path) -> dict[str, Any]:
    """Client settings that reach this broker (as its super user when secured, once its password exists)."""
    if s.tier3_broker_secure and (data / "secrets" / f"{ADMIN_USER}.password").exists():
        return s.client_config()
    return {}


def status(s: BrokerSettings | None = None, bootstrap: str | None = None,
           conf: dict[str, Any] | None = None) -> BrokerStatus:
    """``conf``: client settings (security) for the metadata request; default: this broker's own."""
    s = s or BrokerSettings()
    addr = bootstrap or s.bootstrap
    topics = list_topics(addr, conf=conf if conf is not None else _probe_conf(s, s.tier3_broker_dir.resolve()))
    pid = _our_pid(s)
    version_file = s.tier3_broker_dir / "version"
    version = version_file.read_text().strip() if version_file.exists() and pid else None
    return BrokerStatus(bootstrap=addr, running=topics is not None, pid=pid, version=version,
                        topics=topics or [], managed=pid is not None)


def ensure_running(s: BrokerSettings | None = None) -> bool:
    """The broker that tests, benchmarks and scripts use: the cluster ``KAFKA_BOOTSTRAP_SERVERS`` names, when it
    names another address (nothing is started then); else the local broker: one already answering (e.g. after
    ``tier3 broker up``) is used and left running, else it is started (:func:`up`). ``KAFKA_BOOTSTRAP_SERVERS`` is
    then set to it for this process and its subprocesses. True if the broker was started here."""
    s = s or BrokerSettings()
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external and external != s.bootstrap:
        return False
    started = list_topics(s.bootstrap) is None
    if started:
        up(s)  # BrokerError if it cannot start
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = s.bootstrap
    return started
