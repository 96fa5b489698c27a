"""Principals and their ACLs on the secured development broker (``tier3 broker up --secure``): the per-service ACL
table (:func:`acl_table`, docs/guarantees.md "Least privilege") and the SCRAM users that get it
(:func:`ensure_principals`, ``tier3 broker principal``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from schemas.settings import KafkaSettings
from tier3.devbroker.server import (
    ADMIN_USER,
    SCRAM,
    BrokerError,
    BrokerSettings,
    list_topics,
    secure_client_env,
    silent_logger,
    user_password,
    write_private,
)
from trainer.settings import TrainerSettings

#: the services that get a principal of their own on the secured broker (each its SCRAM user of the same name)
SERVICES = ("app", "worker", "trainer", "watcher")
#: TIER3_TRAINER_GROUP's default (trainer/settings.py)
DEFAULT_TRAINER_GROUP: str = TrainerSettings.model_fields["tier3_trainer_group"].default
#: the throw-away group ids of assign()-based readers (``schemas.kafka.reading.reader``: ``tier3-<purpose>-<uuid>``,
#: and the router's, the watcher's and train-now's): never joined, never committed, but librdkafka names them
READER_GROUP = "tier3-{purpose}-"


@dataclass(frozen=True)
class Grant:
    """One row of the ACL table: ``operations`` allowed on a topic or group, by literal name or name prefix."""

    resource: str  # "topic" | "group"
    name: str
    operations: tuple[str, ...]  # "READ", "WRITE", "CREATE", "DESCRIBE" (AclOperation names)
    prefixed: bool = False
    why: str = ""

    @property
    def target(self) -> str:
        """``topic tier3.experiences``; a prefix ends with ``*``."""
        return f"{self.resource} {self.name}{'*' if self.prefixed else ''}"


@dataclass(frozen=True)
class PrincipalNames:
    """What the ACLs name: the topics (``TIER3_TOPIC_PREFIX``), the worker's group (``<prefix><TIER3_APP_ID>``,
    also the prefix of its tables' changelog topics) and the trainer's group (``TIER3_TRAINER_GROUP``)."""

    topics: KafkaSettings
    worker_group: str
    trainer_group: str = DEFAULT_TRAINER_GROUP


def _reader(purpose: str) -> Grant:
    # DESCRIBE lets librdkafka find the group's coordinator; READ (join, commit, fetch committed offsets) it needs not
    return Grant("group", READER_GROUP.format(purpose=purpose), ("DESCRIBE",), prefixed=True,
                 why="assign()-based reader: never joins, never commits")


def acl_table(names: PrincipalNames) -> dict[str, tuple[Grant, ...]]:
    """Everything each service's principal may do on the secured broker, and nothing more (docs/guarantees.md,
    "Least privilege"). WRITE implies DESCRIBE and, since Kafka 3.0, the idempotent producer (KIP-679); READ
    implies DESCRIBE. No service has any cluster permission; none but the worker may create a topic (its own
    changelogs); only the trainer and the watcher write training-runs, only the trainer trainer-control."""
    t = names.topics
    changelogs = f"{names.worker_group}-"
    clash = [spec.name for spec in t.topic_specs() if spec.name.startswith(changelogs)]
    if clash:  # the worker's prefixed grant would cover them (TIER3_APP_ID=trainer -> <prefix>trainer-control)
        raise BrokerError(f"the worker's changelog prefix {changelogs} would also name {', '.join(clash)}: choose "
                          "another TIER3_APP_ID")
    return {
        "app": (
            Grant("topic", t.experiences_topic, ("WRITE",), why="capture publishes experiences"),
            Grant("topic", t.training_runs_topic, ("READ",), why="the router follows promotions and rollbacks"),
            _reader("router"),
        ),
        "worker": (
            Grant("topic", t.experiences_topic, ("READ",), why="sampled and enriched (its group)"),
            Grant("topic", t.traces_topic, ("WRITE",), why="writes traces (counted as they are written)"),
            Grant("topic", t.dead_letters_topic, ("WRITE",), why="dead letters"),
            Grant("topic", t.online_eval_topic, ("WRITE",), why="closed online-eval windows"),
            Grant("topic", t.training_runs_topic, ("READ",), why="/status and the router statistics"),
            Grant("topic", t.trainer_status_topic, ("READ",), why="trainer heartbeats in /status"),
            Grant("topic", t.trainer_control_topic, ("DESCRIBE",), why="`tier3 worker` checks every topic exists"),
            Grant("topic", changelogs, ("CREATE", "READ", "WRITE"), prefixed=True,
                  why="its tables' changelog topics, which it creates"),
            Grant("group", names.worker_group, ("READ",), why="the Faust consumer group (join, commit)"),
            _reader("offset-guard"), _reader("worker-runs"),
        ),
        "trainer": (
            Grant("topic", t.traces_topic, ("READ",), why="its consumer group; replay"),
            Grant("topic", t.training_runs_topic, ("READ", "WRITE"), why="run events; the gate reads them back"),
            Grant("topic", t.trainer_status_topic, ("WRITE",), why="heartbeats"),
            Grant("topic", t.trainer_control_topic, ("READ", "WRITE"), why="train_now requests and answers"),
            Grant("topic", t.dead_letters_topic, ("WRITE",), why="traces it cannot read"),
            Grant("group", names.trainer_group, ("READ",), why="the trainer group (join, commit)"),
            Grant("group", f"{names.trainer_group}.control", ("READ",), why="its group on trainer-control"),
            _reader("gate-reader"), _reader("replay"), _reader("train-now"),
        ),
        "watcher": (
            Grant("topic", t.online_eval_topic, ("READ",), why="the worker's closed windows"),
            Grant("topic", t.training_runs_topic, ("READ", "WRITE"), why="promotions; publishes rollbacks"),
            _reader("watch"),
        ),
    }


def acl_markdown(names: PrincipalNames) -> list[str]:
    """:func:`acl_table` as the rows of a Markdown table (docs/guarantees.md shows it for the default names)."""
    return [f"| `{svc}` | {'+'.join(g.operations)} | {g.resource} `{g.name}{'*' if g.prefixed else ''}` | {g.why} |"
            for svc, grants in acl_table(names).items() for g in grants]


def _bindings(user: str, grants: tuple[Grant, ...]) -> list[Any]:
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    return [AclBinding(ResourceType[g.resource.upper()], g.name,
                       ResourcePatternType.PREFIXED if g.prefixed else ResourcePatternType.LITERAL,
                       f"User:{user}", "*", AclOperation[op], AclPermissionType.ALLOW)
            for g in grants for op in g.operations]


def ensure_principals(s: BrokerSettings, names: PrincipalNames, services: tuple[str, ...] = SERVICES,
                      users: dict[str, str] | None = None, timeout_s: float = 60.0) -> dict[str, dict[str, str]]:
    """On the secured broker: for each of ``services``, a SCRAM user (named as the service unless ``users``
    says otherwise) with the ACLs of :func:`acl_table` and nothing else it did not have before (ACLs are only
    added: a user made for two topic prefixes holds both sets). Idempotent. Returns each service's client
    settings, also written to ``<broker dir>/<user>.env`` (mode 0600; a password never goes on a command line)."""
    from confluent_kafka.admin import (
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialAlteration,
        UserScramCredentialUpsertion,
    )

    if not s.tier3_broker_secure:
        raise BrokerError("principals and ACLs need the secured broker (TIER3_BROKER_SECURE=true)")
    unknown = [svc for svc in services if svc not in SERVICES]
    if unknown:
        raise BrokerError(f"no such service: {', '.join(unknown)} (one of {', '.join(SERVICES)})")
    table = acl_table(names)
    who = {svc: (users or {}).get(svc, svc) for svc in services}
    if ADMIN_USER in who.values():
        raise BrokerError(f"`{ADMIN_USER}` is the super user: a service's principal needs another name")
    odd = [user for user in who.values() if not user.replace("-", "").replace("_", "").replace(".", "").isalnum()
           or user.startswith(".")]
    if odd:  # the name is a file name (<user>.env, secrets/<user>.password) and a SCRAM user name
        raise BrokerError(f"a principal's name is letters, digits, '.', '-' and '_' (not starting with '.'): "
                          f"{', '.join(repr(u) for u in odd)}")
    data = s.tier3_broker_dir.resolve()
    # the super user first (its password kept in the folder, the broker answering): nothing is written before
    if list_topics(s.bootstrap, timeout_s=min(10.0, timeout_s), conf=s.client_config()) is None:
        raise BrokerError(f"no secured broker answers the super user at {s.bootstrap}: start it with `tier3 broker "
                          "up --secure` (same TIER3_BROKER_DIR and TIER3_BROKER_PORT)")
    passwords = {svc: user_password(data, user, None) for svc, user in who.items()}
    admin = AdminClient({**s.client_config(), "logger": silent_logger()})
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(user, info, passwords[svc].encode()) for svc, user in who.items()]
    acls = [b for svc, user in who.items() for b in _bindings(user, table[svc])]
    try:
        for fut in admin.alter_user_scram_credentials(upserts, request_timeout=timeout_s).values():
            fut.result()
        for fut in admin.create_acls(acls, request_timeout=timeout_s).values():
            fut.result()
    except KafkaException as exc:
        raise BrokerError(f"the secured broker at {s.bootstrap} (TIER3_BROKER_PORT) did not make the principals: "
                          f"{exc.args[0].str()}; is it running (`tier3 broker up --secure`)?") from None
    ca = data / "tls" / "ca.pem"
    out: dict[str, dict[str, str]] = {}
    for svc, user in who.items():
        env = {"KAFKA_BOOTSTRAP_SERVERS": s.bootstrap, **secure_client_env(ca, user, passwords[svc])}
        write_private(data / f"{user}.env", "".join(f"{k}={v}\n" for k, v in env.items()))
        out[svc] = env
    # a new credential reaches the broker through the metadata log: wait until each one authenticates
    deadline = time.monotonic() + timeout_s
    for svc, user in who.items():
        conf = {"bootstrap.servers": s.bootstrap, "security.protocol": "SASL_SSL", "sasl.mechanism": SCRAM,
                "sasl.username": user, "sasl.password": passwords[svc], "ssl.ca.location": str(ca)}
        while list_topics(s.bootstrap, timeout_s=2.0, conf=conf) is None:
            if time.monotonic() > deadline:
                raise BrokerError(f"the new principal `{user}` could not sign in within {timeout_s:.0f} s")
            time.sleep(0.5)
    return out


def ensure_principal(s: BrokerSettings, service: str, names: PrincipalNames, user: str | None = None,
                     timeout_s: float = 60.0) -> dict[str, str]:
    """One service's principal (:func:`ensure_principals`); its client settings."""
    return ensure_principals(s, names, (service,), {service: user or service}, timeout_s)[service]
