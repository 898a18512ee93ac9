"""Record <-> message row. Pure: no I/O, unit-tested without a server.

A row keeps the body as it is (``bytea``), the key as UTF-8 bytes (``bytea``: compared for per-key order, and
a NUL or any other character round-trips, which ``text`` would refuse) and everything else in ``meta``: a
JSON array ``[id, headers, correlation_id, content_type, timestamp]`` encoded as UTF-8 (JSON escapes control
characters, so nothing in a header can break the row either).
"""

from __future__ import annotations

import json
from typing import Any

from msgbus.adapter import Record
from msgbus.errors import DecodeError, InvalidMessage

Row = tuple[bytes | None, bytes, bytes]  # key, body, meta


def encode(record: Record) -> Row:
    """The row values of ``record``; ``InvalidMessage`` for strings that are not valid UTF-8 (lone surrogates)."""
    try:
        meta = json.dumps(
            [record.id, dict(record.headers), record.correlation_id, record.content_type, record.timestamp],
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
        key = None if record.key is None else record.key.encode()
    except UnicodeEncodeError as exc:
        raise InvalidMessage(f"message {record.id!r} has a string that is not valid UTF-8: {exc.reason}") from None
    except ValueError as exc:  # a NaN or infinite timestamp
        raise InvalidMessage(f"message {record.id!r} cannot be stored: {exc}") from None
    return key, record.body, meta


def decode(key: bytes | None, body: bytes, meta: bytes) -> Record:
    """The record in a row; ``DecodeError`` when ``meta`` is not what ``encode`` writes (a foreign row)."""
    try:
        fields: Any = json.loads(meta)
        message_id, headers, correlation_id, content_type, timestamp = fields
        if not isinstance(message_id, str) or not isinstance(headers, dict):
            raise ValueError("id or headers of the wrong type")
        if not all(isinstance(v, str) for v in headers.values()):
            raise ValueError("a header value is not a string")
        return Record(
            body=body,
            id=message_id,
            headers=headers,
            key=None if key is None else key.decode(),
            correlation_id=_optional_str(correlation_id),
            content_type=_optional_str(content_type),
            timestamp=float(timestamp),
        )
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DecodeError(f"malformed msgbus row: {exc}") from exc


def _optional_str(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"expected a string or null, got {type(value).__name__}")
