"""Record <-> Service Bus message, through the SDK's own encoder/decoder (no broker, no mocks)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from azure.servicebus import ServiceBusReceivedMessage
from azure.servicebus._pyamqp._decode import decode_payload
from azure.servicebus._pyamqp._encode import encode_payload
from azure.servicebus._pyamqp.message import Header
from azure.servicebus._transport._pyamqp_transport import PyamqpTransport
from hypothesis import given
from hypothesis import strategies as st

from msgbus.adapter import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTER_HISTORY,
    HEADER_DEAD_LETTER_REASON,
    HEADER_DEAD_LETTER_SOURCE,
    Endpoint,
    Record,
    dedup_key,
)
from msgbus.errors import DecodeError
from msgbus_servicebus import _codec

QUEUE = Endpoint("queue", "orders")


def _received(
    record: Record,
    *,
    prior: int = 0,
    delivery_count: int = 0,
    extra: dict[str, str] | None = None,
    dedup: bool = False,
) -> Any:
    """What a receiver would get: the outgoing message encoded to AMQP bytes and decoded by the SDK."""
    outgoing = _codec.encode(record, prior, dedup=dedup)
    message = PyamqpTransport.to_outgoing_amqp_message(outgoing.raw_amqp_message)
    if extra:
        message = message._replace(application_properties={**message.application_properties, **extra})
    message = message._replace(header=Header(delivery_count=delivery_count))
    out = bytearray()
    encode_payload(out, message)
    return ServiceBusReceivedMessage(decode_payload(memoryview(bytes(out))), receiver=None)


def test_round_trip_keeps_everything() -> None:
    record = Record(
        b"\x00body", "id-1", {"h": "v", "ünï": "✓", "empty": ""}, "k1", "corr", "application/json", 1234.567
    )
    got, attempt = _codec.decode(_received(record), QUEUE)
    assert got == record and attempt == 1
    native = _codec.encode(record).raw_amqp_message
    assert native.annotations == {b"x-opt-partition-key": "k1"}
    assert native.properties is not None and native.properties.creation_time == 1234567
    assert set(native.application_properties or {}) == {"h", "ünï", "empty"}  # nothing of msgbus's


@pytest.mark.parametrize("key", ["", "k" * 129])
def test_a_key_the_partition_key_cannot_hold_is_a_private_property(key: str) -> None:
    record = Record(b"x", "id", key=key, timestamp=2.0)
    assert (_codec.encode(record).application_properties or {})[_codec.KEY] == key
    assert _codec.decode(_received(record), QUEUE)[0] == record


def test_the_older_timestamp_and_key_properties_are_still_read() -> None:
    record = Record(b"x", "id", timestamp=1.0)
    got, _ = _codec.decode(_received(record, extra={_codec.TIMESTAMP: "1.2345678", _codec.KEY: "old"}), QUEUE)
    assert (got.timestamp, got.key, got.headers) == (1.2345678, "old", {})


def test_attempt_counts_deliveries_and_prior_attempts() -> None:
    record = Record(b"x", "id")
    assert _codec.decode(_received(record, delivery_count=2), QUEUE)[1] == 3
    assert _codec.decode(_received(record, prior=3, delivery_count=1), QUEUE)[1] == 5


def test_dead_letter_properties_become_msgbus_headers() -> None:
    record = Record(b"x", "id", {"h": "v"})
    extra = {_codec.DL_REASON: "bad order", _codec.DL_DESCRIPTION: _codec.description(3)}
    got, _ = _codec.decode(_received(record, extra=extra), Endpoint("queue", "orders", dead_letter=True))
    assert got.headers == {
        "h": "v",
        HEADER_DEAD_LETTER_REASON: "bad order",
        HEADER_ATTEMPTS: "3",
        HEADER_DEAD_LETTER_SOURCE: "queue:orders",
    }


def test_service_dead_letters_fall_back_to_delivery_count() -> None:
    extra = {_codec.DL_REASON: "MaxDeliveryCountExceeded", _codec.DL_DESCRIPTION: "too many"}
    sub = Endpoint("topic", "t", "s", dead_letter=True)
    got, _ = _codec.decode(_received(Record(b"x", "id"), delivery_count=9, extra=extra), sub)
    assert got.headers[HEADER_ATTEMPTS] == "10"
    assert got.headers[HEADER_DEAD_LETTER_SOURCE] == "topic:t/s"


@given(
    body=st.binary(max_size=200),
    headers=st.dictionaries(
        st.text(min_size=1, max_size=20).filter(lambda k: not k.startswith("x-msgbus-")), st.text(max_size=50)
    ),
    key=st.none() | st.text(max_size=20),
    timestamp=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_round_trip_property(body: bytes, headers: dict[str, str], key: str | None, timestamp: float) -> None:
    headers.pop(_codec.DL_REASON, None)
    headers.pop(_codec.DL_DESCRIPTION, None)
    record = Record(body, "id", headers, key, None, None, timestamp)
    # The AMQP creation time holds milliseconds.
    assert _codec.decode(_received(record), QUEUE)[0] == replace(record, timestamp=round(timestamp * 1000) / 1000)


@pytest.mark.parametrize(
    "extra",
    [{_codec.PRIOR_ATTEMPTS: "zz"}, {_codec.TIMESTAMP: "not-a-time"}, {_codec.PRIOR_ATTEMPTS: "9" * 5000}],
)
def test_an_unreadable_message_is_read_as_its_body_and_a_problem(extra: dict[str, str]) -> None:
    """decode() raises on damaged msgbus properties; read() (what a receive uses) never does: one such message
    in a batch made the whole receive raise, stranding the others until their locks expired."""
    msg = _received(Record(b"payload", "id-7", {"h": "v"}), extra=extra, delivery_count=2)
    with pytest.raises(DecodeError):
        _codec.decode(msg, QUEUE)
    record, attempt, problem = _codec.read(msg, QUEUE)
    assert (record.body, record.id, record.headers, attempt) == (b"payload", "id-7", {"h": "v"}, 3)
    assert problem is not None and "malformed msgbus property" in problem
    dead = {**extra, _codec.DL_REASON: "DecodeError: bad", _codec.DL_DESCRIPTION: _codec.description(3)}
    in_dlq = _received(Record(b"payload", "id-7"), extra=dead)
    record, _, problem = _codec.read(in_dlq, Endpoint("queue", "orders", dead_letter=True))
    assert problem is not None and record.headers[HEADER_DEAD_LETTER_REASON] == "DecodeError: bad", "reason kept"
    sound = _received(Record(b"ok", "id-8"))
    assert _codec.read(sound, QUEUE) == (*_codec.decode(sound, QUEUE), None)


@given(message_id=st.text(max_size=300), history=st.none() | st.text(max_size=30), prior=st.integers(0, 3))
def test_with_duplicate_detection_the_message_id_is_the_dedup_key_and_the_id_round_trips(
    message_id: str, history: str | None, prior: int
) -> None:
    headers = {} if history is None else {HEADER_DEAD_LETTER_HISTORY: history}
    record = Record(b"b", message_id, headers, None, None, None, 1.0)
    received = _received(record, prior=prior, dedup=True)
    wire = str(received.message_id)
    assert 0 < len(wire) <= 128  # what Service Bus holds
    assert wire == _codec.wire_id(record, prior, dedup=True)
    assert (wire == dedup_key(record)) == (prior == 0)  # a delayed nack's copy is no repeat of the send
    assert _codec.decode(received, QUEUE)[0].id == message_id
    assert _codec.wire_id(record, prior) == message_id  # without duplicate detection: the id itself
