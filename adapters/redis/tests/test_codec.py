"""Record <-> stream fields, without a broker."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgbus.adapter import Record
from msgbus.errors import DecodeError
from msgbus_redis._codec import decode, encode, flatten

text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
records = st.builds(
    Record,
    body=st.binary(max_size=200),
    id=text,
    headers=st.dictionaries(text, text, max_size=5),
    key=st.none() | text,
    correlation_id=st.none() | text,
    content_type=st.none() | text,
    timestamp=st.floats(allow_nan=False),
)


@given(records, st.integers(min_value=0, max_value=10_000))
def test_every_record_round_trips_exactly(record: Record, attempts: int) -> None:
    assert decode(encode(record, attempts)) == (record, attempts)


def test_absent_and_empty_optional_fields_stay_distinct() -> None:
    none = Record(body=b"", id="a")
    empty = Record(body=b"", id="a", key="", correlation_id="", content_type="")
    assert decode(encode(none))[0] == none
    assert decode(encode(empty))[0] == empty
    assert b"key" not in encode(none)
    assert b"headers" not in encode(none)
    assert b"attempts" not in encode(none)


def test_flatten_gives_name_value_pairs_in_order() -> None:
    fields = encode(Record(body=b"\x00\xff", id="m1", key="k"), attempts=2)
    flat = flatten(fields)
    assert flat[:6] == [b"body", b"\x00\xff", b"id", b"m1", b"timestamp", b"0.0"]
    assert dict(zip(flat[::2], flat[1::2], strict=True)) == fields


@pytest.mark.parametrize(
    "fields",
    [
        {b"data": b"hello"},  # written by something else than msgbus
        {b"body": b"x"},  # no id
        {b"body": b"x", b"id": b"\xff"},  # id not UTF-8
        {b"body": b"x", b"id": b"a", b"headers": b"[1]"},
        {b"body": b"x", b"id": b"a", b"headers": b'{"a": 1}'},
        {b"body": b"x", b"id": b"a", b"headers": b"{"},
        {b"body": b"x", b"id": b"a", b"timestamp": b"soon"},
        {b"body": b"x", b"id": b"a", b"attempts": b"many"},
    ],
)
def test_malformed_entries_raise_decode_error(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(DecodeError):
        decode(fields)
