"""Record <-> SQS message, without AWS: exact round trips and SQS's size accounting."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgbus.adapter import Record
from msgbus.errors import DecodeError
from msgbus_sqs._codec import ATTRIBUTE, decode, encode, sqs_size

text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
records = st.builds(
    Record,
    body=st.binary(max_size=200) | text.map(str.encode),
    id=text,
    headers=st.dictionaries(text, text, max_size=30),
    key=st.none() | text,
    correlation_id=st.none() | text,
    content_type=st.none() | text,
    timestamp=st.floats(allow_nan=False, allow_infinity=False),
)


def _as_received(record: Record) -> dict[str, object]:
    body, attrs = encode(record)
    return {"MessageId": "m-1", "Body": body, "MessageAttributes": attrs, "ReceiptHandle": "r"}


@given(records)
def test_every_record_round_trips_exactly(record: Record) -> None:
    assert decode(_as_received(record)) == record


@given(records)
def test_never_more_than_ten_attributes_each_one_sqs_accepts(record: Record) -> None:
    _, attrs = encode(record)
    assert ATTRIBUTE in attrs and len(attrs) <= 10
    assert all(a["DataType"] == "String" and a["StringValue"] for a in attrs.values())


def test_metadata_and_headers_are_native_attributes_up_to_the_limit_then_packed() -> None:
    headers = {f"h{i}": str(i) for i in range(8)}
    record = Record(b"{}", "m1", headers, key="k1", correlation_id="c1", content_type="application/json")
    _, attrs = encode(record)
    native = {name: a["StringValue"] for name, a in attrs.items() if name != ATTRIBUTE}
    assert native == {"content-type": "application/json", "correlation-id": "c1", "key": "k1"} | {
        f"h{i}": str(i) for i in range(6)
    }
    meta = json.loads(attrs[ATTRIBUTE]["StringValue"])
    assert meta["h"] == {"h6": "6", "h7": "7"} and meta["id"] == "m1"
    assert {"ct", "cid", "key"}.isdisjoint(meta)
    assert decode({"Body": "{}", "MessageAttributes": attrs}) == record


@pytest.mark.parametrize(
    ("name", "value"),
    [("empty", ""), ("ctl", "a\x01"), ("key", "v"), ("msgbus", "v"), ("Content-Type", "v"), ("AWS.x", "v"), ("é", "v")],
)
def test_headers_sqs_cannot_carry_natively_are_packed(name: str, value: str) -> None:
    record = Record(b"x", "m1", {name: value, "plain": "p"})
    _, attrs = encode(record)
    assert attrs["plain"]["StringValue"] == "p"
    assert json.loads(attrs[ATTRIBUTE]["StringValue"])["h"] == {name: value}
    assert decode({"Body": "x", "MessageAttributes": attrs}) == record


def test_empty_metadata_is_packed_since_sqs_refuses_empty_attributes() -> None:
    record = Record(b"x", "m1", key="", correlation_id="", content_type="")
    _, attrs = encode(record)
    assert list(attrs) == [ATTRIBUTE]
    assert decode({"Body": "x", "MessageAttributes": attrs}) == record


def test_the_older_format_is_still_read() -> None:
    meta = {"id": "m1", "ts": 1.5, "key": "k", "cid": "c", "ct": "text/plain", "h": {"a": "1"}}
    attrs = {ATTRIBUTE: {"DataType": "String", "StringValue": json.dumps(meta)}}
    assert decode({"Body": "x", "MessageAttributes": attrs}) == Record(
        b"x", "m1", {"a": "1"}, "k", "c", "text/plain", 1.5
    )


@pytest.mark.parametrize("body", [b"", b"\x00\x01\xff", b"\xc3\x28", "a\ufffeb".encode(), b"\x1b[0m"])
def test_bodies_sqs_cannot_carry_as_text_are_base64(body: bytes) -> None:
    text_body, attrs = encode(Record(body=body, id="x"))
    assert json.loads(attrs[ATTRIBUTE]["StringValue"])["enc"] == "base64"
    assert text_body  # SQS rejects an empty body
    assert decode({"Body": text_body, "MessageAttributes": attrs}).body == body


def test_utf8_text_bodies_travel_as_is() -> None:
    body, attrs = encode(Record(body="zoë\n\tok 🚀".encode(), id="x"))
    assert body == "zoë\n\tok 🚀"
    assert "enc" not in json.loads(attrs[ATTRIBUTE]["StringValue"])


def test_size_counts_body_and_attribute_name_type_and_value() -> None:
    body, attrs = encode(Record(body=b"hello", id="i"))
    value = attrs[ATTRIBUTE]["StringValue"]
    assert sqs_size(body, attrs) == 5 + len("msgbus") + len("String") + len(value.encode())


def test_foreign_messages_become_records_with_the_sqs_id() -> None:
    got = decode(
        {"MessageId": "abc", "Body": "plain", "MessageAttributes": {"a": {"DataType": "String", "StringValue": "1"}}}
    )
    assert got == Record(body=b"plain", id="abc", headers={"a": "1"})


@pytest.mark.parametrize("spelling", ["content-type", "Content-Type", "contentType", "content_type"])
def test_foreign_messages_are_read_by_the_same_attribute_names(spelling: str) -> None:
    attrs = {
        spelling: {"DataType": "String", "StringValue": "application/json"},
        "correlation-id": {"DataType": "String", "StringValue": "c9"},
        "key": {"DataType": "String", "StringValue": "k9"},
        "origin": {"DataType": "String", "StringValue": "legacy"},
        "count": {"DataType": "Number", "StringValue": "3"},
        "blob": {"DataType": "Binary", "BinaryValue": b"\x00"},
    }
    message = {
        "MessageId": "abc",
        "Body": '{"n": 1}',
        "MessageAttributes": attrs,
        "Attributes": {"SentTimestamp": "1500"},
    }
    assert decode(message) == Record(
        b'{"n": 1}', "abc", {"origin": "legacy", "count": "3"}, "k9", "c9", "application/json", 1.5
    )


@pytest.mark.parametrize(
    "meta", ["not json", "[]", '{"ts": 1}', '{"id": "x", "enc": "rot13"}', '{"id": "x", "h": {"a": 1}}']
)
def test_malformed_metadata_is_a_decode_error(meta: str) -> None:
    with pytest.raises(DecodeError):
        decode({"Body": "x", "MessageAttributes": {ATTRIBUTE: {"DataType": "String", "StringValue": meta}}})
