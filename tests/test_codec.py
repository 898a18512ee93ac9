"""Body codecs: round-trips, typed validation on receipt, and typed errors for bad input."""

from __future__ import annotations

import dataclasses
import json

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgbus._codec import BYTES, JSON, TEXT, decode, encode
from msgbus.errors import DecodeError, InvalidMessage


class Order(pydantic.BaseModel):
    id: int
    total: float


@dataclasses.dataclass
class Item:
    sku: str
    qty: int


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.binary())
def test_bytes_roundtrip(data: bytes) -> None:
    payload, ctype = encode(data)
    assert ctype == BYTES and decode(payload, ctype) == data


@given(st.text())
def test_text_roundtrip(text: str) -> None:
    payload, ctype = encode(text)
    assert ctype == TEXT and decode(payload, ctype) == text


@given(json_values.filter(lambda v: not isinstance(v, str)))
def test_json_roundtrip(value: object) -> None:
    payload, ctype = encode(value)
    assert ctype == JSON and decode(payload, ctype) == value


def test_models_encode_as_json_and_validate_on_receipt() -> None:
    payload, ctype = encode(Order(id=1, total=2.5))
    assert ctype == JSON and json.loads(payload) == {"id": 1, "total": 2.5}
    assert decode(payload, ctype, Order) == Order(id=1, total=2.5)
    payload, _ = encode(Item("a", 2))
    assert decode(payload, JSON, Item) == Item("a", 2)


@pytest.mark.parametrize("payload", [b"{not json", b'{"id": "x", "total": 1}', b"[1,2]", b"\xff\xfe"])
def test_invalid_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(payload, JSON, Order)


def test_wrong_dataclass_shape_raises_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode(b'{"sku": "a", "qty": "many"}', JSON, Item)


@given(st.binary())
def test_undecodable_json_content_never_raises_other_errors(data: bytes) -> None:
    try:
        decode(data, JSON)
    except DecodeError:
        pass
    try:
        decode(data, JSON, Order)
    except DecodeError:
        pass


@pytest.mark.parametrize("body", [object(), {1, 2}, float("nan"), {"x": object()}, lambda: 1])
def test_unencodable_bodies_raise_invalid_message(body: object) -> None:
    with pytest.raises(InvalidMessage):
        encode(body)


def test_never_pickles() -> None:
    class Custom:
        pass

    with pytest.raises(InvalidMessage, match="cannot encode"):
        encode(Custom())


def test_unknown_content_type_stays_bytes() -> None:
    assert decode(b"\x00\x01", "application/x-custom") == b"\x00\x01"
    assert decode(b"hi", "text/csv") == "hi"
