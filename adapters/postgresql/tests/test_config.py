"""URL options and the error table, without a server."""

from __future__ import annotations

import asyncpg
import asyncpg.exceptions as px
import pytest

import msgbus
from msgbus._url import parse_url
from msgbus.errors import BrokerError, ConfigError, ConnectionLost, PublishError, TopologyError
from msgbus_postgresql import PostgresAdapter, create
from msgbus_postgresql._errors import convert, translated


def _adapter(url: str) -> PostgresAdapter:
    parsed = parse_url(url)
    reader = parsed.reader()
    adapter = create(parsed, reader)
    reader.finish()
    return adapter


def test_defaults() -> None:
    adapter = _adapter("postgresql://")
    o = adapter.options
    assert (o.host, o.port, o.user, o.password, o.database, o.schema) == ("127.0.0.1", 5432, None, None, None, "msgbus")
    assert (o.visibility_timeout, o.poll_interval, o.pool_size, o.sslmode) == (30.0, 2.0, 10, "prefer")
    assert (o.command_timeout, o.connect_timeout, o.reconnect_timeout, o.keepalive_interval) == (30.0, 10.0, 60.0, 5.0)
    caps = adapter.capabilities
    assert (caps.ordering, caps.delayed_delivery, caps.delayed_nack, caps.lock_extension) == (
        "per_key",
        True,
        True,
        True,
    )
    assert (caps.native_dead_letter, caps.persistence, caps.cross_process, caps.restartable) == (
        True,
        "disk",
        True,
        True,
    )
    assert caps.lock_duration == 30.0 and caps.max_message_size == 1_048_576 and caps.max_delay is None


def test_options_are_read_and_typed() -> None:
    adapter = _adapter(
        "postgres://app:pw@db.example:6543/orders?schema=bus_1&visibility_timeout=2.5&poll_interval=0.5"
        "&pool_size=3&command_timeout=4&connect_timeout=2&reconnect_timeout=9&keepalive_interval=1"
        "&max_message_size=1000&sslmode=require"
    )
    o = adapter.options
    assert (o.host, o.port, o.user, o.password, o.database) == ("db.example", 6543, "app", "pw", "orders")
    assert (o.schema, o.visibility_timeout, o.poll_interval, o.pool_size) == ("bus_1", 2.5, 0.5, 3)
    assert (o.command_timeout, o.connect_timeout, o.reconnect_timeout, o.keepalive_interval) == (4.0, 2.0, 9.0, 1.0)
    assert (o.max_message_size, o.sslmode, o.channel) == (1000, "require", "msgbus_bus_1")
    assert adapter.capabilities.lock_duration == 2.5 and adapter.capabilities.max_message_size == 1000


def test_credentials_never_show() -> None:
    adapter = _adapter("postgresql://user:s3cret@host:5432/db")
    assert "s3cret" not in repr(adapter) and "s3cret" not in repr(adapter.options)
    assert "s3cret" not in msgbus.connect("postgresql://user:s3cret@host/db").url


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("postgresql://h/db?schema=Bad-Name", "schema"),
        ('postgresql://h/db?schema=x";drop', "schema"),
        ("postgresql://h/db?schema=" + "a" * 49, "schema"),
        ("postgresql://h/db?visibility_timeout=0", "visibility_timeout"),
        ("postgresql://h/db?pool_size=0", "pool_size"),
        ("postgresql://h/db?pool_size=5000", "pool_size"),
        ("postgresql://h/db?max_message_size=999999999999", "max_message_size"),
        ("postgresql://h/db?sslmode=sometimes", "sslmode"),
        ("postgresql://h/db/extra", "database"),
        ("postgresql://h/db?nonsense=1", "nonsense"),
    ],
)
def test_bad_options_are_config_errors_naming_them(url: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        _adapter(url)


def test_error_table_most_specific_first() -> None:
    cases = [
        (px.InvalidPasswordError("password authentication failed"), ConfigError, False),
        (px.InvalidCatalogNameError('database "x" does not exist'), ConfigError, False),
        (px.UndefinedTableError("relation does not exist"), TopologyError, False),
        (px.CannotConnectNowError("the database system is starting up"), ConnectionLost, True),
        (px.AdminShutdownError("terminating connection due to administrator command"), ConnectionLost, True),
        (px.TooManyConnectionsError("too many clients"), ConnectionLost, True),
        (px.ConnectionDoesNotExistError("connection was closed in the middle of operation"), ConnectionLost, True),
        (asyncpg.InterfaceError("connection is closed"), ConnectionLost, True),
        (px.InternalClientError("cannot switch to state 12"), ConnectionLost, True),
        (TimeoutError(), ConnectionLost, True),
        (ConnectionRefusedError(111, "refused"), ConnectionLost, True),
        (px.DeadlockDetectedError("deadlock detected"), BrokerError, True),
        (px.ProgramLimitExceededError("index row size exceeds maximum"), BrokerError, False),
    ]
    for exc, kind, retryable in cases:
        err = convert(exc, "do it")
        assert type(err) is kind and err.retryable is retryable, (exc, err)
        assert "do it" in str(err)
    assert type(convert(px.DataError("bad"), "send", publish=True)) is PublishError
    assert type(convert(OSError("down"), "send", publish=True)) is ConnectionLost  # the link, not a refusal


def test_secrets_are_scrubbed_from_driver_errors() -> None:
    with pytest.raises(ConfigError) as caught, translated("connect", ["hunter2"]):
        raise px.InvalidPasswordError('password authentication failed for user "app" (hunter2)')
    assert "hunter2" not in str(caught.value) and caught.value.__cause__ is not None


def test_unknown_scheme_alias_names_the_package() -> None:
    from msgbus._registry import PACKAGES

    assert PACKAGES["postgresql"] == PACKAGES["postgres"] == "msgbus-postgresql"
    assert msgbus.connect("postgres://h/db").adapter.__class__ is PostgresAdapter
