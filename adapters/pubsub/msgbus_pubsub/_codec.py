"""Record <-> Pub/Sub message (data, attributes, ordering key). Pure: no I/O, unit-tested without a broker.

Native first, so other Pub/Sub code reads and writes msgbus messages: the body is the data; the id, correlation id
and content type are the attributes ``message-id``, ``correlation-id`` and ``content-type``; the key is the
ordering key when the bus publishes with ordering, else attribute ``key``; user headers are attributes of their
own. Pub/Sub's publish time is set by the server, so msgbus's creation time travels in ``x-msgbus-timestamp``
(``repr`` of the float: it survives dead-lettering and redrive, which publish again). A user header under one of
those attribute names stays a header, and that field of msgbus's travels under its ``x-msgbus-`` name (read first).

Each header is an attribute of the same name when it fits Pub/Sub's limits (at most 100 attributes, names up to
256 bytes not starting with ``goog``, values up to 1024 bytes); whatever does not fit goes into an *overflow*
block: a UTF-8 JSON object written in front of the body, whose length is in attribute ``x-msgbus-overflow``. So
every header round-trips, and a message with small headers stays a plain Pub/Sub message that any client reads.

A message from other code: its Pub/Sub message id is the id (stable across redeliveries, distinct per message),
its publish time the timestamp, its content type the attribute under any common spelling (``content-type``,
``contentType``...), its ordering key the key. Messages written before issue 18 (``x-msgbus-id``, ``-key``,
``-correlation-id``, ``-content-type``) still read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from msgbus.adapter import Record, content_type_from
from msgbus.errors import DecodeError, InvalidMessage, MessageTooLarge

from ._config import PUBSUB_MAX_MESSAGE

ID = "message-id"
KEY = "key"
CORRELATION_ID = "correlation-id"
CONTENT_TYPE = "content-type"
TIMESTAMP = "x-msgbus-timestamp"
OVERFLOW = "x-msgbus-overflow"
# Where each field goes when a user header holds its native name; the format before issue 18 (still read).
_SPARE = {
    ID: "x-msgbus-id",
    KEY: "x-msgbus-key",
    CORRELATION_ID: "x-msgbus-correlation-id",
    CONTENT_TYPE: "x-msgbus-content-type",
}
_OLD = frozenset({TIMESTAMP, OVERFLOW, *_SPARE.values()})
_META = frozenset({*_OLD, *_SPARE})

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
    ordering_key = ""
    key = record.key
    if ordering and key:
        if len(key.encode()) > MAX_ORDERING_KEY:
            raise InvalidMessage(f"key is {len(key.encode())} bytes; a Pub/Sub ordering key takes 1024")
        ordering_key, key = key, None
    user = record.headers
    meta: list[tuple[str, str | None]] = [
        (ID, record.id),
        (KEY, key),
        (CORRELATION_ID, record.correlation_id),
        (CONTENT_TYPE, record.content_type),
    ]
    for name, meta_value in meta:
        if meta_value is None:
            continue
        if name in user:
            name = _SPARE[name]
        if _fits(name, meta_value):
            attributes[name] = meta_value
        else:
            overflow[name] = meta_value
    attributes[TIMESTAMP] = repr(record.timestamp)
    # One attribute stays free for OVERFLOW.
    room = MAX_ATTRIBUTES - 1 - len(attributes)
    spilled: dict[str, str] = {}
    for name, value in user.items():
        if room > 0 and _fits(name, value) and name not in _OLD and name not in attributes:
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
    encoded = Encoded(data, attributes, ordering_key)
    size = encoded.size()
    if size > PUBSUB_MAX_MESSAGE:
        raise MessageTooLarge(size, PUBSUB_MAX_MESSAGE)
    return encoded


def decode(
    data: bytes, attributes: Mapping[str, str], message_id: str, publish_time: float, ordering_key: str = ""
) -> Record:
    """The record in a received message; ``DecodeError`` when its msgbus metadata is malformed."""
    headers = {k: v for k, v in attributes.items() if k not in _OLD}
    values: dict[str, str] = {k: v for k, v in attributes.items() if k in _OLD}
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
            if name in _OLD:
                values[name] = value
            else:
                headers[name] = value  # a native field's value too long for an attribute
    fields: dict[str, str | None] = {KEY: ordering_key} if ordering_key else {}  # then "key" is a user header
    for name, spare in _SPARE.items():
        if name not in fields:
            fields[name] = values[spare] if spare in values else headers.pop(name, None)
    try:
        timestamp = float(values[TIMESTAMP]) if TIMESTAMP in values else publish_time
    except ValueError as exc:
        raise DecodeError(f"malformed {TIMESTAMP} attribute: {exc}") from exc
    content_type, own_id = fields[CONTENT_TYPE], fields[ID]
    return Record(
        body=body,
        id=message_id if own_id is None else own_id,
        headers=headers,
        key=fields[KEY],
        correlation_id=fields[CORRELATION_ID],
        content_type=content_type_from(headers) if content_type is None and headers else content_type,
        timestamp=timestamp,
    )
