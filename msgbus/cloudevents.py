"""CloudEvents 1.0 over any msgbus backend (``pip install 'msgbus[cloudevents]'``; docs/cloudevents.md).

``to_outgoing(event)`` makes an ``Outgoing`` for ``send_many`` / ``publish_many``: in binary mode the attributes
travel as headers (``ce_type``, ...; the prefix of the Kafka binding, or the AMQP binding's ``cloudEvents_``)
and the data as the body, with ``datacontenttype`` as the content type; in structured mode the whole event is
the body, ``application/cloudevents+json``. ``from_message(msg)`` reads either back; a message that is not a
valid CloudEvent raises ``DecodeError``. The event type is the SDK's ``cloudevents.core.v1.event.CloudEvent``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

try:
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent
except ImportError as exc:  # pragma: no cover - the extra is part of the dev install
    raise ImportError("msgbus.cloudevents needs the CloudEvents SDK: pip install 'msgbus[cloudevents]'") from exc

from . import _codec
from ._bus import Bus
from ._message import Message, Outgoing
from .errors import DecodeError, InvalidMessage

__all__ = [
    "AMQP_PREFIX",
    "KAFKA_PREFIX",
    "STRUCTURED_CONTENT_TYPE",
    "CloudEvent",
    "from_message",
    "header_prefix",
    "to_outgoing",
]

KAFKA_PREFIX = "ce_"  # Kafka protocol binding: headers ce_<attribute>, lower case
AMQP_PREFIX = "cloudEvents_"  # AMQP binding: application properties cloudEvents_<attribute> (or cloudEvents:)
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"

# The binding whose prefix a CloudEvents-speaking consumer on that broker expects; the rest take Kafka's, whose
# prefix every backend can store as a header name (SQS refuses ':', so never the AMQP binding's other form).
_PREFIX_BY_SCHEME = {"amqp": AMQP_PREFIX, "amqps": AMQP_PREFIX, "servicebus": AMQP_PREFIX}
_PREFIXES = (KAFKA_PREFIX, AMQP_PREFIX, "cloudEvents:")
_PARTITION_KEY = "partitionkey"  # the Partitioning extension: the message key
_FORMAT = JSONFormat()


def header_prefix(bus: Bus) -> str:
    """The binary-mode header prefix of the protocol binding for ``bus``'s broker: AMQP's ``cloudEvents_`` on
    RabbitMQ and Service Bus, Kafka's ``ce_`` elsewhere."""
    return _PREFIX_BY_SCHEME.get(bus.url.partition(":")[0], KAFKA_PREFIX)


def to_outgoing(
    event: CloudEvent, *, mode: Literal["binary", "structured"] = "binary", prefix: str = KAFKA_PREFIX
) -> Outgoing:
    """The message that carries ``event``; its ``partitionkey`` extension, if any, becomes the message key.

    Binary mode: each attribute a header ``<prefix><name>`` (``time`` in RFC 3339), the data the body encoded by
    ``datacontenttype`` (the msgbus codec's default for the data's type when the event has none: it is then
    part of what is received). Extension values travel as strings, as the bindings say.
    """
    if prefix not in _PREFIXES[:2]:
        raise InvalidMessage(f"CloudEvents header prefix must be {KAFKA_PREFIX!r} or {AMQP_PREFIX!r}, not {prefix!r}")
    attributes = event.get_attributes()
    key = attributes.get(_PARTITION_KEY)
    key = None if key is None else str(key)
    if mode == "structured":
        return Outgoing(_FORMAT.write(event), key=key, content_type=STRUCTURED_CONTENT_TYPE)
    if mode != "binary":
        raise InvalidMessage(f"CloudEvents mode must be 'binary' or 'structured', not {mode!r}")
    headers = {f"{prefix}{name}": _text(value) for name, value in attributes.items() if name != "datacontenttype"}
    data = event.get_data()
    content_type = attributes.get("datacontenttype")
    if content_type is not None and prefix == KAFKA_PREFIX:
        # The Kafka binding's datacontenttype header; msgbus's own content type travels apart (x-msgbus-content-type)
        headers["content-type"] = str(content_type)
    if data is None:
        return Outgoing(b"", key=key, headers=headers, content_type=_codec.BYTES)
    return Outgoing(data, key=key, headers=headers, content_type=content_type)


def from_message(msg: Message[Any]) -> CloudEvent:
    """The CloudEvent ``msg`` carries, in structured mode (by its content type) or binary mode (by its headers).

    Raises ``DecodeError`` when it is neither, or holds an invalid event (a missing ``id``, a bad ``time``, JSON
    that is not an event object...): the runtime dead-letters a message whose handler raises it like any other.
    """
    base = (msg.content_type or "").split(";", 1)[0].strip().lower()
    try:
        if base == "application/cloudevents+json":
            event = _FORMAT.read(CloudEvent, msg.payload)
            assert isinstance(event, CloudEvent)  # the factory given
            return event
        attributes: dict[str, Any] = {}
        for name, value in msg.headers.items():
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    attr = name[len(prefix) :]
                    attributes[attr] = _parse_time(value) if attr == "time" else value
        if "specversion" not in attributes:
            raise DecodeError(f"message {msg.id!r} is not a CloudEvent: no specversion header and not {base!r}")
        if attributes["specversion"] != "1.0":
            raise DecodeError(f"CloudEvents specversion {attributes['specversion']!r} is not supported (1.0 only)")
        data = None
        if msg.payload:
            if msg.content_type:  # the event's datacontenttype, application/octet-stream included
                attributes["datacontenttype"] = msg.content_type
            data = _codec.decode(msg.payload, msg.content_type)
        return CloudEvent(attributes, data)
    except DecodeError:
        raise
    except Exception as exc:  # the SDK's parser and validation on untrusted input: any failure is a bad event
        raise DecodeError(f"message {msg.id!r} is not a valid CloudEvent: {_codec.describe(exc)}") from exc


def _text(value: object) -> str:
    if isinstance(value, datetime):
        text = value.astimezone(UTC).isoformat() if value.tzinfo else value.isoformat()
        return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text
    return str(value)


def _parse_time(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise DecodeError(f"CloudEvents time {value[:64]!r} is not an RFC 3339 timestamp") from exc
