"""Record <-> row, without a server: hypothesis round trips and hostile rows."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgbus.adapter import Record
from msgbus.errors import DecodeError, InvalidMessage
from msgbus_postgresql._codec import _parse, decode, encode

# Any str that UTF-8 can carry (no lone surrogates), NUL and control characters included.
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)

records = st.builds(
    Record,
    body=st.binary(max_size=200),
    id=text,
    headers=st.dictionaries(text, text, max_size=6),
    key=st.none() | text,
    correlation_id=st.none() | text,
    content_type=st.none() | text,
    timestamp=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)


@given(records)
def test_every_record_round_trips(record: Record) -> None:
    assert decode(*encode(record)) == record


@given(text)
def test_stored_metadata_never_holds_a_nul_byte_outside_the_body(value: str) -> None:
    key, _, meta = encode(Record(body=b"\0", id=value, headers={value: value}, key=value))
    assert b"\0" not in meta  # JSON escapes it: the row can go into any PostgreSQL column
    assert key == value.encode()


def test_lone_surrogates_are_invalid_messages() -> None:
    for record in (Record(b"", "\ud800"), Record(b"", "id", {"h": "\udfff"}), Record(b"", "id", key="\ud800")):
        with pytest.raises(InvalidMessage, match="UTF-8"):
            encode(record)


def test_a_non_finite_timestamp_is_an_invalid_message() -> None:
    with pytest.raises(InvalidMessage):
        encode(Record(b"", "id", timestamp=math.inf))


@pytest.mark.parametrize(
    "meta",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"5",
        b'{"id": 5}',
        b'{"headers": {"h": 1}}',
        b'{"headers": []}',
        b'{"timestamp": "soon"}',
        b'{"timestamp": true}',
        b'{"content_type": 1}',
        b"[1, {}, null, null, 0]",
        b'["x", [], null, null, 0]',
        b'["x", {"h": 1}, null, null, 0]',
        b'["x", {}, 5, null, 0]',
        b'["x", {}, null, null, "soon"]',
    ],
)
def test_rows_msgbus_did_not_write_are_decode_errors(meta: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(None, b"body", meta)


def test_key_bytes_that_are_not_utf8_are_decode_errors() -> None:
    meta = json.dumps(["x", {}, None, None, 0]).encode()
    with pytest.raises(DecodeError):
        decode(b"\xff", b"", meta)


def test_rows_other_code_writes_with_sql_read_with_defaults() -> None:
    """Any field of meta may be left out: the row's sequence number is the id, the timestamp 0."""
    assert decode(None, b"x", b"", 42) == Record(b"x", "postgresql-42", {}, timestamp=0.0)
    assert decode(None, b"x", b"{}", 43).id == "postgresql-43"
    meta = b'{"headers": {"content-type": "application/json", "origin": "sql"}}'
    r = decode(b"k", b"{}", meta, 44)
    assert (r.id, r.key, r.content_type, r.headers["origin"]) == ("postgresql-44", "k", "application/json", "sql")


def test_rows_written_before_issue_18_still_read() -> None:
    meta = json.dumps(["old-1", {"h": "v"}, "c", "text/plain", 1700000000.25]).encode()
    assert decode(b"k", b"hi", meta, 7) == Record(b"hi", "old-1", {"h": "v"}, "k", "c", "text/plain", 1700000000.25)


def test_meta_is_a_self_describing_object() -> None:
    _, _, meta = encode(Record(b"", "m-1", {"a": "b"}, "k", None, "application/json", 1.5))
    assert json.loads(meta) == {
        "id": "m-1",
        "headers": {"a": "b"},
        "timestamp": 1.5,
        "content_type": "application/json",
    }


def _reference(meta: bytes) -> object:
    """What decode read meta as before its fast path: ``json.loads`` (empty or blank meta is an empty object)."""
    return json.loads(meta) if meta.strip() else {}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)


@given(
    st.one_of(
        st.binary(max_size=40),
        st.builds(lambda b: b"{" + b, st.binary(max_size=40)),
        st.builds(
            lambda value, before, after: (before + json.dumps(value, ensure_ascii=False) + after).encode(),
            json_values,
            st.sampled_from(["", " ", "\n"]),
            st.sampled_from(["", " ", "\t", "x", "}", "{}"]),
        ),
    )
)
def test_the_fast_meta_path_reads_exactly_what_json_loads_reads(meta: bytes) -> None:
    try:
        expected: object = _reference(meta)
    except ValueError:
        with pytest.raises(ValueError):
            _parse(meta)
        return
    assert _parse(meta) == expected
