"""msgbus endpoints -> Kafka topic and consumer group names. Pure: no I/O."""

from __future__ import annotations

import hashlib
import re

from msgbus.adapter import Endpoint

MAX_TOPIC = 249  # Kafka's limit on a topic name


def topic_of(endpoint: Endpoint) -> str:
    """The Kafka topic of a queue, a topic, or a dead-letter destination.

    A queue and a topic are Kafka topics of the same name (Kafka has only topics). Dead letters of queue
    ``q`` go to ``q.dlq``; of subscription ``s`` of topic ``t`` to ``t.s.dlq`` (each subscription has its own).
    """
    if not endpoint.dead_letter:
        return endpoint.name
    if endpoint.kind == "queue" or endpoint.subscription is None:
        return _fit(f"{endpoint.name}.dlq")
    return _fit(f"{endpoint.name}.{endpoint.subscription}.dlq")


def group_of(endpoint: Endpoint, prefix: str) -> str:
    """The consumer group of a queue (``<prefix>.q.<queue>``), a subscription (``<prefix>.s.<topic>.<sub>``)
    or a dead-letter destination (``<prefix>.dlq.<dead-letter topic>``)."""
    if endpoint.dead_letter:
        return f"{prefix}.dlq.{topic_of(endpoint)}"
    if endpoint.kind == "queue":
        return f"{prefix}.q.{endpoint.name}"
    return f"{prefix}.s.{endpoint.name}.{endpoint.subscription}"


def _fit(name: str) -> str:
    """``name`` if Kafka accepts its length, else shortened with a hash that keeps it unique."""
    if len(name) <= MAX_TOPIC:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[: MAX_TOPIC - 22]}.{digest}.dlq"


def dead_letters_of(endpoint: Endpoint) -> Endpoint:
    """The dead-letter endpoint of ``endpoint``."""
    return Endpoint(endpoint.kind, endpoint.name, endpoint.subscription, dead_letter=True)


def valid_topic(name: str) -> bool:
    """Whether Kafka accepts ``name`` as a topic name."""
    return bool(re.match(r"^[A-Za-z0-9._-]{1,249}$", name)) and name not in (".", "..")
