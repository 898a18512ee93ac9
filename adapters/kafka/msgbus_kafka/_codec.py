"""Record <-> Kafka record, and the commit-metadata format. Pure: no I/O.

Native first, so other Kafka code reads and writes msgbus messages: the body is the record's value, the key
its key (UTF-8), the timestamp its timestamp (milliseconds: ``CreateTime``), and the id, correlation id and
content type are the headers ``message-id``, ``correlation-id`` and ``content-type`` (the name CloudEvents'
Kafka binding uses); user headers are Kafka headers of their own (UTF-8 values). A record from other code
gets ``topic-partition-offset`` as its id (stable across redeliveries, distinct per record) and its content
type from any common spelling (``content-type``, ``contentType``, ``content_type``...). Records written by
msgbus before issue 18 (``x-msgbus-id``, ``-timestamp``, ``-correlation-id``, ``-content-type``) still read.

A user header may itself be named ``content-type`` (the CloudEvents binding's ``datacontenttype`` of an event
without data, say) or ``message-id``/``correlation-id``: it stays a header, and that field of msgbus's travels
under its ``x-msgbus-`` name instead (read first on receipt), so both round-trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from msgbus.adapter import TIMESTAMP_LIMIT, Record, content_type_from
from msgbus.errors import InvalidMessage

ID = "message-id"
CORRELATION_ID = "correlation-id"
CONTENT_TYPE = "content-type"
NATIVE = frozenset({ID, CORRELATION_ID, CONTENT_TYPE})
# The format before issue 18, still read for records already in topics.
OLD_ID = "x-msgbus-id"
OLD_CORRELATION_ID = "x-msgbus-correlation-id"
OLD_CONTENT_TYPE = "x-msgbus-content-type"
OLD_TIMESTAMP = "x-msgbus-timestamp"
_OLD = frozenset({OLD_ID, OLD_CORRELATION_ID, OLD_CONTENT_TYPE, OLD_TIMESTAMP})

MAX_METADATA = 4000  # offset.metadata.max.bytes defaults to 4096


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """What the producer sends: value, key and headers as aiokafka takes them."""

    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int | None


def encode(record: Record) -> KafkaRecord:
    """The Kafka record for ``record``: msgbus's fields first, then user headers.

    ``InvalidMessage`` for a record that is not what ``Record`` says (the core checked those it built).
    """
    try:
        return _encode(record)
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidMessage(f"record {record.id!r:.60} cannot be sent: {exc}") from None


def _encode(record: Record) -> KafkaRecord:
    if not isinstance(record.body, bytes):
        raise TypeError(f"the body is a {type(record.body).__name__}, not bytes")
    if not 0 <= record.timestamp < TIMESTAMP_LIMIT:  # NaN too
        raise ValueError(f"the timestamp {record.timestamp!r} is not a time in seconds since the epoch")
    user = record.headers
    headers = [(OLD_ID if ID in user else ID, record.id.encode())]
    if record.correlation_id is not None:
        headers.append(
            (OLD_CORRELATION_ID if CORRELATION_ID in user else CORRELATION_ID, record.correlation_id.encode())
        )
    if record.content_type is not None:
        headers.append((OLD_CONTENT_TYPE if CONTENT_TYPE in user else CONTENT_TYPE, record.content_type.encode()))
    headers += [(k, v.encode()) for k, v in user.items()]
    return KafkaRecord(
        value=record.body,
        key=None if record.key is None else record.key.encode(),
        headers=headers,
        timestamp_ms=round(record.timestamp * 1000) if record.timestamp > 0 else None,  # round: re-sent stays put
    )


def decode(
    value: bytes | None,
    key: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    timestamp_ms: int,
    fallback_id: str,
) -> Record:
    """The record in a Kafka record. Never fails: a record not written by msgbus gets ``fallback_id``
    (``topic-partition-offset``, stable across redeliveries) and Kafka's timestamp; bytes that are not
    UTF-8 in a header or key are replaced (U+FFFD) rather than dropping the message."""
    own: dict[str, str] = {}
    user: dict[str, str] = {}
    for name, raw in headers:
        text = (raw or b"").decode(errors="replace")
        (own if name in _OLD else user)[name] = text
    timestamp = timestamp_ms / 1000 if timestamp_ms and timestamp_ms > 0 else 0.0
    if own:  # written by msgbus before issue 18, or a user header under a native field's name
        old_ts = own.get(OLD_TIMESTAMP)
        if old_ts is not None:  # a header of another producer may hold anything: only a time replaces Kafka's
            try:
                exact = float(old_ts)
            except ValueError:
                exact = -1.0
            if 0 <= exact < TIMESTAMP_LIMIT:
                timestamp = exact
        message_id, correlation_id, content_type = (
            own[OLD_ID] if OLD_ID in own else _native(user, ID),
            own[OLD_CORRELATION_ID] if OLD_CORRELATION_ID in own else _native(user, CORRELATION_ID),
            own[OLD_CONTENT_TYPE] if OLD_CONTENT_TYPE in own else _native(user, CONTENT_TYPE),
        )
    else:
        message_id, correlation_id, content_type = (
            _native(user, ID),
            _native(user, CORRELATION_ID),
            _native(user, CONTENT_TYPE),
        )
    if content_type is None and user:
        content_type = content_type_from(user)  # another spelling (contentType...): it stays a header too
    return Record(
        body=value or b"",
        id=message_id or fallback_id,
        headers=user,
        key=None if key is None else key.decode(errors="replace"),
        correlation_id=correlation_id,
        content_type=content_type,
        timestamp=timestamp,
    )


def _native(user: dict[str, str], name: str) -> str | None:
    """The field under its native header ``name``, taken out of the user headers."""
    return user.pop(name, None)


# --- commit metadata: what a partition's next owner must know beyond the committed offset ---


@dataclass(frozen=True, slots=True)
class PartitionNotes:
    """Offsets at or after the committed offset that are already settled (``settled``: skip them) and
    offsets that were delivered and not settled, with how many times (``attempts``: the next delivery is
    attempt n+1, also after a crash)."""

    settled: frozenset[int] = frozenset()
    attempts: Mapping[int, int] = field(default_factory=dict)


_VERSION = "msgbus1"


def encode_notes(
    settled: Iterable[int], attempts: Mapping[int, int], limit: int = MAX_METADATA, ahead: range = range(0)
) -> str:
    """``msgbus1|s:<ranges>|a:<range>=<n>,...``; attempts are dropped first, then settled ranges,
    to stay within ``limit`` (losing them costs a redelivery or an attempt count, never a message).

    Attempts are written as runs of consecutive offsets with the same count (``40-551=1``): a full credit of
    records handed out once each is one short entry, not one per record. ``ahead`` (offsets not fetched yet,
    claimed as delivered once) comes first, so a count in ``attempts`` for one of them wins when read back."""
    ranges = _ranges(sorted(set(settled)))
    delivered = _runs(attempts)
    if len(ahead):
        first = f"{ahead[0]}-{ahead[-1]}=1"
        delivered = f"{first},{delivered}" if delivered else first
    text = f"{_VERSION}|s:{ranges}|a:{delivered}"
    if len(text) <= limit:
        return text
    text = f"{_VERSION}|s:{ranges}|a:"
    while len(text) > limit:
        ranges = ranges[: ranges.rfind(",")] if "," in ranges else ""
        text = f"{_VERSION}|s:{ranges}|a:"
    return text


def decode_notes(text: str | None) -> PartitionNotes:
    """The notes in commit metadata; anything else (empty, another tool's metadata) means none."""
    if not text or not text.startswith(_VERSION + "|"):
        return PartitionNotes()
    settled: set[int] = set()
    attempts: dict[int, int] = {}
    try:
        for part in text.split("|")[1:]:
            kind, _, body = part.partition(":")
            if kind == "s" and body:
                for item in body.split(","):
                    lo, _, hi = item.partition("-")
                    settled.update(range(int(lo), int(hi or lo) + 1))
            elif kind == "a" and body:
                for item in body.split(","):
                    span, _, n = item.partition("=")
                    lo, _, hi = span.partition("-")
                    attempts.update(dict.fromkeys(range(int(lo), int(hi or lo) + 1), int(n)))
    except ValueError:
        return PartitionNotes()
    return PartitionNotes(frozenset(settled), attempts)


def _runs(attempts: Mapping[int, int]) -> str:
    """``lo-hi=n`` for each run of consecutive offsets with the same count ``n`` (``o=n`` for a run of one)."""
    out: list[str] = []
    start = prev = count = -1
    for o in sorted(attempts):
        n = attempts[o]
        if o == prev + 1 and n == count:
            prev = o
            continue
        if start >= 0:
            out.append(f"{start}={count}" if start == prev else f"{start}-{prev}={count}")
        start = prev = o
        count = n
    if start >= 0:
        out.append(f"{start}={count}" if start == prev else f"{start}-{prev}={count}")
    return ",".join(out)


def _ranges(offsets: list[int]) -> str:
    out: list[str] = []
    start = prev = None
    for o in offsets:
        if start is None:
            start = prev = o
        elif o == (prev or 0) + 1:
            prev = o
        else:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = o
    if start is not None:
        out.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(out)
