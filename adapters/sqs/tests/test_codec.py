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
def test_one_attribute_whatever_the_number_of_headers(record: Record) -> None:
    _, attrs = encode(record)
    assert list(attrs) == [ATTRIBUTE]


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


@pytest.mark.parametrize(
    "meta", ["not json", "[]", '{"ts": 1}', '{"id": "x", "enc": "rot13"}', '{"id": "x", "h": {"a": 1}}']
)
def test_malformed_metadata_is_a_decode_error(meta: str) -> None:
    with pytest.raises(DecodeError):
        decode({"Body": "x", "MessageAttributes": {ATTRIBUTE: {"DataType": "String", "StringValue": meta}}})
