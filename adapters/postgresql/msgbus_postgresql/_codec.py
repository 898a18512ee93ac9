"""Record <-> message row. Pure: no I/O, unit-tested without a server.

A row keeps the body as it is (``bytea``), the key as UTF-8 bytes (``bytea``: compared for per-key order, and
a NUL or any other character round-trips, which ``text`` would refuse) and everything else in ``meta``: a UTF-8
JSON object ``{"id", "headers", "correlation_id", "content_type", "timestamp"}`` (JSON escapes control
characters, so nothing in a header can break the row either). Other code writing rows with SQL may leave out any
field of ``meta`` (or leave it empty): the id is then ``postgresql-<seq>`` (the row's sequence number: stable
across redeliveries, distinct per row), the headers none, the timestamp 0. Rows written before issue 18 hold a
JSON array ``[id, headers, correlation_id, content_type, timestamp]``: still read.
"""

from __future__ import annotations

import json
from typing import Any

from msgbus.adapter import Record, content_type_from
from msgbus.errors import DecodeError, InvalidMessage

Row = tuple[bytes | None, bytes, bytes]  # key, body, meta

_RAW_DECODE = json.JSONDecoder().raw_decode


def encode(record: Record) -> Row:
    """The row values of ``record``; ``InvalidMessage`` for strings that are not valid UTF-8 (lone surrogates)."""
    try:
        # content_type always (null too): a row without it names its type in a header, if anywhere (decode)
        fields: dict[str, Any] = {
            "id": record.id,
            "headers": record.headers if type(record.headers) is dict else dict(record.headers),
            "content_type": record.content_type,
            "timestamp": record.timestamp,
        }
        if record.correlation_id is not None:
            fields["correlation_id"] = record.correlation_id
        meta = json.dumps(fields, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        key = None if record.key is None else record.key.encode()
    except UnicodeEncodeError as exc:
        raise InvalidMessage(f"message {record.id!r} has a string that is not valid UTF-8: {exc.reason}") from None
    except (ValueError, TypeError) as exc:  # a NaN or infinite timestamp, headers that are not a mapping
        raise InvalidMessage(f"message {record.id!r} cannot be stored: {exc}") from None
    return key, record.body, meta


def decode(key: bytes | None, body: bytes, meta: bytes, seq: int = 0) -> Record:
    """The record in row ``seq``; ``DecodeError`` when ``meta`` holds fields of the wrong types (or no JSON)."""
    try:
        fields: Any = _parse(meta)
        if isinstance(fields, list):  # before issue 18
            message_id, headers, correlation_id, content_type, timestamp = fields
            if not isinstance(message_id, str):
                raise ValueError("the id is not a string")
            typed = True
        elif isinstance(fields, dict):
            message_id = fields.get("id", f"postgresql-{seq}")
            headers = fields.get("headers", {})
            correlation_id = fields.get("correlation_id")
            typed = "content_type" in fields
            content_type = fields.get("content_type")
            timestamp = fields.get("timestamp", 0.0)
            if not isinstance(message_id, str):
                raise ValueError("the id is not a string")
        else:
            raise ValueError("meta is not a JSON object")
        # JSON makes exact types: ``type(x) is`` checks are ``isinstance`` here, at a fraction of the cost.
        if type(headers) is not dict or (headers and not all(type(v) is str for v in headers.values())):
            raise ValueError("the headers are not an object of strings")
        if type(timestamp) is not float and (type(timestamp) is not int):
            raise ValueError("the timestamp is not a number")
        if content_type is not None and type(content_type) is not str:
            raise ValueError(f"expected a string or null, got {type(content_type).__name__}")
        if correlation_id is not None and type(correlation_id) is not str:
            raise ValueError(f"expected a string or null, got {type(correlation_id).__name__}")
        return Record(
            body,
            message_id,
            headers,
            None if key is None else key.decode(),
            correlation_id,
            content_type if typed or not headers else content_type_from(headers),
            float(timestamp),
        )
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DecodeError(f"malformed msgbus row: {exc}") from exc


def _parse(meta: bytes) -> Any:
    """``meta``'s JSON value. msgbus's own rows (one UTF-8 object, nothing around it) skip ``json.loads``'s
    encoding detection and whitespace passes, half of its cost per message; anything else takes the full path."""
    if meta[:1] == b"{":
        try:
            text = meta.decode()
            value, end = _RAW_DECODE(text)
            if end == len(text):
                return value
        except ValueError:  # UnicodeDecodeError, JSONDecodeError: json.loads decides (and says why)
            pass
    return json.loads(meta) if meta.strip() else {}
