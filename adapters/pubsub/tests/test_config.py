"""URL options and resource names: pure, no broker."""

from __future__ import annotations

import pytest

from msgbus._url import parse_url
from msgbus.adapter import Endpoint
from msgbus.errors import ConfigError
from msgbus_pubsub import create
from msgbus_pubsub._config import PubSubOptions, read_options
from msgbus_pubsub._names import route


def options(url: str) -> PubSubOptions:
    parsed = parse_url(url)
    reader = parsed.reader()
    out = read_options(parsed, reader)
    reader.finish()
    return out


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    o = options("pubsub://my-project")
    assert o.project == "my-project" and o.emulator_host is None
    assert o.ack_deadline == 60 and o.subscription_ack_deadline == 60
    assert not o.ordering and o.max_delivery_attempts == 100 and o.persistence == "disk"


def test_emulator_from_option_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "localhost:9999")
    assert options("pubsub://p-1234").emulator_host == "localhost:9999"
    assert options("pubsub://p-1234?emulator_host=127.0.0.1:8085").emulator_host == "127.0.0.1:8085"


def test_short_ack_deadline_keeps_the_subscription_at_10_s() -> None:
    o = options("pubsub://proj-1?ack_deadline=1.5&ordering=true")
    assert o.ack_deadline == 2 and o.subscription_ack_deadline == 10 and o.ordering
    url = parse_url("pubsub://proj-1?ack_deadline=2&ordering=true")
    caps = create(url, url.reader()).capabilities
    assert caps.lock_duration == 2.0 and caps.ordering == "per_key" and not caps.delayed_delivery


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("pubsub://", "project"),
        ("pubsub://Bad_Project", "project"),
        ("pubsub://proj-1:8085", "emulator_host"),
        ("pubsub://user:pw@proj-1", "credentials"),
        ("pubsub://proj-1?ack_deadline=601", "ack_deadline"),
        ("pubsub://proj-1?max_delivery_attempts=4", "max_delivery_attempts"),
        ("pubsub://proj-1?max_delivery_attempts=101", "max_delivery_attempts"),
        ("pubsub://proj-1?batch_max_messages=1001", "batch_max_messages"),
        ("pubsub://proj-1?max_message_size=20000000", "max_message_size"),
        ("pubsub://proj-1?prefix=1x", "prefix"),
        ("pubsub://proj-1?persistence=maybe", "persistence"),
    ],
)
def test_bad_options(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        options(url)


def test_names_never_collide() -> None:
    def names(e: Endpoint) -> set[str]:
        r = route("p", "", e)
        return {r.topic, r.dead_letter_topic, *(s.name for s in r.subscriptions)}

    queue = route("p", "", Endpoint("queue", "orders"))
    assert queue.topic == "projects/p/topics/orders~queue"
    assert queue.subscription == "projects/p/subscriptions/orders~queue"
    assert queue.dead_letter_topic == "projects/p/topics/orders~queue~dlq"
    sub = route("p", "app-", Endpoint("topic", "orders", "queue"))
    assert sub.topic == "projects/p/topics/app-orders"
    assert sub.subscription == "projects/p/subscriptions/app-orders~sub~queue"
    dead = route("p", "", Endpoint("queue", "orders", dead_letter=True))
    assert dead.subscription == "projects/p/subscriptions/orders~queue~dlq"
    assert not names(Endpoint("queue", "orders")) & names(Endpoint("topic", "orders", "queue"))
    assert not names(Endpoint("queue", "abc")) & names(Endpoint("topic", "abc", "q"))


@pytest.mark.parametrize(
    "endpoint",
    [Endpoint("queue", "1abc"), Endpoint("topic", "google-x"), Endpoint("topic", "ab"), Endpoint("queue", "x" * 250)],
)
def test_names_pubsub_refuses(endpoint: Endpoint) -> None:
    with pytest.raises(ConfigError):
        route("p", "", endpoint)
