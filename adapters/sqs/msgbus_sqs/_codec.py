"""Record <-> SQS/SNS message (body text + message attributes). Pure: no I/O, unit-tested without AWS.

SQS and SNS bodies are text limited to the XML character set, and a message carries at most 10 message
attributes. So:

- the body is sent as is when it is UTF-8 made only of characters SQS accepts; otherwise (binary, control
  characters, empty) it is base64 and the metadata says so. Bytes round-trip exactly either way.
- all msgbus metadata (id, timestamp, key, correlation id, content type, every header) travels as ONE
  JSON string attribute named ``msgbus``: any number of headers fits, empty strings survive, and nine
  attributes stay free for other tools. Size is counted the way SQS counts it (``sqs_size``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

from msgbus.adapter import Record
from msgbus.errors import DecodeError

ATTRIBUTE = "msgbus"
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
    if record.key is not None:
        meta["key"] = record.key
    if record.correlation_id is not None:
        meta["cid"] = record.correlation_id
    if record.content_type is not None:
        meta["ct"] = record.content_type
    if record.headers:
        meta["h"] = dict(record.headers)
    return text, {ATTRIBUTE: {"DataType": _STRING, "StringValue": _dumps(meta)}}


def sqs_size(body: str, attributes: Mapping[str, Mapping[str, str]]) -> int:
    """Bytes SQS counts against its limit: body plus each attribute's name, data type and value."""
    n = len(body.encode())
    for name, attr in attributes.items():
        n += len(name.encode()) + len(attr["DataType"].encode()) + len(attr.get("StringValue", "").encode())
    return n


def decode(message: Mapping[str, Any]) -> Record:
    """The record in an SQS ``ReceiveMessage`` entry; ``DecodeError`` when the msgbus metadata is malformed.

    A message not written by msgbus becomes a record with the SQS message id, its string attributes as
    headers and its body as UTF-8 bytes.
    """
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
        return Record(
            body=payload,
            id=_str(meta, "id", required=True) or "",
            headers=_headers(meta.get("h")),
            key=_str(meta, "key"),
            correlation_id=_str(meta, "cid"),
            content_type=_str(meta, "ct"),
            timestamp=float(meta.get("ts", 0.0)),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise DecodeError(f"malformed msgbus metadata on SQS message {message.get('MessageId')}: {exc}") from exc


def _foreign(message: Mapping[str, Any], body: str, attrs: Mapping[str, Mapping[str, Any]]) -> Record:
    headers = {name: a["StringValue"] for name, a in attrs.items() if "StringValue" in a}
    return Record(body=body.encode(), id=str(message.get("MessageId", "")), headers=headers)


def _str(meta: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = meta.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{name}' is not a string")
    return value


def _headers(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("'h' is not a JSON object of strings")
    return value
