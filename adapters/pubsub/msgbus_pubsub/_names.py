"""Resource layout: which Pub/Sub topics and subscriptions hold an endpoint's messages.

msgbus names never contain ``~`` (letters, digits, ``_ . -`` only), so ``~`` separates the parts and no
two endpoints share a resource. Subscription names are global to a project in Pub/Sub, hence the topic
in every subscription's name (``inventory`` may subscribe to many topics):

=============================  ===================  ========================  ============================
endpoint                       topic (send)         subscription (receive)    dead letters (topic = sub)
=============================  ===================  ========================  ============================
queue ``Q``                    ``Q~queue``          ``Q~queue``               ``Q~queue~dlq``
topic ``T``                    ``T``                (none: publish only)      (none)
topic ``T``, subscription S    ``T``                ``T~sub~S``               ``T~sub~S~dlq``
=============================  ===================  ========================  ============================

Every name gets the ``prefix`` option in front. A dead-letter destination is a topic with one
subscription of the same name, so dead letters are kept until someone reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from msgbus.adapter import Endpoint
from msgbus.errors import ConfigError

_MAX_ID = 255


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """A subscription to create: ``dead_letter_topic`` set means it gets a dead-letter policy."""

    name: str
    topic: str
    dead_letter_topic: str | None


@dataclass(frozen=True, slots=True)
class Route:
    """Full resource paths for one endpoint."""

    endpoint: Endpoint
    topic: str  # where send() publishes
    subscription: str | None  # what a receiver pulls from (None: a publisher-only topic endpoint)
    dead_letter_topic: str  # where Delivery.dead_letter() publishes
    topics: tuple[str, ...]  # what declare() creates, in order
    subscriptions: tuple[SubscriptionSpec, ...]


def route(project: str, prefix: str, endpoint: Endpoint) -> Route:
    """The resources of ``endpoint``; raises ``ConfigError`` for names Pub/Sub cannot take."""
    t = f"projects/{project}/topics/"
    s = f"projects/{project}/subscriptions/"
    if endpoint.kind == "queue":
        base = _resource_id(prefix, endpoint.name, "~queue")
        own_topic = base
    elif endpoint.subscription is None:
        if endpoint.dead_letter:
            raise ConfigError(f"{endpoint}: a topic's dead letters belong to a subscription; name one")
        topic = _resource_id(prefix, endpoint.name, "")
        return Route(endpoint, t + topic, None, t + topic, (t + topic,), ())
    else:
        own_topic = _resource_id(prefix, endpoint.name, "")
        base = _resource_id(prefix, endpoint.name, f"~sub~{endpoint.subscription}")
    dlq = _resource_id(base, "", "~dlq")
    specs = (SubscriptionSpec(s + dlq, t + dlq, None), SubscriptionSpec(s + base, t + own_topic, t + dlq))
    if endpoint.dead_letter:
        return Route(endpoint, t + dlq, s + dlq, t + dlq, (t + own_topic, t + dlq), specs)
    return Route(endpoint, t + own_topic, s + base, t + dlq, (t + own_topic, t + dlq), specs)


def _resource_id(prefix: str, name: str, suffix: str) -> str:
    rid = f"{prefix}{name}{suffix}"
    if not rid[:1].isalpha():
        raise ConfigError(
            f"Pub/Sub names must start with a letter; {name!r} does not (set the 'prefix' option, e.g. prefix=app-)"
        )
    if len(rid) > _MAX_ID or len(rid) < 3:
        raise ConfigError(f"Pub/Sub name {rid!r} must be 3 to {_MAX_ID} characters long")
    if rid.lower().startswith("goog"):
        raise ConfigError(f"Pub/Sub names must not start with 'goog': {rid!r} (set the 'prefix' option)")
    return rid
