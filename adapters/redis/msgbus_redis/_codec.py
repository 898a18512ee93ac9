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
    body = fields.get(BODY)
    raw_id = fields.get(ID)
    if body is None or raw_id is None:
        raise DecodeError("stream entry has no 'body' or 'id' field (not written by msgbus)")
    try:
        record = Record(
            body=bytes(body),
            id=raw_id.decode(),
            headers=_headers(fields.get(HEADERS)),
            key=_text(fields.get(KEY)),
            correlation_id=_text(fields.get(CORRELATION_ID)),
            content_type=_text(fields.get(CONTENT_TYPE)),
            timestamp=float(fields.get(TIMESTAMP, b"0")),
        )
        attempts = int(fields.get(ATTEMPTS, b"0"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"malformed stream entry: {exc}") from exc
    return record, attempts


def _headers(raw: bytes | None) -> dict[str, str]:
    if raw is None:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("'headers' is not a JSON object of strings")
    return value


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode()
