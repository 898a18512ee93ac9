"""Record <-> NATS message (headers + body). Pure: no I/O, unit-tested without a broker.

The body is the payload as is. msgbus's fields are NATS headers: ``Nats-Msg-Id`` (the message id, which
also makes JetStream drop a re-sent duplicate within the stream's duplicate window), ``Msgbus-Ts``,
``Msgbus-Key``, ``Msgbus-Correlation-Id``, ``Content-Type``. User headers are NATS headers of their own.

NATS headers are HTTP-like: names are RFC 7230 tokens, values printable ASCII, and clients trim the
values' outer spaces. A name or value that does not fit (unicode, spaces at either end, a name that
would be read as a ``Nats-``/``Msgbus-`` header) is percent-encoded, and its encoded name is listed in
``Msgbus-Encoded`` so the receiver decodes exactly those. An encoded name always contains ``%``, which a
plain name never does, so the two kinds never collide.

Native first (issue 18): the id is ``Nats-Msg-Id`` and the content type ``Content-Type``, the places other NATS
code uses; NATS has no key, correlation id or producer-set time, so those stay msgbus's own ``Msgbus-`` headers.
A message from other code gets ``nats-<stream>-<stream sequence>`` as its id when it has no ``Nats-Msg-Id``
(stable across redeliveries, distinct per message), the server's time, and its content type from any common
header spelling (``content-type``, ``contentType``...).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from urllib.parse import quote, unquote

from msgbus.adapter import Record, content_type_from
from msgbus.errors import DecodeError, InvalidMessage, MessageTooLarge

MSG_ID = "Nats-Msg-Id"
TIMESTAMP = "Msgbus-Ts"
KEY = "Msgbus-Key"
CORRELATION_ID = "Msgbus-Correlation-Id"
CONTENT_TYPE = "Content-Type"
ENCODED = "Msgbus-Encoded"
# A redriven dead letter keeps its id but must not be dropped as a duplicate of its first send (JetStream's window):
# its Nats-Msg-Id gets the redrive's number and the id travels here.
REDRIVEN_ID = "Msgbus-Id"
_HISTORY = "x-msgbus-dead-letter-history"
_OURS = {MSG_ID, TIMESTAMP, KEY, CORRELATION_ID, CONTENT_TYPE, ENCODED, REDRIVEN_ID}

_TOKEN = re.compile(r"[!#$&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 7230 token characters without '%'
_TOKEN_SAFE = "!#$&'*+-.^_`|~"  # what quote() leaves alone in a name (besides letters and digits)
_VALUE = re.compile(r"(?:[!-$&-~](?:[ -$&-~]*[!-$&-~])?)?")  # printable ASCII but '%', no outer space
_VALUE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
_RESERVED = ("nats-", "msgbus-")
_HEADER_LINE = len("NATS/1.0\r\n") + 2  # the header block's first line and its closing CRLF


def _plain_name(name: str) -> bool:
    """Whether ``name`` can go on the wire as it is: a token that no NATS or msgbus header uses."""
    low = name.lower()
    return bool(_TOKEN.fullmatch(name)) and not low.startswith(_RESERVED) and low != "content-type"


def _quote_name(name: str) -> str:
    encoded = quote(name, safe=_TOKEN_SAFE)
    if "%" not in encoded:  # a reserved name: encode its first character so it is read as a user header
        encoded = f"%{ord(encoded[0]):02X}{encoded[1:]}"
    return encoded


def _value(value: str) -> str:
    return value if _VALUE.fullmatch(value) else quote(value, safe=_VALUE_SAFE)


def encode(record: Record) -> dict[str, str]:
    """The NATS headers carrying ``record``'s metadata and headers (names and values are ASCII).

    Raises ``InvalidMessage`` for strings that cannot be UTF-8 encoded (lone surrogates).
    """
    try:
        headers = {MSG_ID: _value(record.id), TIMESTAMP: repr(record.timestamp)}
        history = record.headers.get(_HISTORY)
        if history is not None:
            headers[REDRIVEN_ID] = headers[MSG_ID]
            headers[MSG_ID] += f"~redrive-{hashlib.sha256(history.encode()).hexdigest()[:16]}"
        if record.key is not None:
            headers[KEY] = _value(record.key)
        if record.correlation_id is not None:
            headers[CORRELATION_ID] = _value(record.correlation_id)
        if record.content_type is not None:
            headers[CONTENT_TYPE] = _value(record.content_type)
        encoded: list[str] = []
        for name, value in record.headers.items():
            if not name:
                raise InvalidMessage(f"message {record.id!r} has a header with an empty name")
            if _plain_name(name) and _VALUE.fullmatch(value):
                headers[name] = value
            else:
                wire = name if _plain_name(name) else _quote_name(name)
                headers[wire] = quote(value, safe=_VALUE_SAFE)
                encoded.append(wire)
        if encoded:
            headers[ENCODED] = ",".join(encoded)
    except UnicodeEncodeError as exc:
        raise InvalidMessage(f"message {record.id!r} has a string that is not valid UTF-8: {exc.reason}") from None
    return headers


def wire_size(headers: Mapping[str, str], body: bytes) -> int:
    """Bytes the server counts against its ``max_payload``: the header block plus the body."""
    return _HEADER_LINE + sum(len(k) + len(v) + 4 for k, v in headers.items()) + len(body)


def check_size(headers: Mapping[str, str], body: bytes, max_payload: int) -> None:
    """``MessageTooLarge`` when the encoded message would exceed the server's ``max_payload``."""
    size = wire_size(headers, body)
    if size > max_payload:
        raise MessageTooLarge(size, max_payload)


def decode(headers: Mapping[str, str] | None, body: bytes, fallback_id: str, fallback_ts: float) -> Record:
    """The record in a received message; ``DecodeError`` when msgbus's headers are malformed.

    A message from another NATS client (no msgbus headers) is accepted: its id is ``Nats-Msg-Id`` or
    ``fallback_id``, its timestamp the server's (``fallback_ts``), its headers all it has.
    """
    if not headers:
        return Record(body, fallback_id, {}, None, None, None, fallback_ts)
    get = headers.get
    try:
        encoded = get(ENCODED)
        quoted = set(encoded.split(",")) if encoded else ()
        raw_id, ts, key, correlation_id, ctype = (
            get(REDRIVEN_ID) or get(MSG_ID),
            get(TIMESTAMP),
            get(KEY),
            get(CORRELATION_ID),
            get(CONTENT_TYPE),
        )
        user: dict[str, str] = {}
        for name, value in headers.items():
            if name in _OURS:
                continue
            if name in quoted:
                user[unquote(name, errors="strict")] = unquote(value, errors="strict")
            else:
                user[name] = value
        return Record(
            body,
            fallback_id if raw_id is None else _unvalue(raw_id),
            user,
            None if key is None else _unvalue(key),
            None if correlation_id is None else _unvalue(correlation_id),
            _unvalue(ctype) if ctype is not None else content_type_from(user) if ts is None and user else None,
            fallback_ts if ts is None else float(ts),
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"malformed msgbus headers: {exc}") from exc


def _unvalue(value: str) -> str:
    """A metadata value as sent: ``_value`` leaves clean values alone, so only decode what has escapes."""
    return unquote(value, errors="strict") if "%" in value else value


def parse_header_block(block: bytes) -> dict[str, str]:
    """The headers of a stored message as the JetStream API returns them (``NATS/1.0\\r\\nName: value...``)."""
    out: dict[str, str] = {}
    for line in block.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().decode("ascii", "replace")] = value.strip().decode("utf-8", "replace")
    return out
