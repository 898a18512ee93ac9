"""URL options and error translation of the Kafka adapter: no broker needed."""

from __future__ import annotations

import pytest
from aiokafka import errors as kx

from msgbus._url import parse_url
from msgbus.errors import ConfigError, ConnectionLost, InvalidMessage, PublishError, TopologyError
from msgbus_kafka import create
from msgbus_kafka._config import AUTO_REPLICATION, read_options
from msgbus_kafka._errors import convert


def options(url: str):  # type: ignore[no-untyped-def]
    parsed = parse_url(url)
    reader = parsed.reader()
    out = read_options(parsed, reader)
    reader.finish()
    return out


def test_defaults() -> None:
    o = options("kafka://broker:9093")
    assert o.bootstrap == ("broker:9093",) and o.partitions == 8 and o.security_protocol == "PLAINTEXT"
    assert o.client_kwargs()["bootstrap_servers"] == ["broker:9093"]


def test_replication_is_decided_by_the_cluster_unless_given() -> None:
    assert options("kafka://b:9092").replication_factor == AUTO_REPLICATION
    assert options("kafka://b:9092?replication_factor=2").replication_factor == 2
    with pytest.raises(ConfigError, match="replication_factor"):
        options("kafka://b:9092?replication_factor=0")


def test_sasl_and_tls_and_no_secret_in_repr() -> None:
    o = options("kafka+ssl://user:s3cret@b1:9094?bootstrap=b2:9094,b3:9094&sasl_mechanism=SCRAM-SHA-512")
    assert o.bootstrap == ("b1:9094", "b2:9094", "b3:9094")
    assert o.security_protocol == "SASL_SSL" and o.sasl_mechanism == "SCRAM-SHA-512"
    assert "s3cret" not in repr(o)
    kwargs = o.client_kwargs()
    assert kwargs["sasl_plain_password"] == "s3cret" and kwargs["ssl_context"] is not None
    assert options("kafka://u:p@h:1").security_protocol == "SASL_PLAINTEXT"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("kafka://h:1?partitions=0", "partitions"),
        ("kafka://h:1?bootstrap=nohost", "bootstrap"),
        ("kafka://h:1?sasl_mechanism=GSSAPI", "sasl_mechanism"),
        ("kafka://h:1?session_timeout=3&heartbeat_interval=5", "heartbeat_interval"),
        ("kafka://h:1/path", "path"),
        ("kafka://h:1?group_prefix=a/b", "group_prefix"),
    ],
)
def test_bad_options(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        options(url)


def test_capabilities_follow_options() -> None:
    parsed = parse_url("kafka://h:1?visibility_timeout=5&max_message_size=1000")
    adapter = create(parsed, parsed.reader())
    caps = adapter.capabilities
    assert (caps.ordering, caps.lock_duration, caps.max_message_size, caps.delayed_delivery) == (
        "per_key",
        5.0,
        1000,
        False,
    )


def test_error_translation() -> None:
    assert isinstance(convert(kx.KafkaConnectionError("down"), "send"), ConnectionLost)
    # The kit's one rule for a failed send: a refusal becomes PublishError; a lost connection stays ConnectionLost.
    assert type(convert(kx.KafkaConnectionError("down"), "send", publish=True)) is ConnectionLost
    assert type(convert(kx.NotLeaderForPartitionError(), "send", publish=True)) is PublishError
    assert isinstance(convert(kx.UnknownTopicOrPartitionError(), "x", publish=True), TopologyError)
    assert isinstance(convert(kx.MessageSizeTooLargeError(), "x"), InvalidMessage)
    err = convert(kx.KafkaError("pw=hunter2"), "x", secrets=["hunter2"])
    assert "hunter2" not in str(err) and err.retryable


def test_not_checking_the_host_name_still_verifies_the_certificate() -> None:
    """ssl_check_hostname=false also turned certificate verification off (CERT_NONE): any certificate passed."""
    import ssl

    lax_host = options("kafka+ssl://b:9093?ssl_check_hostname=false").ssl_context()
    assert lax_host.verify_mode == ssl.CERT_REQUIRED and not lax_host.check_hostname
    strict = options("kafka+ssl://b:9093").ssl_context()
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    unverified = options("kafka+ssl://b:9093?ssl_verify=false").ssl_context()
    assert unverified.verify_mode == ssl.CERT_NONE and not unverified.check_hostname
    with pytest.raises(ConfigError, match="ssl_verify"):
        options("kafka://b:9092?ssl_verify=false")  # a TLS option without TLS is unknown, as the others
