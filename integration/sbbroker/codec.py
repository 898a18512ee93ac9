"""AMQP 1.0 message sections, edited in place: the body a client sent is forwarded byte for byte.

proton's ``Message`` re-encodes a decoded data body as an amqp-value, which the SDK would read back
as a different body type, so stored messages stay raw and only the header, message annotations and
application properties are rewritten on delivery.
"""

from __future__ import annotations

from typing import Any

from proton import Data, DataException, Described, symbol, timestamp, uint, ulong

HEADER, DELIVERY_ANNOTATIONS, ANNOTATIONS, PROPERTIES, APP_PROPERTIES = 0x70, 0x71, 0x72, 0x73, 0x74
DATA, FOOTER = 0x75, 0x78


def sections(raw: bytes) -> list[tuple[int, bytes, Any]]:
    """``(descriptor, encoded bytes, decoded value)`` for each section of an encoded message."""
    out: list[tuple[int, bytes, Any]] = []
    pos = 0
    while pos < len(raw):
        data = Data()
        used = data.decode(raw[pos:])
        data.rewind()
        data.next()
        section = data.get_object()
        if not isinstance(section, Described):
            raise ValueError("not an AMQP message: a section is not a described value")
        out.append((int(section.descriptor), raw[pos : pos + used], _copy(section.value)))
        pos += used
    return out


def _copy(value: Any) -> Any:
    # proton hands out memoryviews into buffers it frees later (see the notes): copy them.
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {_copy(k): _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def split_batch(raw: bytes) -> list[bytes]:
    """The messages in one transfer: the inner messages of an SDK batch (format 0x80013700), else ``[raw]``.

    proton 0.40 does not expose the transfer's message format, so a batch is recognised by its shape: no
    application properties, only data sections that each hold an encoded message, and an envelope
    message-id (when there is one) equal to the first inner message's id.
    """
    parts = sections(raw)
    datas = [bytes(value) for code, _, value in parts if code == DATA]
    if not datas or any(code == APP_PROPERTIES for code, _, _ in parts):
        return [raw]
    if not all(len(d) > 3 and d[:2] == b"\x00\x53" and HEADER <= d[2] <= FOOTER for d in datas):
        return [raw]
    envelope_id = _message_id(parts)
    try:
        first_id = _message_id(sections(datas[0]))
    except ValueError:
        return [raw]
    return datas if envelope_id is None or envelope_id == first_id else [raw]


def _message_id(parts: list[tuple[int, bytes, Any]]) -> Any:
    for code, _, value in parts:
        if code == PROPERTIES and value:
            return value[0]
    return None


def group_id(raw: bytes) -> str | None:
    """The message's group-id (Service Bus' SessionId), or None."""
    try:
        parts = sections(raw)
    except (ValueError, DataException):  # not an AMQP message (the store's own tests store plain bytes)
        return None
    for code, _, value in parts:
        if code == PROPERTIES and isinstance(value, list) and len(value) > 10 and value[10] is not None:
            return str(value[10])
    return None


def message_id(raw: bytes) -> str | None:
    """The message's message-id as text (what duplicate detection compares), or None when it has none."""
    try:
        value = _message_id(sections(raw))
    except (ValueError, DataException):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _encode(code: int, value: Any) -> bytes:
    data = Data()
    data.put_object(Described(ulong(code), value))
    return bytes(data.encode())


def message_annotations(raw: bytes) -> dict[str, Any]:
    """The message annotations of an encoded message, keys as plain strings."""
    for code, _, value in sections(raw):
        if code == ANNOTATIONS and isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
    return {}


def rewrite(
    raw: bytes, *, delivery_count: int, annotations: dict[str, Any], properties: dict[str, Any] | None = None
) -> bytes:
    """``raw`` with its header's delivery-count set and ``annotations``/``properties`` merged in."""
    header: list[Any] = [True, None, None, None, None]
    ann: dict[Any, Any] = {}
    app: dict[Any, Any] | None = None
    kept: list[tuple[int, bytes]] = []
    for code, encoded, value in sections(raw):
        if code == HEADER:
            header = (list(value) + [None] * 5)[:5]
        elif code == ANNOTATIONS:
            ann = dict(value)
        elif code == APP_PROPERTIES:
            app = dict(value)
        elif code != DELIVERY_ANNOTATIONS:
            kept.append((code, encoded))
    header[3] = delivery_count == 0
    header[4] = uint(delivery_count)
    ann.update({symbol(k): v for k, v in annotations.items()})
    if properties:
        app = {**(app or {}), **properties}
    out = [_encode(HEADER, header), _encode(ANNOTATIONS, ann)]
    for code, encoded in kept:
        if code > APP_PROPERTIES and app is not None:
            out.append(_encode(APP_PROPERTIES, app))
            app = None
        out.append(encoded)
    if app is not None:
        out.append(_encode(APP_PROPERTIES, app))
    return b"".join(out)


def ms(seconds: float) -> timestamp:
    """An AMQP timestamp (milliseconds since the epoch)."""
    return timestamp(int(seconds * 1000))
