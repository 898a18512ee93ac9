"""Record <-> Kafka record, and the commit-metadata format. Pure: no I/O.

A Kafka record carries the body as its value, the key as its key (UTF-8), user headers as Kafka headers
(UTF-8 values) and msgbus's own fields in four headers below; the exact float timestamp travels in a
header because Kafka's record timestamp has millisecond resolution (it is set too, for Kafka tools).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from msgbus.adapter import TIMESTAMP_LIMIT, Record
from msgbus.errors import InvalidMessage

ID = "x-msgbus-id"
CORRELATION_ID = "x-msgbus-correlation-id"
CONTENT_TYPE = "x-msgbus-content-type"
TIMESTAMP = "x-msgbus-timestamp"
_OWN = frozenset({ID, CORRELATION_ID, CONTENT_TYPE, TIMESTAMP})

MAX_METADATA = 4000  # offset.metadata.max.bytes defaults to 4096


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """What the producer sends: value, key and headers as aiokafka takes them."""

    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int | None


def encode(record: Record) -> KafkaRecord:
    """The Kafka record for ``record``: user headers first, then msgbus's fields.

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
    headers = [(k, v.encode()) for k, v in record.headers.items()]
    headers.append((ID, record.id.encode()))
    headers.append((TIMESTAMP, repr(record.timestamp).encode()))
    if record.correlation_id is not None:
        headers.append((CORRELATION_ID, record.correlation_id.encode()))
    if record.content_type is not None:
        headers.append((CONTENT_TYPE, record.content_type.encode()))
    return KafkaRecord(
        value=record.body,
        key=None if record.key is None else record.key.encode(),
        headers=headers,
        timestamp_ms=int(record.timestamp * 1000) if record.timestamp > 0 else None,
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
        (own if name in _OWN else user)[name] = text
    try:
        timestamp = float(own[TIMESTAMP])
    except (KeyError, ValueError):
        timestamp = timestamp_ms / 1000 if timestamp_ms and timestamp_ms > 0 else 0.0
    return Record(
        body=value or b"",
        id=own.get(ID) or fallback_id,
        headers=user,
        key=None if key is None else key.decode(errors="replace"),
        correlation_id=own.get(CORRELATION_ID),
        content_type=own.get(CONTENT_TYPE),
        timestamp=timestamp,
    )


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
