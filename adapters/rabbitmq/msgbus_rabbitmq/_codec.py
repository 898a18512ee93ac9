"""Record <-> AMQP 0-9-1 message. Pure functions: no I/O, unit-tested without a broker.

Mapping (native first, so other AMQP code reads and writes msgbus messages): body -> body; id -> ``message_id``;
correlation_id -> ``correlation_id``; content_type -> ``content_type``; timestamp -> ``timestamp`` (whole
seconds) plus milliseconds in header ``timestamp_in_ms`` (the header of RabbitMQ's message-timestamp plugin);
key -> header ``x-msgbus-key`` (AMQP 0-9-1 has no key property and the routing key addresses the queue: the key
is msgbus's own, for its per-key ordering); headers -> AMQP headers (str -> str), one by one. Every message is
persistent (delivery mode 2).

A message from other code: without ``content_type``, the content type a header names under a common spelling
(``content-type``, ``contentType``...); without ``message_id``, a fresh id ``amqp-<uuid>`` per delivery (classic
and quorum queues hold no per-message identity to derive a stable one from; a body hash would give two distinct
messages with the same body one id): distinct between messages, kept through msgbus's own re-publishes (delayed
nacks), but new on a broker redelivery. Messages written before issue 18 (``x-msgbus-timestamp``) still read.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aio_pika import DeliveryMode, Message

from msgbus.adapter import TIMESTAMP_LIMIT, Record, content_type_from
from msgbus.errors import InvalidMessage

HEADER_KEY = "x-msgbus-key"
# The creation time in milliseconds, as RabbitMQ's message-timestamp plugin stamps it (AMQP's is whole seconds).
HEADER_TIMESTAMP_MS = "timestamp_in_ms"
OLD_TIMESTAMP = "x-msgbus-timestamp"  # the exact float, before issue 18: still read
# Attempts already made before this copy was re-published (delayed nack / classic-queue nack).
HEADER_PRIOR_ATTEMPTS = "x-msgbus-prior-attempts"
# aio-pika sends an empty id/correlation id/content type as "absent"; this header names those that were "".
HEADER_EMPTY = "x-msgbus-empty"
# Headers the broker adds; they describe the transport, not the sender's message. Quorum queues count a
# message's returns in x-delivery-count (RabbitMQ 3.x: every return; 4.x: failed deliveries only) and, from
# 4.0, every return in x-acquired-count, a consumer that died included.
BROKER_HEADER = "x-delivery-count"
ACQUIRED_HEADER = "x-acquired-count"
_BROKER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-")
_PRIVATE = frozenset(
    {
        HEADER_KEY,
        HEADER_TIMESTAMP_MS,
        OLD_TIMESTAMP,
        HEADER_PRIOR_ATTEMPTS,
        HEADER_EMPTY,
        BROKER_HEADER,
        ACQUIRED_HEADER,
    }
)
_SHORTSTR = 255  # AMQP short strings (ids, content type, header names) hold at most 255 bytes


@dataclass(frozen=True, slots=True)
class Decoded:
    """A received message: the record as sent, and which delivery attempt this is (1 = first)."""

    record: Record
    attempt: int


def encode(record: Record, prior_attempts: int = 0) -> Message:
    """The persistent AMQP message for ``record``; raises ``InvalidMessage`` for what AMQP cannot carry."""
    _shortstr("message id", record.id)
    if record.correlation_id is not None:
        _shortstr("correlation id", record.correlation_id)
    if record.content_type is not None:
        _shortstr("content type", record.content_type)
    headers: dict[str, Any] = {}
    for name, value in record.headers.items():
        _shortstr("header name", name)
        if name in _PRIVATE or name.startswith(_BROKER_PREFIXES):
            raise InvalidMessage(f"header {name!r} is reserved by the RabbitMQ adapter or the broker")
        headers[name] = value
    if record.key is not None:
        headers[HEADER_KEY] = record.key
    if record.timestamp:
        headers[HEADER_TIMESTAMP_MS] = round(record.timestamp * 1000)  # round: a re-publish keeps it
    if prior_attempts:
        headers[HEADER_PRIOR_ATTEMPTS] = str(prior_attempts)
    empty = [n for n, v in (("id", record.id), ("cid", record.correlation_id), ("ct", record.content_type)) if v == ""]
    if empty:
        headers[HEADER_EMPTY] = ",".join(empty)
    return Message(
        record.body,
        headers=headers,
        message_id=record.id,
        correlation_id=record.correlation_id,
        content_type=record.content_type,
        timestamp=datetime.fromtimestamp(int(record.timestamp), tz=UTC) if record.timestamp else None,
        delivery_mode=DeliveryMode.PERSISTENT,
    )


def decode(
    body: bytes,
    headers: Mapping[str, Any] | None,
    *,
    message_id: str | None,
    correlation_id: str | None,
    content_type: str | None,
    timestamp: float | None,
    redelivered: bool | None,
) -> Decoded:
    """The record and attempt number of a received message (also one sent by a non-msgbus producer).

    The attempt is the attempts carried on re-publish, plus the broker's count of redeliveries
    (``x-acquired-count`` or else ``x-delivery-count`` on quorum queues; the ``redelivered`` flag, i.e. at
    least one, on classic queues), plus one.
    """
    raw = headers or {}
    user = {k: _text(v) for k, v in raw.items() if k not in _PRIVATE and not k.startswith(_BROKER_PREFIXES)}
    prior = _count(raw.get(HEADER_PRIOR_ATTEMPTS))
    if ACQUIRED_HEADER in raw:
        redeliveries = _count(raw[ACQUIRED_HEADER])
    elif BROKER_HEADER in raw:
        redeliveries = _count(raw[BROKER_HEADER])
    else:
        redeliveries = int(bool(redelivered))
    ts_header, scale = raw.get(HEADER_TIMESTAMP_MS), 1000
    if ts_header is None:
        ts_header, scale = raw.get(OLD_TIMESTAMP), 1
    ts = float(timestamp) if timestamp is not None else 0.0
    if ts_header is not None:  # another producer's header may hold anything: only a time replaces AMQP's
        try:
            exact = float(ts_header if isinstance(ts_header, str | int) else _text(ts_header)) / scale
        except (ValueError, OverflowError):
            exact = -1.0
        if 0 <= exact < TIMESTAMP_LIMIT:
            ts = exact
    key = raw.get(HEADER_KEY)
    marked = raw.get(HEADER_EMPTY)  # rare: only a message with an empty id, correlation id or content type
    empty = _text(marked).split(",") if marked is not None else ()
    record = Record(
        body=body,
        id="" if "id" in empty else message_id or _fallback_id(),
        headers=user,
        key=_text(key) if key is not None else None,
        correlation_id="" if "cid" in empty else correlation_id or None,
        content_type="" if "ct" in empty else content_type or (content_type_from(user) if user else None),
        timestamp=ts,
    )
    return Decoded(record, prior + redeliveries + 1)


def _shortstr(what: str, value: str) -> None:
    if len(value.encode()) > _SHORTSTR:
        raise InvalidMessage(f"{what} is longer than AMQP's {_SHORTSTR}-byte limit: {value[:40]!r}...")


def _count(value: object) -> int:
    if value is None:  # the common case: no such header (skip _text's JSON fallback)
        return 0
    try:
        return max(0, int(_text(value)))
    except ValueError:
        return 0


def _text(value: object) -> str:
    """A header value as text; values from non-msgbus producers may be any AMQP field type."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return json.dumps(value, default=str, sort_keys=True)


def _fallback_id() -> str:
    """An id for a message whose producer set none: distinct per delivery (see the module docstring)."""
    return f"amqp-{uuid.uuid4().hex}"
