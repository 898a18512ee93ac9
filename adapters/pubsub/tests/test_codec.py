"""Record <-> Pub/Sub message: pure, no broker. Headers round-trip whatever their size or count."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgbus.adapter import Record
from msgbus.errors import DecodeError, InvalidMessage, MessageTooLarge
from msgbus_pubsub._codec import (
    ID,
    KEY,
    MAX_ATTRIBUTE_VALUE,
    MAX_ATTRIBUTES,
    OVERFLOW,
    TIMESTAMP,
    decode,
    encode,
)


def roundtrip(record: Record, *, ordering: bool = False) -> Record:
    e = encode(record, ordering=ordering)
    return decode(e.data, e.attributes, "m1", 1.0, e.ordering_key)


def test_small_headers_are_plain_attributes_and_body_untouched() -> None:
    r = Record(b"body", "id-1", {"a": "1", "b": ""}, key="k", correlation_id="c", content_type="t", timestamp=1.5)
    e = encode(r, ordering=False)
    assert e.data == b"body"
    assert e.attributes["a"] == "1" and e.attributes["b"] == ""
    assert e.attributes[ID] == "id-1" and e.attributes[KEY] == "k" and e.attributes[TIMESTAMP] == "1.5"
    assert OVERFLOW not in e.attributes
    assert e.ordering_key == ""
    assert roundtrip(r) == r


def test_ordering_sets_the_ordering_key() -> None:
    assert encode(Record(b"", "i", key="k"), ordering=True).ordering_key == "k"
    assert encode(Record(b"", "i"), ordering=True).ordering_key == ""


def test_oversized_and_reserved_headers_overflow_into_the_body_prefix() -> None:
    headers = {
        "long": "x" * (MAX_ATTRIBUTE_VALUE + 1),
        "n" * 257: "long name",
        "goog-reserved": "v",
        "ok": "fine",
    }
    r = Record(b"\x00payload", "id", headers, key="k" * 2000, timestamp=2.0)
    e = encode(r, ordering=False)
    assert set(e.attributes) == {ID, TIMESTAMP, "ok", OVERFLOW}  # the key is too long for an attribute
    assert e.data.endswith(b"\x00payload") and len(e.data) == int(e.attributes[OVERFLOW]) + 8
    assert roundtrip(r) == r


def test_more_than_100_headers_round_trip() -> None:
    r = Record(b"b", "id", {f"h{i:03d}": str(i) for i in range(150)})
    e = encode(r, ordering=False)
    assert len(e.attributes) == MAX_ATTRIBUTES
    assert roundtrip(r) == r


def test_ordering_key_over_1024_bytes_is_invalid() -> None:
    with pytest.raises(InvalidMessage, match="ordering key"):
        encode(Record(b"", "i", key="k" * 1025), ordering=True)


def test_over_10_mb_is_too_large() -> None:
    with pytest.raises(MessageTooLarge):
        encode(Record(b"\0" * 10_000_001, "i"), ordering=False)


def test_foreign_message_uses_pubsub_metadata() -> None:
    r = decode(b"raw", {"origin": "gcloud"}, "m42", 123.25)
    assert r == Record(b"raw", "m42", {"origin": "gcloud"}, timestamp=123.25)


@pytest.mark.parametrize("name", ["content-type", "Content-Type", "contentType", "content_type"])
def test_other_code_s_message_reads_by_convention(name: str) -> None:
    r = decode(b"{}", {name: "application/json", "origin": "raw"}, "m42", 5.0, "k-1")
    assert (r.id, r.content_type, r.key, r.timestamp) == ("m42", "application/json", "k-1", 5.0)
    assert r.headers.get("origin") == "raw"


def test_fields_go_to_native_places() -> None:
    r = Record(b"{}", "m-1", {"origin": "x"}, "k", "c-1", "application/json", 1.5)
    e = encode(r, ordering=True)
    assert e.ordering_key == "k"
    assert e.attributes == {
        "message-id": "m-1",
        "correlation-id": "c-1",
        "content-type": "application/json",
        "x-msgbus-timestamp": "1.5",
        "origin": "x",
    }
    assert roundtrip(r, ordering=True) == r
    assert encode(r, ordering=False).attributes["key"] == "k"


def test_a_user_header_under_a_native_name_keeps_both() -> None:
    r = Record(b"", "m", {"content-type": "a/b", "key": "theirs", "message-id": "x"}, "k", None, "c/d", 1.0)
    for ordering in (False, True):
        assert roundtrip(r, ordering=ordering) == r


def test_messages_written_before_issue_18_still_read() -> None:
    old = {
        "h": "v",
        "x-msgbus-id": "old-1",
        "x-msgbus-timestamp": "1700000000.25",
        "x-msgbus-key": "k",
        "x-msgbus-correlation-id": "c",
        "x-msgbus-content-type": "text/plain",
    }
    assert decode(b"hi", old, "m9", 5.0) == Record(b"hi", "old-1", {"h": "v"}, "k", "c", "text/plain", 1700000000.25)


@pytest.mark.parametrize(
    "attributes",
    [
        {ID: "i", OVERFLOW: "x"},
        {ID: "i", OVERFLOW: "99"},
        {ID: "i", OVERFLOW: "2"},
        {ID: "i", TIMESTAMP: "soon"},
    ],
)
def test_malformed_metadata_is_a_decode_error(attributes: dict[str, str]) -> None:
    with pytest.raises(DecodeError):
        decode(b"[1]body", attributes, "m1", 0.0)


text = st.text(min_size=0, max_size=1500)


@given(
    body=st.binary(max_size=2000),
    headers=st.dictionaries(st.text(min_size=1, max_size=300).filter(lambda s: not s.startswith("x-msgbus-")), text),
    key=st.none() | text,
    correlation_id=st.none() | text,
    content_type=st.none() | text,
    timestamp=st.floats(min_value=0, max_value=4e9),
)
def test_any_record_round_trips(
    body: bytes,
    headers: dict[str, str],
    key: str | None,
    correlation_id: str | None,
    content_type: str | None,
    timestamp: float,
) -> None:
    r = Record(body, "id-x", headers, key, correlation_id, content_type, timestamp)
    assert roundtrip(r) == r
    if key is None or len(key.encode()) <= 1024:
        assert roundtrip(r, ordering=True) == r
