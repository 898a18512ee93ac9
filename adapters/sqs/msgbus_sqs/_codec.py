"""Record <-> SQS/SNS message (body text + message attributes). Pure: no I/O, unit-tested without AWS.

SQS and SNS bodies are text limited to the XML character set, and a message carries at most 10 message
attributes. So:

- the body is sent as is when it is UTF-8 made only of characters SQS accepts; otherwise (binary, control
  characters, empty) it is base64 and the metadata says so. Bytes round-trip exactly either way.
- native attributes first, so a raw consumer or an SNS filter policy sees them: ``content-type``,
  ``correlation-id`` and ``key`` (String attributes), then the user headers one by one, in their order, as
  long as attributes are left: 9, since one always goes to ``msgbus``.
- the ``msgbus`` attribute (a JSON string) holds the id and exact timestamp, and the overflow: the headers
  past the limit, headers SQS cannot carry as an attribute (an empty value, characters SQS refuses, a name
  outside SQS's rules, a name of the attributes above or a content-type spelling), and a content type,
  correlation id or key that is empty. Size is counted the way SQS counts it (``sqs_size``).

Messages written by other code (no ``msgbus`` attribute) are read by the same names: ``content-type`` (or
``Content-Type``, ``contentType``, ``content_type``), ``correlation-id`` and ``key``; other String and Number
attributes are headers (Binary ones are left out); the id is the SQS ``MessageId`` and the timestamp its
``SentTimestamp``. Messages in the older format (everything in ``msgbus``) are still read.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

from msgbus.adapter import Record, content_type_from
from msgbus.errors import DecodeError

ATTRIBUTE = "msgbus"
CONTENT_TYPE = "content-type"
CORRELATION_ID = "correlation-id"
KEY = "key"
MAX_ATTRIBUTES = 10  # per message, SQS and SNS alike
_NATIVE = frozenset({ATTRIBUTE, CONTENT_TYPE, CORRELATION_ID, KEY})
# Attribute names SQS and SNS accept: letters, digits, '-', '_', '.', no '.' first, last or twice in a row,
# not starting with AWS. or Amazon. in any case. Content-type spellings are left out so no raw reader mistakes a
# header for the content type.
_NAME = re.compile(r"(?!\.)(?!.*\.\.)(?!(?i:aws|amazon)\.)(?!(?i:content[-_]?type)$)[A-Za-z0-9_.-]{1,256}(?<!\.)")
_STRING = "String"
# Characters SQS accepts in a body or string attribute (the XML 1.0 set).
_NOT_SQS_TEXT = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ENC_BASE64 = "base64"


def _sqs_text(data: bytes) -> str | None:
    """``data`` as text when SQS can carry it unchanged, else None."""
    if not data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if _NOT_SQS_TEXT.search(text) else text


def _dumps(value: Mapping[str, Any]) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if _NOT_SQS_TEXT.search(text):  # e.g. U+FFFE in a header: escape everything instead
        text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    return text


def encode(record: Record) -> tuple[str, dict[str, dict[str, str]]]:
    """The SQS/SNS ``MessageBody`` and ``MessageAttributes`` of ``record``."""
    meta: dict[str, Any] = {"id": record.id, "ts": record.timestamp}
    text = _sqs_text(record.body)
    if text is None:
        meta["enc"] = _ENC_BASE64
        # SQS rejects an empty body; "=" is not valid base64 output and marks the empty payload.
        text = base64.b64encode(record.body).decode("ascii") or "="
    attrs: dict[str, dict[str, str]] = {}
    for name, short, value in (
        (CONTENT_TYPE, "ct", record.content_type),
        (CORRELATION_ID, "cid", record.correlation_id),
        (KEY, "key", record.key),
    ):
        if value is not None:
            if value and not _NOT_SQS_TEXT.search(value):
                attrs[name] = {"DataType": _STRING, "StringValue": value}
            else:
                meta[short] = value
    if record.headers:
        room = MAX_ATTRIBUTES - 1 - len(attrs)
        packed: dict[str, str] = {}
        for name, value in record.headers.items():
            if room and value and name not in _NATIVE and _NAME.fullmatch(name) and not _NOT_SQS_TEXT.search(value):
                attrs[name] = {"DataType": _STRING, "StringValue": value}
                room -= 1
            else:
                packed[name] = value
        if packed:
            meta["h"] = packed
    attrs[ATTRIBUTE] = {"DataType": _STRING, "StringValue": _dumps(meta)}
    return text, attrs


def sqs_size(body: str, attributes: Mapping[str, Mapping[str, str]]) -> int:
    """Bytes SQS counts against its limit: body plus each attribute's name, data type and value."""
    n = len(body.encode())
    for name, attr in attributes.items():
        n += len(name.encode()) + len(attr["DataType"].encode()) + len(attr.get("StringValue", "").encode())
    return n


def decode(message: Mapping[str, Any]) -> Record:
    """The record in an SQS ``ReceiveMessage`` entry; ``DecodeError`` when the ``msgbus`` attribute is malformed."""
    body = message.get("Body", "")
    attrs: Mapping[str, Mapping[str, Any]] = message.get("MessageAttributes") or {}
    meta_attr = attrs.get(ATTRIBUTE)
    if meta_attr is None:
        return _foreign(message, body, attrs)
    try:
        meta = json.loads(meta_attr["StringValue"])
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
        enc = meta.get("enc")
        if enc is None:
            payload = body.encode()
        elif enc == _ENC_BASE64:
            payload = b"" if body == "=" else base64.b64decode(body, validate=True)
        else:
            raise ValueError(f"unknown body encoding {enc!r}")
        content_type, correlation_id, key = _str(meta, "ct"), _str(meta, "cid"), _str(meta, "key")
        headers: dict[str, str] = {}
        for name, attr in attrs.items():
            value = attr.get("StringValue")
            if value is None or name == ATTRIBUTE:
                continue
            if name == CONTENT_TYPE:
                content_type = value
            elif name == CORRELATION_ID:
                correlation_id = value
            elif name == KEY:
                key = value
            else:
                headers[name] = value
        packed = meta.get("h")
        if packed is not None:
            headers.update(_headers(packed))
        return Record(
            body=payload,
            id=_str(meta, "id", required=True) or "",
            headers=headers,
            key=key,
            correlation_id=correlation_id,
            content_type=content_type,
            timestamp=float(meta.get("ts", 0.0)),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise DecodeError(f"malformed msgbus metadata on SQS message {message.get('MessageId')}: {exc}") from exc


def _foreign(message: Mapping[str, Any], body: str, attrs: Mapping[str, Mapping[str, Any]]) -> Record:
    """A message other code sent: the same attribute names, the SQS message id and sent time."""
    headers = {name: a["StringValue"] for name, a in attrs.items() if isinstance(a.get("StringValue"), str)}
    content_type = content_type_from(headers)
    if content_type is not None:
        headers = {k: v for k, v in headers.items() if not _CONTENT_TYPE_NAME.fullmatch(k)}
    sent = (message.get("Attributes") or {}).get("SentTimestamp", "")
    key, correlation_id = headers.pop(KEY, None), headers.pop(CORRELATION_ID, None)
    return Record(
        body=body.encode(),
        id=str(message.get("MessageId", "")),
        headers=headers,
        key=key,
        correlation_id=correlation_id,
        content_type=content_type,
        timestamp=int(sent) / 1000 if sent.isdigit() else 0.0,
    )


_CONTENT_TYPE_NAME = re.compile("content[-_]?type", re.IGNORECASE)


def _str(meta: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = meta.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{name}' is not a string")
    return value


def _headers(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("'h' is not a JSON object of strings")
    return value
