"""Record <-> Redis stream entry fields. Pure: no I/O, unit-tested without a broker.

An entry holds ``body`` (bytes as is), ``id``, ``timestamp`` (``repr`` of the float, exact), and when
set ``key``, ``correlation_id``, ``content_type`` (UTF-8; an absent field is ``None``, an empty one is
``""``), ``headers`` (a JSON object of strings) and ``attempts`` (deliveries before this entry was
written, carried across nack re-adds so the attempt count keeps growing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from msgbus.adapter import Record
from msgbus.errors import DecodeError

BODY = b"body"
ID = b"id"
KEY = b"key"
HEADERS = b"headers"
CORRELATION_ID = b"correlation_id"
CONTENT_TYPE = b"content_type"
TIMESTAMP = b"timestamp"
ATTEMPTS = b"attempts"


def encode(record: Record, attempts: int = 0) -> dict[bytes, bytes]:
    """The entry's fields, in the order XADD writes them."""
    fields = {BODY: record.body, ID: record.id.encode(), TIMESTAMP: repr(record.timestamp).encode()}
    if record.key is not None:
        fields[KEY] = record.key.encode()
    if record.correlation_id is not None:
        fields[CORRELATION_ID] = record.correlation_id.encode()
    if record.content_type is not None:
        fields[CONTENT_TYPE] = record.content_type.encode()
    if record.headers:
        fields[HEADERS] = json.dumps(dict(record.headers), ensure_ascii=False, separators=(",", ":")).encode()
    if attempts:
        fields[ATTEMPTS] = str(attempts).encode()
    return fields


def flatten(fields: Mapping[bytes, bytes]) -> list[bytes]:
    """``[name, value, ...]``: how the Lua scripts take an entry's fields."""
    return [part for pair in fields.items() for part in pair]


def decode(fields: Mapping[bytes, bytes]) -> tuple[Record, int]:
    """The record in an entry and the attempts made before it; ``DecodeError`` when malformed."""
    get = fields.get  # the consume hot path: one lookup per field, no helper call for an absent one
    body = get(BODY)
    raw_id = get(ID)
    if body is None or raw_id is None:
        raise DecodeError("stream entry has no 'body' or 'id' field (not written by msgbus)")
    try:
        headers, key, correlation_id, content_type = get(HEADERS), get(KEY), get(CORRELATION_ID), get(CONTENT_TYPE)
        record = Record(
            body if type(body) is bytes else bytes(body),
            raw_id.decode(),
            {} if headers is None else _headers(headers),
            None if key is None else key.decode(),
            None if correlation_id is None else correlation_id.decode(),
            None if content_type is None else content_type.decode(),
            float(get(TIMESTAMP, b"0")),
        )
        attempts = int(get(ATTEMPTS, b"0"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"malformed stream entry: {exc}") from exc
    return record, attempts


def _headers(raw: bytes) -> dict[str, str]:
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("'headers' is not a JSON object of strings")
    return value
