"""URL options, key layout and error translation, without a broker."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis import exceptions as rx

from msgbus._url import parse_url
from msgbus.adapter import Endpoint
from msgbus.errors import BrokerError, ConfigError, ConnectionLost, InvalidMessage, PublishError, TopologyError
from msgbus_redis import RedisAdapter, create
from msgbus_redis._errors import convert, translated
from msgbus_redis._names import route


def _adapter(url: str) -> RedisAdapter:
    parsed = parse_url(url)
    reader = parsed.reader()
    adapter = create(parsed, reader)
    reader.finish()
    return adapter


def test_defaults() -> None:
    adapter = _adapter("redis://")
    o = adapter.options
    assert (o.host, o.port, o.db, o.tls, o.prefix) == ("127.0.0.1", 6379, 0, False, "msgbus")
    caps = adapter.capabilities
    assert caps.lock_duration == o.visibility_timeout == 30.0
    assert caps.max_message_size == 8 * 1024 * 1024
    assert (caps.ordering, caps.delayed_delivery, caps.delayed_nack, caps.lock_extension) == ("none", True, True, True)
    assert caps.persistence == "none"  # "auto" until open() reads the server's AOF settings


def test_options_are_read_and_typed() -> None:
    adapter = _adapter(
        "rediss://u:pw@cache.example:6390/3?prefix=app&visibility_timeout=2.5&persistence=disk"
        "&max_message_size=1000&wait_replicas=1&ssl_check_hostname=false"
    )
    o = adapter.options
    assert (o.host, o.port, o.db, o.tls, o.prefix, o.wait_replicas) == ("cache.example", 6390, 3, True, "app", 1)
    assert adapter.capabilities.persistence == "disk"
    assert adapter.capabilities.lock_duration == 2.5
    assert adapter.capabilities.max_message_size == 1000
    assert o.ssl_check_hostname is False


def test_password_never_shows() -> None:
    adapter = _adapter("redis://user:s3cret@host:6379/0")
    assert "s3cret" not in repr(adapter)
    assert "s3cret" not in repr(adapter.options)
    assert "s3cret" not in str(adapter.url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://host/zero",
        "redis://host/0?visibility_timeout=-1",
        "redis://host/0?persistence=maybe",
        "redis://host/0?prefix=a{b}",
        "redis://host/0?max_message_size=999999999999",
        "redis://host/0?ssl_certfile=/x.pem",  # TLS options only on rediss://
        "redis://host/0?poll_interval=20",  # longer than socket_timeout
    ],
)
def test_bad_options_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        _adapter(url)


def test_every_key_is_distinct_and_shares_the_hash_tag() -> None:
    routes = [
        route("p", Endpoint("queue", "a")),
        route("p", Endpoint("queue", "a", dead_letter=True)),
        route("p", Endpoint("topic", "a", "x")),
        route("p", Endpoint("topic", "a", "x", dead_letter=True)),
        route("p", Endpoint("topic", "a", "x:dlq")),  # would collide with suffix-style naming
        route("p", Endpoint("topic", "a", "x:dlq", dead_letter=True)),
    ]
    per_route = [
        {r.retry_stream, r.retry_delayed, r.dead_letter_stream} | set(r.streams) | {k for m in r.movers for k in m}
        for r in routes[2:6:2]
    ]
    assert not per_route[0] & per_route[1] - {"p:{t:a}", "p:{t:a}:delayed"}
    queue = routes[0]
    assert queue.streams == ("p:{q:a}",) and queue.dead_letter_stream == "p:{q:a}:dlq"
    assert routes[1].streams == ("p:{q:a}:dlq",)
    for r in routes:
        tag = "{q:a}" if r.endpoint.kind == "queue" else "{t:a}"
        keys = [*r.streams, r.retry_stream, r.retry_delayed, r.dead_letter_stream, r.send_stream, r.send_delayed]
        assert all(tag in k for k in keys)


@pytest.mark.parametrize("endpoint", [Endpoint("queue", ""), Endpoint("queue", "a}b"), Endpoint("topic", "t", "{s")])
def test_unusable_names_raise_config_error(endpoint: Endpoint) -> None:
    with pytest.raises(ConfigError):
        route("p", endpoint)


def test_translation_table() -> None:
    lost = convert(rx.ConnectionError("Connection refused"), "send")
    assert isinstance(lost, ConnectionLost) and lost.retryable
    assert isinstance(convert(rx.BusyLoadingError("LOADING"), "receive"), ConnectionLost)
    assert isinstance(convert(rx.TimeoutError("timeout"), "receive"), ConnectionLost)
    auth = convert(rx.AuthenticationError("WRONGPASS"), "connect")
    assert isinstance(auth, ConfigError) and not auth.retryable
    perm = convert(rx.NoPermissionError("NOPERM"), "send")
    assert type(perm) is BrokerError and not perm.retryable
    assert isinstance(convert(rx.ResponseError("NOGROUP No such key"), "receive"), TopologyError)
    assert isinstance(convert(rx.DataError("bad"), "send"), InvalidMessage)
    oom = convert(rx.OutOfMemoryError("OOM command not allowed"), "send", publish=True)
    assert isinstance(oom, PublishError) and oom.retryable
    assert type(convert(rx.ResponseError("ERR x"), "ack")) is BrokerError


def test_translated_chains_the_cause_and_removes_secrets() -> None:
    with pytest.raises(ConnectionLost) as info, translated("connect", secrets=["hunter2"]):
        raise rx.ConnectionError("could not auth with hunter2")
    assert "hunter2" not in str(info.value)
    assert isinstance(info.value.__cause__, rx.ConnectionError)


def test_body_fields_option() -> None:
    assert _adapter("redis://").options.body_fields == (b"body",)
    assert _adapter("redis://?body_fields=data,%20payload,data").options.body_fields == (b"data", b"payload")
    for bad in ("id", "body,", "Content-Type", "x-msgbus-prior-attempts", "headers"):
        with pytest.raises(ConfigError, match="body_fields"):
            _adapter(f"redis://?body_fields={bad}")


def test_ordering_option_declares_per_key_and_partitions() -> None:
    plain = _adapter("redis://")
    assert (plain.options.ordering, plain.options.partitions, plain.capabilities.ordering) == ("none", 16, "none")
    ordered = _adapter("redis://?ordering=per_key&partitions=4")
    assert (ordered.options.ordering, ordered.options.partitions) == ("per_key", 4)
    assert ordered.capabilities.ordering == "per_key"
    assert _adapter("redis://?ordering=none").capabilities.ordering == "none"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://?ordering=fifo", "ordering"),
        ("redis://?ordering=per_key&partitions=0", "partitions"),
        ("redis://?ordering=per_key&partitions=257", "partitions"),
        ("redis://?ordering=per_key&partitions=many", "partitions"),
        ("redis://?ordering=per_key&visibility_timeout=0.5&poll_interval=0.2", "poll_interval"),
    ],
)
def test_bad_ordering_options_raise_config_error(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        _adapter(url)


def test_ordered_routes_add_partition_streams_under_the_same_hash_tag() -> None:
    queue = route("p", Endpoint("queue", "a"), 4)
    assert queue.partitions == ("p:{q:a}:p0", "p:{q:a}:p1", "p:{q:a}:p2", "p:{q:a}:p3")
    assert queue.streams == ("p:{q:a}",)  # unkeyed messages: the queue's own stream, as without the option
    assert set(queue.partitions) <= queue.deletable  # one group: acked entries go at once
    assert {g.stream for g in queue.groups} >= set(queue.partitions)
    sub = route("p", Endpoint("topic", "t", "s"), 4)
    assert sub.partitions == tuple(f"p:{{t:t}}:p{i}" for i in range(4)) and not set(sub.partitions) & sub.deletable
    assert all(g.start == "$" for g in sub.groups if g.stream in sub.partitions)
    assert sub.members == "p:{t:t}:members:s" != route("p", Endpoint("topic", "t", "s2"), 4).members
    assert route("p", Endpoint("queue", "a", dead_letter=True), 4).partitions == ()  # dead letters: not partitioned
    publish = route("p", Endpoint("topic", "t"), 4)
    assert publish.partitions == sub.partitions and not publish.receivable


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_key_has_one_partition(key: str) -> None:
    """Hostile keys (empty, huge, control characters, lone surrogates) map to a partition; never raise."""
    r = route("p", Endpoint("queue", "a"), 16)
    assert r.partition_of(key) in r.partitions
    assert r.partition_of(key) == r.partition_of(str(key))  # a pure function of the key
    assert r.partition_of(key * 1000) in r.partitions
