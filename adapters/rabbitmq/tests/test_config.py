"""URL options: defaults, validation, TLS, and that secrets never show."""

from __future__ import annotations

import pytest

from msgbus._url import parse_url
from msgbus.adapter import Endpoint, Record
from msgbus.errors import ConfigError
from msgbus_rabbitmq import create
from msgbus_rabbitmq._config import DEFAULT_MAX_MESSAGE_SIZE, read_options
from msgbus_rabbitmq._names import delay_bucket_ms, holding_queue_name, partition_of, partition_queues, queue_name


def _options(url: str):
    parsed = parse_url(url)
    reader = parsed.reader()
    options = read_options(parsed, reader)
    reader.finish()
    return options


def test_defaults() -> None:
    s = _options("amqp://")
    assert (s.host, s.port, s.username, s.password, s.vhost) == ("localhost", 5672, "guest", "guest", "/")
    assert (s.queue_type, s.confirms, s.max_message_size, s.tls) == ("quorum", True, DEFAULT_MAX_MESSAGE_SIZE, None)


def test_vhost_and_options() -> None:
    s = _options("amqp://u:p@h:1234/my%2Fvhost?queue_type=classic&send_timeout=2.5&max_message_size=1024")
    assert (s.host, s.port, s.vhost, s.queue_type, s.send_timeout, s.max_message_size) == (
        "h",
        1234,
        "my/vhost",
        "classic",
        2.5,
        1024,
    )


def test_amqps_defaults_to_port_5671_and_verifying_tls() -> None:
    s = _options("amqps://h/")
    assert s.port == 5671 and s.tls is not None and s.tls.check_hostname


def test_amqps_verify_false_turns_checks_off() -> None:
    s = _options("amqps://h/?verify=false")
    assert s.tls is not None and not s.tls.check_hostname


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("amqp://h/?ca_file=/x.pem", "amqps"),
        ("amqps://h/?key_file=/k.pem", "cert_file"),
        ("amqps://h/?ca_file=/nonexistent/ca.pem", "cannot load TLS"),
        ("amqp://h/?queue_type=stream", "queue_type"),
        ("amqp://h/?max_message_size=999999999999", "max_message_size"),
        ("amqp://h/?send_timeout=-1", "send_timeout"),
        ("amqp://h/?ordering=global", "ordering"),
        ("amqp://h/?ordering=per_key&queue_type=classic", "quorum"),
        ("amqp://h/?ordering=per_key&partitions=0", "partitions"),
        ("amqp://h/?ordering=per_key&partitions=257", "partitions"),
    ],
)
def test_bad_options_raise_config_error(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _options(url)


def test_unknown_option_is_left_for_the_core_to_reject() -> None:
    parsed = parse_url("amqp://h/?bogus=1")
    reader = parsed.reader()
    create(parsed, reader)
    with pytest.raises(ConfigError, match="bogus"):
        reader.finish()


def test_password_never_in_repr() -> None:
    parsed = parse_url("amqp://user:s3cret@h/")
    adapter = create(parsed, parsed.reader())
    assert "s3cret" not in repr(adapter) and "s3cret" not in repr(_options("amqp://user:s3cret@h/"))


def test_queue_names() -> None:
    assert queue_name(Endpoint("queue", "orders")) == "orders"
    assert queue_name(Endpoint("queue", "orders", dead_letter=True)) == "orders.dlq"
    assert queue_name(Endpoint("topic", "placed", "inventory")) == "placed.inventory"
    assert queue_name(Endpoint("topic", "placed", "inventory", dead_letter=True)) == "placed.inventory.dlq"
    with pytest.raises(ConfigError):
        queue_name(Endpoint("topic", "placed"))


@pytest.mark.parametrize(("delay", "ms"), [(0.0001, 1), (0.05, 50), (0.123, 130), (1.0, 1000), (1.234, 1300)])
def test_delays_round_up_to_two_significant_digits(delay: float, ms: int) -> None:
    assert delay_bucket_ms(delay) == ms


def test_holding_queue_names_fit_amqp_limits() -> None:
    assert holding_queue_name(500, "orders", "q") == "msgbus.delay.500ms.q.orders"
    assert len(holding_queue_name(500, "o" * 255, "q")) <= 255


def test_a_receivers_connection_uses_the_urls_settings() -> None:
    """The receivers' pika connection is built from the same settings as the sending one (no broker needed)."""
    from msgbus_rabbitmq._receiver import RabbitMQReceiver

    parsed = parse_url("amqps://alice:s3cret@mq.example:5999/prod?verify=false&heartbeat=15&connect_timeout=3")
    reader = parsed.reader()
    adapter = create(parsed, reader)
    reader.finish()
    params = RabbitMQReceiver(adapter, Endpoint("queue", "q"), "q", ["q"], 8, ordered=False)._parameters()
    assert (params.host, params.port, params.virtual_host, params.heartbeat) == ("mq.example", 5999, "prod", 15)
    assert (params.credentials.username, params.credentials.password) == ("alice", "s3cret")
    assert (params.socket_timeout, params.stack_timeout, params.connection_attempts) == (3.0, 3.0, 1)
    assert params.ssl_options.context is adapter.options.tls and params.ssl_options.server_hostname == "mq.example"
    assert params.client_properties["connection_name"] == "msgbus consumer"
    plain = parse_url("amqp://")
    reader = plain.reader()
    local = create(plain, reader)
    reader.finish()
    assert (
        RabbitMQReceiver(local, Endpoint("queue", "q"), "q", ["q"], 8, ordered=False)._parameters().ssl_options is None
    )


def test_ordering_is_declared_only_with_the_option() -> None:
    for url, ordering in (("amqp://h/", "none"), ("amqp://h/?ordering=per_key&partitions=4", "per_key")):
        parsed = parse_url(url)
        assert create(parsed, parsed.reader()).capabilities.ordering == ordering


def test_partitions_follow_the_key() -> None:
    assert partition_queues("orders", 3) == ["orders.p0", "orders.p1", "orders.p2"]
    keyed = {partition_of(Record(b"", f"id-{i}", key="customer-7"), 8) for i in range(100)}
    assert len(keyed) == 1  # one key, one partition, whatever the ids
    spread = {partition_of(Record(b"", "id", key=f"customer-{i}"), 8) for i in range(100)}
    assert spread == set(range(8))
    assert all(0 <= partition_of(Record(b"", "x", key=f"k{i}"), 5) < 5 for i in range(50))
