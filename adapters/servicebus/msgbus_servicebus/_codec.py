"""Record <-> Service Bus message. Pure: no I/O, unit-tested without a broker.

Body, message id, correlation id and content type map to the message's own fields, the key to its partition
key, the timestamp to its AMQP ``creation-time`` (milliseconds); headers are application properties, one each.
Only what Service Bus has no field for travels as a private application property (``x-msgbus-`` names, which
user headers cannot use): the attempts made before a delayed nack's re-sent copy, and a key the partition key
cannot hold (empty, or over 128 characters), and, with duplicate detection, the message id when the one on the
wire must differ from it (``wire_id``). Messages written by other code are read the same way; one without
a message id gets its sequence number, without a creation time its enqueued time. The key and timestamp
properties earlier versions wrote are still read. Dead-lettered messages are read back with Service Bus'
``DeadLetterReason`` and ``DeadLetterErrorDescription`` as the msgbus dead-letter headers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus.amqp import AmqpMessageBodyType

from msgbus.adapter import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTER_REASON,
    HEADER_DEAD_LETTER_SOURCE,
    TIMESTAMP_LIMIT,
    Endpoint,
    Record,
    dedup_key,
)
from msgbus.errors import DecodeError

KEY = "x-msgbus-key"  # only for a key the partition key cannot hold
TIMESTAMP = "x-msgbus-timestamp"  # read only: earlier versions wrote the exact timestamp here
MAX_PARTITION_KEY = 128  # characters (the service's and the SDK's limit)
PRIOR_ATTEMPTS = "x-msgbus-prior-attempts"  # deliveries before a delayed nack re-sent the message
MESSAGE_ID = "x-msgbus-id"  # the message id, when duplicate detection needs another MessageId on the wire
_PRIVATE = frozenset({KEY, TIMESTAMP, PRIOR_ATTEMPTS, MESSAGE_ID})
DL_REASON = "DeadLetterReason"
DL_DESCRIPTION = "DeadLetterErrorDescription"
MAX_REASON = 4096  # kept well inside the service's 64 KiB header limit
_ATTEMPTS_TEXT = re.compile(r"after (\d+) attempt")


def wire_id(record: Record, prior_attempts: int = 0, *, dedup: bool = False) -> str:
    """The MessageId to send. Without duplicate detection, the message id. With it, what the entity must
    recognise a repeated send by: ``dedup_key`` (the id itself when Service Bus can hold it; a redrive is no
    repeat), and for a delayed nack's copy (``prior_attempts``) a key of its own, since that copy is a new send
    of the same id that duplicate detection would otherwise drop."""
    if not dedup:
        return record.id
    key = dedup_key(record)
    if prior_attempts:
        key = hashlib.sha256(f"{key}\nattempts {prior_attempts}".encode()).hexdigest()
    return key


def encode(record: Record, prior_attempts: int = 0, *, dedup: bool = False) -> ServiceBusMessage:
    """The message to send for ``record`` (``prior_attempts``: deliveries already made, for a re-sent copy;
    ``dedup``: the entity requires duplicate detection, see ``wire_id``)."""
    props: dict[str | bytes, Any] = {k: v for k, v in record.headers.items()}
    message_id = wire_id(record, prior_attempts, dedup=dedup)
    if message_id != record.id:
        props[MESSAGE_ID] = record.id
    key = record.key
    native_key = key is not None and 0 < len(key) <= MAX_PARTITION_KEY
    if key is not None and not native_key:
        props[KEY] = key
    if prior_attempts:
        props[PRIOR_ATTEMPTS] = str(prior_attempts)
    message = ServiceBusMessage(
        record.body,
        message_id=message_id,
        correlation_id=record.correlation_id,
        content_type=record.content_type,
        partition_key=key if native_key else None,
        application_properties=props,
    )
    properties = message.raw_amqp_message.properties
    if properties is not None:
        properties.creation_time = round(record.timestamp * 1000)
    return message


def description(attempts: int) -> str:
    """``DeadLetterErrorDescription`` msgbus writes: says, and later tells the reader, how many attempts."""
    return f"msgbus: dead-lettered after {attempts} attempt(s)"


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _body(msg: ServiceBusReceivedMessage) -> bytes:
    amqp = msg.raw_amqp_message
    if amqp.body_type == AmqpMessageBodyType.DATA:
        return b"".join(bytes(part) for part in amqp.body)
    value = amqp.body
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise DecodeError(f"Service Bus message {msg.message_id} has a {amqp.body_type} body msgbus cannot read")


def decode(msg: ServiceBusReceivedMessage, endpoint: Endpoint) -> tuple[Record, int]:
    """The record in ``msg`` and its attempt number (1 on first delivery); ``DecodeError`` when msgbus's own
    properties on it are damaged (see ``read``, which never raises).

    From a dead-letter sub-queue (``endpoint.dead_letter``) the record carries the msgbus dead-letter
    headers, built from the service's dead-letter properties.
    """
    record, attempt, problem = read(msg, endpoint)
    if problem is not None:
        raise DecodeError(problem)
    return record, attempt


def read(msg: ServiceBusReceivedMessage, endpoint: Endpoint) -> tuple[Record, int, str | None]:
    """``decode``, never failing: what a receive uses, since one damaged message must not make the receive
    of its whole batch raise. A property msgbus cannot read is left at its default (no prior attempts, the
    enqueued time, an empty body) and named in the third item, for the core to dead-letter the message; the
    headers (and, from a dead-letter sub-queue, the dead-letter ones) are kept either way."""
    props: Mapping[Any, Any] = msg.application_properties or {}
    text = {_text(k): v for k, v in props.items()}
    headers = {k: _text(v) for k, v in text.items() if k not in _PRIVATE and k not in (DL_REASON, DL_DESCRIPTION)}
    problems: list[str] = []
    try:
        prior = int(_text(text.get(PRIOR_ATTEMPTS, "0")))
    except ValueError as exc:
        prior = 0
        problems.append(f"{PRIOR_ATTEMPTS}: {exc}")
    try:
        timestamp = _timestamp(msg, text)
    except ValueError as exc:
        timestamp = _enqueued(msg)
        problems.append(f"{TIMESTAMP}: {exc}")
    try:
        body = _body(msg)
    except DecodeError as exc:
        body = b""
        problems.append(str(exc))
    attempt = prior + (msg.delivery_count or 0) + 1
    if endpoint.dead_letter:
        why = _text(text.get(DL_DESCRIPTION, ""))
        found = _ATTEMPTS_TEXT.search(why)
        headers[HEADER_DEAD_LETTER_REASON] = _text(text.get(DL_REASON, "")) or why
        headers[HEADER_ATTEMPTS] = found.group(1) if found else str(attempt)
        headers[HEADER_DEAD_LETTER_SOURCE] = str(Endpoint(endpoint.kind, endpoint.name, endpoint.subscription))
    record = Record(
        body=body,
        id=_message_id(msg, text),
        headers=headers,
        key=_text(text[KEY]) if KEY in text else msg.partition_key,
        correlation_id=None if msg.correlation_id is None else str(msg.correlation_id),
        content_type=msg.content_type,
        timestamp=timestamp,
    )
    problem = f"malformed msgbus property on message {record.id}: {'; '.join(problems)}" if problems else None
    return record, attempt, problem


def _message_id(msg: ServiceBusReceivedMessage, props: Mapping[str, Any]) -> str:
    """The msgbus message id: the one carried beside a duplicate detection key, else the MessageId, else (a
    message sent without one) the sequence number."""
    if MESSAGE_ID in props:
        return _text(props[MESSAGE_ID])
    return str(msg.message_id) if msg.message_id is not None else str(msg.sequence_number)


def _timestamp(msg: ServiceBusReceivedMessage, props: Mapping[str, Any]) -> float:
    """The creation time (the older ``x-msgbus-timestamp`` first), else the enqueued time; ``ValueError`` for a
    value that is not a time."""
    if TIMESTAMP in props:
        value = float(_text(props[TIMESTAMP]))
    else:
        amqp = msg.raw_amqp_message.properties
        created = None if amqp is None else amqp.creation_time
        if created is None:
            return _enqueued(msg)
        value = int(created) / 1000
    if not 0 <= value < TIMESTAMP_LIMIT:  # also false for NaN
        raise ValueError(f"{value!r} is not a time in seconds since the epoch")
    return value


def _enqueued(msg: ServiceBusReceivedMessage) -> float:
    when = msg.enqueued_time_utc
    return when.timestamp() if when is not None else 0.0
