"""Record <-> Redis stream entry fields. Pure: no I/O, unit-tested without a broker.

The field convention, for entries msgbus writes and for entries anyone writes with a plain ``XADD``:

- ``body`` (the first of the ``body_fields`` option's names that the entry has): the body, bytes as is;
- ``id``: the message id; an entry without one gets its stream entry id (stable across redeliveries,
  distinct between entries);
- ``timestamp``: seconds since the epoch (``repr`` of the float, exact); without a valid one, the time in
  the stream entry id (milliseconds);
- ``key``, ``correlation-id`` and ``content-type`` (also read: ``Content-Type``, ``contentType``,
  ``content_type``, ``correlation_id``); an absent field is ``None``, an empty one ``""``;
- every other field is a header, one field each. A user header whose name is one of the names above goes
  into one ``headers`` field instead, a JSON object of strings (earlier msgbus versions put all headers
  there: entries in that format are still read);
- ``x-msgbus-prior-attempts``: deliveries before a nack re-added the entry, so the attempt count keeps
  growing (``attempts`` in the older format).

An entry without a body field is delivered whole: its body is a JSON object of all its fields (values as
UTF-8 text, invalid bytes replaced), content type ``application/json``, no headers. Text that is not UTF-8
is read with invalid bytes replaced. So any entry is deliverable: ``decode`` never raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from msgbus.adapter import TIMESTAMP_LIMIT, Record

BODY = b"body"
ID = b"id"
KEY = b"key"
HEADERS = b"headers"
CORRELATION_ID = b"correlation-id"
CONTENT_TYPE = b"content-type"
TIMESTAMP = b"timestamp"
PRIOR_ATTEMPTS = b"x-msgbus-prior-attempts"
_OLD_CORRELATION_ID = b"correlation_id"
_OLD_ATTEMPTS = b"attempts"
#: Names that are never a header field (besides the body field(s) and the content-type spellings).
_META = frozenset({ID, KEY, HEADERS, CORRELATION_ID, _OLD_CORRELATION_ID, TIMESTAMP, PRIOR_ATTEMPTS, _OLD_ATTEMPTS})
_CT_NAME = re.compile(b"content[-_]?type", re.IGNORECASE)
DEFAULT_BODY_FIELDS = (BODY,)
_JSON = "application/json"


_CT_COMMON = frozenset({CONTENT_TYPE, b"content_type", b"Content-Type", b"contentType"})


def _is_content_type(name: bytes) -> bool:
    return name in _CT_COMMON or (11 <= len(name) <= 12 and _CT_NAME.fullmatch(name) is not None)


def encode(
    record: Record, attempts: int = 0, body_fields: tuple[bytes, ...] = DEFAULT_BODY_FIELDS
) -> dict[bytes, bytes]:
    """The entry's fields, in the order XADD writes them (the body under the first of ``body_fields``)."""
    fields = {body_fields[0]: record.body, ID: record.id.encode(), TIMESTAMP: repr(record.timestamp).encode()}
    if record.key is not None:
        fields[KEY] = record.key.encode()
    if record.correlation_id is not None:
        fields[CORRELATION_ID] = record.correlation_id.encode()
    if record.content_type is not None:
        fields[CONTENT_TYPE] = record.content_type.encode()
    packed: dict[str, str] | None = None
    for name, value in record.headers.items():
        raw = name.encode()
        if raw in _META or raw in body_fields or _is_content_type(raw):
            if packed is None:
                packed = {}
            packed[name] = value
        else:
            fields[raw] = value.encode()
    if packed:
        fields[HEADERS] = json.dumps(packed, ensure_ascii=False, separators=(",", ":")).encode()
    if attempts:
        fields[PRIOR_ATTEMPTS] = str(attempts).encode()
    return fields


def flatten(fields: Mapping[bytes, bytes]) -> list[bytes]:
    """``[name, value, ...]``: how the Lua scripts take an entry's fields."""
    return [part for pair in fields.items() for part in pair]


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """``{name: value}`` of an entry's fields as Redis sends them, ``[name, value, ...]`` (a name twice: the last)."""
    it = iter(flat)
    return dict(zip(it, it, strict=False))


def decode(
    flat: Sequence[bytes], entry_id: bytes, body_fields: tuple[bytes, ...] = DEFAULT_BODY_FIELDS
) -> tuple[Record, int]:
    """The record in the entry ``entry_id``, its fields as Redis sends them (``[name, value, ...]``), and the
    attempts made before it. Never raises (see the module).

    An entry as msgbus writes it without headers (``body``, ``id``, ``timestamp``, then ``key``, ``correlation-id``
    and ``content-type`` where set, in that order; a valid timestamp) takes a quick path: each name looked at in
    place, no dict made; ``_decode`` reads every other entry, the same way."""
    n = len(flat)
    if (
        6 <= n <= 12
        and flat[0] == BODY
        and flat[2] == ID
        and flat[4] == TIMESTAMP
        and body_fields == DEFAULT_BODY_FIELDS
    ):
        key = correlation_id = content_type = None
        i = 6
        if i < n and flat[i] == KEY:
            key = flat[i + 1]
            i += 2
        if i < n and flat[i] == CORRELATION_ID:
            correlation_id = flat[i + 1]
            i += 2
        if i < n and flat[i] == CONTENT_TYPE:
            content_type = flat[i + 1]
            i += 2
        if i == n:
            try:
                timestamp = float(flat[5])
            except ValueError:
                timestamp = -1.0
            if 0 <= timestamp < TIMESTAMP_LIMIT:  # also false for NaN
                body = flat[1]
                record = Record(
                    body if type(body) is bytes else bytes(body),
                    _text(flat[3]),
                    {},
                    None if key is None else _text(key),
                    None if correlation_id is None else _text(correlation_id),
                    None if content_type is None else _text(content_type),
                    timestamp,
                )
                return record, 0
    return _decode(pairs(flat), entry_id, body_fields)


def _decode(fields: Mapping[bytes, bytes], entry_id: bytes, body_fields: tuple[bytes, ...]) -> tuple[Record, int]:
    """``decode`` of any entry."""
    body = None
    for body_name in body_fields:
        body = fields.get(body_name)
        if body is not None:
            break
    if body is None:
        return _whole(fields, entry_id), 0
    headers: dict[str, str] = {}
    content_type: str | None = None
    for name, value in fields.items():
        if name in _META or name == body_name:
            continue
        if name in _CT_COMMON or (11 <= len(name) <= 12 and _CT_NAME.fullmatch(name) is not None):
            if content_type is None or name == CONTENT_TYPE:
                content_type = _text(value)
            continue
        headers[_text(name)] = _text(value)
    get = fields.get
    packed = get(HEADERS)
    if packed is not None:
        extra = _headers(packed)
        if extra is None:
            headers["headers"] = _text(packed)
        else:
            headers.update(extra)
    raw_id, key, correlation_id = get(ID), get(KEY), get(CORRELATION_ID, get(_OLD_CORRELATION_ID))
    raw_ts = get(TIMESTAMP)
    try:
        timestamp: float | None = float(raw_ts) if raw_ts is not None else None
    except ValueError:
        timestamp = None
    if timestamp is not None and not 0 <= timestamp < TIMESTAMP_LIMIT:  # also false for NaN
        timestamp = None
    if timestamp is None:
        timestamp = _entry_time(entry_id)
        if TIMESTAMP in fields:  # not a time msgbus wrote: someone else's field, kept
            headers["timestamp"] = _text(fields[TIMESTAMP])
    attempts = _attempts(fields, headers) if PRIOR_ATTEMPTS in fields or _OLD_ATTEMPTS in fields else 0
    record = Record(
        body if type(body) is bytes else bytes(body),
        _text(entry_id if raw_id is None else raw_id),
        headers,
        None if key is None else _text(key),
        None if correlation_id is None else _text(correlation_id),
        content_type,
        timestamp,
    )
    return record, attempts


def _attempts(fields: Mapping[bytes, bytes], headers: dict[str, str]) -> int:
    """Deliveries before this entry was re-added; a value msgbus did not write is kept as a header instead."""
    raw = fields.get(PRIOR_ATTEMPTS)
    if raw is not None:
        if raw.isdigit():
            return int(raw)
        headers[PRIOR_ATTEMPTS.decode()] = _text(raw)
    old = fields.get(_OLD_ATTEMPTS)
    if old is not None:
        # The older msgbus format; in an entry that does not look like one, an 'attempts' field is a header.
        if raw is None and old.isdigit() and ID in fields and TIMESTAMP in fields:
            return int(old)
        headers["attempts"] = _text(old)
    return 0


def _entry_time(entry_id: bytes) -> float:
    """The time in a stream entry id (``<milliseconds>-<sequence>``); 0 for one past ``TIMESTAMP_LIMIT`` (an
    explicit ``XADD`` id can be any number)."""
    ms, _, _ = entry_id.partition(b"-")
    seconds = int(ms) / 1000 if ms.isdigit() else 0.0
    return seconds if seconds < TIMESTAMP_LIMIT else 0.0


def _headers(raw: bytes) -> dict[str, str] | None:
    """The ``headers`` field as msgbus writes it (a JSON object of strings), else None."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return None
    try:  # JSON escapes can spell lone surrogates, which no header can hold
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return None
    return value


def _whole(fields: Mapping[bytes, bytes], entry_id: bytes) -> Record:
    """An entry without a body field: all of it as one JSON object, typed ``application/json``."""
    document = {_text(name): _text(value) for name, value in fields.items()}
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    return Record(body, _text(entry_id), {}, None, None, _JSON, _entry_time(entry_id))
