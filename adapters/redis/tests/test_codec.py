"""Record <-> stream fields, without a broker."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgbus.adapter import TIMESTAMP_LIMIT, Record
from msgbus_redis import _codec as codec
from msgbus_redis._codec import _decode, decode, encode, flatten, pairs

text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
records = st.builds(
    Record,
    body=st.binary(max_size=200),
    id=text,
    headers=st.dictionaries(text, text, max_size=5),
    key=st.none() | text,
    correlation_id=st.none() | text,
    content_type=st.none() | text,
    timestamp=st.floats(min_value=0, max_value=TIMESTAMP_LIMIT, exclude_max=True),
)


@given(records, st.integers(min_value=0, max_value=10_000), st.sampled_from([(b"body",), (b"data", b"body")]))
def test_every_record_round_trips_exactly(record: Record, attempts: int, body_fields: tuple[bytes, ...]) -> None:
    assert decode(flatten(encode(record, attempts, body_fields)), b"1-0", body_fields) == (record, attempts)


def test_user_headers_are_fields_one_by_one_and_reserved_names_are_packed() -> None:
    record = Record(b"{}", "m1", {"origin": "shop", "id": "h-id", "Content-Type": "h-ct", "body": "h"}, key="k")
    fields = encode(record, 0)
    assert fields[b"origin"] == b"shop"
    assert json.loads(fields[b"headers"]) == {"id": "h-id", "Content-Type": "h-ct", "body": "h"}
    assert fields[b"id"] == b"m1" and fields[b"key"] == b"k" and b"content-type" not in fields
    assert decode(flatten(fields), b"1-0") == (record, 0)


def test_absent_and_empty_optional_fields_stay_distinct() -> None:
    none = Record(body=b"", id="a")
    empty = Record(body=b"", id="a", key="", correlation_id="", content_type="")
    assert decode(flatten(encode(none)), b"1-0")[0] == none
    assert decode(flatten(encode(empty)), b"1-0")[0] == empty
    assert b"key" not in encode(none)
    assert b"headers" not in encode(none)
    assert b"x-msgbus-prior-attempts" not in encode(none)


def test_flatten_gives_name_value_pairs_in_order() -> None:
    fields = encode(Record(body=b"\x00\xff", id="m1", key="k"), attempts=2)
    flat = flatten(fields)
    assert flat[:6] == [b"body", b"\x00\xff", b"id", b"m1", b"timestamp", b"0.0"]
    assert dict(zip(flat[::2], flat[1::2], strict=True)) == fields


def test_a_plain_xadd_entry_is_read_by_the_field_convention() -> None:
    """What the issue's raw producer writes: body, a header, a content type; the id is the stream entry id."""
    fields = {b"body": b'{"n": 1}', b"origin": b"legacy", b"content-type": b"application/json"}
    record, attempts = decode(flatten(fields), b"1700000000123-4")
    assert record == Record(
        b'{"n": 1}', "1700000000123-4", {"origin": "legacy"}, None, None, "application/json", 1700000000.123
    )
    assert attempts == 0


@pytest.mark.parametrize("name", [b"Content-Type", b"contentType", b"content_type", b"CONTENT-TYPE"])
def test_content_type_spellings(name: bytes) -> None:
    record, _ = decode(flatten({b"body": b"x", name: b"text/plain"}), b"5-0")
    assert record.content_type == "text/plain" and record.headers == {}


def test_the_configured_body_field_is_used_first_match_wins() -> None:
    fields = {b"payload": b"p", b"data": b"d", b"other": b"o"}
    record, _ = decode(flatten(fields), b"5-0", (b"data", b"payload"))
    assert record.body == b"d" and record.headers == {"payload": "p", "other": "o"}


def test_an_entry_without_a_body_field_is_delivered_whole_as_json() -> None:
    record, attempts = decode(flatten({b"data": b"hello", b"id": b"42", b"n": b"\xff"}), b"2000-7")
    assert json.loads(record.body) == {"data": "hello", "id": "42", "n": "\ufffd"}
    assert (record.id, record.content_type, record.headers, record.timestamp) == ("2000-7", "application/json", {}, 2.0)
    assert attempts == 0


@pytest.mark.parametrize(
    ("fields", "headers"),
    [
        ({b"body": b"x", b"headers": b"[1]"}, {"headers": "[1]"}),
        ({b"body": b"x", b"headers": b'{"a": 1}'}, {"headers": '{"a": 1}'}),
        ({b"body": b"x", b"headers": b"{"}, {"headers": "{"}),
        ({b"body": b"x", b"headers": b'{"a": "\\ud800"}'}, {"headers": '{"a": "\\ud800"}'}),
        ({b"body": b"x", b"timestamp": b"soon"}, {"timestamp": "soon"}),
        ({b"body": b"x", b"timestamp": b"nan"}, {"timestamp": "nan"}),
        ({b"body": b"x", b"timestamp": b"1e300"}, {"timestamp": "1e300"}),
        ({b"body": b"x", b"attempts": b"many"}, {"attempts": "many"}),
        ({b"body": b"x", b"attempts": b"3"}, {"attempts": "3"}),  # not the older msgbus format (no id/timestamp)
        ({b"body": b"x", b"x-msgbus-prior-attempts": b"zz"}, {"x-msgbus-prior-attempts": "zz"}),
        ({b"body": b"x", b"\xff": b"\xfe"}, {"\ufffd": "\ufffd"}),
    ],
)
def test_fields_of_other_shapes_are_headers_never_a_decode_error(
    fields: dict[bytes, bytes], headers: dict[str, str]
) -> None:
    record, attempts = decode(flatten(fields), b"3000-0")
    assert (record.body, record.headers, record.timestamp, attempts) == (b"x", headers, 3.0, 0)


def test_entries_in_the_older_format_are_still_read() -> None:
    """The format before issue 18: all headers in one JSON ``headers`` field, ``correlation_id``, ``attempts``."""
    fields = {
        b"body": b"b",
        b"id": b"m1",
        b"timestamp": b"1.5",
        b"key": b"k",
        b"correlation_id": b"c",
        b"content_type": b"text/plain",
        b"headers": b'{"h": "v", "id": "x"}',
        b"attempts": b"2",
    }
    record, attempts = decode(flatten(fields), b"9-0")
    assert record == Record(b"b", "m1", {"h": "v", "id": "x"}, "k", "c", "text/plain", 1.5)
    assert attempts == 2


@given(
    st.dictionaries(
        st.sampled_from([b"body", b"id", b"timestamp", b"headers", b"attempts", b"key"]) | st.binary(), st.binary()
    ),
    st.integers(min_value=0, max_value=2**48),
)
def test_any_entry_decodes_to_a_sound_record_that_round_trips(fields: dict[bytes, bytes], ms: int) -> None:
    """Hostile or foreign fields never raise, and what they decode to is storable and reads back the same."""
    record, attempts = decode(flatten(fields), f"{ms}-0".encode())
    assert record.size() >= 0  # every text encodable, the timestamp a time
    assert decode(flatten(encode(record, attempts)), b"1-0") == (record, attempts)


_TEXT = st.binary() | st.text().map(str.encode)
_TIMES = st.floats(min_value=0, max_value=1e10).map(lambda t: repr(t).encode()) | st.sampled_from(
    [b"nan", b"-1", b"1e300", b" 2.5 ", b"\xff", b"1_0"]
)


@given(
    st.fixed_dictionaries(
        {b"body": st.binary(), b"id": _TEXT, b"timestamp": _TIMES},  # msgbus's order, then its optional fields
        optional={
            b"key": _TEXT,
            b"correlation-id": _TEXT,
            b"content-type": _TEXT,
            b"headers": _TEXT,
            b"Content-Type": _TEXT,
            b"x": _TEXT,
        },
    ),
    st.none() | st.randoms(use_true_random=False),  # shuffles the fields when given
    st.lists(st.sampled_from([b"body", b"id", b"timestamp", b"key", b"content-type"]), max_size=2),
    st.integers(min_value=0, max_value=2**48),
)
def test_the_quick_path_reads_what_the_full_path_reads(
    fields: dict[bytes, bytes], shuffle: random.Random | None, again: list[bytes], ms: int
) -> None:
    """``decode``'s quick path for entries msgbus wrote without headers gives exactly the full reading, for fields
    in any order and names given twice (Redis keeps both; the last one counts)."""
    items = list(fields.items())
    if shuffle is not None:
        shuffle.shuffle(items)
    flat = [part for pair in items for part in pair] + [part for name in again for part in (name, b"again")]
    entry_id = f"{ms}-0".encode()
    assert decode(flat, entry_id) == _decode(pairs(flat), entry_id, (b"body",))


@pytest.mark.parametrize("record", [Record(b"b", "i"), Record(b"b", "i", {}, "k", "c", "text/plain", 1.5)])
def test_msgbus_entries_without_headers_take_the_quick_path(record: Record, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_: object) -> None:
        raise AssertionError("read field by field")

    monkeypatch.setattr(codec, "_decode", full)
    assert decode(flatten(encode(record)), b"1-0") == (record, 0)
