"""Record <-> Pub/Sub message (data, attributes, ordering key). Pure: no I/O, unit-tested without a broker.

Metadata travels in attributes named ``x-msgbus-*`` (a prefix the core reserves, so no user header can
collide): ``x-msgbus-id``, ``x-msgbus-timestamp`` (``repr`` of the float, exact), and when set
``x-msgbus-key``, ``x-msgbus-correlation-id``, ``x-msgbus-content-type``. Each header is an attribute of
the same name when it fits Pub/Sub's limits (at most 100 attributes, names up to 256 bytes not starting
with ``goog``, values up to 1024 bytes); whatever does not fit goes into an *overflow* block: a UTF-8
JSON object written in front of the body, whose length is in attribute ``x-msgbus-overflow``. So every
header round-trips, and a message with small headers stays a plain Pub/Sub message that any client reads.

A message not written by msgbus (no ``x-msgbus-id``) is still received: its Pub/Sub message id is the
id, its attributes are the headers and its publish time the timestamp.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from msgbus.adapter import Record
from msgbus.errors import DecodeError, InvalidMessage, MessageTooLarge

from ._config import PUBSUB_MAX_MESSAGE

ID = "x-msgbus-id"
TIMESTAMP = "x-msgbus-timestamp"
KEY = "x-msgbus-key"
CORRELATION_ID = "x-msgbus-correlation-id"
CONTENT_TYPE = "x-msgbus-content-type"
OVERFLOW = "x-msgbus-overflow"
_FIELDS = {KEY: "key", CORRELATION_ID: "correlation_id", CONTENT_TYPE: "content_type"}
_META = frozenset({ID, TIMESTAMP, OVERFLOW, *_FIELDS})

MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY = 256
MAX_ATTRIBUTE_VALUE = 1024
MAX_ORDERING_KEY = 1024


@dataclass(frozen=True, slots=True)
class Encoded:
    """A record as Pub/Sub's publish call takes it."""

    data: bytes
    attributes: dict[str, str]
    ordering_key: str

    def size(self) -> int:
        """Bytes Pub/Sub counts against its 10 MB message limit."""
        n = len(self.data) + len(self.ordering_key.encode())
        return n + sum(len(k.encode()) + len(v.encode()) for k, v in self.attributes.items())


def _fits(name: str, value: str) -> bool:
    return (
        len(name.encode()) <= MAX_ATTRIBUTE_KEY
        and len(value.encode()) <= MAX_ATTRIBUTE_VALUE
        and not name.lower().startswith("goog")
    )


def encode(record: Record, *, ordering: bool) -> Encoded:
    """The Pub/Sub message for ``record``; ``ordering`` sets its key as the ordering key.

    Raises ``InvalidMessage`` when the key cannot be an ordering key and ``MessageTooLarge`` when the
    encoded message exceeds Pub/Sub's 10 MB.
    """
    attributes: dict[str, str] = {}
    overflow: dict[str, object] = {}
    meta: list[tuple[str, str | None]] = [
        (ID, record.id),
        (TIMESTAMP, repr(record.timestamp)),
        (KEY, record.key),
        (CORRELATION_ID, record.correlation_id),
        (CONTENT_TYPE, record.content_type),
    ]
    for name, meta_value in meta:
        if meta_value is None:
            continue
        if _fits(name, meta_value):
            attributes[name] = meta_value
        else:
            overflow[name] = meta_value
    # One attribute stays free for OVERFLOW.
    room = MAX_ATTRIBUTES - 1 - len(attributes)
    spilled: dict[str, str] = {}
    for name, value in record.headers.items():
        if room > 0 and _fits(name, value) and name not in _META:
            attributes[name] = value
            room -= 1
        else:
            spilled[name] = value
    if spilled:
        overflow["headers"] = spilled
    data = record.body
    if overflow:
        block = json.dumps(overflow, ensure_ascii=False, separators=(",", ":")).encode()
        attributes[OVERFLOW] = str(len(block))
        data = block + data
    ordering_key = ""
    if ordering and record.key:
        if len(record.key.encode()) > MAX_ORDERING_KEY:
            raise InvalidMessage(f"key is {len(record.key.encode())} bytes; a Pub/Sub ordering key takes 1024")
        ordering_key = record.key
    encoded = Encoded(data, attributes, ordering_key)
    size = encoded.size()
    if size > PUBSUB_MAX_MESSAGE:
        raise MessageTooLarge(size, PUBSUB_MAX_MESSAGE)
    return encoded


def decode(data: bytes, attributes: Mapping[str, str], message_id: str, publish_time: float) -> Record:
    """The record in a received message; ``DecodeError`` when its msgbus metadata is malformed."""
    headers = {k: v for k, v in attributes.items() if k not in _META}
    values: dict[str, str] = {k: v for k, v in attributes.items() if k in _META}
    body = data
    if OVERFLOW in attributes:
        try:
            length = int(attributes[OVERFLOW])
            if not 0 <= length <= len(data):
                raise ValueError(f"overflow length {length} outside the {len(data)}-byte payload")
            block = json.loads(data[:length])
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"malformed msgbus overflow block: {exc}") from exc
        if not isinstance(block, dict):
            raise DecodeError("malformed msgbus overflow block: not a JSON object")
        body = data[length:]
        spilled = block.pop("headers", {})
        if not isinstance(spilled, dict) or not all(isinstance(v, str) for v in spilled.values()):
            raise DecodeError("malformed msgbus overflow block: 'headers' is not an object of strings")
        headers.update(spilled)
        for name, value in block.items():
            if name not in _META or not isinstance(value, str):
                raise DecodeError(f"malformed msgbus overflow block: unexpected entry {name!r}")
            values[name] = value
    if ID not in values:  # not written by msgbus
        return Record(body=body, id=message_id, headers=headers, timestamp=publish_time)
    try:
        timestamp = float(values.get(TIMESTAMP, repr(publish_time)))
    except ValueError as exc:
        raise DecodeError(f"malformed {TIMESTAMP} attribute: {exc}") from exc
    return Record(
        body=body,
        id=values[ID],
        headers=headers,
        key=values.get(KEY),
        correlation_id=values.get(CORRELATION_ID),
        content_type=values.get(CONTENT_TYPE),
        timestamp=timestamp,
    )
