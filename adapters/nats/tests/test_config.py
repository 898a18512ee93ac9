"""URL options and the error table, without a broker."""

from __future__ import annotations

import nats.errors as nx
import nats.js.errors as jx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgbus._url import parse_url
from msgbus.adapter import Endpoint
from msgbus.errors import (
    BrokerError,
    ConfigError,
    ConnectionLost,
    InvalidMessage,
    PublishError,
    TopologyError,
)
from msgbus_nats import NatsAdapter, create
from msgbus_nats._errors import convert, translated
from msgbus_nats._names import route


def _adapter(url: str) -> NatsAdapter:
    parsed = parse_url(url)
    reader = parsed.reader()
    adapter = create(parsed, reader)
    reader.finish()
    return adapter


def test_defaults() -> None:
    adapter = _adapter("nats://")
    o = adapter._options
    assert (o.host, o.port, o.prefix, o.storage, o.replicas, o.tls) == ("127.0.0.1", 4222, "msgbus", "file", 1, None)
    assert (o.ack_wait, o.max_deliver, o.send_timeout, o.duplicate_window) == (30.0, 50, 30.0, 120.0)
    assert (o.ping_interval, o.max_outstanding_pings) == (5.0, 3)  # a dead connection is noticed in 15-20 s
    caps = adapter.capabilities
    assert (caps.ordering, caps.delayed_delivery, caps.delayed_nack, caps.lock_extension) == ("none", False, True, True)
    assert caps.lock_duration == 30.0 and caps.persistence == "process-crash"
    assert caps.max_message_size == 1024 * 1024 - 512  # until open() reads the server's max_payload


def test_options_are_read_and_typed() -> None:
    adapter = _adapter(
        "nats://u:pw@nats.example:4333?prefix=app-1&ack_wait=2.5&max_deliver=7&storage=memory&replicas=3"
        "&max_message_size=1000&send_timeout=5&duplicate_window=60&ping_interval=1&max_outstanding_pings=2"
    )
    o = adapter._options
    assert (o.host, o.port, o.user, o.password, o.token) == ("nats.example", 4333, "u", "pw", None)
    assert (o.prefix, o.ack_wait, o.max_deliver, o.storage, o.replicas) == ("app-1", 2.5, 7, "memory", 3)
    assert adapter.capabilities.persistence == "none" and adapter.capabilities.max_message_size == 1000
    assert adapter.capabilities.lock_duration == 2.5


def test_ordering_per_key_declares_it_and_partitions_the_endpoints() -> None:
    adapter = _adapter("nats://h?ordering=per_key&partitions=4")
    assert adapter.capabilities.ordering == "per_key" and adapter._options.partitions == 4
    assert adapter.credit >= 4 + 1  # a pull on every partition and room for unkeyed messages at defaults
    r = adapter.route(Endpoint("queue", "orders"))
    assert r.subjects == ["msgbus.q.orders", "msgbus.q.orders.*"]
    assert r.consumers == [("msgbus", "msgbus.q.orders")] + [
        (f"msgbus_p{i}", f"msgbus.q.orders.p{i}") for i in range(4)
    ]
    assert len(r.advisory_subjects) == 5  # the dead-letter stream captures every consumer's max_deliver advisory
    dead = adapter.route(Endpoint("queue", "orders", dead_letter=True))
    assert dead.consumers == [("msgbus", None)] and dead.subjects == ["msgbus.dq.orders"]
    assert dead.advisory_subjects == r.advisory_subjects  # declared from either, the dead-letter stream is the same
    sub = adapter.route(Endpoint("topic", "events", "billing"))
    assert sub.consumers[1] == ("billing_p0", "msgbus.t.events.p0")


def test_without_ordering_nothing_is_partitioned() -> None:
    adapter = _adapter("nats://h?partitions=4")  # read, but only ordering=per_key uses it
    assert adapter.capabilities.ordering == "none" and adapter.credit == 16
    r = adapter.route(Endpoint("queue", "orders"))
    assert (r.subjects, r.consumers) == (["msgbus.q.orders"], [("msgbus", None)])  # as before issue 19
    assert r.advisory_subjects == ["$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.msgbus_q_orders.msgbus"]


@settings(max_examples=300, deadline=None)
@given(key=st.text(max_size=300), partitions=st.integers(1, 256))
def test_any_key_goes_to_one_valid_partition_subject(key: str, partitions: int) -> None:
    """Hostile keys (dots, wildcards, spaces, NUL, surrogates are refused earlier) never make a subject of their own."""
    r = route("msgbus", Endpoint("queue", "orders"), partitions)
    subject = r.partition_subject(key)
    head, _, tail = subject.rpartition(".")
    assert head == r.subject and tail.startswith("p") and 0 <= int(tail[1:]) < partitions
    assert subject == r.partition_subject(key)  # stable: every message of a key in one partition


def test_a_lone_user_name_is_a_token() -> None:
    o = _adapter("nats://tok3n@host")._options
    assert (o.user, o.password, o.token) == (None, None, "tok3n")


def test_credentials_never_show() -> None:
    adapter = _adapter("nats://user:s3cret@host:4222")
    assert "s3cret" not in repr(adapter) and "s3cret" not in repr(adapter._options)
    assert "tok3n" not in repr(_adapter("nats://tok3n@host")._options)


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("nats://h?prefix=a.b", "prefix"),
        ("nats://h?prefix=" + "x" * 33, "prefix"),
        ("nats://h?storage=tape", "storage"),
        ("nats://h?ack_wait=0.1", "ack_wait"),
        ("nats://h?max_deliver=1", "max_deliver"),
        ("nats://h?replicas=7", "replicas"),
        ("nats://h?duplicate_window=10", "duplicate_window"),
        ("nats://h?tls=false&ca_file=/x.pem", "tls=true"),
        ("nats://h?tls=true&ca_file=/nonexistent/ca.pem", "TLS"),
        ("nats://h/somepath", "path"),
        ("nats://h?bogus=1", "bogus"),
        ("nats://h?ordering=global", "ordering"),
        ("nats://h?ordering=per_key&partitions=0", "partitions"),
        ("nats://h?ordering=per_key&partitions=257", "partitions"),
    ],
)
def test_bad_options_are_config_errors_naming_them(url: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        _adapter(url)


@pytest.mark.parametrize(
    ("exc", "kind", "retryable"),
    [
        (jx.NotFoundError(code=404, err_code=10059, description="stream not found"), TopologyError, False),
        (jx.BadRequestError(code=400, err_code=10058, description="different configuration"), TopologyError, False),
        (jx.ServiceUnavailableError(code=503), BrokerError, True),
        (jx.BadRequestError(code=400, err_code=1, description="bad"), BrokerError, False),
        (nx.AuthorizationError(), ConfigError, False),
        (nx.NoServersError(), ConnectionLost, True),
        (nx.TimeoutError(), ConnectionLost, True),
        (nx.MaxPayloadError(), InvalidMessage, False),
        (ConnectionResetError(), ConnectionLost, True),
        (nx.Error("odd"), BrokerError, True),
    ],
)
def test_error_table(exc: BaseException, kind: type[Exception], retryable: bool) -> None:
    err = convert(exc, "do it")
    assert type(err) is kind and err.retryable is retryable


def test_publish_refusals_are_publish_errors_and_secrets_are_scrubbed() -> None:
    err = convert(nx.Error("server said no to pw-s3cret"), "send", ["pw-s3cret"], publish=True)
    assert isinstance(err, PublishError) and "pw-s3cret" not in str(err) and "***" in str(err)
    with pytest.raises(ConnectionLost) as info, translated("connect", ["pw-s3cret"]):
        raise nx.NoServersError()
    assert isinstance(info.value.__cause__, nx.NoServersError)
