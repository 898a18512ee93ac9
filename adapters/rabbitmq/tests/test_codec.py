"""Record <-> AMQP message mapping, without a broker: exact round-trips and attempt counting."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgbus.adapter import Record
from msgbus.errors import InvalidMessage
from msgbus_rabbitmq._codec import HEADER_PRIOR_ATTEMPTS, decode, encode

_short = st.text(max_size=40)
_names = st.text(min_size=1, max_size=30).filter(lambda s: not s.startswith("x-") and s != "timestamp_in_ms")


def _roundtrip(record: Record, *, prior: int = 0, extra: dict[str, Any] | None = None, redelivered: bool = False):
    m = encode(record, prior)
    headers = dict(m.headers or {})
    headers.update(extra or {})
    return decode(
        m.body,
        headers,
        message_id=m.message_id,
        correlation_id=m.correlation_id,
        content_type=m.content_type,
        timestamp=m.timestamp.timestamp() if m.timestamp is not None else None,  # pika: whole seconds
        redelivered=redelivered,
    )


@given(
    body=st.binary(max_size=200),
    msg_id=st.text(max_size=60),
    headers=st.dictionaries(_names, st.text(max_size=40), max_size=5),
    key=st.none() | _short,
    correlation_id=st.none() | _short,
    content_type=st.none() | _short,
    timestamp=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_every_field_round_trips_exactly(
    body: bytes,
    msg_id: str,
    headers: dict[str, str],
    key: str | None,
    correlation_id: str | None,
    content_type: str | None,
    timestamp: float,
) -> None:
    record = Record(body, msg_id, headers, key, correlation_id, content_type, timestamp)
    decoded = _roundtrip(record)
    assert decoded.record == replace(record, timestamp=round(timestamp * 1000) / 1000)  # milliseconds kept
    assert decoded.attempt == 1


def test_messages_are_persistent_and_carry_amqp_properties() -> None:
    m = encode(Record(b"x", "id-1", {"a": "b"}, "k", "c-1", "text/plain", 1700000000.25))
    assert m.delivery_mode == 2
    assert (m.message_id, m.correlation_id, m.content_type) == ("id-1", "c-1", "text/plain")
    assert m.timestamp is not None and m.timestamp.timestamp() == 1700000000  # whole seconds for AMQP tools


@pytest.mark.parametrize(
    ("prior", "extra", "redelivered", "attempt"),
    [
        (0, {}, False, 1),
        (0, {}, True, 2),  # classic queue: the flag says "at least once before"
        (0, {"x-delivery-count": 3}, True, 4),  # quorum queue: the broker's exact count wins over the flag
        (2, {}, False, 3),  # re-published after 2 attempts (delayed nack)
        (2, {"x-delivery-count": 1}, True, 4),  # ... then crashed once
    ],
)
def test_attempt_adds_carried_and_broker_counts(prior: int, extra: dict[str, Any], redelivered: bool, attempt: int):
    decoded = _roundtrip(Record(b"", "m"), prior=prior, extra=extra, redelivered=redelivered)
    assert decoded.attempt == attempt
    assert decoded.record.headers == {}


def test_broker_headers_are_not_user_headers() -> None:
    extra = {"x-death": [{"count": 1, "queue": "q"}], "x-first-death-queue": "q", "x-delivery-count": 1}
    decoded = _roundtrip(Record(b"", "m", {"user": "1"}), extra=extra)
    assert decoded.record.headers == {"user": "1"}


def test_foreign_messages_decode_with_text_headers_and_distinct_ids() -> None:
    """No message_id: an id per delivery, never a body hash (two messages with one body are two messages)."""
    headers = {"n": 5, "b": b"raw", "t": True, "l": [1, 2]}
    one = decode(
        b"body", headers, message_id=None, correlation_id=None, content_type=None, timestamp=None, redelivered=False
    )
    two = decode(
        b"body", headers, message_id=None, correlation_id=None, content_type=None, timestamp=None, redelivered=True
    )
    assert one.record.headers == {"n": "5", "b": "raw", "t": "true", "l": "[1, 2]"}
    assert one.record.id != two.record.id and one.record.id.startswith("amqp-")


@pytest.mark.parametrize("name", ["content-type", "Content-Type", "contentType", "content_type"])
def test_other_code_s_content_type_header_is_read(name: str) -> None:
    decoded = decode(
        b"{}",
        {name: "application/json"},
        message_id="m",
        correlation_id=None,
        content_type=None,
        timestamp=5.0,
        redelivered=False,
    )
    assert (decoded.record.content_type, decoded.record.timestamp) == ("application/json", 5.0)


def test_fields_go_to_native_places() -> None:
    m = encode(Record(b"{}", "m-1", {"origin": "x"}, "k", "c-1", "application/json", 1700000000.5))
    assert (m.message_id, m.correlation_id, m.content_type) == ("m-1", "c-1", "application/json")
    assert m.timestamp is not None and m.timestamp.timestamp() == 1700000000
    assert m.headers == {"origin": "x", "x-msgbus-key": "k", "timestamp_in_ms": 1700000000500}


def test_messages_written_before_issue_18_still_read() -> None:
    old = {"h": "v", "x-msgbus-key": "k", "x-msgbus-timestamp": "1700000000.123456"}
    decoded = decode(
        b"hi",
        old,
        message_id="old-1",
        correlation_id="c",
        content_type="text/plain",
        timestamp=1700000000.0,
        redelivered=False,
    )
    assert decoded.record == Record(b"hi", "old-1", {"h": "v"}, "k", "c", "text/plain", 1700000000.123456)


@pytest.mark.parametrize("name", ["x-msgbus-key", "x-delivery-count", "x-death", HEADER_PRIOR_ATTEMPTS])
def test_reserved_header_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidMessage, match="reserved"):
        encode(Record(b"", "m", {name: "1"}))


def test_ids_longer_than_an_amqp_short_string_are_refused() -> None:
    with pytest.raises(InvalidMessage, match="255"):
        encode(Record(b"", "m" * 256))
    with pytest.raises(InvalidMessage, match="255"):
        encode(Record(b"", "m", correlation_id="é" * 128))


@pytest.mark.parametrize("bad", ["not-a-time", "nan", "1e300", -5, 10**30])
def test_a_damaged_timestamp_header_leaves_the_amqp_timestamp(bad: object) -> None:
    for name in ("timestamp_in_ms", "x-msgbus-timestamp"):
        decoded = decode(
            b"", {name: bad}, message_id="m", correlation_id=None, content_type=None, timestamp=7.0, redelivered=False
        )
        assert decoded.record.timestamp == 7.0
