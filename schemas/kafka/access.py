"""Fail fast when Kafka refuses this process: wrong credentials, a TLS certificate it does not trust, or ACLs.

librdkafka treats a refused sign-in like a broker that is down: it reconnects and retries forever (logging each
attempt), and a metadata request simply times out. Every command therefore calls :func:`check_kafka_access`
first; a refusal becomes one clear line and exit code 2 (a configuration error, like invalid settings) instead of
a hang or a retry loop. A broker that does not answer at all is not this check's business: it returns False and
the command's own retry policy applies.

Shared by ``streams`` and ``trainer`` (which never import each other), so it lives here next to the settings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from schemas.settings import KafkaSettings

#: exit code of a command whose settings Kafka refuses (the same as for invalid settings)
ACCESS_EXIT_CODE = 2

_AUTHENTICATION = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED}
_TLS = {KafkaError._SSL}
_QUIET = logging.getLogger("tier3.kafka_access")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False  # librdkafka's own log repeats every failed attempt; the error is reported once, below


class KafkaAccessError(Exception):
    """Kafka refused this client (credentials, TLS or ACLs): a configuration error, not worth retrying."""


def check_kafka_access(settings: KafkaSettings, topics: Sequence[str] = (), timeout_s: float = 15.0) -> bool:
    """Sign in to the cluster and describe ``topics``; raise :class:`KafkaAccessError` (one line) if Kafka refuses
    the credentials, the TLS handshake, or access to one of the topics. Return True when the cluster answered,
    False when no broker answered within ``timeout_s``."""
    errors: list[KafkaError] = []
    conf: dict[str, Any] = {**settings.client_config(), "error_cb": errors.append, "logger": _QUIET,
                            "allow.auto.create.topics": False}  # describing a topic must never create it
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=0.5)
            break
        except KafkaException:
            pass
        admin.poll(0)  # serves error_cb: a refused sign-in is reported there, not by the metadata request
        for err in errors:
            _raise_if_refused(settings, err)
        if time.monotonic() > deadline:
            return False
    for topic in topics:
        meta = admin.list_topics(topic=topic, timeout=max(1.0, deadline - time.monotonic())).topics.get(topic)
        if meta is not None and meta.error is not None and meta.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            raise KafkaAccessError(f"Kafka at {settings.kafka_bootstrap_servers} does not let {_who(settings)} "
                                   f"use topic {topic} (topic authorization failed): grant it with Kafka ACLs, or "
                                   "use a principal that has them")
    return True


def _who(settings: KafkaSettings) -> str:
    if settings.kafka_sasl_username:
        return f"user {settings.kafka_sasl_username!r}"
    return f"this client ({settings.kafka_security_protocol})"


def _detail(err: KafkaError) -> str:
    # "sasl_ssl://127.0.0.1:9094/bootstrap: SASL authentication error: ..." -> the part after the broker name
    text = " ".join(err.str().split())
    head, sep, tail = text.partition(": ")
    return tail if sep and "://" in head else text


def _raise_if_refused(settings: KafkaSettings, err: KafkaError) -> None:
    where = settings.kafka_bootstrap_servers
    if err.code() in _AUTHENTICATION:
        raise KafkaAccessError(f"Kafka at {where} refused the credentials of {_who(settings)} "
                               f"({settings.kafka_sasl_mechanism or 'no SASL mechanism'}): {_detail(err)}; check "
                               "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISM")
    if err.code() in _TLS:
        raise KafkaAccessError(f"the TLS handshake with Kafka at {where} failed: {_detail(err)}; check "
                               "KAFKA_SSL_CA_LOCATION and KAFKA_SECURITY_PROTOCOL")
