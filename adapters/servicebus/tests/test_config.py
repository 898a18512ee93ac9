"""URL options and connection strings, without a broker."""

from __future__ import annotations

import pytest

from msgbus._url import parse_url
from msgbus.errors import ConfigError
from msgbus_servicebus import create, url_from_connection_string
from msgbus_servicebus._config import read_options
from msgbus_servicebus._names import check_entity

KEY = "s3cr3t+Key/with=="


def _options(url: str):  # type: ignore[no-untyped-def]
    parsed = parse_url(url)
    reader = parsed.reader()
    options = read_options(parsed, reader)
    reader.finish()
    return options


def test_local_host_defaults_to_the_emulator_dialect_without_admin_api() -> None:
    o = _options("servicebus://Root:k@127.0.0.1:5682?lock_duration=2")
    assert (o.emulator, o.management, o.lock_duration, o.port) == (True, "none", 2.0, 5682)
    assert o.connection_string.endswith(";UseDevelopmentEmulator=true")


def test_namespace_defaults_to_admin_topology_and_tls() -> None:
    o = _options("servicebus://Root:k@ns.servicebus.windows.net")
    assert (o.emulator, o.management, o.lock_duration, o.max_delivery_count) == (False, "admin", 60.0, 10)
    assert "UseDevelopmentEmulator" not in o.connection_string


def test_key_is_never_shown() -> None:
    url = url_from_connection_string(
        f"Endpoint=sb://127.0.0.1:5682;SharedAccessKeyName=Root;SharedAccessKey={KEY};UseDevelopmentEmulator=true"
    )
    parsed = parse_url(url)
    assert parsed.password == KEY
    adapter = create(parsed, parsed.reader())
    for text in (repr(adapter), str(adapter.url), repr(adapter.options), repr(parsed)):
        assert KEY not in text and "s3cr3t" not in text


def test_connection_string_round_trip() -> None:
    url = url_from_connection_string("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=R;SharedAccessKey=k")
    assert url == "servicebus://R:k@ns.servicebus.windows.net"


@pytest.mark.parametrize(
    "text",
    [
        "Endpoint=http://x;SharedAccessKeyName=R;SharedAccessKey=k",
        "Endpoint=sb://x;SharedAccessKeyName=R",
        "Endpoint=sb://x;SharedAccessKeyName=R;SharedAccessKey=k;Bogus=1",
        "garbage",
    ],
)
def test_bad_connection_strings_raise_without_the_key(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        url_from_connection_string(text)
    assert "SharedAccessKey=k" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "servicebus://127.0.0.1:5682",  # no key
        "servicebus://R:k@/",  # no host
        "servicebus://R:k@h/queue",  # a path
        "servicebus://R:k@h?management=maybe",
        "servicebus://R:k@h?lock_duration=0.1",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        _options(url)


def test_entity_names() -> None:
    assert check_entity("queue", "orders.v1_x-y", 260) == "orders.v1_x-y"
    with pytest.raises(ConfigError):
        check_entity("subscription", "s" * 51, 50)
    with pytest.raises(ConfigError):
        check_entity("queue", "-bad", 260)


def test_ordering_per_key_is_declared_only_with_the_option() -> None:
    assert _options("servicebus://Root:k@127.0.0.1:5682").ordering == "none"
    assert _options("servicebus://Root:k@127.0.0.1:5682?ordering=per_key").ordering == "per_key"
    with pytest.raises(ConfigError):
        _options("servicebus://Root:k@127.0.0.1:5682?ordering=total")
    parsed = parse_url("servicebus://Root:k@127.0.0.1:5682?ordering=per_key")
    assert create(parsed, parsed.reader()).capabilities.ordering == "per_key"
    parsed = parse_url("servicebus://Root:k@127.0.0.1:5682")
    assert create(parsed, parsed.reader()).capabilities.ordering == "none"


def test_the_session_of_a_record_is_its_key_or_one_of_sixteen_by_its_id() -> None:
    from msgbus.adapter import Record
    from msgbus.errors import InvalidMessage
    from msgbus_servicebus._sessions import KEYLESS_SESSIONS, session_of

    assert session_of(Record(b"", "id-1", key="order-7")) == "order-7"
    keyless = {session_of(Record(b"", f"id-{i}")) for i in range(500)}
    assert keyless == {f"msgbus-keyless-{n}" for n in range(KEYLESS_SESSIONS)}
    assert session_of(Record(b"", "id-1")) == session_of(Record(b"", "id-1"))  # a redrive keeps its session
    assert session_of(Record(b"", "x", key="k" * 128)) == "k" * 128
    for bad in ("", "k" * 129):
        with pytest.raises(InvalidMessage, match="session id"):
            session_of(Record(b"", "x", key=bad))


def test_duplicate_detection_is_declared_only_with_the_option_and_a_window_azure_accepts() -> None:
    base = "servicebus://Root:k@127.0.0.1:5682"
    assert _options(base).dedup_window is None
    assert _options(base + "?duplicate_detection=true").dedup_window == 600.0  # Azure's default window
    assert _options(base + "?dedup_window=30").dedup_window == 30.0  # a window turns it on
    assert _options(base + "?duplicate_detection=true&dedup_window=0").dedup_window == 600.0
    for bad in ("dedup_window=19", "dedup_window=604801", "dedup_window=-1", "dedup_window=ten"):
        with pytest.raises(ConfigError, match="dedup_window"):
            _options(f"{base}?{bad}")
    parsed = parse_url(base + "?duplicate_detection=true&dedup_window=120")
    assert create(parsed, parsed.reader()).capabilities.dedup_window == 120.0
    parsed = parse_url(base)
    assert create(parsed, parsed.reader()).capabilities.dedup_window is None


def test_an_existing_entity_must_detect_duplicates_for_at_least_the_window() -> None:
    from datetime import timedelta
    from types import SimpleNamespace

    from msgbus.adapter import Endpoint
    from msgbus.errors import TopologyError
    from msgbus_servicebus._topology import _check_dedup

    queue = Endpoint("queue", "orders")

    def entity(on: bool, minutes: float) -> SimpleNamespace:
        window = timedelta(minutes=minutes)
        return SimpleNamespace(requires_duplicate_detection=on, duplicate_detection_history_time_window=window)

    _check_dedup(queue, entity(False, 10), None)  # the option is off: anything goes
    _check_dedup(queue, entity(True, 10), 600.0)
    _check_dedup(queue, entity(True, 60), 600.0)
    with pytest.raises(TopologyError, match="without duplicate detection"):
        _check_dedup(queue, entity(False, 10), 600.0)
    with pytest.raises(TopologyError, match="less than dedup_window=600"):
        _check_dedup(queue, entity(True, 5), 600.0)
