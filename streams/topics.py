"""Create tier3's topics up front, idempotently (Faust will not consume a topic that did not exist at start).

Only ``tier3 topics create`` (and the demo, the benchmarks and the worker's own changelog topics) create topics;
every other command checks them with :func:`schemas.runtime.preflight.check_topics` and says to run ``tier3 topics
create``. No client ever creates one by asking for it (``allow.auto.create.topics`` is off in
``KafkaSettings.client_config``; the local broker has ``auto.create.topics.enable=false``).
"""

from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.runtime.preflight import TopicsNotReady, kafka_metadata
from schemas.settings import KafkaSettings, TopicSpec
from streams.errors import StreamsError


def ensure_topics(settings: KafkaSettings, specs: list[TopicSpec] | None = None,
                  timeout_s: float = 30.0) -> dict[str, str]:
    """Create the missing topics; return ``{name: "created" | "exists"}``.

    An existing topic with a different partition count is an error (:class:`TopicsNotReady`), not a silent
    mismatch: a Faust table's source topic and its changelog must agree. No broker answering within
    ``TIER3_KAFKA_TIMEOUT_S`` is :class:`schemas.runtime.preflight.KafkaUnreachable` (one line, what to do).
    """
    specs = specs if specs is not None else settings.topic_specs()
    existing = kafka_metadata(settings).topics
    admin = AdminClient(settings.client_config())
    result: dict[str, str] = {}
    new: list[NewTopic] = []
    for spec in specs:
        if spec.name in existing:
            have = len(existing[spec.name].partitions)
            if have != spec.partitions:
                raise TopicsNotReady(f"topic {spec.name} exists with {have} partitions, settings say "
                                     f"{spec.partitions}: use another TIER3_TOPIC_PREFIX or fix the setting")
            result[spec.name] = "exists"
        else:
            new.append(NewTopic(spec.name, num_partitions=spec.partitions,
                                replication_factor=settings.tier3_replication_factor, config=spec.config))
    if new:
        for name, fut in admin.create_topics(new, operation_timeout=timeout_s).items():
            try:
                fut.result(timeout=timeout_s)
                result[name] = "created"
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:  # a racing creator won
                    result[name] = "exists"
                else:
                    raise StreamsError(f"could not create topic {name}: {exc.args[0].str()}") from None
    # also for topics that "exist": one created a moment ago by another process may still have no leader
    _wait_until_served(admin, {spec.name: spec.partitions for spec in specs}, timeout_s)
    return result


def _wait_until_served(admin: AdminClient, want: dict[str, int], timeout_s: float) -> None:
    """Wait until new topics show in metadata with a leader for every partition.

    CreateTopics returns before the metadata has spread: a Faust worker that asks for metadata right then finds
    the topics "missing", drops them from its subscription and never consumes them.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        topics = admin.list_topics(timeout=timeout_s).topics
        ready = all(name in topics and topics[name].error is None and len(topics[name].partitions) == n
                    and all(p.leader >= 0 for p in topics[name].partitions.values())
                    for name, n in want.items())
        if ready:
            return
        if time.monotonic() > deadline:
            raise StreamsError(f"created topics did not appear in the cluster metadata within {timeout_s:.0f} s: "
                               f"{', '.join(sorted(want))}")
        time.sleep(0.1)
