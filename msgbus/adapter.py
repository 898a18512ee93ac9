"""The adapter interface: what a backend implements so the four roles work on it.

An adapter moves ``Record`` objects (bytes plus metadata) to and from named endpoints; the core
does everything else (codecs, retries, dead-letter policy, concurrency, shutdown). Adapters
register a factory ``(BusURL, OptionReader) -> Adapter`` under the entry-point group
``msgbus.adapters`` keyed by URL scheme; the factory reads its options from the ``OptionReader``
(unknown ones are rejected after it returns). Every method raises ``msgbus.errors`` types only
(translate in one place: an ``ErrorTable`` of the client library's exceptions).

This module is the whole public kit for adapter authors: an adapter distribution imports from
``msgbus.adapter`` and ``msgbus.errors`` only, never from a private ``msgbus._*`` module
(``tests/test_api.py`` enforces it for the adapters in this repository).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from ._capabilities import Capabilities, has
from ._hold import KeyHold
from ._translate import ErrorRow, ErrorTable
from ._url import REDACTED, BusURL, OptionReader, redact, url_from_connection_string
from ._waits import wait_set
from .errors import CapabilityMissing, ConfigError, InvalidMessage

__all__ = [
    "HEADER_ATTEMPTS",
    "HEADER_DEAD_LETTER_HISTORY",
    "HEADER_DEAD_LETTER_REASON",
    "HEADER_DEAD_LETTER_SOURCE",
    "HEADER_REPLY_TO",
    "MAX_DEAD_LETTER_REASON",
    "PREFETCH_BYTES",
    "REDACTED",
    "RESERVED_HEADER_PREFIX",
    "STATS",
    "TIMESTAMP_LIMIT",
    "Adapter",
    "BusURL",
    "Capabilities",
    "Delivery",
    "Endpoint",
    "ErrorRow",
    "ErrorTable",
    "KeyHold",
    "OptionReader",
    "Receiver",
    "Record",
    "content_type_from",
    "dead_letter_reason",
    "dead_letter_record",
    "dedup_key",
    "deleted_queue",
    "has",
    "redact",
    "url_from_connection_string",
    "wait_set",
]

RESERVED_HEADER_PREFIX = "x-msgbus-"
HEADER_DEAD_LETTER_REASON = "x-msgbus-dead-letter-reason"
HEADER_DEAD_LETTER_SOURCE = "x-msgbus-dead-letter-source"
HEADER_ATTEMPTS = "x-msgbus-attempts"
#: Why a redriven message died before (``Bus.redrive``), a JSON list; ``msgbus.HEADER_DEAD_LETTER_HISTORY``.
HEADER_DEAD_LETTER_HISTORY = "x-msgbus-dead-letter-history"
#: The queue a request's reply goes to (``Bus.request``, ``Message.reply``); its reply carries the request's id as
#: its correlation id.
HEADER_REPLY_TO = "x-msgbus-reply-to"
#: Timestamps are seconds since the epoch before this one (10000-01-01, the end of ``datetime``'s range).
TIMESTAMP_LIMIT = 253402300800.0
#: Longest dead-letter reason, in characters (at most 4 KiB as UTF-8); longer ones are cut (``dead_letter_reason``).
MAX_DEAD_LETTER_REASON = 1024
#: The most bytes of message bodies one consumer holds fetched and unsettled, whatever its ``prefetch`` (a
#: count): with large messages this bound is reached first, so a queue of 1 MiB messages at a credit of 512
#: holds about 32 MiB, not 512. A receiver that reads ahead of what the core asked for (Kafka's pump) bounds
#: its read-ahead by the same figure. A single message larger than the bound is still received, one at a time.
PREFETCH_BYTES = 32 * 1024 * 1024
#: The figures ``Adapter.stats`` may report, in the order ``msgbus stats`` shows them.
STATS = ("depth", "in_flight", "dead_letters", "consumers", "oldest_age")


@dataclass(slots=True)
class Record:
    """A message as an adapter sees it: encoded body plus the metadata every backend carries.

    Treat it as immutable (use ``dataclasses.replace``); it is not frozen only because frozen
    dataclasses cost a noticeable share of the per-message send path.
    """

    body: bytes
    id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    key: str | None = None
    correlation_id: str | None = None
    content_type: str | None = None
    timestamp: float = 0.0

    def size(self) -> int:
        """Bytes counted against a backend's message size limit (body + metadata, text as UTF-8).

        Raises ``InvalidMessage`` for a record that cannot go on any wire: a body that is not bytes,
        metadata that is not text, text that is not encodable (a lone surrogate), a timestamp that is not a
        finite number >= 0. Every adapter's ``send`` measures its records, so a malformed one is refused
        there, typed, before anything is stored.
        """
        try:
            if not isinstance(self.body, bytes):
                raise TypeError(f"the body is a {type(self.body).__name__}, not bytes")
            ts = self.timestamp
            if not isinstance(ts, int | float) or isinstance(ts, bool) or not 0 <= ts < TIMESTAMP_LIMIT:
                raise TypeError(f"the timestamp {ts!r:.40} is not a time in seconds since the epoch")
            n = len(self.body) + len(self.id.encode())
            for text in (self.key, self.correlation_id, self.content_type):
                if text is not None:
                    n += len(text.encode())
            for k, v in self.headers.items():
                n += len(k.encode()) + len(v.encode())
        except (TypeError, AttributeError, UnicodeError) as exc:
            raise InvalidMessage(f"record {_shown(self.id)} cannot be sent: {exc}") from None
        return n


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where messages go or come from.

    ``kind="queue"``: a work queue ``name``. ``kind="topic"``: topic ``name``; to receive,
    ``subscription`` names the durable subscription. ``dead_letter=True`` addresses the
    dead-letter destination that belongs to that queue or subscription.
    """

    kind: Literal["queue", "topic"]
    name: str
    subscription: str | None = None
    dead_letter: bool = False

    def __str__(self) -> str:
        text = self.name if self.subscription is None else f"{self.name}/{self.subscription}"
        return f"{self.kind}:{text}" + (" (dead letters)" if self.dead_letter else "")


def content_type_from(headers: Mapping[str, str]) -> str | None:
    """The content type a message written by other code names in its headers, under any common spelling
    (``content-type``, ``Content-Type``, ``contentType``, ``content_type``; case and ``-``/``_`` ignored), for
    adapters reading messages that carry it as a header rather than in a native property. A value that is not
    short printable text (at most 256 characters) names none: the message is then untyped, not rejected."""
    for name, value in headers.items():
        if _CONTENT_TYPE_NAME.fullmatch(name) and isinstance(value, str):
            value = value.strip()
            if 0 < len(value) <= 256 and value.isprintable():
                return value
    return None


_CONTENT_TYPE_NAME = re.compile("content[-_]?type", re.IGNORECASE)


def dedup_key(record: Record) -> str:
    """What a backend with send deduplication (``Capabilities.dedup_window``) recognises a repeated send by: the
    message id, which a retried send repeats. A redriven message keeps its id but is a new send, not a repeat: its
    key is a hash of the id and its dead-letter history (the same for a retried redrive). At most 64 characters of
    ``[0-9a-f]`` or the id itself when that is printable ASCII of at most 128 (SQS's MessageDeduplicationId)."""
    history = record.headers.get(HEADER_DEAD_LETTER_HISTORY)
    if history is None and _DEDUP_SAFE.fullmatch(record.id):
        return record.id
    return hashlib.sha256(f"{record.id}\n{history or ''}".encode(errors="surrogatepass")).hexdigest()


_DEDUP_SAFE = re.compile(r"[\x21-\x7e]{1,128}")


def dead_letter_reason(text: str) -> str:
    """``text`` as a dead-letter reason every backend can store: at most ``MAX_DEAD_LETTER_REASON``
    characters (cut with ``...``), with control characters other than tab and newline, lone surrogates
    and other code points a header cannot hold replaced by U+FFFD. Idempotent."""
    if not isinstance(text, str):
        text = repr(text)
    if len(text) > MAX_DEAD_LETTER_REASON:
        text = text[: MAX_DEAD_LETTER_REASON - 3] + "..."
    if not (text.isascii() and text.isprintable()):
        text = _UNSTORABLE.sub("\ufffd", text)
    return text


# What no header of some backend can hold (SQS attributes take only XML characters; NUL ends C strings).
_UNSTORABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def _shown(text: object) -> str:
    """A record id for an error message: short, and printable whatever it holds."""
    return repr(text)[:80]


def dead_letter_record(record: Record, reason: str, attempts: int, source: Endpoint) -> Record:
    """The record to store in a dead-letter destination: original body and headers plus why.

    The reason goes through ``dead_letter_reason`` (bounded and storable on every backend).
    """
    headers = dict(record.headers)
    headers[HEADER_DEAD_LETTER_REASON] = dead_letter_reason(reason)
    headers[HEADER_ATTEMPTS] = str(attempts)
    headers[HEADER_DEAD_LETTER_SOURCE] = str(replace(source, dead_letter=False))
    return replace(record, headers=headers)


class Delivery(abc.ABC):
    """One received message and the handle that settles it. Settling twice is the core's to prevent."""

    __slots__ = ("attempt", "problem", "raw", "record")

    def __init__(self, record: Record, attempt: int, raw: object = None, problem: str | None = None) -> None:
        self.record = record
        self.attempt = attempt  # 1 on first delivery
        self.raw = raw
        # Why the adapter could not read this message (its metadata is damaged, or it was not written by
        # msgbus), with ``record`` holding what it could read (at least the raw body): never raise from
        # ``receive`` over one message, which would strand its whole batch. The core dead-letters it with
        # ``DecodeError: <problem>`` (a dead-letter consumer gets it raw).
        self.problem = problem

    @abc.abstractmethod
    async def ack(self) -> None:
        """Remove the message for good."""

    @abc.abstractmethod
    async def nack(self, delay: float | None = None) -> None:
        """Make the message available again (after ``delay`` seconds where supported)."""

    @abc.abstractmethod
    async def dead_letter(self, reason: str) -> None:
        """Move the message to the dead-letter destination (``dead_letter_record``) and remove it here."""

    async def extend(self, seconds: float) -> None:  # noqa: B027 - optional hook
        """Keep the message invisible to other consumers for ``seconds`` more (lock backends)."""


class Receiver(abc.ABC):
    """Pulls deliveries from one endpoint. The core keeps the prefetch limit: it asks ``receive`` for at most
    the room it has left, so a receiver returns what it is asked for and does not count unsettled deliveries."""

    @abc.abstractmethod
    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for at least one delivery; return up to ``max_messages``."""

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack several deliveries; adapters with a batch ack override this."""
        for d in deliveries:
            await d.ack()

    async def release_many(self, deliveries: Sequence[Delivery]) -> None:
        """Give back deliveries ``receive`` returned that no handler got (a stopping consumer's buffer), so other
        consumers get them now; where the backend can, without counting a delivery (nobody attempted them: a
        message handed back by every restart must not reach the delivery limit unhandled). The default nacks
        each, all at once (adapters that batch settlements send a few calls); raises the first failure after."""
        results = await asyncio.gather(*(d.nack() for d in deliveries), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """Return once every settlement made so far is durable. Adapters whose ``ack_many`` only records an
        ack for a later commit (``capabilities.ack_delay``) override this; the runtime calls it before and
        after a redelivered message runs alone (``msgbus._redelivery``)."""

    async def release(self) -> None:  # noqa: B027 - optional hook
        """Give back what was fetched but not returned by ``receive`` yet (read-ahead, credit the broker pushed),
        so other consumers get it now, not when this receiver closes or its lock expires. ``run()`` calls it
        when it stops; receiving again afterwards must work. Adapters without such a buffer need nothing."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving. Unsettled deliveries are released by the broker (or by their lock expiring)."""


class Adapter(abc.ABC):
    """A connection to one backend."""

    capabilities: Capabilities
    url: BusURL
    #: Whether concurrent single sends to one endpoint should go out together (``msgbus._coalesce``): true
    #: for anything with a round trip; an in-process backend whose ``send`` never waits sets it false.
    coalesce_sends: bool = True
    #: The backend's natural credit: the prefetch ``run()`` and ``run_batch()`` use when the user sets none
    #: (raised to what the workers need, ``2 x concurrency`` messages or two batches each). A whole fetch where
    #: one receive returns many for one round trip (a Kafka fetch, a Redis stream read), so a consumer at
    #: defaults pays a round trip per that many messages; near what handlers finish within a lock period where
    #: a held message's lock runs (SQS, Service Bus), so it is not held while others could take it. Set it with
    #: the reason in a comment. ``PREFETCH_BYTES`` bounds the bytes it stands for.
    credit: int = 16

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect. Raises ``ConnectionLost`` when the backend cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; idempotent."""

    @abc.abstractmethod
    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create the endpoint (with its dead-letter destination) if missing; idempotent.

        For a subscription endpoint this creates the topic and the subscription, after which every
        message published to the topic reaches it. With ``create=False`` (the ``topology=verify``
        option) only check that it exists, raising ``TopologyError`` when it does not.
        """

    @abc.abstractmethod
    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """Store ``records`` at a queue or topic; return only once the backend has them durably."""

    @abc.abstractmethod
    async def receiver(self, endpoint: Endpoint, prefetch: int) -> Receiver:
        """Start receiving from a queue, a subscription, or a dead-letter destination. ``prefetch`` (the most
        the consumer holds unsettled) sizes a broker's credit or read-ahead window, where it has one."""

    async def ping(self) -> None:
        """One cheap round trip to the backend on the open connection (a metadata call), raising ``ConnectionLost``
        or ``BrokerError`` when it fails. ``Bus.ping`` opens the adapter first and bounds both with its timeout."""
        raise CapabilityMissing(f"{type(self).__name__} has no health check (Adapter.ping)")

    async def stats(self, endpoint: Endpoint) -> Mapping[str, float] | None:
        """What the backend reports about a queue or subscription, by name (``STATS``: ``depth``, ``in_flight``,
        ``dead_letters``, ``consumers``, ``oldest_age`` in seconds), leaving out what it does not know; ``None``
        when the adapter reports nothing (``msgbus stats`` says so)."""
        return None

    async def delete(self, endpoint: Endpoint) -> None:
        """Remove a work queue and what the adapter made for it (its dead-letter destination, groups, rows), with
        their messages, and nothing else; a queue that does not exist is not an error. ``deleted_queue`` names the
        queue. ``Bus.close`` removes its reply queue through it, ``msgbus delete`` any queue."""
        raise CapabilityMissing(f"{type(self).__name__} cannot delete a queue (Adapter.delete)")


def deleted_queue(endpoint: Endpoint) -> str:
    """The name of the queue ``Adapter.delete`` removes; ``ConfigError`` for a topic, a subscription or a
    dead-letter destination alone (they go with their queue)."""
    if endpoint.kind != "queue" or endpoint.subscription is not None or endpoint.dead_letter or not endpoint.name:
        raise ConfigError(f"{endpoint}: only a work queue can be deleted (with its dead letters)")
    return endpoint.name
